// FlashAttention backward (FlashAttention-2 work split), sm_80+ tensor cores via mma.sync.
//
// What it computes, per batch b, query head h (K/V head h / (Hq / Hk)), query row i, key j:
//   P_ij  = exp(scale * q_i.k_j - lse_i)           (recomputed; 0 for hidden keys and empty rows)
//   Z_ij  = Philox keep bit / (1 - p)               (1 without dropout; the forward's own mask)
//   dV_j  = sum_i P_ij Z_ij dO_i
//   dS_ij = P_ij (Z_ij dO_i.v_j - D_i),   D_i = dO_i.O_i   (= sum_j P_ij Z_ij dO_i.v_j, dropout too)
//   dK_j  = scale * sum_i dS_ij q_i,      dQ_i = scale * sum_j dS_ij k_j
// dK / dV are written per QUERY head (the binding sums GQA groups).
//
// Kernels, launched in this order by run_flash_bwd_hdim:
//   1. flash_bwd_dot_do_o_kernel: D = rowsum(dO * O) in fp32, laid out like lse (and, for the Hopper
//      backward, both row statistics per query tile: StatTiles).
//   2. flash_bwd_dkdv_kernel: one thread block per (kBlockN = 128 keys, head, batch), 8 warps;
//      loops over the query tiles (kBlockM = 64 rows; 32 at head dim 128 with dropout and at head dim
//      64 without, which runs 2 blocks per SM) that see those keys. Warp w owns key rows
//      [16w, 16w + 16) and computes the TRANSPOSED scores S^T = K Q^T and dP^T = V dO^T, so its
//      accumulators are already the A operand of dV += P^T dO and dK += dS^T Q (no shared-memory
//      round trip for P); dK / dV stay in registers for the whole loop. dS^T is also stored to
//      shared memory (two buffers) for dQ += dS K (warps 2 x 4 over the 64 x D tile), added with fp32
//      atomics to dq_accum at the top of the NEXT iteration (one barrier per iteration).
//      Deterministic mode skips that part.
//   3a. flash_bwd_convert_dq_kernel: dq = scale * dq_accum, in the input dtype; or
//   3b. (deterministic) flash_bwd_dq_kernel: one block per (64 query rows, head, batch), 4 warps,
//      loops over the key tiles: S, dP, dS recomputed in the forward's row layout, dQ in registers,
//      no atomics, so the result is bit-identical run to run.
//
// Shared memory tiles use SwizzledTile (mma.cuh); all copies from global are 16-byte cp.async.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "block_mask.cuh"
#include "flash.h"
#include "mma.cuh"
#include "philox.cuh"
#include "seq_info.cuh"

namespace longctx {
namespace bwd {

using longctx::opaque;

// (kRows x D) tile from global rows row0.. (rows >= `rows` zero-filled) into a SwizzledTile.
// The thread index goes through opaque() so that each call recomputes its chunks' coordinates
// and 64-bit addresses where it runs, instead of the compiler sharing them between calls (say the
// prologue's K load and the epilogue's dK store) and holding them in registers in between.
// Coordinates in unsigned arithmetic (idx >= 0): shifts and masks instead of signed division
// fix-ups (about 300 fewer instructions per dK/dV kernel at head dim 128).
template <typename Tile, int kThreads, typename T>
__device__ __forceinline__ void copy_tile(T* smem, const T* gmem, int64_t row_stride, int row0, int rows, int tid) {
  constexpr int kTotal = Tile::kElems / 8;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int idx = it * kThreads + opaque(tid);
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const unsigned u = static_cast<unsigned>(idx), rest = u / Tile::kBlockChunks;
      const int r = static_cast<int>(rest % Tile::kRows);
      const int c = static_cast<int>((rest / Tile::kRows) * Tile::kBlockCols + (u % Tile::kBlockChunks) * 8);
      const int row = row0 + r;
      const bool pred = row < rows;
      const T* src = gmem + (pred ? static_cast<int64_t>(row) * row_stride + c : 0);
      cp_async_16(smem_u32(smem + Tile::offset(r, c)), src, pred);
    }
  }
}

// kN fp32 values (lse or D) of rows row0.. into shared memory (rows >= `rows` zero-filled).
template <int kN, int kThreads>
__device__ __forceinline__ void copy_row_stats(float* smem, const float* gmem, int row0, int rows, int tid) {
  static_assert(kN <= kThreads, "one value per thread");
  if (tid < kN) {
    const bool pred = row0 + tid < rows;
    cp_async_4(smem_u32(smem + tid), gmem + (pred ? row0 + tid : 0), pred);
  }
}

// Writes a (kRows x D) tile staged in shared memory to global rows row0.. (only rows < `rows`).
template <typename Tile, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T* gmem, const T* smem, int64_t row_stride, int row0, int rows, int tid) {
  constexpr int kTotal = Tile::kElems / 8;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int idx = it * kThreads + opaque(tid);
    if (kTotal % kThreads == 0 || idx < kTotal) {
      int r, c;
      Tile::copy_coords(idx, r, c);
      if (row0 + r < rows)
        *reinterpret_cast<uint4*>(gmem + static_cast<int64_t>(row0 + r) * row_stride + c) =
            *reinterpret_cast<const uint4*>(smem + Tile::offset(r, c));
    }
  }
}

// Four keep bits (bit e: column j0 + e) of row i, from one Philox call.
__device__ __forceinline__ uint32_t keep_bits4(uint64_t seed, uint64_t offset, int bh, int i, int j0,
                                               uint32_t thresh) {
  const Philox4 r = dropout_draws(seed, offset, bh, i, j0);
  return uint32_t(r.x < thresh) | (uint32_t(r.y < thresh) << 1) | (uint32_t(r.z < thresh) << 2) |
         (uint32_t(r.w < thresh) << 3);
}

// lse as used by the kernels: base 2, and +inf for rows that see no key (lse = -inf) or lie past
// the sequence end, so that P = exp2(s * scale_log2 - lse2) is exactly 0 there and never NaN.
__device__ __forceinline__ float lse_log2(float lse, bool valid) {
  return (valid && lse != -INFINITY) ? lse * 1.4426950408889634f : INFINITY;
}

// Query rows per iteration of the Hopper backward (BwdTraits in flash_bwd_sm90.cuh), also the tile of
// its per-tile workspaces: 128 at head dim 64 (twice the work per softmax pass), 64 at head dim 128
// (registers: dK + dV already hold 128 per thread).
template <int D>
constexpr int kSm90BlockM = D == 64 ? 128 : 64;

