// The order in which a kernel takes its work tiles when the tiles of a (head, batch) pair differ in
// length (causal: query tile m of the forward sees m + 1 key tiles, key tile n of the backward
// 1 + (last query tile - n)).
//
// Whatever runs last sets the kernel's end. With each pair's tiles in a row (longest first), the
// tiles still running when the last one starts include long tiles of the last pairs, and the
// multiprocessors that finish early idle meanwhile (measured: 5-12% of a causal forward at head dim
// 128). Taking all tiles longest first would end on the shortest tiles, but the tiles running at once
// would then belong to every pair and no longer share K / V (forward) or Q / dO (backward) in L2. So
// the pairs come in windows whose inputs fit a share of L2, and within a window the tiles go by
// length: tile 0 (the longest) of every pair in the window, then tile 1, and so on. The kernel then
// ends on the last window's shortest tiles.
#pragma once

#include <cstdint>

namespace longctx {

// How many (head, batch) pairs share a window: those whose `bytes_per_pair` of inputs fit `budget`
// bytes (at least 1, at most all of them).
__host__ __device__ __forceinline__ int tile_window(int64_t bytes_per_pair, int num_pairs, int64_t budget) {
  const int64_t fit = budget / (bytes_per_pair > 0 ? bytes_per_pair : 1);
  return static_cast<int>(fit < 1 ? 1 : (fit < num_pairs ? fit : num_pairs));
}

// Work tile t in [0, num_pairs x tiles_per_pair) in window order -> its index within its pair
// (0 = longest) and its pair.
struct WindowedTile {
  int idx, pair;
};
__device__ __forceinline__ WindowedTile windowed_tile(int t, int tiles_per_pair, int num_pairs, int window) {
  const int pair0 = t / (window * tiles_per_pair) * window;  // the window's first pair
  const int r = t - pair0 * tiles_per_pair, pairs = min(window, num_pairs - pair0);
  const int idx = r / pairs;
  return {idx, pair0 + (r - idx * pairs)};
}

}  // namespace longctx
