// Argument checks and output shapes shared by the CPU and CUDA entry points (host code only), so both
// backends reject the same inputs with the same messages.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "common.h"

namespace slimfit {

// Every tensor argument must be on the device of the first: a kernel reads all of them through that device's
// pointers, so a host tensor passed to a CUDA kernel (or one on another GPU) would be an illegal memory access.
inline void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  const auto& [first_name, first] = *args.begin();
  for (const auto& [name, tensor] : args) {
    TORCH_CHECK(tensor->device() == first->device(), "slimfit::", op, ": ", name, " must be on the device of ",
                first_name, " (", first->device(), "), got ", tensor->device());
  }
}

inline void check_quant_args(const char* op, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "slimfit::", op, ": bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0, "slimfit::", op, ": group_size must be positive, got ", group_size);
}

// Checks a dequantize call against the container layout; returns the element count of `shape`.
inline int64_t check_dequantize_args(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset,
                                     int64_t bits, int64_t group_size, at::IntArrayRef shape) {
  check_quant_args("dequantize", bits, group_size);
  check_same_device("dequantize", {{"codes", &codes}, {"scale", &scale}, {"offset", &offset}});
  const int64_t n = c10::multiply_integers(shape);
  const int64_t num_groups = (n + group_size - 1) / group_size;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == (n * bits + 7) / 8,
              "slimfit::dequantize: codes must be uint8 with ceil(numel * bits / 8) elements");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && offset.scalar_type() == at::kBFloat16 &&
                  scale.numel() == num_groups && offset.numel() == num_groups,
              "slimfit::dequantize: scale and offset must be bfloat16 with ceil(numel / group_size) elements");
  return n;
}

// Rows of a tensor seen as [rows, n] over its last dimension, and the int32 block offsets each row needs.
struct RowLayout {
  int64_t rows;
  int64_t n;
  int64_t num_blocks;
};

inline int64_t index_blocks(int64_t n) { return n > kIndexBlock ? (n + kIndexBlock - 1) / kIndexBlock : 0; }

// Checks a sparsify call; returns the layout of `x`.
inline RowLayout check_sparsify_args(const at::Tensor& x, int64_t k) {
  const int64_t n = x.dim() ? x.size(-1) : 1;
  const int64_t rows = n ? x.numel() / n : c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK(k >= 0 && k <= n, "slimfit::sparsify: k must be in [0, ", n, "], got ", k);
  TORCH_CHECK(n <= (int64_t{1} << 31), "slimfit::sparsify: rows longer than 2**31 are not supported, got ", n);
  return {rows, n, index_blocks(n)};
}

// values, indices and (zeroed) block offsets of a sparsify result for `x`.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_sparse(const at::Tensor& x, const RowLayout& layout,
                                                                   int64_t k) {
  return {at::empty({layout.rows, k}, x.options()), at::empty({layout.rows, k}, x.options().dtype(at::kShort)),
          at::zeros({layout.rows, layout.num_blocks}, x.options().dtype(at::kInt))};
}

// Checks a densify call against the container layout; returns the layout of `shape`.
inline RowLayout check_densify_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& offsets,
                                    at::IntArrayRef shape) {
  check_same_device("densify", {{"values", &values}, {"indices", &indices}, {"block_offsets", &offsets}});
  const int64_t n = shape.empty() ? 1 : shape.back();
  const int64_t rows = c10::multiply_integers(shape.slice(0, shape.empty() ? 0 : shape.size() - 1));
  TORCH_CHECK(values.dim() == 2 && values.size(0) == rows && values.size(1) <= n,
              "slimfit::densify: values must be [rows, k] with k <= row length for shape ", shape);
  const int64_t num_blocks = index_blocks(n);
  TORCH_CHECK(indices.scalar_type() == at::kShort && indices.sizes() == values.sizes(),
              "slimfit::densify: indices must be int16 with the shape of values");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 2 && offsets.size(0) == rows &&
                  offsets.size(1) == num_blocks,
              "slimfit::densify: block_offsets must be int32 [rows, ", num_blocks, "]");
  return {rows, n, num_blocks};
}

// Checks an update_norms call: a known metric and pairs of equal shape and dtype, all on before[0]'s device.
inline void check_update_norms_args(at::TensorList before, at::TensorList after, c10::string_view metric) {
  TORCH_CHECK(metric == "rel_l2" || metric == "rel_l1_mean",
              "slimfit::update_norms: metric must be 'rel_l2' or 'rel_l1_mean', got ", metric);
  TORCH_CHECK(before.size() == after.size(), "slimfit::update_norms: before and after differ in length");
  for (size_t p = 0; p < before.size(); ++p) {
    TORCH_CHECK(before[p].sizes() == after[p].sizes() && before[p].scalar_type() == after[p].scalar_type(),
                "slimfit::update_norms: pair ", p, " differs in shape or dtype");
    TORCH_CHECK(before[p].device() == before[0].device(), "slimfit::update_norms: before[", p,
                "] must be on the device of before[0] (", before[0].device(), "), got ", before[p].device());
    TORCH_CHECK(after[p].device() == before[0].device(), "slimfit::update_norms: after[", p,
                "] must be on the device of before[0] (", before[0].device(), "), got ", after[p].device());
  }
}

}  // namespace slimfit