// Chunk (query tile m, head h) of sequence b in one of the Hopper backward's per-tile workspaces:
// kChunk floats per (kBlockM-row query tile, head), chunks ordered (tile, head) from
// SeqInfo::query_tile0 (dq_accum: DqTiles in flash_bwd_sm90.cuh; the row statistics: StatTiles).
template <int kBlockM, int kChunk>
__device__ __forceinline__ float* tile_chunk(float* base, const FlashBwdParams& p, const SeqInfo& s, int b, int h,
                                             int m) {
  return base + ((s.query_tile0<kBlockM>(b, p.seqlen_q) + m) * p.num_heads_q + h) * static_cast<int64_t>(kChunk);
}

// The row statistics as the Hopper backward reads them, one bulk copy per query tile
// (p.row_stat_tiles): per (kBlockM-row query tile, head) a chunk of kBlockM lse2 values (lse_log2, so
// +inf on empty rows and on the padding rows past the sequence end) then kBlockM values of D (0 on
// padding rows).
template <int kBlockM>
struct StatTiles {
  static constexpr int kChunk = 2 * kBlockM;
  __device__ __forceinline__ static float* chunk(const FlashBwdParams& p, const SeqInfo& s, int b, int h, int m) {
    return tile_chunk<kBlockM, kChunk>(p.row_stat_tiles, p, s, b, h, m);
  }
};

// ----------------------------------------------------------------------------------------------
// 1. D = rowsum(dO * O)
// ----------------------------------------------------------------------------------------------

constexpr int kRowThreads = 16;  // threads per row in the row-wise kernels (16 B each per chunk)
constexpr int kRowKernelThreads = 256;
constexpr int kRowsPerBlock = kRowKernelThreads / kRowThreads;

template <typename T, int D>
__global__ void __launch_bounds__(kRowKernelThreads) flash_bwd_dot_do_o_kernel(const FlashBwdParams p) {
  const int b = blockIdx.y, h = blockIdx.z;
  const SeqInfo s(p, b);
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int c = (threadIdx.x % kRowThreads) * 8;
  constexpr int kTileM = kSm90BlockM<D>;
  const bool tiled = p.row_stat_tiles != nullptr && threadIdx.x % kRowThreads == 0;
  const bool in_tiles = i < (s.seqlen_q + kTileM - 1) / kTileM * kTileM;  // padding rows included
  if (D % (4 * kRowThreads) == 0 && p.zero_dq_tiles && in_tiles) {  // (head dims 64 / 128 only)
    // The Hopper backward's dq_accum (DqTiles, kTileM x D floats per (tile, head)): this row's share of
    // its tile's chunk, D floats at (i % kTileM) x D (which values they are does not matter here).
    float4* const dst =
        reinterpret_cast<float4*>(tile_chunk<kTileM, kTileM * D>(p.dq_accum, p, s, b, h, i / kTileM) + (i % kTileM) * D);
#pragma unroll
    for (int k = 0; k < D / (4 * kRowThreads); ++k)
      dst[threadIdx.x % kRowThreads + k * kRowThreads] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (i >= s.seqlen_q) {  // the Hopper backward's padding rows (the grid covers whole 128-row tiles)
    if (tiled && in_tiles) {
      float* const chunk = StatTiles<kTileM>::chunk(p, s, b, h, i / kTileM);
      chunk[i % kTileM] = INFINITY;
      chunk[kTileM + i % kTileM] = 0.f;
    }
    return;
  }
  float acc = 0.f;
  if (c < D) {
    const T* o = static_cast<const T*>(p.o) + s.tok(b, s.q_start, p.o_batch_stride, p.o_row_stride, h, p.o_head_stride) +
                 static_cast<int64_t>(i) * p.o_row_stride + c;
    const T* d = static_cast<const T*>(p.dout) +
                 s.tok(b, s.q_start, p.do_batch_stride, p.do_row_stride, h, p.do_head_stride) +
                 static_cast<int64_t>(i) * p.do_row_stride + c;
    const uint4 ov = *reinterpret_cast<const uint4*>(o), dv = *reinterpret_cast<const uint4*>(d);
    const uint32_t* ow = reinterpret_cast<const uint32_t*>(&ov);
    const uint32_t* dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 a = unpack_float2<T>(ow[e]), bb = unpack_float2<T>(dw[e]);
      acc = fmaf(a.x, bb.x, fmaf(a.y, bb.y, acc));
    }
  }
#pragma unroll
  for (int m = kRowThreads / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (threadIdx.x % kRowThreads == 0) {
    const int64_t off = b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start + i;
    p.dsoftmax_sum[off] = acc;
    if (tiled) {
      float* const chunk = StatTiles<kTileM>::chunk(p, s, b, h, i / kTileM);
      chunk[i % kTileM] = lse_log2(p.lse[off], true);
      chunk[kTileM + i % kTileM] = acc;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// 3a. dq = scale * dq_accum
// ----------------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kRowKernelThreads) flash_bwd_convert_dq_kernel(const FlashBwdParams p) {
  const int b = blockIdx.y, h = blockIdx.z;
  const SeqInfo s(p, b);
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int c = (threadIdx.x % kRowThreads) * 8;
  if (i >= s.seqlen_q || c >= D) return;
  const float* acc =
      p.dq_accum + ((s.dq_accum_row(b, p.seqlen_q) + i) * p.num_heads_q + h) * static_cast<int64_t>(D) + c;
  const float4 x0 = *reinterpret_cast<const float4*>(acc), x1 = *reinterpret_cast<const float4*>(acc + 4);
  const float sc = p.softmax_scale;
  uint4 out;
  out.x = pack_float2<T>(x0.x * sc, x0.y * sc);
  out.y = pack_float2<T>(x0.z * sc, x0.w * sc);
  out.z = pack_float2<T>(x1.x * sc, x1.y * sc);
  out.w = pack_float2<T>(x1.z * sc, x1.w * sc);
  T* dq = static_cast<T*>(p.dq) + s.tok(b, s.q_start, p.dq_batch_stride, p.dq_row_stride, h, p.dq_head_stride) +
          static_cast<int64_t>(i) * p.dq_row_stride + c;
  *reinterpret_cast<uint4*>(dq) = out;
}

// ----------------------------------------------------------------------------------------------
// 2. dK, dV (+ dQ with atomics): one block per key tile
// ----------------------------------------------------------------------------------------------

// acc = A B^T for one warp: A is this warp's 16 rows (x D) of an ATile at shared address a, B is
// kMTiles*8 rows (x D) of a BTile at b; both swizzled, read with ldmatrix. The backward's two
// "transposed scores" products: S^T = K Q^T and dP^T = V dO^T.
template <typename T, typename ATile, typename BTile, int kKSteps, int kMTiles>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[kMTiles][4], uint32_t a, uint32_t b) {
#pragma unroll
  for (int j = 0; j < kMTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, ATile::frag_offset(a, 0, 2 * kk));
#pragma unroll
    for (int np = 0; np < kMTiles / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, BTile::frag_offset(b, 16 * np, 2 * kk));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_m16n8k16<T>(acc[2 * np], af, b0);
      mma_m16n8k16<T>(acc[2 * np + 1], af, b1);
    }
  }
}

