// CPU kernel for slimfit::update_norms (definition: slimfit/reference.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../checks.h"
#include "../common.h"

namespace slimfit {
namespace {

// Sums of one chunk in eight independent lanes (vectorisable without fast-math, fixed order so the result
// does not depend on the thread count).
template <typename scalar_t, bool kL2>
void chunk_sums(const scalar_t* b, const scalar_t* a, int64_t begin, int64_t end, double eps, double* out) {
  constexpr int kLanes = 8;
  double s0[kLanes] = {}, s1[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      norm_terms<kL2>(static_cast<float>(b[i + l]), static_cast<float>(a[i + l]), eps, s0[l], s1[l]);
    }
  }
  for (; i < end; ++i) norm_terms<kL2>(static_cast<float>(b[i]), static_cast<float>(a[i]), eps, s0[0], s1[0]);
  out[0] = out[1] = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    out[0] += s0[l];
    out[1] += s1[l];
  }
}

at::Tensor update_norms_cpu(at::TensorList before_in, at::TensorList after_in, c10::string_view metric,
                            double eps) {
  check_update_norms_args(before_in, after_in, metric);
  const bool l2 = metric == "rel_l2";
  const int64_t pairs = static_cast<int64_t>(before_in.size());
  std::vector<at::Tensor> before, after;
  std::vector<int64_t> first_chunk(pairs + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    before.push_back(before_in[p].contiguous());
    after.push_back(after_in[p].contiguous());
    first_chunk[p + 1] = first_chunk[p] + (before[p].numel() + kNormChunk - 1) / kNormChunk;
  }
  const int64_t chunks = first_chunk[pairs];
  std::vector<double> partial(2 * chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      const int64_t begin = (c - first_chunk[p]) * kNormChunk;
      const int64_t end = std::min(before[p].numel(), begin + kNormChunk);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, before[p].scalar_type(), "slimfit_update_norms", [&] {
        const scalar_t* b = before[p].data_ptr<scalar_t>();
        const scalar_t* a = after[p].data_ptr<scalar_t>();
        if (l2) {
          chunk_sums<scalar_t, true>(b, a, begin, end, eps, &partial[2 * c]);
        } else {
          chunk_sums<scalar_t, false>(b, a, begin, end, eps, &partial[2 * c]);
        }
      });
    }
  });
  auto out = at::empty({pairs}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < pairs; ++p) {
    double s0 = 0.0, s1 = 0.0;
    for (int64_t c = first_chunk[p]; c < first_chunk[p + 1]; ++c) {
      s0 += partial[2 * c];
      s1 += partial[2 * c + 1];
    }
    o[p] = finish_norm(s0, s1, before[p].numel(), l2, eps);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimfit, CPU, m) { m.impl("update_norms", &update_norms_cpu); }

}  // namespace slimfit
