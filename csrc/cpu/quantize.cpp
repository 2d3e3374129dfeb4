// CPU kernels for slimfit::quantize / slimfit::dequantize (format: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <type_traits>

#include "../checks.h"
#include "../common.h"

namespace slimfit {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

template <typename scalar_t>
GroupParams scan_group(const scalar_t* x, int64_t begin, int64_t end, int levels) {
  // Eight independent lanes let the compiler vectorise the min/max reduction without fast-math.
  constexpr int kLanes = 8;
  float lo[kLanes], hi[kLanes], bad[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lo[l] = INFINITY;
    hi[l] = -INFINITY;
    bad[l] = 0.0f;
  }
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float v = static_cast<float>(x[i + l]);
      lo[l] = v < lo[l] ? v : lo[l];
      hi[l] = v > hi[l] ? v : hi[l];
      bad[l] += v * 0.0f;  // NaN for NaN or +-Inf inputs
    }
  }
  for (; i < end; ++i) {
    float v = static_cast<float>(x[i]);
    lo[0] = v < lo[0] ? v : lo[0];
    hi[0] = v > hi[0] ? v : hi[0];
    bad[0] += v * 0.0f;
  }
  float group_lo = lo[0], group_hi = hi[0], group_bad = bad[0];
  for (int l = 1; l < kLanes; ++l) {
    group_lo = std::fmin(group_lo, lo[l]);
    group_hi = std::fmax(group_hi, hi[l]);
    group_bad += bad[l];
  }
  return group_params(group_lo, group_hi, group_bad == 0.0f, levels);
}

// Codes of whole bytes [i, stop) of one group (i and stop on byte boundaries). kBits is a compile-time
// constant so the per-byte loop unrolls and the finite/stochastic branches hoist out of the loop.
template <int kBits, typename scalar_t>
void quantize_bytes(const scalar_t* x, int64_t i, int64_t stop, const GroupParams& p, bool stochastic, uint32_t key,
                    uint8_t* codes) {
  constexpr int kPerByte = 8 / kBits;
  constexpr int kLevels = (1 << kBits) - 1;
  for (; i < stop; i += kPerByte) {
    uint32_t byte = 0;
    for (int s = 0; s < kPerByte; ++s) {
      byte |= quantize_code(static_cast<float>(x[i + s]), p, kLevels, stochastic, key, i + s) << (s * kBits);
    }
    codes[i / kPerByte] = static_cast<uint8_t>(byte);
  }
}

template <typename scalar_t>
void quantize_kernel(const scalar_t* x, int64_t n, int bits, int64_t group_size, bool stochastic, uint32_t key,
                     uint8_t* codes, uint16_t* scale, uint16_t* offset) {
  const int levels = (1 << bits) - 1;
  const int per_byte = 8 / bits;
  const int64_t num_groups = (n + group_size - 1) / group_size;
  // Groups are processed in runs that start on a byte boundary so no byte is shared between threads.
  const int64_t run = per_byte / std::gcd<int64_t>(group_size, per_byte);
  const int64_t num_runs = (num_groups + run - 1) / run;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (run * group_size));
  at::parallel_for(0, num_runs, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g_end = std::min(num_groups, (r + 1) * run);
      uint32_t pending = 0;  // bits of a byte that straddles two groups
      // Element by element, for the partial bytes at a group's edges.
      auto add_code = [&](int64_t i, const GroupParams& p) {
        const int slot = static_cast<int>(i % per_byte);
        pending |= quantize_code(static_cast<float>(x[i]), p, levels, stochastic, key, i) << (slot * bits);
        if (slot == per_byte - 1 || i == n - 1) {
          codes[i / per_byte] = static_cast<uint8_t>(pending);
          pending = 0;
        }
      };
      for (int64_t g = r * run; g < g_end; ++g) {
        const int64_t begin = g * group_size;
        const int64_t end = std::min(n, begin + group_size);
        const GroupParams p = scan_group(x, begin, end, levels);
        scale[g] = p.scale_bits;
        offset[g] = p.offset_bits;
        int64_t i = begin;
        for (; i < end && i % per_byte != 0; ++i) add_code(i, p);
        const int64_t stop = i + (end - i) / per_byte * per_byte;
        if (bits == 8) {
          quantize_bytes<8>(x, i, stop, p, stochastic, key, codes);
        } else if (bits == 4) {
          quantize_bytes<4>(x, i, stop, p, stochastic, key, codes);
        } else {
          quantize_bytes<2>(x, i, stop, p, stochastic, key, codes);
        }
        for (i = stop; i < end; ++i) add_code(i, p);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x_in, int64_t bits, int64_t group_size,
                                                            std::optional<int64_t> seed) {
  check_quant_args("quantize", bits, group_size);
  TORCH_CHECK(x_in.device().is_cpu(), "slimfit::quantize (CPU kernel): x must be on CPU");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t num_groups = (n + group_size - 1) / group_size;
  auto codes = at::empty({(n * bits + 7) / 8}, x.options().dtype(at::kByte));
  auto scale = at::empty({num_groups}, x.options().dtype(at::kBFloat16));
  auto offset = at::empty({num_groups}, x.options().dtype(at::kBFloat16));
  if (n == 0) return {codes, scale, offset};
  const uint32_t key = hash32(static_cast<uint32_t>(seed.value_or(0)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "slimfit_quantize_cpu", [&] {
    quantize_kernel<scalar_t>(x.data_ptr<scalar_t>(), n, static_cast<int>(bits), group_size, seed.has_value(), key,
                              codes.data_ptr<uint8_t>(), reinterpret_cast<uint16_t*>(scale.data_ptr<at::BFloat16>()),
                              reinterpret_cast<uint16_t*>(offset.data_ptr<at::BFloat16>()));
  });
  return {codes, scale, offset};
}

at::Tensor dequantize_cpu(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& offset_in,
                          int64_t bits, int64_t group_size, at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_dequantize_args(codes_in, scale_in, offset_in, bits, group_size, shape);
  const int64_t num_groups = (n + group_size - 1) / group_size;
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(), offset = offset_in.contiguous();
  auto out = at::empty(shape, codes.options().dtype(dtype));
  if (n == 0) return out;
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* o = reinterpret_cast<const uint16_t*>(offset.data_ptr<at::BFloat16>());
  const int b = static_cast<int>(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "slimfit_dequantize_cpu", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / group_size);
    at::parallel_for(0, num_groups, grain, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const float gs = bf16_to_float(s[g]), go = bf16_to_float(o[g]);
        const int64_t end = std::min(n, (g + 1) * group_size);
        // A compile-time bit width turns the code lookup into shifts and masks.
        auto decode = [&](auto bits_constant) {
          for (int64_t i = g * group_size; i < end; ++i) {
            y[i] = static_cast<scalar_t>(dequantize_code(unpack_code(c, i, bits_constant.value), gs, go));
          }
        };
        if (b == 8) {
          decode(std::integral_constant<int, 8>{});
        } else if (b == 4) {
          decode(std::integral_constant<int, 4>{});
        } else {
          decode(std::integral_constant<int, 2>{});
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace slimfit
