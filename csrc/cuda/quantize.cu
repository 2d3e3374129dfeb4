// CUDA kernels for slimfit::quantize / slimfit::dequantize (format: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"

namespace slimfit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

int grid_for(int64_t work_items, int items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 8));
}

// One warp per group: min/max reduction with shuffles, then the group's bfloat16 scale and offset.
template <typename scalar_t>
__global__ void group_params_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t group_size,
                                    int64_t num_groups, int levels, uint16_t* __restrict__ scale,
                                    uint16_t* __restrict__ offset) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; g < num_groups; g += warps) {
    const int64_t begin = g * group_size;
    const int64_t end = min(n, begin + group_size);
    float lo = INFINITY, hi = -INFINITY, bad = 0.0f;
    for (int64_t i = begin + lane; i < end; i += 32) {
      const float v = static_cast<float>(x[i]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
      bad += v * 0.0f;
    }
    for (int delta = 16; delta > 0; delta /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffU, lo, delta));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffU, hi, delta));
      bad += __shfl_xor_sync(0xffffffffU, bad, delta);
    }
    if (lane == 0) {
      const GroupParams p = group_params(lo, hi, bad == 0.0f, levels);
      scale[g] = p.scale_bits;
      offset[g] = p.offset_bits;
    }
  }
}

// One thread per output byte: quantizes the byte's elements with their groups' parameters.
template <typename scalar_t>
__global__ void codes_kernel(const scalar_t* __restrict__ x, int64_t n, int bits, int64_t group_size,
                             bool stochastic, uint32_t key, const uint16_t* __restrict__ scale,
                             const uint16_t* __restrict__ offset, uint8_t* __restrict__ codes, int64_t num_bytes) {
  const int per_byte = 8 / bits;
  const int levels = (1 << bits) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < num_bytes; b += stride) {
    uint32_t byte = 0;
    for (int slot = 0; slot < per_byte; ++slot) {
      const int64_t i = b * per_byte + slot;
      if (i >= n) break;
      const int64_t g = i / group_size;
      const GroupParams p = params_from_bits(scale[g], offset[g]);
      byte |= quantize_code(static_cast<float>(x[i]), p, levels, stochastic, key, i) << (slot * bits);
    }
    codes[b] = static_cast<uint8_t>(byte);
  }
}

template <typename scalar_t>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const uint16_t* __restrict__ scale,
                                  const uint16_t* __restrict__ offset, int bits, int64_t group_size, int64_t n,
                                  scalar_t* __restrict__ y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t g = i / group_size;
    y[i] = static_cast<scalar_t>(
        dequantize_code(unpack_code(codes, i, bits), bf16_to_float(scale[g]), bf16_to_float(offset[g])));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x_in, int64_t bits,
                                                             int64_t group_size, std::optional<int64_t> seed) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "slimfit::quantize: bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0, "slimfit::quantize: group_size must be positive, got ", group_size);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t num_groups = (n + group_size - 1) / group_size;
  const int64_t num_bytes = (n * bits + 7) / 8;
  auto codes = at::empty({num_bytes}, x.options().dtype(at::kByte));
  auto scale = at::empty({num_groups}, x.options().dtype(at::kBFloat16));
  auto offset = at::empty({num_groups}, x.options().dtype(at::kBFloat16));
  if (n == 0) return {codes, scale, offset};
  const uint32_t key = hash32(static_cast<uint32_t>(seed.value_or(0)));
  auto* s = reinterpret_cast<uint16_t*>(scale.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(offset.data_ptr<at::BFloat16>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "slimfit_quantize_cuda", [&] {
    group_params_kernel<scalar_t><<<grid_for(num_groups, kWarpsPerBlock), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), n, group_size, num_groups, (1 << bits) - 1, s, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    codes_kernel<scalar_t><<<grid_for(num_bytes, kThreads), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), n, static_cast<int>(bits), group_size, seed.has_value(), key, s, o,
        codes.data_ptr<uint8_t>(), num_bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, scale, offset};
}

at::Tensor dequantize_cuda(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& offset_in,
                           int64_t bits, int64_t group_size, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "slimfit::dequantize: bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0, "slimfit::dequantize: group_size must be positive, got ", group_size);
  const int64_t n = c10::multiply_integers(shape);
  const int64_t num_groups = (n + group_size - 1) / group_size;
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.numel() == (n * bits + 7) / 8,
              "slimfit::dequantize: codes must be uint8 with ceil(numel * bits / 8) elements");
  TORCH_CHECK(scale_in.scalar_type() == at::kBFloat16 && offset_in.scalar_type() == at::kBFloat16 &&
                  scale_in.numel() == num_groups && offset_in.numel() == num_groups,
              "slimfit::dequantize: scale and offset must be bfloat16 with ceil(numel / group_size) elements");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(), offset = offset_in.contiguous();
  auto out = at::empty(shape, codes.options().dtype(dtype));
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "slimfit_dequantize_cuda", [&] {
    dequantize_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>()),
        reinterpret_cast<const uint16_t*>(offset.data_ptr<at::BFloat16>()), static_cast<int>(bits), group_size, n,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace slimfit