template <int kHeadDim_, typename T_, int kBlockM_, int kMinBlocks_ = 1>
struct BwdTraits {
  using T = T_;
  static constexpr int D = kHeadDim_;
  static constexpr int kBlockN = 128;      // keys per block (16 per warp)
  static constexpr int kBlockM = kBlockM_;  // query rows per iteration
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM the registers must allow
  static constexpr int kMTiles = kBlockM / 8;  // n8 tiles of S^T per warp (query columns)
  static constexpr int kMSteps = kBlockM / 16;  // k16 steps of P^T dO
  static constexpr int kDTiles = D / 8;        // n8 tiles of dK / dV per warp
  static constexpr int kKSteps = D / 16;       // k16 steps of K Q^T
  // dQ (kBlockM x D) = dS (kBlockM x kBlockN) K: warps kWarpsMdQ (rows) x kWarpsNdQ (columns),
  // with an even number of n8 tiles per warp.
  static constexpr int kWarpsNdQ = (D / 4) % 16 == 0 ? 4 : 2;
  static constexpr int kWarpsMdQ = kWarps / kWarpsNdQ;
  static constexpr int kdQStrips = kBlockM / kWarpsMdQ / 16;  // 16-row strips per warp
  static constexpr int kdQCols = D / kWarpsNdQ;              // columns per warp
  static constexpr int kdQTiles = kdQCols / 8;
  using KTile = SwizzledTile<kBlockN, D>;
  using QTile = SwizzledTile<kBlockM, D>;
  using DSTile = SwizzledTile<kBlockN, kBlockM>;  // dS^T: [key][query]
  // Shared memory (16-bit elements): K, V, Q x2, dO x2, dS^T x2; then fp32 lse x2, D x2.
  static constexpr int kOffV = KTile::kElems;
  static constexpr int kOffQ = 2 * KTile::kElems;
  static constexpr int kOffdO = kOffQ + 2 * QTile::kElems;
  static constexpr int kOffdS = kOffdO + 2 * QTile::kElems;
  static constexpr int kElems16 = kOffdS + 2 * DSTile::kElems;  // dS^T double-buffered (deferred dQ)
  static constexpr int kSmemBytes = kElems16 * 2 + 4 * kBlockM * 4;
  static_assert(kdQTiles % 2 == 0 && kdQStrips >= 1, "dQ warp tiling");
};

