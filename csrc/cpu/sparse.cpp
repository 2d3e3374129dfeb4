// CPU kernels for slimfit::sparsify / slimfit::densify (format: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "../checks.h"
#include "../common.h"

namespace slimfit {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

template <typename scalar_t>
void sparsify_kernel(const scalar_t* x, int64_t rows, int64_t n, int64_t k, scalar_t* values, int16_t* indices,
                     int32_t* block_offsets, int64_t num_blocks) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> keys(static_cast<size_t>(n));
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * n;
      for (int64_t j = 0; j < n; ++j) keys[j] = magnitude_key(static_cast<float>(row[j]));
      // T is the k-th largest key: everything above T is kept, then the lowest columns whose key equals T.
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
      const uint32_t threshold = keys[k - 1];
      // nth_element leaves every key above T in front of position k - 1.
      int64_t equal_left =
          k - std::count_if(keys.begin(), keys.begin() + (k - 1), [&](uint32_t key) { return key > threshold; });
      scalar_t* v = values + r * k;
      int16_t* idx = indices + r * k;
      int32_t* blocks = block_offsets + r * num_blocks;
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (num_blocks && j % kIndexBlock == 0) blocks[j / kIndexBlock] = static_cast<int32_t>(c);
        const uint32_t key = magnitude_key(static_cast<float>(row[j]));
        if (key > threshold || (key == threshold && equal_left > 0)) {
          equal_left -= key == threshold;
          v[c] = row[j];
          idx[c] = static_cast<int16_t>(static_cast<uint16_t>(j & (kIndexBlock - 1)));
          ++c;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsify_cpu(const at::Tensor& x_in, int64_t k) {
  const RowLayout layout = check_sparsify_args(x_in, k);
  const int64_t rows = layout.rows, n = layout.n, num_blocks = layout.num_blocks;
  const at::Tensor x = x_in.contiguous();
  at::Tensor values, indices, block_offsets;
  std::tie(values, indices, block_offsets) = empty_sparse(x, layout, k);
  if (rows == 0 || k == 0) return {values, indices, block_offsets};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "slimfit_sparsify_cpu", [&] {
    sparsify_kernel<scalar_t>(x.data_ptr<scalar_t>(), rows, n, k, values.data_ptr<scalar_t>(),
                              indices.data_ptr<int16_t>(), block_offsets.data_ptr<int32_t>(), num_blocks);
  });
  return {values, indices, block_offsets};
}

at::Tensor densify_cpu(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
                       at::IntArrayRef shape) {
  const RowLayout layout = check_densify_args(values_in, indices_in, offsets_in, shape);
  const int64_t rows = layout.rows, n = layout.n, num_blocks = layout.num_blocks;
  const int64_t k = values_in.size(1);
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  auto out = at::empty(shape, values.options());
  if (out.numel() == 0) return out;
  const int16_t* idx = indices.data_ptr<int16_t>();
  const int32_t* blk = offsets.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "slimfit_densify_cpu", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = y + r * n;
        std::memset(static_cast<void*>(row), 0, sizeof(scalar_t) * n);
        const int32_t* starts = blk + r * num_blocks;
        int64_t block = 0;
        for (int64_t j = 0; j < k; ++j) {
          while (block + 1 < num_blocks && starts[block + 1] <= j) ++block;
          const int64_t col = block * kIndexBlock + static_cast<uint16_t>(idx[r * k + j]);
          TORCH_CHECK(col < n, "slimfit::densify: column ", col, " of row ", r, " is outside the row length ", n);
          row[col] = v[r * k + j];
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CPU, m) {
  m.impl("sparsify", &sparsify_cpu);
  m.impl("densify", &densify_cpu);
}

}  // namespace slimfit
