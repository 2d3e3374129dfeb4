// CUDA kernels for slimfit::quantize / slimfit::dequantize (format: slimfit/reference.py).
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

// Unsigned integer type of a given byte width, for single vector loads and stores.
template <int kBytes>
struct Raw;
template <>
struct Raw<1> {
  using type = uint8_t;
};
template <>
struct Raw<2> {
  using type = uint16_t;
};
template <>
struct Raw<4> {
  using type = uint32_t;
};
template <>
struct Raw<8> {
  using type = uint2;
};
template <>
struct Raw<16> {
  using type = uint4;
};

// Groups whose tiles fit kCachedTiles stay in registers between the min/max and the quantize step; longer
// groups are read again (from L1/L2).
constexpr int kCachedTiles = 4;

// V consecutive elements starting at i0 (a multiple of V) as floats; one aligned vector load when all V are
// inside the group, element loads at the group's ragged end.
template <typename scalar_t, int V>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ x, int64_t i0, int64_t end, float (&v)[V]) {
  if (i0 + V <= end) {
    using RawT = typename Raw<V * sizeof(scalar_t)>::type;
    alignas(16) scalar_t vals[V];
    *reinterpret_cast<RawT*>(vals) = *reinterpret_cast<const RawT*>(x + i0);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = static_cast<float>(vals[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = i0 + e < end ? static_cast<float>(x[i0 + e]) : 0.0f;
  }
}

template <int V>
__device__ __forceinline__ void scan_tile(const float (&v)[V], int64_t i0, int64_t end, float& lo, float& hi,
                                          float& bad) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (i0 + e < end) {
      lo = fminf(lo, v[e]);
      hi = fmaxf(hi, v[e]);
      bad += v[e] * 0.0f;  // NaN for NaN or +-Inf inputs
    }
  }
}

// Quantizes and stores V codes. When V codes fill whole bytes the lane stores them with one aligned store;
// otherwise `share` neighbouring lanes OR their codes into one byte with shuffles (all lanes must call).
template <int V>
__device__ __forceinline__ void store_tile(const float (&v)[V], int64_t i0, int64_t end, const GroupParams& p,
                                           int bits, bool stochastic, uint32_t key, uint8_t* __restrict__ codes) {
  const int levels = (1 << bits) - 1;
  uint64_t packed = 0;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (i0 + e < end) {
      packed |= static_cast<uint64_t>(quantize_code(v[e], p, levels, stochastic, key, i0 + e)) << (e * bits);
    }
  }
  const int tile_bits = V * bits;
  if (tile_bits < 8) {
    const int share = 8 / tile_bits;
    const int lane = threadIdx.x % 32;
    packed <<= (lane % share) * tile_bits;
    for (int d = 1; d < share; d *= 2) packed |= __shfl_down_sync(0xffffffffU, packed, d);
    if (lane % share == 0 && i0 < end) codes[i0 * bits / 8] = static_cast<uint8_t>(packed);
    return;
  }
  uint8_t* out = codes + i0 * bits / 8;
  if (i0 + V <= end) {
    switch (tile_bits / 8) {
      case 1:
        *out = static_cast<uint8_t>(packed);
        break;
      case 2:
        *reinterpret_cast<uint16_t*>(out) = static_cast<uint16_t>(packed);
        break;
      case 4:
        *reinterpret_cast<uint32_t*>(out) = static_cast<uint32_t>(packed);
        break;
      default:
        *reinterpret_cast<uint2*>(out) = make_uint2(static_cast<uint32_t>(packed), static_cast<uint32_t>(packed >> 32));
    }
  } else if (i0 < end) {
    const int64_t bytes = ((end - i0) * bits + 7) / 8;
    for (int64_t b = 0; b < bytes; ++b) out[b] = static_cast<uint8_t>(packed >> (8 * b));
  }
}