// Variant bit (kVariant & 1): deferred dQ: iteration m's dQ product + atomics run at the top of
// iteration m + 1 (dS^T double-buffered), so one barrier per iteration instead of two and the warps
// drift apart instead of meeting at the dQ barrier. (16-byte vector dQ atomics measured 0 to -1%:
// kernels/NOTES_bwd.md.)
template <typename Tr, bool kIsCausal, bool kHasDropout, int kVariant>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) flash_bwd_dkdv_kernel(const FlashBwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // sm_80: the deferred form of the fp16 head-dim-128 non-causal instance spills 8 B; that one
  // keeps dQ at the end of its iteration (the second dS^T buffer then goes unused).
  constexpr bool kDeferDq =
      (kVariant & 1) != 0 && !(Tr::D == 128 && !kIsCausal && !TypeTraits<typename Tr::T>::kIsBf16);
#else
  constexpr bool kDeferDq = (kVariant & 1) != 0;
#endif
  using T = typename Tr::T;
  using KTile = typename Tr::KTile;
  using QTile = typename Tr::QTile;
  using DSTile = typename Tr::DSTile;
  constexpr int D = Tr::D, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kMTiles = Tr::kMTiles, kMSteps = Tr::kMSteps, kDTiles = Tr::kDTiles;

  // 1024-byte alignment: frag_offset's XOR may then act on full shared-memory addresses.
  extern __shared__ __align__(1024) char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Tr::kOffV;
  T* sQ = sK + Tr::kOffQ;    // [2] stages
  T* sdO = sK + Tr::kOffdO;  // [2] stages
  T* sdS = sK + Tr::kOffdS;
  float* sLse = reinterpret_cast<float*>(sK + Tr::kElems16);  // [2][kBlockM]
  float* sDsum = sLse + 2 * kBlockM;                          // [2][kBlockM]

  const int n_block = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const int tid0 = threadIdx.x;
  const SeqInfo s(p, b);
  const int col0 = n_block * kBlockN;  // first key of this block
  if (col0 >= s.seqlen_k) return;
  const int hk = h / (p.num_heads_q / p.num_heads_k);
  const int diag = s.seqlen_k - s.seqlen_q;  // query i sees keys j <= i + diag (causal)

  const int m_end = (s.seqlen_q + kBlockM - 1) / kBlockM;
  int m_begin = 0;
  if (kIsCausal) m_begin = max(0, col0 - diag) / kBlockM;
  // Block-sparse: only the query tiles of kept mask blocks are visited (all of them when dense).
  const int m_first = mask_col<kBlockM>(p, b, h, col0).next(m_begin, m_end);

  const T* q_ptr = static_cast<const T*>(p.q) + s.tok(b, s.q_start, p.q_batch_stride, p.q_row_stride, h, p.q_head_stride);
  const T* do_ptr =
      static_cast<const T*>(p.dout) + s.tok(b, s.q_start, p.do_batch_stride, p.do_row_stride, h, p.do_head_stride);
  const T* k_ptr = static_cast<const T*>(p.k) + s.tok(b, s.k_start, p.k_batch_stride, p.k_row_stride, hk, p.k_head_stride);
  const T* v_ptr = static_cast<const T*>(p.v) + s.tok(b, s.k_start, p.v_batch_stride, p.v_row_stride, hk, p.v_head_stride);
  const int64_t lse_off = b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;
  const float* lse_ptr = p.lse + lse_off;
  const float* dsum_ptr = p.dsoftmax_sum + lse_off;
  const bool compute_dq = !p.deterministic;

  uint64_t seed = 0, offset = 0;
  uint32_t keep_thresh = 0;
  float rp_dropout = 1.f;
  if (kHasDropout) {
    seed = p.rng_state[0];
    offset = p.rng_state[1];
    keep_thresh = keep_threshold(1.f - p.p_dropout);
    rp_dropout = 1.f / (1.f - p.p_dropout);
  }
  const int bh = b * p.num_heads_q + h;

  // Prologue: K, V and the first query tile.
  copy_tile<KTile, kThreads>(sK, k_ptr, p.k_row_stride, col0, s.seqlen_k, tid0);
  copy_tile<KTile, kThreads>(sV, v_ptr, p.v_row_stride, col0, s.seqlen_k, tid0);
  if (m_first < m_end) {
    const int row0 = m_first * kBlockM;
    copy_tile<QTile, kThreads>(sQ, q_ptr, p.q_row_stride, row0, s.seqlen_q, tid0);
    copy_tile<QTile, kThreads>(sdO, do_ptr, p.do_row_stride, row0, s.seqlen_q, tid0);
    copy_row_stats<kBlockM, kThreads>(sLse, lse_ptr, row0, s.seqlen_q, tid0);
    copy_row_stats<kBlockM, kThreads>(sDsum, dsum_ptr, row0, s.seqlen_q, tid0);
  }
  cp_async_commit();

  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[d][e] = acc_dv[d][e] = 0.f;

  const float scale_log2 = p.softmax_scale_log2;

  // Deferred dQ: one extra pass (m_block == m_end) that only adds the last visited tile's dQ.
  int stage = 0, m_prev = -1;  // m_prev: the tile visited before m_block
  for (int m_block = m_first;;) {
    if (m_block >= m_end && (!kDeferDq || m_prev < 0)) break;
    const int row0 = m_block * kBlockM;
    const int m_next =
        m_block < m_end ? mask_col<kBlockM>(p, opaque(b), h, col0).next(m_block + 1, m_end) : m_end;
    // Every per-thread index is re-derived each iteration from an opaque thread index: otherwise
    // the compiler hoists dozens of loop-invariant per-lane addresses and spills them.
    const int tid = opaque(tid0);
    const int warp = static_cast<unsigned>(tid) / 32;  // unsigned: no signed-division fix-ups
    const int lane = static_cast<unsigned>(tid) % 32, g = lane / 4, t4 = lane % 4;
    // Fragment addressing (mma.cuh frag_offset): per-lane byte offsets of the ldmatrix row each lane
    // supplies. A / trans-B pattern: row lane % 16, chunk lane / 16. Non-trans-B / trans-A pattern:
    // row (lane % 8) + 8 (lane / 16), chunk (lane / 8) % 2.
    const int a_row = lane % 16, a_chunk = lane / 16;
    const int b_row = (lane % 8) + (lane / 16) * 8, b_chunk = (lane / 8) % 2;
    const int key_row = warp * 16;  // this warp's key rows inside the tile
    const uint32_t sK_u = smem_u32(sK), sV_u = smem_u32(sV), sdS_u = smem_u32(sdS);
    const uint32_t kv_a = KTile::byte_offset(key_row + a_row, a_chunk);  // K / V rows of S^T, dP^T
    const uint32_t q_b = QTile::byte_offset(b_row, b_chunk);              // Q / dO as B of S^T, dP^T
    const uint32_t q_bt = QTile::byte_offset(a_row, a_chunk);             // Q / dO as B of dK, dV
    const uint32_t ds_st = DSTile::byte_offset(key_row + g, 0) + 4 * t4;  // dS^T fragment stores
    // dQ: warp (wm, wn) owns query rows [qrow, qrow + 16 kdQStrips) and columns [dcol, dcol + kdQCols).
    const int wm = warp / Tr::kWarpsNdQ, wn = warp % Tr::kWarpsNdQ;
    const int qrow = wm * Tr::kdQStrips * 16, dcol = wn * Tr::kdQCols;
    const uint32_t ds_at = DSTile::byte_offset(b_row, b_chunk);  // dS as trans-A of dQ
    const uint32_t k_bt = KTile::byte_offset(a_row, a_chunk);    // K as trans-B of dQ

    // Full fragment base addresses for this iteration (see opaque()).
    const uint32_t sQs_u = smem_u32(sQ) + stage * QTile::kBytes;
    const uint32_t sdOs_u = smem_u32(sdO) + stage * QTile::kBytes;
    const uint32_t K_a = opaque(sK_u + kv_a), V_a = opaque(sV_u + kv_a);
    const uint32_t Q_b = sQs_u + q_b, dO_b = sdOs_u + q_b, Q_bt = sQs_u + q_bt, dO_bt = sdOs_u + q_bt;
    const float* sLses = sLse + stage * kBlockM;
    const float* sDsums = sDsum + stage * kBlockM;

    // dQ (kBlockM x D) of query tile rows r0.. += dS K, added to dq_accum with fp32 atomics.
    // A = dS from the dS^T buffer at dS_base ([key][query], ldmatrix.trans), B = K [key][d]
    // (ldmatrix.trans).
    auto dq_phase = [&](const int r0, const uint32_t dS_base) {
      // Per-warp fragment bases, recomputed here (opaque) rather than held across the loop.
      uint32_t dS_at[Tr::kdQStrips], K_bt[Tr::kdQTiles / 2];
#pragma unroll
      for (int st = 0; st < Tr::kdQStrips; ++st) dS_at[st] = opaque(dS_base + DSTile::frag_offset(ds_at, 0, qrow / 8 + 2 * st));
#pragma unroll
      for (int dp = 0; dp < Tr::kdQTiles / 2; ++dp) K_bt[dp] = opaque(sK_u + KTile::frag_offset(k_bt, 0, dcol / 8 + 2 * dp));
      float acc_dq[Tr::kdQStrips][Tr::kdQTiles][4];
#pragma unroll
      for (int st = 0; st < Tr::kdQStrips; ++st)
#pragma unroll
        for (int d = 0; d < Tr::kdQTiles; ++d)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_dq[st][d][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t sa[Tr::kdQStrips][4];
#pragma unroll
        for (int st = 0; st < Tr::kdQStrips; ++st)
          ldmatrix_x4_trans(sa[st], DSTile::frag_offset(dS_at[st], 16 * kk, 0));
#pragma unroll
        for (int dp = 0; dp < Tr::kdQTiles / 2; ++dp) {
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, KTile::frag_offset(K_bt[dp], 16 * kk, 0));
          const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
#pragma unroll
          for (int st = 0; st < Tr::kdQStrips; ++st) {
            mma_m16n8k16<T>(acc_dq[st][2 * dp], sa[st], k0);
            mma_m16n8k16<T>(acc_dq[st][2 * dp + 1], sa[st], k1);
          }
        }
      }
      const int64_t dq_row_stride = static_cast<int64_t>(p.num_heads_q) * D;
      float* dq_acc = p.dq_accum + (s.dq_accum_row(b, p.seqlen_q) + r0) * dq_row_stride + h * D + dcol;
      {
#pragma unroll
        for (int st = 0; st < Tr::kdQStrips; ++st)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int r = qrow + st * 16 + g + hh * 8;
            if (r0 + r < s.seqlen_q) {
              float* dst = dq_acc + static_cast<int64_t>(r) * dq_row_stride + 2 * t4;
#pragma unroll
              for (int d = 0; d < Tr::kdQTiles; ++d)
                atomic_add_f32x2(dst + d * 8, acc_dq[st][d][2 * hh], acc_dq[st][d][2 * hh + 1]);
            }
          }
      }
    };

    cp_async_wait<0>();
    __syncthreads();  // this stage has landed for all; everyone is done with the other stage and sdS
    if (m_next < m_end) {
      // Source pointers re-derived from the parameters (opaque batch index): cheaper than the
      // four 64-bit registers they would hold across the loop.
      const int bi = opaque(b);
      const SeqInfo si(p, bi);
      const int64_t lo = bi * p.lse_batch_stride + h * p.lse_head_stride + si.q_start;
      const T* qp = static_cast<const T*>(p.q) + si.tok(bi, si.q_start, p.q_batch_stride, p.q_row_stride, h, p.q_head_stride);
      const T* dop =
          static_cast<const T*>(p.dout) + si.tok(bi, si.q_start, p.do_batch_stride, p.do_row_stride, h, p.do_head_stride);
      const int nrow0 = m_next * kBlockM;
      copy_tile<QTile, kThreads>(sQ + (stage ^ 1) * QTile::kElems, qp, p.q_row_stride, nrow0, si.seqlen_q, tid);
      copy_tile<QTile, kThreads>(sdO + (stage ^ 1) * QTile::kElems, dop, p.do_row_stride, nrow0, si.seqlen_q, tid);
      copy_row_stats<kBlockM, kThreads>(sLse + (stage ^ 1) * kBlockM, p.lse + lo, nrow0, si.seqlen_q, tid);
      copy_row_stats<kBlockM, kThreads>(sDsum + (stage ^ 1) * kBlockM, p.dsoftmax_sum + lo, nrow0, si.seqlen_q, tid);
    }
    cp_async_commit();

    if constexpr (kDeferDq) {
      // dQ of the previous tile: its dS^T (other buffer) is complete since the barrier above.
      if (compute_dq && m_prev >= 0) dq_phase(m_prev * kBlockM, sdS_u + (stage ^ 1) * DSTile::kBytes);
      if (m_block >= m_end) break;
    }


    // (0) Dropout keep bits of this thread's fragment of the 16 x kBlockM tile: bit 4 mt + e for
    // accumulator element e of n8 tile mt. Lane L draws Philox for query (L % 8) of the n8 tile
    // and keys 4 (L / 8) .. +3 of the warp's 16, then each thread collects the bits it needs.
    // Drawn before S^T so the Philox temporaries never coexist with the score accumulators.
    uint32_t keep = 0xffffffffu;
    if constexpr (kHasDropout) {
      const int ln = lane;
      const int src = 2 * (ln % 4) + 8 * (ln / 16), bit = (ln / 4) % 4;
      const int key0 = col0 + key_row + 4 * (ln / 8);
#pragma unroll 2  // two Philox chains in flight: ILP without the register cost of eight
      for (int mt = 0; mt < kMTiles; ++mt) {
        const uint32_t mine = keep_bits4(seed, offset, bh, row0 + mt * 8 + (ln % 8), key0, keep_thresh);
        const uint32_t k0 = __shfl_sync(0xffffffffu, mine, src);
        const uint32_t k1 = __shfl_sync(0xffffffffu, mine, src + 1);
        const uint32_t k2 = __shfl_sync(0xffffffffu, mine, src + 16);
        const uint32_t k3 = __shfl_sync(0xffffffffu, mine, src + 17);
        const uint32_t kb = ((k0 >> bit) & 1) | (((k1 >> bit) & 1) << 1) | (((k2 >> bit) & 1) << 2) |
                            (((k3 >> bit) & 1) << 3);
        keep ^= (kb ^ 0xFu) << (4 * mt);
      }
    }

    // (1) S^T = K Q^T for this warp's 16 keys x kBlockM queries.
    float acc_s[kMTiles][4];
    warp_gemm_nt<T, KTile, QTile, Tr::kKSteps>(acc_s, K_a, Q_b);

    // (2) Masks (key past the sequence end; causal: key right of the query's diagonal), then
    // P^T = exp2(S^T scale_log2 - lse2), kept packed as the A operand of dV.
    const bool need_mask = col0 + kBlockN > s.seqlen_k || (kIsCausal && col0 + kBlockN - 1 > row0 + diag);
    if (need_mask) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int j = col0 + key_row + g + hh * 8;
        const bool past_end = j >= s.seqlen_k;
        // Query i = row0 + c + 2 t4 (c = 8 mt + e) hides key j when j > i + diag, i.e. jr > c.
        const int jr = j - diag - row0 - 2 * t4;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (past_end || (kIsCausal && jr > mt * 8 + e)) acc_s[mt][2 * hh + e] = -INFINITY;
      }
    }
    uint32_t p_frag[kMSteps][4];  // P^T, A operand layout (k16 steps over queries)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const int ic = mt * 8 + 2 * t4;  // this thread's query columns ic, ic + 1 (tile-relative)
      const float2 lse = *reinterpret_cast<const float2*>(sLses + ic);
      const float l0 = lse_log2(lse.x, row0 + ic < s.seqlen_q), l1 = lse_log2(lse.y, row0 + ic + 1 < s.seqlen_q);
      float pe[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) pe[e] = fast_exp2(fmaf(acc_s[mt][e], scale_log2, -((e & 1) ? l1 : l0)));
      // A operand of m16n8k16: a[0..1] from n8 tile 2 kk (rows g, g + 8), a[2..3] from tile 2 kk + 1.
      const int ks = mt / 2, half = (mt % 2) * 2;
      p_frag[ks][half] = pack_float2<T>(pe[0], pe[1]);
      p_frag[ks][half + 1] = pack_float2<T>(pe[2], pe[3]);
    }

    // (3) dV += (P Z)^T dO: B = dO [query][d] via ldmatrix.trans. With dropout the operand
    // P Z / (1 - p) is formed one k16 step at a time from the packed P and the keep bits.
