// CUDA kernels for slimfit::pack_bits / slimfit::unpack_bits (format: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.h"

namespace slimfit {
namespace {

// One thread per output byte; eight 0/1 mask bytes are read as one uint64 when the mask is 8-byte aligned.
__global__ void pack_bits_kernel(const uint8_t* __restrict__ mask, int64_t n, bool aligned,
                                 uint8_t* __restrict__ packed, int64_t num_bytes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < num_bytes; b += stride) {
    uint32_t byte = 0;
    if (aligned && 8 * b + 8 <= n) {
      const uint64_t lanes = reinterpret_cast<const uint64_t*>(mask)[b];
      byte = static_cast<uint32_t>((lanes * 0x0102040810204080ULL) >> 56);  // see csrc/cpu/bits.cpp
    } else {
      for (int j = 0; j < 8 && 8 * b + j < n; ++j) byte |= static_cast<uint32_t>(mask[8 * b + j] != 0) << j;
    }
    packed[b] = static_cast<uint8_t>(byte);
  }
}

// One thread per packed byte; the eight bools are written as one uint64 (the output is freshly allocated).
__global__ void unpack_bits_kernel(const uint8_t* __restrict__ packed, int64_t n, uint8_t* __restrict__ mask,
                                   int64_t num_bytes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < num_bytes; b += stride) {
    const uint32_t byte = packed[b];
    if (8 * b + 8 <= n) {
      uint64_t lanes = 0;
      for (int j = 0; j < 8; ++j) lanes |= static_cast<uint64_t>((byte >> j) & 1U) << (8 * j);
      reinterpret_cast<uint64_t*>(mask)[b] = lanes;
    } else {
      for (int j = 0; 8 * b + j < n; ++j) mask[8 * b + j] = static_cast<uint8_t>((byte >> j) & 1U);
    }
  }
}

at::Tensor pack_bits_cuda(const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, "slimfit::pack_bits: mask must be bool, got ",
              mask_in.scalar_type());
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t n = mask.numel();
  const int64_t num_bytes = (n + 7) / 8;
  auto out = at::empty({num_bytes}, mask.options().dtype(at::kByte));
  if (n == 0) return out;
  const auto* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const bool aligned = reinterpret_cast<uintptr_t>(m) % 8 == 0;
  pack_bits_kernel<<<grid_for(num_bytes, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      m, n, aligned, out.data_ptr<uint8_t>(), num_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed_in, at::IntArrayRef shape) {
  const int64_t n = c10::multiply_integers(shape);
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.numel() == (n + 7) / 8,
              "slimfit::unpack_bits: packed must be uint8 with ceil(numel / 8) elements for shape ", shape);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  auto out = at::empty(shape, packed.options().dtype(at::kBool));
  if (n == 0) return out;
  const int64_t num_bytes = packed.numel();
  unpack_bits_kernel<<<grid_for(num_bytes, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), n, reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), num_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CUDA, m) {
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
}

}  // namespace slimfit
