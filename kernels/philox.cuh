// Counter-based Philox4x32-10 (Salmon et al. 2011) for attention dropout.
//
// The keep decision for attention element (b, h, i, j) -- batch b, query head h, query row i and
// key column j, both counted within their own sequence -- is a pure function of
// (seed, offset, b, h, i, j), so the backward regenerates exactly the forward's mask:
//   counter = {j / 4, i, b * num_heads_q + h, offset}, key = {seed_lo, seed_hi}
//   r = philox4x32_10(counter, key)[j % 4];  keep iff r < keep_threshold(1 - p_dropout)
#pragma once

#include <cstdint>

namespace longctx {

struct Philox4 {
  uint32_t x, y, z, w;
};

__host__ __device__ __forceinline__ void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

__host__ __device__ __forceinline__ Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, ctr.x, hi0, lo0);
    mulhilo32(kMul1, ctr.z, hi1, lo1);
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// Keep iff a uniform 32-bit draw is below this; p_keep in (0, 1].
__host__ __device__ __forceinline__ uint32_t keep_threshold(float p_keep) {
  const double t = static_cast<double>(p_keep) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Four consecutive columns j0..j0+3 (j0 % 4 == 0) of row i share one Philox call.
__host__ __device__ __forceinline__ Philox4 dropout_draws(uint64_t seed, uint64_t offset, int bh, int i, int j0) {
  return philox4x32_10(Philox4{static_cast<uint32_t>(j0 >> 2), static_cast<uint32_t>(i),
                               static_cast<uint32_t>(bh), static_cast<uint32_t>(offset)},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace longctx