#pragma unroll
    for (int kk = 0; kk < kMSteps; ++kk) {
      uint32_t pa[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if constexpr (kHasDropout) {
          // a[r] holds query columns of n8 tile 2 kk + r / 2, elements 2 (r % 2) .. +1 of it.
          const int bit = 4 * (2 * kk + r / 2) + 2 * (r % 2);
          const float2 pv = unpack_float2<T>(p_frag[kk][r]);
          pa[r] = pack_float2<T>(((keep >> bit) & 1) ? pv.x * rp_dropout : 0.f,
                                 ((keep >> (bit + 1)) & 1) ? pv.y * rp_dropout : 0.f);
        } else {
          pa[r] = p_frag[kk][r];
        }
      }
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t db[4];
        ldmatrix_x4_trans(db, QTile::frag_offset(dO_bt, 16 * kk, 2 * dp));
        const uint32_t d0[2] = {db[0], db[1]}, d1[2] = {db[2], db[3]};
        mma_m16n8k16<T>(acc_dv[2 * dp], pa, d0);
        mma_m16n8k16<T>(acc_dv[2 * dp + 1], pa, d1);
      }
    }

    // (4) dP^T = V dO^T.
    float acc_dp[kMTiles][4];
    warp_gemm_nt<T, KTile, QTile, Tr::kKSteps>(acc_dp, V_a, dO_b);

    // (5) dS^T = P^T (dP^T Z / (1 - p) - D), packed as the A operand of dK and stored to sdS.
    uint32_t ds_frag[kMSteps][4];
    const uint32_t dS_st = opaque(sdS_u + (kDeferDq ? stage * DSTile::kBytes : 0) + ds_st);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const int ic = mt * 8 + 2 * t4;
      const float2 dsum = *reinterpret_cast<const float2*>(sDsums + ic);
      const int ks = mt / 2, half = (mt % 2) * 2;
      const float2 p01 = unpack_float2<T>(p_frag[ks][half]), p23 = unpack_float2<T>(p_frag[ks][half + 1]);
      const float pe[4] = {p01.x, p01.y, p23.x, p23.y};
      float ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float dsv = (e & 1) ? dsum.y : dsum.x;
        float dpv = acc_dp[mt][e];
        if constexpr (kHasDropout) dpv = ((keep >> (4 * mt + e)) & 1) ? dpv * rp_dropout : 0.f;
        ds[e] = pe[e] * (dpv - dsv);
      }
      ds_frag[ks][half] = pack_float2<T>(ds[0], ds[1]);
      ds_frag[ks][half + 1] = pack_float2<T>(ds[2], ds[3]);
      if (compute_dq) {
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(DSTile::frag_offset(dS_st, 0, mt)), "r"(ds_frag[ks][half]));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(DSTile::frag_offset(dS_st, 8, mt)), "r"(ds_frag[ks][half + 1]));
      }
    }

    // (6) dK += dS^T Q: B = Q [query][d] via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kMSteps; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t qb[4];
        ldmatrix_x4_trans(qb, QTile::frag_offset(Q_bt, 16 * kk, 2 * dp));
        const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
        mma_m16n8k16<T>(acc_dk[2 * dp], ds_frag[kk], q0);
        mma_m16n8k16<T>(acc_dk[2 * dp + 1], ds_frag[kk], q1);
      }
    }

    // (7) dQ (kBlockM x D) += dS K, added to dq_accum with fp32 atomics (deferred: at the top of
    // the next iteration, see above).
    if constexpr (!kDeferDq) {
      if (compute_dq) {
        __syncthreads();  // sdS complete
        dq_phase(row0, sdS_u);
      }
    }
    m_prev = m_block;
    m_block = m_next;
    stage ^= 1;
  }

  // Epilogue: dK (scaled) and dV through shared memory (K / V buffers) for 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();  // every thread is done reading sK, sV
  const float scale = p.softmax_scale;
  const int warp = tid0 / 32, g = (tid0 % 32) / 4, t4 = tid0 % 4, key_row = warp * 16;
  const uint32_t kv_st = KTile::byte_offset(key_row + g, 0) + 4 * t4;
