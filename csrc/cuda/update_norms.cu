// CUDA kernel for slimfit::update_norms (definition: slimfit/reference.py): every pair in one launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "launch.h"

namespace slimfit {
namespace {

// Per-pair metadata, copied to the device once per call (multi-tensor style).
struct NormPair {
  const void* before;
  const void* after;
  int64_t numel;
  int64_t first_chunk;  // chunks of kNormChunk elements; pair p owns [first_chunk, next pair's first_chunk)
  int32_t dtype;        // 0 float32, 1 float16, 2 bfloat16
};

template <typename scalar_t, bool kL2>
__device__ void accumulate(const NormPair& p, int64_t begin, int64_t end, double eps, double& s0, double& s1) {
  const auto* b = static_cast<const scalar_t*>(p.before);
  const auto* a = static_cast<const scalar_t*>(p.after);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    norm_terms<kL2>(static_cast<float>(b[i]), static_cast<float>(a[i]), eps, s0, s1);
  }
}

// Fixed-order block sum (the same result on every run).
__device__ void block_sum(double& s0, double& s1, double* shared) {
  for (int d = 16; d > 0; d /= 2) {
    s0 += __shfl_down_sync(0xffffffffU, s0, d);
    s1 += __shfl_down_sync(0xffffffffU, s1, d);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared[2 * warp] = s0;
    shared[2 * warp + 1] = s1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      s0 += shared[2 * w];
      s1 += shared[2 * w + 1];
    }
  }
  __syncthreads();
}

// Blocks stride over all chunks of all pairs and store each chunk's two sums; the last block to finish
// (atomic ticket after a fence) adds each pair's chunk sums in chunk order and writes the results.
__global__ void update_norms_kernel(const NormPair* __restrict__ pairs, int64_t num_pairs, int64_t num_chunks,
                                    bool l2, double eps, double* __restrict__ partial,
                                    unsigned int* __restrict__ ticket, float* __restrict__ out) {
  __shared__ double shared[2 * kWarpsPerBlock];
  __shared__ bool last;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    int64_t lo = 0, hi = num_pairs;  // the pair owning chunk c: last with first_chunk <= c
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (pairs[mid].first_chunk <= c) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const NormPair p = pairs[lo];
    const int64_t begin = (c - p.first_chunk) * kNormChunk;
    const int64_t end = min(p.numel, begin + kNormChunk);
    double s0 = 0.0, s1 = 0.0;
    if (p.dtype == 0) {
      l2 ? accumulate<float, true>(p, begin, end, eps, s0, s1) : accumulate<float, false>(p, begin, end, eps, s0, s1);
    } else if (p.dtype == 1) {
      l2 ? accumulate<at::Half, true>(p, begin, end, eps, s0, s1)
         : accumulate<at::Half, false>(p, begin, end, eps, s0, s1);
    } else {
      l2 ? accumulate<at::BFloat16, true>(p, begin, end, eps, s0, s1)
         : accumulate<at::BFloat16, false>(p, begin, end, eps, s0, s1);
    }
    block_sum(s0, s1, shared);
    if (threadIdx.x == 0) {
      partial[2 * c] = s0;
      partial[2 * c + 1] = s1;
    }
  }
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(ticket, 1U) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int lane = threadIdx.x % 32;
  for (int64_t q = threadIdx.x / 32; q < num_pairs; q += kWarpsPerBlock) {
    const int64_t first = pairs[q].first_chunk;
    const int64_t stop = q + 1 < num_pairs ? pairs[q + 1].first_chunk : num_chunks;
    double s0 = 0.0, s1 = 0.0;
    for (int64_t c = first + lane; c < stop; c += 32) {
      s0 += __ldcg(partial + 2 * c);  // L2 reads: other blocks wrote these
      s1 += __ldcg(partial + 2 * c + 1);
    }
    for (int d = 16; d > 0; d /= 2) {
      s0 += __shfl_down_sync(0xffffffffU, s0, d);
      s1 += __shfl_down_sync(0xffffffffU, s1, d);
    }
    if (lane == 0) out[q] = finish_norm(s0, s1, pairs[q].numel, l2, eps);
  }
}

int32_t dtype_code(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "slimfit::update_norms: tensors must be float32, float16 or bfloat16, got ", t);
  return t == at::kFloat ? 0 : t == at::kHalf ? 1 : 2;
}

at::Tensor update_norms_cuda(at::TensorList before_in, at::TensorList after_in, c10::string_view metric,
                             double eps) {
  check_update_norms_args(before_in, after_in, metric);
  TORCH_CHECK(!before_in.empty(), "slimfit::update_norms: the CUDA kernel needs at least one pair");
  const at::Device device = before_in[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t num_pairs = static_cast<int64_t>(before_in.size());
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided inputs, alive until the launch is queued
  auto meta = at::empty({num_pairs * static_cast<int64_t>(sizeof(NormPair))},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* host = reinterpret_cast<NormPair*>(meta.data_ptr<uint8_t>());
  int64_t num_chunks = 0;
  for (int64_t p = 0; p < num_pairs; ++p) {
    const at::Tensor& b = before_in[p];
    const at::Tensor& a = after_in[p];
    keep_alive.push_back(b.contiguous());
    keep_alive.push_back(a.contiguous());
    host[p] = NormPair{keep_alive[2 * p].data_ptr(), keep_alive[2 * p + 1].data_ptr(), b.numel(), num_chunks,
                       dtype_code(b.scalar_type())};
    num_chunks += (b.numel() + kNormChunk - 1) / kNormChunk;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto on_device = at::TensorOptions().device(device);
  auto pairs = meta.to(on_device.dtype(at::kByte), /*non_blocking=*/true);
  // Chunk sums (2 doubles per chunk) followed by the ticket counter, which must start at zero.
  auto workspace = at::empty({2 * num_chunks + 1}, on_device.dtype(at::kDouble));
  auto* partial = workspace.data_ptr<double>();
  auto* ticket = reinterpret_cast<unsigned int*>(partial + 2 * num_chunks);
  C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  auto out = at::empty({num_pairs}, on_device.dtype(at::kFloat));
  const int grid = static_cast<int>(std::min<int64_t>(std::max<int64_t>(num_chunks, 1), 4096));
  update_norms_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const NormPair*>(pairs.data_ptr<uint8_t>()),
                                                     num_pairs, num_chunks, metric == "rel_l2", eps, partial,
                                                     ticket, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CUDA, m) { m.impl("update_norms", &update_norms_cuda); }

}  // namespace slimfit