// Fused single pass for groups that start on a byte boundary: one warp per group (grid-stride), each lane
// loads V consecutive elements per tile with one vector load, warp-shuffle min/max, then the lane quantizes
// and packs its cached elements. The group's bytes belong to its warp alone.
template <typename scalar_t, int V>
__global__ void fused_quantize_kernel(const scalar_t* __restrict__ x, int64_t n, int bits, int64_t group_size,
                                      int64_t num_groups, bool stochastic, uint32_t key, uint16_t* __restrict__ scale,
                                      uint16_t* __restrict__ offset, uint8_t* __restrict__ codes) {
  const int lane = threadIdx.x % 32;
  const int levels = (1 << bits) - 1;
  constexpr int64_t kTile = 32 * V;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; g < num_groups; g += warps) {
    const int64_t begin = g * group_size;
    const int64_t end = min(n, begin + group_size);
    const int64_t tiles = (end - begin + kTile - 1) / kTile;
    float cache[kCachedTiles][V];
    float lo = INFINITY, hi = -INFINITY, bad = 0.0f;
#pragma unroll
    for (int t = 0; t < kCachedTiles; ++t) {
      if (t < tiles) {
        const int64_t i0 = begin + t * kTile + lane * V;
        load_tile<scalar_t, V>(x, i0, end, cache[t]);
        scan_tile<V>(cache[t], i0, end, lo, hi, bad);
      }
    }
    for (int64_t t = kCachedTiles; t < tiles; ++t) {
      const int64_t i0 = begin + t * kTile + lane * V;
      float v[V];
      load_tile<scalar_t, V>(x, i0, end, v);
      scan_tile<V>(v, i0, end, lo, hi, bad);
    }
    for (int delta = 16; delta > 0; delta /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffU, lo, delta));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffU, hi, delta));
      bad += __shfl_xor_sync(0xffffffffU, bad, delta);
    }
    const GroupParams p = group_params(lo, hi, bad == 0.0f, levels);
    if (lane == 0) {
      scale[g] = p.scale_bits;
      offset[g] = p.offset_bits;
    }
#pragma unroll
    for (int t = 0; t < kCachedTiles; ++t) {
      if (t < tiles) store_tile<V>(cache[t], begin + t * kTile + lane * V, end, p, bits, stochastic, key, codes);
    }
    for (int64_t t = kCachedTiles; t < tiles; ++t) {
      const int64_t i0 = begin + t * kTile + lane * V;
      float v[V];
      load_tile<scalar_t, V>(x, i0, end, v);
      store_tile<V>(v, i0, end, p, bits, stochastic, key, codes);
    }
  }
}

// Widest V (elements per lane and vector load) that keeps loads aligned, tiles inside groups and a warp's
// tile no longer than a group.
template <typename scalar_t>
int pick_vector_width(const scalar_t* x, int64_t group_size) {
  int v = 16 / static_cast<int>(sizeof(scalar_t));
  while (v > 1 && (group_size % v != 0 || reinterpret_cast<uintptr_t>(x) % (v * sizeof(scalar_t)) != 0 ||
                   32 * v > group_size)) {
    v /= 2;
  }
  return v;
}

struct QuantizeArgs {
  int64_t n;
  int bits;
  int64_t group_size;
  int64_t num_groups;
  bool stochastic;
  uint32_t key;
  uint16_t* scale;
  uint16_t* offset;
  uint8_t* codes;
};

template <typename scalar_t, int V>
void launch_fused(const scalar_t* x, const QuantizeArgs& a, cudaStream_t stream) {
  fused_quantize_kernel<scalar_t, V><<<grid_for(a.num_groups, kWarpsPerBlock), kThreads, 0, stream>>>(
      x, a.n, a.bits, a.group_size, a.num_groups, a.stochastic, a.key, a.scale, a.offset, a.codes);
}