#pragma unroll
  for (int d = 0; d < kDTiles; ++d)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      *reinterpret_cast<uint32_t*>(smem_raw + KTile::frag_offset(kv_st, 8 * hh, d)) =
          pack_float2<T>(acc_dk[d][2 * hh] * scale, acc_dk[d][2 * hh + 1] * scale);
      *reinterpret_cast<uint32_t*>(smem_raw + Tr::kOffV * 2 + KTile::frag_offset(kv_st, 8 * hh, d)) =
          pack_float2<T>(acc_dv[d][2 * hh], acc_dv[d][2 * hh + 1]);
    }
  __syncthreads();
  // Sequence info re-read here (opaque batch index) rather than held in registers all along.
  const int be = opaque(b);
  const SeqInfo se(p, be);
  T* dk_ptr = static_cast<T*>(p.dk) + se.tok(be, se.k_start, p.dk_batch_stride, p.dk_row_stride, h, p.dk_head_stride);
  T* dv_ptr = static_cast<T*>(p.dv) + se.tok(be, se.k_start, p.dv_batch_stride, p.dv_row_stride, h, p.dv_head_stride);
  store_tile<KTile, kThreads>(dk_ptr, sK, p.dk_row_stride, col0, se.seqlen_k, tid0);
  store_tile<KTile, kThreads>(dv_ptr, sV, p.dv_row_stride, col0, se.seqlen_k, tid0);
}

// ----------------------------------------------------------------------------------------------
// 3b. Deterministic dQ: one block per query tile, no atomics
// ----------------------------------------------------------------------------------------------

template <int kHeadDim_, typename T_>
struct BwdDqTraits {
  using T = T_;
  static constexpr int D = kHeadDim_;
  static constexpr int kBlockM = 64;  // query rows per block (16 per warp)
  static constexpr int kBlockN = 64;  // keys per iteration
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kNTiles = kBlockN / 8;
  static constexpr int kDTiles = D / 8;
  static constexpr int kKSteps = D / 16;
  using QTile = SwizzledTile<kBlockM, D>;
  using KTile = SwizzledTile<kBlockN, D>;
  // Shared memory: Q, dO, then K x2, V x2; then fp32 lse and D of the block's rows.
  static constexpr int kOffdO = QTile::kElems;
  static constexpr int kOffK = 2 * QTile::kElems;
  static constexpr int kOffV = kOffK + 2 * KTile::kElems;
  static constexpr int kElems16 = kOffV + 2 * KTile::kElems;
  static constexpr int kSmemBytes = kElems16 * 2;
};

