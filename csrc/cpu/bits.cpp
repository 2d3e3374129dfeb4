// CPU kernels for slimfit::pack_bits / slimfit::unpack_bits (format: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>

namespace slimfit {
namespace {

constexpr int64_t kGrainBytes = 1 << 14;

// Eight 0/1 bytes (little-endian in a uint64) to one byte: the product moves byte j's bit to bit 56 + j
// without carries (every partial product lands on a distinct bit).
inline uint8_t pack8(uint64_t lanes) { return static_cast<uint8_t>((lanes * 0x0102040810204080ULL) >> 56); }

// Byte b to eight 0/1 bytes, as one uint64 per byte value.
const std::array<uint64_t, 256>& spread_table() {
  static const std::array<uint64_t, 256> table = [] {
    std::array<uint64_t, 256> t{};
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 8; ++j) t[b] |= static_cast<uint64_t>((b >> j) & 1) << (8 * j);
    }
    return t;
  }();
  return table;
}

at::Tensor pack_bits_cpu(const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, "slimfit::pack_bits: mask must be bool, got ",
              mask_in.scalar_type());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t n = mask.numel();
  const int64_t full = n / 8;
  auto out = at::empty({(n + 7) / 8}, mask.options().dtype(at::kByte));
  if (n == 0) return out;
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint8_t* p = out.data_ptr<uint8_t>();
  at::parallel_for(0, full, kGrainBytes, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint64_t lanes;
      std::memcpy(&lanes, m + 8 * b, sizeof(lanes));
      p[b] = pack8(lanes);
    }
  });
  if (full * 8 < n) {
    uint64_t lanes = 0;
    std::memcpy(&lanes, m + 8 * full, static_cast<size_t>(n - 8 * full));
    p[full] = pack8(lanes);
  }
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed_in, at::IntArrayRef shape) {
  const int64_t n = c10::multiply_integers(shape);
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.numel() == (n + 7) / 8,
              "slimfit::unpack_bits: packed must be uint8 with ceil(numel / 8) elements for shape ", shape);
  const at::Tensor packed = packed_in.contiguous();
  auto out = at::empty(shape, packed.options().dtype(at::kBool));
  if (n == 0) return out;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* m = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const auto& table = spread_table();
  const int64_t full = n / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) std::memcpy(m + 8 * b, &table[p[b]], 8);
  });
  if (full * 8 < n) std::memcpy(m + 8 * full, &table[p[full]], static_cast<size_t>(n - 8 * full));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CPU, m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
}

}  // namespace slimfit
