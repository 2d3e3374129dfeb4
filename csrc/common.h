// Scalar helpers shared by the CPU and CUDA kernels; each mirrors a function in slimfit/reference.py.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace slimfit {

SF_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

SF_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// reference._hash32 (lowbias32).
SF_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// reference.uniform_from_seed for element i, with key = hash32(seed).
SF_HD float uniform_at(uint32_t key, int64_t i) {
  return static_cast<float>(hash32(static_cast<uint32_t>(i) + key) >> 8) * (1.0f / 16777216.0f);
}

// bfloat16 bits of v rounded toward +inf (up) or -inf (reference._round_to_bf16).
SF_HD uint16_t bf16_bits_directed(float v, bool up) {
  uint32_t bits = float_bits(v);
  uint32_t truncated = bits & 0xFFFF0000U;
  bool grow = (bits & 0xFFFFU) != 0 && ((v < 0.0f) != up);
  return static_cast<uint16_t>((grow ? truncated + 0x10000U : truncated) >> 16);
}

SF_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

constexpr uint16_t kBF16NaN = 0x7FC0;

// Per-group quantization parameters derived from the group's min/max (reference.quantize).
struct GroupParams {
  uint16_t scale_bits;
  uint16_t offset_bits;
  float offset;
  float inv_scale;
  bool finite;
};

SF_HD GroupParams group_params(float lo, float hi, bool finite, int levels) {
  // -0.0 + 0.0 is +0.0: which signed zero a min/max reduction returns is unspecified, its sum with +0 is not.
#ifdef __CUDA_ARCH__
  lo = __fadd_rn(lo, 0.0f);
  hi = __fadd_rn(hi, 0.0f);
#else
  lo += 0.0f;
  hi += 0.0f;
#endif
  GroupParams p;
  p.finite = finite;
  if (!finite) {
    p.scale_bits = kBF16NaN;
    p.offset_bits = kBF16NaN;
    p.offset = 0.0f;
    p.inv_scale = 0.0f;
    return p;
  }
  p.offset_bits = bf16_bits_directed(lo, false);
  p.offset = bf16_to_float(p.offset_bits);
  p.scale_bits = bf16_bits_directed((hi - p.offset) / static_cast<float>(levels), true);
  float scale = bf16_to_float(p.scale_bits);
  p.inv_scale = scale > 0.0f ? 1.0f / scale : 0.0f;
  return p;
}

}  // namespace slimfit

namespace slimfit {

// Parameters rebuilt from the stored bfloat16 scale and offset (identical to group_params' result).
SF_HD GroupParams params_from_bits(uint16_t scale_bits, uint16_t offset_bits) {
  GroupParams p;
  p.scale_bits = scale_bits;
  p.offset_bits = offset_bits;
  const float scale = bf16_to_float(scale_bits);
  p.finite = scale == scale;  // NaN marks a group that held NaN or Inf
  p.offset = p.finite ? bf16_to_float(offset_bits) : 0.0f;
  p.inv_scale = p.finite && scale > 0.0f ? 1.0f / scale : 0.0f;
  return p;
}

// Code of one element (reference.quantize): round-to-nearest-even or stochastic floor(v + u), clamped.
// Clamping to [0, levels] before rounding gives the same code as after (the bounds are integers; NaN -> 0),
// and lets the host round without a libm call: adding 1.5 * 2**23 rounds a value in [0, 2**22) to an
// integer, half to even, under the default rounding mode; float to int conversion truncates (floor for >= 0).
SF_HD uint32_t quantize_code(float x, const GroupParams& p, int levels, bool stochastic, uint32_t key, int64_t i) {
  if (!p.finite) return 0;
  const float v = (x - p.offset) * p.inv_scale;
  const float w = stochastic ? v + uniform_at(key, i) : v;
#ifdef __CUDA_ARCH__
  const float c = fminf(fmaxf(w, 0.0f), static_cast<float>(levels));
  return static_cast<uint32_t>(stochastic ? c : rintf(c));
#else
  // Comparisons instead of fminf/fmaxf (library calls without -ffinite-math-only); NaN -> 0 as with fmaxf.
  const float pos = w > 0.0f ? w : 0.0f;
  const float c = pos < static_cast<float>(levels) ? pos : static_cast<float>(levels);
  constexpr float kRoundMagic = 12582912.0f;
  return static_cast<uint32_t>(stochastic ? c : (c + kRoundMagic) - kRoundMagic);
#endif
}

// offset + code * scale, kept as two roundings on every backend (no fused multiply-add).
SF_HD float dequantize_code(uint32_t code, float scale, float offset) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(offset, __fmul_rn(static_cast<float>(code), scale));
#else
  return offset + static_cast<float>(code) * scale;
#endif
}

// Code of element i inside a packed byte stream (little-endian within each byte).
SF_HD uint32_t unpack_code(const uint8_t* codes, int64_t i, int bits) {
  const int per_byte = 8 / bits;
  return (codes[i / per_byte] >> ((i % per_byte) * bits)) & ((1U << bits) - 1U);
}

}  // namespace slimfit

namespace slimfit {

// Columns addressed by one uint16 sparse index (reference._INDEX_BLOCK).
constexpr int64_t kIndexBlock = 65536;

// Magnitude order used by sparsify (reference._magnitude_key): float bits without the sign, NaN above Inf.
SF_HD uint32_t magnitude_key(float v) { return float_bits(v) & 0x7FFFFFFFU; }

}  // namespace slimfit

namespace slimfit {

// update_norms: elements per work chunk (CPU task, CUDA block) and the per-pair result from its two sums.
constexpr int64_t kNormChunk = 1 << 16;

// Per-element terms in float64 on float32-converted inputs (reference.update_norms); rel_l1_mean adds only s0.
// `m < eps ? eps : m` keeps NaN like torch's clamp_min and maps to a vector max instruction.
template <bool kL2>
SF_HD void norm_terms(float before, float after, double eps, double& s0, double& s1) {
  const double b = static_cast<double>(before);
  const double d = static_cast<double>(after) - b;
  if (kL2) {
    s0 += d * d;
    s1 += b * b;
  } else {
    const double mag = fabs(b);
    s0 += fabs(d) / (mag < eps ? eps : mag);
  }
}

SF_HD float finish_norm(double s0, double s1, int64_t n, bool l2, double eps) {
  if (l2) {
    const double denom = sqrt(s1);
    return static_cast<float>(sqrt(s0) / (denom < eps ? eps : denom));
  }
  return n ? static_cast<float>(s0 / static_cast<double>(n)) : 0.0f;
}

}  // namespace slimfit