template <typename Tr, bool kIsCausal, bool kHasDropout>
__global__ void __launch_bounds__(Tr::kThreads, 2) flash_bwd_dq_kernel(const FlashBwdParams p) {
  using T = typename Tr::T;
  using QTile = typename Tr::QTile;
  using KTile = typename Tr::KTile;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles;

  extern __shared__ __align__(1024) char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + Tr::kOffdO;
  T* sK = sQ + Tr::kOffK;  // [2]
  T* sV = sQ + Tr::kOffV;  // [2]

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal tiles first
  const int b = blockIdx.y, h = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const SeqInfo s(p, b);
  const int row0 = m_block * kBlockM;
  if (row0 >= s.seqlen_q) return;
  const int hk = h / (p.num_heads_q / p.num_heads_k);
  const int diag = s.seqlen_k - s.seqlen_q;

  int n_end = (s.seqlen_k + kBlockN - 1) / kBlockN;
  if (kIsCausal) {
    const int last_key = min(row0 + kBlockM, s.seqlen_q) + diag;  // one past the last visible key
    n_end = min(n_end, last_key <= 0 ? 0 : (last_key + kBlockN - 1) / kBlockN);
  }

  const T* q_ptr = static_cast<const T*>(p.q) + s.tok(b, s.q_start, p.q_batch_stride, p.q_row_stride, h, p.q_head_stride);
  const T* do_ptr =
      static_cast<const T*>(p.dout) + s.tok(b, s.q_start, p.do_batch_stride, p.do_row_stride, h, p.do_head_stride);
  const T* k_ptr = static_cast<const T*>(p.k) + s.tok(b, s.k_start, p.k_batch_stride, p.k_row_stride, hk, p.k_head_stride);
  const T* v_ptr = static_cast<const T*>(p.v) + s.tok(b, s.k_start, p.v_batch_stride, p.v_row_stride, hk, p.v_head_stride);
  T* dq_ptr = static_cast<T*>(p.dq) + s.tok(b, s.q_start, p.dq_batch_stride, p.dq_row_stride, h, p.dq_head_stride);
  const int64_t lse_off = b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;

  uint64_t seed = 0, offset = 0;
  uint32_t keep_thresh = 0;
  float rp_dropout = 1.f;
  if (kHasDropout) {
    seed = p.rng_state[0];
    offset = p.rng_state[1];
    keep_thresh = keep_threshold(1.f - p.p_dropout);
    rp_dropout = 1.f / (1.f - p.p_dropout);
  }
  const int bh = b * p.num_heads_q + h;

  // Block-sparse: only the key tiles of kept mask blocks are visited (all of them when dense).
  const MaskLine<kBlockN> key_tiles = mask_row<kBlockN>(p, b, h, row0);
  const int n_first = key_tiles.next(0, n_end);
  copy_tile<QTile, kThreads>(sQ, q_ptr, p.q_row_stride, row0, s.seqlen_q, tid);
  copy_tile<QTile, kThreads>(sdO, do_ptr, p.do_row_stride, row0, s.seqlen_q, tid);
  if (n_first < n_end) {
    copy_tile<KTile, kThreads>(sK, k_ptr, p.k_row_stride, n_first * kBlockN, s.seqlen_k, tid);
    copy_tile<KTile, kThreads>(sV, v_ptr, p.v_row_stride, n_first * kBlockN, s.seqlen_k, tid);
  }
  cp_async_commit();

  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const int b_row = (lane % 8) + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;
  const int warp_row = warp * 16;

  // This thread's two rows: lse (base 2, +inf when empty) and D.
  float l2[2], dsum[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = row0 + warp_row + g + hh * 8;
    const bool valid = i < s.seqlen_q;
    l2[hh] = lse_log2(valid ? p.lse[lse_off + i] : 0.f, valid);
    dsum[hh] = valid ? p.dsoftmax_sum[lse_off + i] : 0.f;
  }

  float acc_dq[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[d][e] = 0.f;
  const float scale_log2 = p.softmax_scale_log2;

  for (int n_block = n_first, stage = 0; n_block < n_end; stage ^= 1) {
    const int n_next = key_tiles.next(n_block + 1, n_end);
    const int col0 = n_block * kBlockN;
    const T* sKs = sK + stage * KTile::kElems;
    const T* sVs = sV + stage * KTile::kElems;
    cp_async_wait<0>();
    __syncthreads();
    if (n_next < n_end) {
      copy_tile<KTile, kThreads>(sK + (stage ^ 1) * KTile::kElems, k_ptr, p.k_row_stride, n_next * kBlockN,
                                 s.seqlen_k, tid);
      copy_tile<KTile, kThreads>(sV + (stage ^ 1) * KTile::kElems, v_ptr, p.v_row_stride, n_next * kBlockN,
                                 s.seqlen_k, tid);
    }
    cp_async_commit();

    float acc_s[kNTiles][4], acc_dp[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[j][e] = acc_dp[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Tr::kKSteps; ++kk) {
      uint32_t qa[4], da[4];
      ldmatrix_x4(qa, smem_u32(sQ + QTile::offset(warp_row + a_row, kk * 16 + a_col)));
      ldmatrix_x4(da, smem_u32(sdO + QTile::offset(warp_row + a_row, kk * 16 + a_col)));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, smem_u32(sKs + KTile::offset(np * 16 + b_row, kk * 16 + b_col)));
        ldmatrix_x4(vb, smem_u32(sVs + KTile::offset(np * 16 + b_row, kk * 16 + b_col)));
        const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
        const uint32_t v0[2] = {vb[0], vb[1]}, v1[2] = {vb[2], vb[3]};
        mma_m16n8k16<T>(acc_s[2 * np], qa, k0);
        mma_m16n8k16<T>(acc_s[2 * np + 1], qa, k1);
        mma_m16n8k16<T>(acc_dp[2 * np], da, v0);
        mma_m16n8k16<T>(acc_dp[2 * np + 1], da, v1);
      }
    }

    const bool need_mask = col0 + kBlockN > s.seqlen_k || (kIsCausal && col0 + kBlockN - 1 > row0 + diag);
    if (need_mask) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = row0 + warp_row + g + hh * 8;
        const int limit = kIsCausal ? min(s.seqlen_k, i + diag + 1) : s.seqlen_k;  // first hidden key
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (col0 + nt * 8 + 2 * t4 + e >= limit) acc_s[nt][2 * hh + e] = -INFINITY;
      }
    }

#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      uint32_t keep = 0xF;
      if constexpr (kHasDropout) {
        // Lane L draws Philox for row L % 16 of the warp and keys 8 nt + 4 (L / 16) .. +3; thread
        // (g, t4) needs keys 8 nt + 2 t4, +1 of rows g and g + 8.
        const uint32_t mine =
            keep_bits4(seed, offset, bh, row0 + warp_row + (lane % 16), col0 + nt * 8 + 4 * (lane / 16), keep_thresh);
        const int src = g + 16 * (t4 / 2), sh = 2 * (t4 % 2);
        const uint32_t k0 = __shfl_sync(0xffffffffu, mine, src);
        const uint32_t k1 = __shfl_sync(0xffffffffu, mine, src + 8);
        keep = ((k0 >> sh) & 3) | (((k1 >> sh) & 3) << 2);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hh = e / 2;
        const float pe = fast_exp2(fmaf(acc_s[nt][e], scale_log2, -l2[hh]));
        if constexpr (kHasDropout) {
          const bool kept = (keep >> e) & 1;
          acc_dp[nt][e] = pe * (kept ? acc_dp[nt][e] * rp_dropout - dsum[hh] : -dsum[hh]);
        } else {
          acc_dp[nt][e] = pe * (acc_dp[nt][e] - dsum[hh]);
        }
      }
    }

    // dQ += dS K: A = dS straight from the accumulators, B = K [key][d] via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t sa[4];
      pack_c_to_a<T>(sa, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, smem_u32(sKs + KTile::offset(kk * 16 + a_row, dp * 16 + a_col)));
        const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
        mma_m16n8k16<T>(acc_dq[2 * dp], sa, k0);
        mma_m16n8k16<T>(acc_dq[2 * dp + 1], sa, k1);
      }
    }
    n_block = n_next;
  }

  // Epilogue: scale, stage through sQ (every read of sQ precedes the loop's last barrier; with no
  // iteration wait for the prologue copies first), 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
  const float scale = p.softmax_scale;
