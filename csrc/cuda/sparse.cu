// CUDA kernels for slimfit::sparsify / slimfit::densify (format: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../common.h"
#include "launch.h"

namespace slimfit {
namespace {

// Exclusive prefix sum of `v` over the block (warp shuffles, then one warp over the warp totals);
// `total` receives the block's sum. Every thread of the block must call it.
__device__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int inclusive = v;
  for (int d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(0xffffffffU, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int s = lane < warps ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d *= 2) {
      const int up = __shfl_up_sync(0xffffffffU, s, d);
      if (lane >= d) s += up;
    }
    warp_sums[lane] = s;
  }
  __syncthreads();
  const int before = warp ? warp_sums[warp - 1] : 0;
  total = warp_sums[warps - 1];
  __syncthreads();
  return before + inclusive - v;
}

// One block per row. A 4-pass radix select (8 bits of the magnitude key per pass) finds the k-th largest key
// T and how many entries equal to T are kept (the lowest columns); a final pass writes kept entries in
// column order, positions from block-wide prefix sums.
template <typename scalar_t>
__global__ void sparsify_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t n, int64_t k,
                                scalar_t* __restrict__ values, int16_t* __restrict__ indices,
                                int32_t* __restrict__ block_offsets, int64_t num_blocks) {
  __shared__ int hist[256];
  __shared__ int warp_sums[32];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_remaining;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* row = x + r * n;
    uint32_t prefix = 0, mask = 0;
    int64_t remaining = k;  // entries still to take among those whose key matches `prefix` under `mask`
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const uint32_t key = magnitude_key(static_cast<float>(row[j]));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFU], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t above = 0;
        int d = 255;
        for (; d > 0 && above + hist[d] < remaining; --d) above += hist[d];
        s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
        s_remaining = remaining - above;
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= 0xFFU << shift;
    }
    int64_t kept_before = 0, equal_before = 0;
    for (int64_t base = 0; base < n; base += blockDim.x) {
      const int64_t j = base + threadIdx.x;
      const uint32_t key = j < n ? magnitude_key(static_cast<float>(row[j])) : 0U;
      const bool equal = j < n && key == prefix;
      int equal_total, keep_total;
      const int equal_rank = block_exclusive_scan(equal, warp_sums, equal_total);
      const bool keep = (j < n && key > prefix) || (equal && equal_before + equal_rank < remaining);
      const int pos = block_exclusive_scan(keep, warp_sums, keep_total);
      if (num_blocks && j < n && j % kIndexBlock == 0) {
        block_offsets[r * num_blocks + j / kIndexBlock] = static_cast<int32_t>(kept_before + pos);
      }
      if (keep) {
        values[r * k + kept_before + pos] = row[j];
        indices[r * k + kept_before + pos] = static_cast<int16_t>(static_cast<uint16_t>(j & (kIndexBlock - 1)));
      }
      kept_before += keep_total;
      equal_before += equal_total;
    }
  }
}

// One thread per kept entry; the entry's 65536-column block is found by binary search in block_offsets.
// Columns outside the row (a corrupted container) are skipped rather than written out of bounds.
template <typename scalar_t>
__global__ void densify_kernel(const scalar_t* __restrict__ values, const int16_t* __restrict__ indices,
                               const int32_t* __restrict__ block_offsets, int64_t rows, int64_t k, int64_t n,
                               int64_t num_blocks, scalar_t* __restrict__ out) {
  const int64_t total = rows * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / k, j = e % k;
    int64_t col = static_cast<uint16_t>(indices[e]);
    if (num_blocks) {
      const int32_t* starts = block_offsets + r * num_blocks;
      int64_t lo = 0, hi = num_blocks;  // first block whose start is > j
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (starts[mid] <= j) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      col += (lo - 1) * kIndexBlock;
    }
    if (col >= 0 && col < n) out[r * n + col] = values[e];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsify_cuda(const at::Tensor& x_in, int64_t k) {
  const RowLayout layout = check_sparsify_args(x_in, k);
  const int64_t rows = layout.rows, n = layout.n, num_blocks = layout.num_blocks;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor values, indices, block_offsets;
  std::tie(values, indices, block_offsets) = empty_sparse(x, layout, k);
  if (rows == 0 || k == 0) return {values, indices, block_offsets};
  const int grid = static_cast<int>(std::min<int64_t>(rows, 65535LL * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "slimfit_sparsify_cuda", [&] {
    sparsify_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), rows, n, k, values.data_ptr<scalar_t>(), indices.data_ptr<int16_t>(),
        block_offsets.data_ptr<int32_t>(), num_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices, block_offsets};
}

at::Tensor densify_cuda(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
                        at::IntArrayRef shape) {
  const RowLayout layout = check_densify_args(values_in, indices_in, offsets_in, shape);
  const int64_t rows = layout.rows, n = layout.n, num_blocks = layout.num_blocks;
  const int64_t k = values_in.size(1);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  auto out = at::zeros(shape, values.options());
  if (rows * k == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "slimfit_densify_cuda", [&] {
    densify_kernel<scalar_t><<<grid_for(rows * k, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        values.data_ptr<scalar_t>(), indices.data_ptr<int16_t>(), offsets.data_ptr<int32_t>(), rows, k, n,
        num_blocks, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CUDA, m) {
  m.impl("sparsify", &sparsify_cuda);
  m.impl("densify", &densify_cuda);
}

}  // namespace slimfit
