// Launch helpers shared by the CUDA kernels.
#pragma once
#include <algorithm>
#include <cstdint>

namespace slimfit {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Blocks for `work_items` spread `items_per_block` per block, capped so grid-stride loops cover the rest.
inline int grid_for(int64_t work_items, int items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 8));
}

}  // namespace slimfit