#pragma unroll
  for (int d = 0; d < kDTiles; ++d)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      *reinterpret_cast<uint32_t*>(sQ + QTile::offset(warp_row + g + hh * 8, d * 8) + 2 * t4) =
          pack_float2<T>(acc_dq[d][2 * hh] * scale, acc_dq[d][2 * hh + 1] * scale);
  __syncthreads();
  store_tile<QTile, kThreads>(dq_ptr, sQ, p.dq_row_stride, row0, s.seqlen_q, tid);
}

// ----------------------------------------------------------------------------------------------
// Launch
// ----------------------------------------------------------------------------------------------

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <int D, typename T, bool kIsCausal, bool kHasDropout, int kVariant>
void launch_dkdv(const FlashBwdParams& p, cudaStream_t stream) {
  constexpr bool kTwoBlocks = D == 64 && (kVariant & 4);  // 32-query iterations, 2 blocks per SM
  constexpr int kBlockM = ((D == 128 && kHasDropout) || kTwoBlocks) ? 32 : 64;
  using Tr = BwdTraits<D, T, kBlockM, kTwoBlocks ? 2 : 1>;
  auto dkdv = flash_bwd_dkdv_kernel<Tr, kIsCausal, kHasDropout, kVariant & 1>;
  set_smem(dkdv, Tr::kSmemBytes);
  const dim3 grid_kv((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, p.batch, p.num_heads_q);
  dkdv<<<grid_kv, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
}

// dQ after the dK / dV kernel: scale dq_accum into dq, or (deterministic) the separate dQ kernel.
template <int D, typename T, bool kIsCausal, bool kHasDropout>
void launch_dq(const FlashBwdParams& p, cudaStream_t stream) {
  const dim3 grid_rows((p.seqlen_q + kRowsPerBlock - 1) / kRowsPerBlock, p.batch, p.num_heads_q);
  if (p.deterministic) {
    using DqTr = BwdDqTraits<D, T>;
    auto dq = flash_bwd_dq_kernel<DqTr, kIsCausal, kHasDropout>;
    set_smem(dq, DqTr::kSmemBytes);
    const dim3 grid_q((p.seqlen_q + DqTr::kBlockM - 1) / DqTr::kBlockM, p.batch, p.num_heads_q);
    dq<<<grid_q, DqTr::kThreads, DqTr::kSmemBytes, stream>>>(p);
  } else {
    flash_bwd_convert_dq_kernel<T, D><<<grid_rows, kRowKernelThreads, 0, stream>>>(p);
  }
}

template <int D, typename T, bool kIsCausal, bool kHasDropout>
void launch_bwd(const FlashBwdParams& p, cudaStream_t stream) {
  // Query rows per iteration (launch_dkdv): 32 for head dim 128 with dropout (else the Philox work
  // spills registers) and for head dim 64 without dropout (128 registers, 2 blocks per SM), else 64.
  // dK / dV kernel variant (flash_bwd_dkdv_kernel's kVariant; bit 4 = head dim 64 in 32-query
  // iterations with 2 blocks per SM): deferred dQ (1) everywhere; head dim 64 without dropout
  // also 2 blocks per SM, causal not deferred (4: the
  // deferred form spills 8 B on sm_90a there); head dim 96 with dropout not deferred (spills 32 B on
  // sm_80). Measured variants: kernels/NOTES_bwd.md (v3-v5).
  constexpr int kVariant =
      (D == 64 && !kHasDropout) ? (kIsCausal ? 4 : 5) : ((D == 96 && kHasDropout) ? 0 : 1);
  launch_dkdv<D, T, kIsCausal, kHasDropout, kVariant>(p, stream);
  launch_dq<D, T, kIsCausal, kHasDropout>(p, stream);
}


}  // namespace bwd
}  // namespace longctx

#include "flash_bwd_sm90.cuh"

namespace longctx {

// One explicit instantiation per (head dim, dtype) lives in flash_bwd_hdim*_*.cu.
template <int kHeadDim, typename T>
void run_flash_bwd_hdim(const FlashBwdParams& params, cudaStream_t stream) {
  FlashBwdParams p = params;
  const bool dropout = p.p_dropout > 0.f;
  // Hopper path (flash_bwd_sm90.cuh) for head dims 64 / 128 without dropout, when enabled, built, and
  // TMA can address the tensors.
  sm90::QdoMaps maps;
  bool hopper = false;
  if constexpr (kHeadDim == 64 || kHeadDim == 128)
    hopper = p.use_sm90 && !dropout && sm90::make_dkdv_maps<kHeadDim, T>(p, &maps);
  // dq_accum starts at zero where it is used (not in deterministic mode): the Hopper path's tiles are
  // zeroed by the dot(dO, O) kernel on its way, the stage-1 path's rows by a memset.
  p.zero_dq_tiles = hopper && !p.deterministic;
  if (!hopper) p.row_stat_tiles = nullptr;
  if (!hopper && !p.deterministic) cudaMemsetAsync(p.dq_accum, 0, p.dq_accum_floats * sizeof(float), stream);
  // Rows up to a multiple of 128: the Hopper backward's row statistics fill whole query tiles.
  const dim3 grid_rows((p.seqlen_q + 127) / 128 * 128 / bwd::kRowsPerBlock, p.batch, p.num_heads_q);
  bwd::flash_bwd_dot_do_o_kernel<T, kHeadDim><<<grid_rows, bwd::kRowKernelThreads, 0, stream>>>(p);
  if constexpr (kHeadDim == 64 || kHeadDim == 128) {
    if (hopper) {
      if (p.is_causal) sm90::launch_dkdv<kHeadDim, T, true>(p, maps, stream);
      else sm90::launch_dkdv<kHeadDim, T, false>(p, maps, stream);
      if (!p.deterministic) sm90::launch_convert_dq<kHeadDim, T>(p, stream);  // dq_accum is tiled
      else if (p.is_causal) bwd::launch_dq<kHeadDim, T, true, false>(p, stream);
      else bwd::launch_dq<kHeadDim, T, false, false>(p, stream);
      return;
    }
  }
  if (p.is_causal) {
    if (dropout) bwd::launch_bwd<kHeadDim, T, true, true>(p, stream);
    else bwd::launch_bwd<kHeadDim, T, true, false>(p, stream);
  } else {
    if (dropout) bwd::launch_bwd<kHeadDim, T, false, true>(p, stream);
    else bwd::launch_bwd<kHeadDim, T, false, false>(p, stream);
  }
}

}  // namespace longctx