template <typename scalar_t>
void launch_fused_quantize(const scalar_t* x, const QuantizeArgs& a, cudaStream_t stream) {
  switch (pick_vector_width(x, a.group_size)) {
    case 8:
      if constexpr (sizeof(scalar_t) == 2) launch_fused<scalar_t, 8>(x, a, stream);
      break;
    case 4:
      if constexpr (sizeof(scalar_t) <= 4) launch_fused<scalar_t, 4>(x, a, stream);
      break;
    case 2:
      launch_fused<scalar_t, 2>(x, a, stream);
      break;
    default:
      launch_fused<scalar_t, 1>(x, a, stream);
  }
}

// Generic two-kernel path for groups that do not start on a byte boundary (a byte may straddle two groups).
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

// One thread per 8 consecutive elements: their `bits` code bytes in one load (when the codes are 8-byte
// aligned), one 64-bit division for the group index, and the 8 outputs in 16-byte stores.
constexpr int kDequantPerThread = 8;

template <typename scalar_t>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, bool codes_aligned,
                                  const uint16_t* __restrict__ scale, const uint16_t* __restrict__ offset, int bits,
                                  int64_t group_size, int64_t n, scalar_t* __restrict__ y) {
  constexpr int kE = kDequantPerThread;
  const int64_t chunks = (n + kE - 1) / kE;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint32_t mask = (1U << bits) - 1U;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks; c += stride) {
    const int64_t i0 = c * kE;
    const bool full = i0 + kE <= n;
    const uint8_t* src = codes + c * bits;  // kE * bits / 8 bytes
    uint64_t packed = 0;
    if (full && codes_aligned) {
      if (bits == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(src);
        packed = w.x | (static_cast<uint64_t>(w.y) << 32);
      } else if (bits == 4) {
        packed = *reinterpret_cast<const uint32_t*>(src);
      } else {
        packed = *reinterpret_cast<const uint16_t*>(src);
      }
    } else {
      const int64_t bytes = full ? bits : ((n - i0) * bits + 7) / 8;
      for (int64_t b = 0; b < bytes; ++b) packed |= static_cast<uint64_t>(src[b]) << (8 * b);
    }
    int64_t g = i0 / group_size;
    int64_t next = (g + 1) * group_size;  // first element of the following group
    float s = bf16_to_float(scale[g]), o = bf16_to_float(offset[g]);
    alignas(16) scalar_t vals[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      if (i0 + e == next) {  // elements advance by one, so a group boundary is met exactly
        ++g;
        next += group_size;
        if (i0 + e < n) {
          s = bf16_to_float(scale[g]);
          o = bf16_to_float(offset[g]);
        }
      }
      vals[e] = static_cast<scalar_t>(dequantize_code(static_cast<uint32_t>(packed >> (e * bits)) & mask, s, o));
    }
    if (full) {
      constexpr int kVectors = kE * sizeof(scalar_t) / 16;
#pragma unroll
      for (int v = 0; v < kVectors; ++v) reinterpret_cast<uint4*>(y + i0)[v] = reinterpret_cast<const uint4*>(vals)[v];
    } else {
      for (int e = 0; i0 + e < n; ++e) y[i0 + e] = vals[e];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x_in, int64_t bits,
                                                             int64_t group_size, std::optional<int64_t> seed) {
  check_quant_args("quantize", bits, group_size);
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
    if ((group_size * bits) % 8 == 0) {
      const QuantizeArgs args{n, static_cast<int>(bits), group_size, num_groups, seed.has_value(), key, s, o,
                              codes.data_ptr<uint8_t>()};
      launch_fused_quantize<scalar_t>(x.data_ptr<scalar_t>(), args, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
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
  const int64_t n = check_dequantize_args(codes_in, scale_in, offset_in, bits, group_size, shape);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(), offset = offset_in.contiguous();
  auto out = at::empty(shape, codes.options().dtype(dtype));
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "slimfit_dequantize_cuda", [&] {
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const bool aligned = reinterpret_cast<uintptr_t>(c) % 8 == 0;
    dequantize_kernel<scalar_t><<<grid_for((n + kDequantPerThread - 1) / kDequantPerThread, kThreads), kThreads, 0,
                                  stream>>>(
        c, aligned, reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>()),
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
