// FlashAttention forward (FlashAttention-2 work split), sm_80+ tensor cores via mma.sync.
//
// What it computes, per batch b, query head h (K/V head h / (Hq / Hk)) and query row i:
//   s_ij = softmax_scale * q_i . k_j   for visible keys j (j < Sk; causal: j <= i + Sk - Sq)
//   o_i  = sum_j softmax(s_i)_j * z_ij / (1 - p) * v_j,  z_ij = Philox keep bit (1 without dropout)
//   lse_i = log sum_j exp(s_ij)        (natural log; -inf and o_i = 0 when no key is visible)
//
// Work split: one thread block of kNWarps warps per (kBlockM query rows, head, batch); warp w owns
// rows [w * kRowsPerWarp, (w + 1) * kRowsPerWarp) of the tile as kStrips strips of 16 rows, so each
// K/V fragment read from shared memory feeds kStrips MMAs. The block walks the key tiles from the
// last visible one down to 0: tiles that need a mask (the sequence end, the causal diagonal) come
// first, and once one needs none, no lower one does. Tiles wholly above the diagonal are never
// visited, nor (block-sparse, block_mask.cuh) the tiles of blocks the mask drops.
//
// Pipeline (cp.async; kKVStages): with one stage, one K and one V buffer alternate — while
// S = Q K^T and the softmax run V[n] streams in, while O += P V runs K[n-1] streams in; with two
// stages the next tile's K and V stream in during the whole current tile.
//
// Online softmax in base 2: m is the running row max kept in log2 units (max score * softmax_scale
// * log2 e); a score becomes exp2(s * scale_log2 - m) with one FFMA and one MUFU.EX2. Row sums stay
// thread-partial until the end (the four lanes of a quad share a row).
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_runtime.h>

#include "block_mask.cuh"
#include "flash.h"
#include "mma.cuh"
#include "philox.cuh"

namespace longctx {

// Lazy rescale (both kernels): the gap, in log2 units, by which a tile's max must exceed a row's
// reference max before the reference moves; P = exp2(S * scale - reference) stays <= 2^8.
constexpr float kRescaleGapLog2 = 8.f;
// The same bound as a value: every P of a row is <= exp2(kRescaleGapLog2) = 256 (the speculative
// softmax of the Hopper forward tests its row sums against it).
constexpr float kRescaleBound = 256.f;
static_assert(kRescaleBound == float(1 << static_cast<int>(kRescaleGapLog2)), "exp2(kRescaleGapLog2)");

// kQKUnroll: unroll factor of the k16 loop of S = Q K^T when Q is read from shared memory (0: full).
// A partial unroll stops the compiler from hoisting every step's fragments, which spills at D=128.
// kKVStages: 1 = one K and one V buffer that alternate (V streams in during Q K^T, the next K
// during P V; two barriers per tile); 2 = two K/V buffer pairs, the next tile's K and V stream in
// during the whole current tile (one barrier per tile, twice the K/V shared memory).
// kLazyRescale: raise a row's reference max only when it grows by more than 2^8 (see the kernel),
// skipping most O rescales; off = FlashAttention-2's rescale on every tile. Measured (NOTES.md v4):
// slower at D = 64, faster with two K/V stages at D = 128 but that combination spills; off everywhere.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kQInRegs_, typename T_, int kQKUnroll_ = 0,
          int kKVStages_ = 1, bool kLazyRescale_ = false>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr bool kQInRegs = kQInRegs_;
  static constexpr int kQKUnroll = (kQKUnroll_ == 0 || kQInRegs_) ? kHeadDim_ / 16 : kQKUnroll_;
  static constexpr int kRowsPerWarp = kBlockM / kNWarps;
  static constexpr int kStrips = kRowsPerWarp / 16;
  static constexpr int kNTiles = kBlockN / 8;     // n8 tiles of S per strip
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of O per strip
  static constexpr int kKSteps = kHeadDim / 16;   // k16 steps of Q K^T
  static constexpr int kPSteps = kBlockN / 16;    // k16 steps of P V
  using QTile = SwizzledTile<kBlockM, kHeadDim>;
  using KTile = SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kKVStages = kKVStages_;
  static constexpr bool kLazyRescale = kLazyRescale_;
  static constexpr bool kSm90Only = false;
  static constexpr int kSmemBytes = QTile::kBytes + 2 * kKVStages * KTile::kBytes;
  // Two 4-warp blocks share a multiprocessor (255 registers each); 8-warp blocks run alone.
  static constexpr int kMinBlocksPerSm = kNWarps <= 4 ? 2 : 1;
  static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole 16-row strips");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 32 == 0, "tile sizes");
};

// Copies (kRows x kHeadDim) tiles from global to swizzled shared memory with cp.async. Per pass the
// block moves kRowsPerPass rows of one column block; thread tid always handles row
// tid / kBlockChunks (+ pass offset) and chunk tid % kBlockChunks, so its shared-memory address
// and global offset are computed once and each pass adds constants.
template <typename Tile, int kNThreads>
struct TileLoader {
  static constexpr int kRowsPerPass = kNThreads / Tile::kBlockChunks;
  static constexpr int kPasses = Tile::kElems / 8 / kNThreads;
  static_assert(kNThreads % Tile::kBlockChunks == 0 && Tile::kElems / 8 % kNThreads == 0, "copy split");
  static_assert(kRowsPerPass % 8 == 0 && Tile::kRows % kRowsPerPass == 0, "passes must keep the swizzle phase");

  int row;            // row within a pass
  uint32_t smem_off;  // byte offset of this thread's chunk in pass 0

  __device__ __forceinline__ explicit TileLoader(int tid) {
    row = tid / Tile::kBlockChunks;
    smem_off = Tile::byte_offset(row, tid % Tile::kBlockChunks);
  }

  // Element offset of this thread's chunk in pass 0 (row 0 of a tile), to fold into a base offset.
  __device__ __forceinline__ int64_t lane_offset(int tid, int64_t row_stride) const {
    return row * row_stride + (tid % Tile::kBlockChunks) * 8;
  }

  // Rows row0 .. row0 + kRows of a tensor whose row 0 plus this thread's lane_offset is at
  // `lane_ptr`; rows >= `rows` are zero-filled (no read; `safe` is a valid address to name).
  template <typename T>
  __device__ __forceinline__ void load(uint32_t smem, const T* lane_ptr, const T* safe, int64_t row_stride,
                                       int row0, int rows) const {
    const T* src = lane_ptr + row0 * row_stride;
    const int64_t step = kRowsPerPass * row_stride;  // one pass further down (advanced, not hoisted)
    const int valid = rows - row0 - row;              // pass rows < valid are inside the sequence
    constexpr int kPassesPerBlock = Tile::kRows / kRowsPerPass;
#pragma unroll
    for (int block = 0; block < Tile::kNumBlocks; ++block) {
      const T* g = src + block * Tile::kBlockCols;
#pragma unroll
      for (int pr = 0; pr < kPassesPerBlock; ++pr) {
        const int r = pr * kRowsPerPass;
        const bool pred = r < valid;
        cp_async_16(smem + block * Tile::kBlockBytes + r * Tile::kRowBytes + smem_off, pred ? g : safe, pred);
        g += step;
      }
    }
  }
};

template <typename Tr, bool kIsCausal, bool kHasDropout, bool kSparse>
__device__ __forceinline__ void flash_fwd_block(const FlashFwdParams& p) {
  using T = typename Tr::T;
  using QTile = typename Tr::QTile;
  using KTile = typename Tr::KTile;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kStrips = Tr::kStrips;
  constexpr int kNThreads = Tr::kNThreads;

  extern __shared__ __align__(128) char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + QTile::kElems;  // then V, and with two stages a second K, V pair

  // Heaviest (causal) query tiles first so the tail of the grid is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;

  int q_start = 0, seqlen_q = p.seqlen_q, k_start = 0, seqlen_k = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[b];
    seqlen_q = p.cu_seqlens_q[b + 1] - q_start;
    k_start = p.cu_seqlens_k[b];
    seqlen_k = p.cu_seqlens_k[b + 1] - k_start;
  }
  const int row0 = m_block * kBlockM;
  if (row0 >= seqlen_q) return;

  const int hk = h / (p.num_heads_q / p.num_heads_k);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t q_off = (varlen ? q_start * p.q_row_stride : b * p.q_batch_stride) + h * p.q_head_stride;
  // K and V have identical strides (the binding guarantees it), so one offset serves both.
  const int64_t kv_off = (varlen ? k_start * p.k_row_stride : b * p.k_batch_stride) + hk * p.k_head_stride;
  const T* k_gmem = static_cast<const T*>(p.k);
  const T* v_gmem = static_cast<const T*>(p.v);
  // Output pointers (recomputed in the epilogue so they hold no registers through the main loop).
  auto out_ptrs = [&](T*& o_ptr, float*& lse_ptr) {
    o_ptr = static_cast<T*>(p.o) + (varlen ? q_start * p.o_row_stride : b * p.o_batch_stride) +
            h * p.o_head_stride;
    lse_ptr = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + q_start;
  };

  // Query i sees keys j <= i + diag (causal).
  const int diag = seqlen_k - seqlen_q;
  int n_block_max = (seqlen_k + kBlockN - 1) / kBlockN;
  if (kIsCausal) {
    const int last_key = min(row0 + kBlockM, seqlen_q) + diag;  // one past the last visible key
    n_block_max = min(n_block_max, last_key <= 0 ? 0 : (last_key + kBlockN - 1) / kBlockN);
  }

  // Block-sparse (kSparse): only the key tiles of kept mask blocks are visited. A template switch,
  // not a runtime one: the mask walk costs the dense instances registers they do not have (and the
  // dense path below keeps its original spelling, which ptxas allocates without spills).
  // The first visited tile comes from the mask in global memory; the block's mask row is then
  // staged in shared memory (after the K/V tiles) so that each later step of the walk is a shared-
  // memory read, not a dependent global load.
  const int n_first = kSparse ? mask_row<kBlockN>(p, b, h, row0).prev(n_block_max) : n_block_max - 1;
  uint8_t* smem_mask = reinterpret_cast<uint8_t*>(smem_raw + Tr::kSmemBytes);
  auto prev_kept = [&](int n_block) { return prev_kept_smem<kBlockN>(smem_u32(smem_raw) + Tr::kSmemBytes, n_block); };

  if (kSparse ? n_first < 0 : n_block_max == 0) {  // no row of this tile sees any key: o = 0, lse = -inf
    T* o_ptr;
    float* lse_ptr;
    out_ptrs(o_ptr, lse_ptr);
    constexpr int kChunks = QTile::kChunks;
    for (int i = tid; i < kBlockM * kChunks; i += kNThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      if (row0 + r < seqlen_q)
        *reinterpret_cast<uint4*>(o_ptr + static_cast<int64_t>(row0 + r) * p.o_row_stride + c) =
            make_uint4(0, 0, 0, 0);
    }
    for (int r = tid; r < kBlockM; r += kNThreads)
      if (row0 + r < seqlen_q) lse_ptr[row0 + r] = -INFINITY;
    return;
  }

  // Dropout state (read on the device so CUDA graphs replay with fresh offsets).
  uint64_t seed = 0, offset = 0;
  uint32_t keep_thresh = 0;
  if (kHasDropout) {
    seed = p.rng_state[0];
    offset = p.rng_state[1];
    keep_thresh = keep_threshold(1.f - p.p_dropout);
  }
  const int bh = b * p.num_heads_q + h;

  if constexpr (kSparse) {
    const uint8_t* row = mask_row<kBlockN>(p, b, h, row0).flags;
    for (int c = tid; c < p.block_mask_cols; c += kNThreads) smem_mask[c] = row[c];
    __syncthreads();
  }

  // Shared memory: Q | K0 | V0 (| K1 | V1 with two stages) (| the mask row, block-sparse).
  const uint32_t sQ_u = smem_u32(sQ);
  constexpr uint32_t kStageBytes = 2 * KTile::kBytes;
  uint32_t kv_stage = 0;  // byte offset of the current K/V stage
  const uint32_t sK0_u = smem_u32(sK);
  {
    const TileLoader<QTile, kNThreads> q_loader(tid);
    const T* q_lane = static_cast<const T*>(p.q) + q_off + q_loader.lane_offset(tid, p.q_row_stride);
    q_loader.load(sQ_u, q_lane, static_cast<const T*>(p.q), p.q_row_stride, row0, seqlen_q);
  }
  cp_async_commit();
  const TileLoader<KTile, kNThreads> kv_loader(tid);
  const int64_t kv_lane = kv_off + kv_loader.lane_offset(tid, p.k_row_stride);
  kv_loader.load(sK0_u, k_gmem + kv_lane, k_gmem, p.k_row_stride, (kSparse ? n_first : n_block_max - 1) * kBlockN, seqlen_k);
  if constexpr (Tr::kKVStages == 2)
    kv_loader.load(sK0_u + KTile::kBytes, v_gmem + kv_lane, v_gmem, p.k_row_stride, (kSparse ? n_first : n_block_max - 1) * kBlockN, seqlen_k);
  cp_async_commit();

  const int warp_row = warp * Tr::kRowsPerWarp;  // first row of this warp inside the tile
  // ldmatrix lane addressing (see mma.cuh): A / trans-B pattern and non-trans B pattern.
  // Per-lane swizzled byte offsets; fragment (R, C) is then Tile::frag_offset(base, R, C).
  const uint32_t q_base = QTile::byte_offset(warp_row + lane % 16, lane / 16);
  const uint32_t k_base = KTile::byte_offset((lane % 8) + (lane / 16) * 8, (lane / 8) % 2);
  const uint32_t v_base = KTile::byte_offset(lane % 16, lane / 16);

  uint32_t q_frag[Tr::kQInRegs ? Tr::kKSteps : 1][kStrips][4];
  if constexpr (Tr::kQInRegs) {
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < Tr::kKSteps; ++kk)
#pragma unroll
      for (int s = 0; s < kStrips; ++s)
        ldmatrix_x4(q_frag[kk][s], sQ_u + QTile::frag_offset(q_base, s * 16, kk * 2));
  }

  float acc_o[kStrips][Tr::kDTiles][4];
#pragma unroll
  for (int s = 0; s < kStrips; ++s)
#pragma unroll
    for (int d = 0; d < Tr::kDTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[s][d][e] = 0.f;
  float row_max[kStrips][2], row_sum[kStrips][2];
#pragma unroll
  for (int s = 0; s < kStrips; ++s)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_max[s][hh] = -INFINITY;
      row_sum[s][hh] = 0.f;
    }
  const float scale_log2 = p.softmax_scale_log2;

  // One key tile: S = Q K^T, mask (kMask), online softmax, dropout, O += P V. The masked tiles
  // (sequence end, causal diagonal) are the highest ones; they run in a loop of their own so the
  // register allocation of the unmasked loop is not burdened by the mask arithmetic.
  // n_next: the tile visited after n_block (< 0: none), prefetched during n_block. Block-sparse, it
  // is found at the top of the tile, before the score accumulators are live (found later, the walk's
  // temporaries spill); dense, it is spelled from col0 where used, which ptxas allocates best.
  auto process_tile = [&](const int n_block, const int n_next, const bool need_mask) {
    const int col0 = n_block * kBlockN;
    const uint32_t sK_u = sK0_u + kv_stage, sV_u = sK_u + KTile::kBytes;
    cp_async_wait<0>();  // K[n_block] (two stages: and V[n_block]; first tile: and Q) have landed
    __syncthreads();     // ... for every thread; and everyone is done reading the buffers refilled next
    auto next_col0 = [&]() { return kSparse ? n_next * kBlockN : col0 - kBlockN; };
    if constexpr (Tr::kKVStages == 1) {
      kv_loader.load(sV_u, v_gmem + kv_lane, v_gmem, p.k_row_stride, col0, seqlen_k);
      cp_async_commit();
    } else if (const int next = next_col0(); kSparse ? next >= 0 : n_block > 0) {  // prefetch
      const uint32_t nk = sK0_u + (kv_stage ^ kStageBytes);
      kv_loader.load(nk, k_gmem + kv_lane, k_gmem, p.k_row_stride, next, seqlen_k);
      kv_loader.load(nk + KTile::kBytes, v_gmem + kv_lane, v_gmem, p.k_row_stride, next, seqlen_k);
      cp_async_commit();
    }

    // S = Q K^T
    float acc_s[kStrips][Tr::kNTiles][4];
#pragma unroll
    for (int s = 0; s < kStrips; ++s)
#pragma unroll
      for (int j = 0; j < Tr::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[s][j][e] = 0.f;
#pragma unroll(Tr::kQKUnroll)
    for (int kk = 0; kk < Tr::kKSteps; ++kk) {
      uint32_t qa[kStrips][4];
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[s][e] = q_frag[kk][s][e];
        } else {
          ldmatrix_x4(qa[s], sQ_u + QTile::frag_offset(q_base, s * 16, kk * 2));
        }
      }
#pragma unroll
      for (int np = 0; np < Tr::kNTiles / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK_u + KTile::frag_offset(k_base, np * 16, kk * 2));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
#pragma unroll
        for (int s = 0; s < kStrips; ++s) {
          mma_m16n8k16<T>(acc_s[s][2 * np], qa[s], b0);
          mma_m16n8k16<T>(acc_s[s][2 * np + 1], qa[s], b1);
        }
      }
    }

    // Mask the sequence end and, causal, everything right of the diagonal (block-uniform test).
    if (need_mask) {
#pragma unroll
      for (int s = 0; s < kStrips; ++s)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = row0 + warp_row + s * 16 + g + hh * 8;
          const int limit = kIsCausal ? min(seqlen_k, i + diag + 1) : seqlen_k;  // first hidden key
#pragma unroll
          for (int j = 0; j < Tr::kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (col0 + j * 8 + 2 * t4 + e >= limit) acc_s[s][j][2 * hh + e] = -INFINITY;
        }
    }

    // Online softmax. Lazy (kLazyRescale): a row's reference max m moves only when the tile max
    // exceeds it by more than kRescaleGapLog2 (log2 units), so P = exp2(S * scale - m) <= 2^8 and
    // after the first few tiles almost no row needs its O rescaled; the rescale is a branch that a
    // warp skips when none of its rows moved. Exact: O, the row sum and the LSE all use the same m.
    // Eager: FlashAttention-2's m = running max and a rescale on every tile.
#pragma unroll
    for (int s = 0; s < kStrips; ++s)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        // row_max holds the reference max already scaled to log2 units (m * scale * log2 e).
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < Tr::kNTiles; ++j) mx = fmaxf(mx, fmaxf(acc_s[s][j][2 * hh], acc_s[s][j][2 * hh + 1]));
        mx = quad_max(mx) * scale_log2;  // softmax_scale > 0, so -inf stays -inf
        const float m_old = row_max[s][hh];
        if constexpr (Tr::kLazyRescale) {
          if (mx > m_old + kRescaleGapLog2) {
            if (m_old != -INFINITY) {  // a row that saw no key yet has O = 0 and sum 0
              const float corr = fast_exp2(m_old - mx);
              row_sum[s][hh] *= corr;
#pragma unroll
              for (int d = 0; d < Tr::kDTiles; ++d) {
                acc_o[s][d][2 * hh] *= corr;
                acc_o[s][d][2 * hh + 1] *= corr;
              }
            }
            row_max[s][hh] = mx;
          }
        } else {
          mx = fmaxf(mx, m_old);
          const float corr = fast_exp2(m_old - (mx == -INFINITY ? 0.f : mx));
          row_sum[s][hh] *= corr;
#pragma unroll
          for (int d = 0; d < Tr::kDTiles; ++d) {
            acc_o[s][d][2 * hh] *= corr;
            acc_o[s][d][2 * hh + 1] *= corr;
          }
          row_max[s][hh] = mx;
        }
        const float m_ref = row_max[s][hh];
        const float m_scaled = m_ref == -INFINITY ? 0.f : m_ref;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < Tr::kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(fmaf(acc_s[s][j][2 * hh + e], scale_log2, -m_scaled));
            acc_s[s][j][2 * hh + e] = pe;
            sum += pe;
          }
        row_sum[s][hh] += sum;
      }

    // Dropout after the row sums (the normaliser counts every probability); 1/(1-p) at the end.
    if constexpr (kHasDropout) {
#pragma unroll
      for (int s = 0; s < kStrips; ++s)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = row0 + warp_row + s * 16 + g + hh * 8;
#pragma unroll
          for (int j = 0; j < Tr::kNTiles; ++j) {
            // Lanes t4 = 0,1 share the Philox call of columns 8j + 0..3, lanes 2,3 that of 8j + 4..7.
            const int j0 = col0 + j * 8 + 4 * (t4 / 2);
            const Philox4 r = dropout_draws(seed, offset, bh, i, j0);
            const uint32_t r0 = (t4 & 1) ? r.z : r.x, r1 = (t4 & 1) ? r.w : r.y;
            const bool keep0 = r0 < keep_thresh, keep1 = r1 < keep_thresh;
            if (!keep0) acc_s[s][j][2 * hh] = 0.f;
            if (!keep1) acc_s[s][j][2 * hh + 1] = 0.f;
            if (p.dropout_mask != nullptr && i < seqlen_q) {
              const int jj = col0 + j * 8 + 2 * t4;
              uint8_t* mrow = p.dropout_mask + (static_cast<int64_t>(bh) * seqlen_q + i) * seqlen_k;
              if (jj < seqlen_k) mrow[jj] = keep0;
              if (jj + 1 < seqlen_k) mrow[jj + 1] = keep1;
            }
          }
        }
    }

    if constexpr (Tr::kKVStages == 1) {
      cp_async_wait<0>();  // V[n_block] has landed
      __syncthreads();     // ... for every thread; and everyone is done reading K[n_block]
      if (const int next = next_col0(); kSparse ? next >= 0 : n_block > 0) {
        kv_loader.load(sK_u, k_gmem + kv_lane, k_gmem, p.k_row_stride, next, seqlen_k);
        cp_async_commit();
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < Tr::kPSteps; ++kk) {
      uint32_t pa[kStrips][4];
#pragma unroll
      for (int s = 0; s < kStrips; ++s) pack_c_to_a<T>(pa[s], acc_s[s][2 * kk], acc_s[s][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < Tr::kDTiles / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV_u + KTile::frag_offset(v_base, kk * 16, dp * 2));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
#pragma unroll
        for (int s = 0; s < kStrips; ++s) {
          mma_m16n8k16<T>(acc_o[s][2 * dp], pa[s], b0);
          mma_m16n8k16<T>(acc_o[s][2 * dp + 1], pa[s], b1);
        }
      }
    }
    if constexpr (Tr::kKVStages == 2) {  // the next tile lives in the other stage
      kv_stage ^= kStageBytes;
    }
  };
  auto needs_mask = [&](int n_block) {
    const int col0 = n_block * kBlockN;
    return col0 + kBlockN > seqlen_k || (kIsCausal && col0 + kBlockN - 1 > row0 + diag);
  };
  if constexpr (kSparse) {
    for (int n_block = n_first; n_block >= 0;) {
      const int n_next = prev_kept(n_block);
      process_tile(n_block, n_next, needs_mask(n_block));
      n_block = n_next;
    }
  } else {
    int n_block = n_block_max - 1;
    for (; n_block >= 0; --n_block) process_tile(n_block, 0, needs_mask(n_block));
  }

  // Epilogue: normalise, write LSE, stage O through shared memory (the Q buffer: every thread's
  // last read of sQ came before the loop's last barrier) for 16-byte coalesced stores.
  const float out_scale = kHasDropout ? 1.f / (1.f - p.p_dropout) : 1.f;
  T* o_ptr;
  float* lse_ptr;
  out_ptrs(o_ptr, lse_ptr);
#pragma unroll
  for (int s = 0; s < kStrips; ++s)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float l = quad_sum(row_sum[s][hh]);
      const bool empty = !(l > 0.f);
      const float inv = empty ? 0.f : out_scale / l;
      const int r = warp_row + s * 16 + g + hh * 8;
      if (t4 == 0 && row0 + r < seqlen_q) {
        const float m = row_max[s][hh];
        lse_ptr[row0 + r] = empty ? -INFINITY : (m + __log2f(l)) * 0.69314718055994531f;
      }
#pragma unroll
      for (int d = 0; d < Tr::kDTiles; ++d) {
        const uint32_t v = pack_float2<T>(acc_o[s][d][2 * hh] * inv, acc_o[s][d][2 * hh + 1] * inv);
        const int col = d * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(sQ + QTile::offset(r, col) + (col & 7)) = v;
      }
    }
  __syncthreads();
  constexpr int kTotal = QTile::kElems / 8;
#pragma unroll
  for (int it = 0; it < kTotal / kNThreads; ++it) {
    int r, c;
    QTile::copy_coords(it * kNThreads + tid, r, c);
    if (row0 + r < seqlen_q)
      *reinterpret_cast<uint4*>(o_ptr + static_cast<int64_t>(row0 + r) * p.o_row_stride + c) =
          *reinterpret_cast<const uint4*>(sQ + QTile::offset(r, c));
  }
}

// Tiles tuned for Hopper's register allocation (Traits::kSm90Only) are compiled only for sm_90+;
// on older GPUs the host dispatch launches FwdConfig::TraitsSm8x instead, so this never traps.
template <typename Tr, bool kIsCausal, bool kHasDropout, bool kSparse>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocksPerSm) flash_fwd_kernel(const FlashFwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (Tr::kSm90Only) {
    __trap();
  } else {
    flash_fwd_block<Tr, kIsCausal, kHasDropout, kSparse>(p);
  }
#else
  flash_fwd_block<Tr, kIsCausal, kHasDropout, kSparse>(p);
#endif
}

// A tile whose register allocation fits only Hopper's compiler (it spills on sm_80).
template <typename Base>
struct Sm90Only : Base {
  static constexpr bool kSm90Only = true;
};

// Per head dim (and dropout, whose Philox state needs registers): the tile shape
// (kBlockM, kBlockN, warps, Q held in registers, Q K^T unroll, K/V stages). Every choice compiles
// without spills; kernels/NOTES.md has the measurements behind them. TraitsSparse / TraitsSparseSm8x:
// the block-sparse instances (sm_90+ / older), the dense tiles except where the walk spills.
template <int kHeadDim, bool kHasDropout, typename T>
struct FwdConfig;
template <bool kHasDropout, typename T>
struct FwdConfig<32, kHasDropout, T> {
  using Traits = FwdTraits<32, 128, kHasDropout ? 32 : 128, 4, true, T, 0, 2>;
  using TraitsSm8x = Traits;
  using TraitsSparse = Traits;
  using TraitsSparseSm8x = Traits;
};
template <bool kHasDropout, typename T>
struct FwdConfig<64, kHasDropout, T> {
  using Traits = FwdTraits<64, 128, kHasDropout ? 32 : 64, 4, true, T, 0, 2>;
  using TraitsSm8x = Traits;
  using TraitsSparse = Traits;
  using TraitsSparseSm8x = Traits;
};
template <bool kHasDropout, typename T>
struct FwdConfig<96, kHasDropout, T> {
  using Traits = std::conditional_t<kHasDropout, FwdTraits<96, 64, 64, 4, true, T, 0, 2>,
                                    FwdTraits<96, 128, 64, 4, false, T, 2, 2>>;
  using TraitsSm8x = Traits;
  using TraitsSparse = Traits;
  using TraitsSparseSm8x = Traits;
};
template <bool kHasDropout, typename T>
struct FwdConfig<128, kHasDropout, T> {  // two K/V stages spill here and measured no faster
  using Traits = std::conditional_t<kHasDropout, FwdTraits<128, 64, 64, 4, true, T, 0, 2>,
                                    Sm90Only<FwdTraits<128, 128, 64, 4, false, T, 2, 1>>>;
  // sm_8x: 128 x 64 spills a few bytes there, 128 x 32 does not (FlashAttention-2's A100 choice too).
  using TraitsSm8x = std::conditional_t<kHasDropout, Traits, FwdTraits<128, 128, 32, 4, false, T>>;
  // Block-sparse: the dense sm_90 tile with the Q K^T loop unrolled x4 (x2 spills 8 B with the walk);
  // with dropout 64 x 32 (64 x 64 spills 4 B on sm_80 with the walk).
  using SparseDropout = FwdTraits<128, 64, 32, 4, true, T, 0, 2>;
  using TraitsSparse =
      std::conditional_t<kHasDropout, SparseDropout, Sm90Only<FwdTraits<128, 128, 64, 4, false, T, 4, 1>>>;
  using TraitsSparseSm8x = std::conditional_t<kHasDropout, SparseDropout, TraitsSm8x>;
};

template <typename Tr, bool kIsCausal, bool kHasDropout, bool kSparse>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  auto kernel = flash_fwd_kernel<Tr, kIsCausal, kHasDropout, kSparse>;
  const int smem = Tr::kSmemBytes + (kSparse ? (p.block_mask_cols + 15) / 16 * 16 : 0);  // + the mask row
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.num_heads_q, p.batch);
  kernel<<<grid, Tr::kNThreads, smem, stream>>>(p);
}

// Compute capability major of the current device (cached per device).
inline int device_major() {
  static int major[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 0;
  if (major[dev] == 0) cudaDeviceGetAttribute(&major[dev], cudaDevAttrComputeCapabilityMajor, dev);
  return major[dev];
}

template <typename Config, bool kIsCausal, bool kHasDropout>
void launch_for_arch(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.block_mask != nullptr && device_major() >= 9)
    launch_flash_fwd<typename Config::TraitsSparse, kIsCausal, kHasDropout, true>(p, stream);
  else if (p.block_mask != nullptr)
    launch_flash_fwd<typename Config::TraitsSparseSm8x, kIsCausal, kHasDropout, true>(p, stream);
  else if (device_major() >= 9) launch_flash_fwd<typename Config::Traits, kIsCausal, kHasDropout, false>(p, stream);
  else launch_flash_fwd<typename Config::TraitsSm8x, kIsCausal, kHasDropout, false>(p, stream);
}

}  // namespace longctx

#include "flash_fwd_sm90.cuh"

namespace longctx {

// One explicit instantiation per (head dim, dtype) lives in flash_fwd_hdim*_*.cu.
template <int kHeadDim, typename T>
void run_flash_fwd_hdim(const FlashFwdParams& p, cudaStream_t stream) {
  using WithDropout = FwdConfig<kHeadDim, true, T>;
  using NoDropout = FwdConfig<kHeadDim, false, T>;
  const bool dropout = p.p_dropout > 0.f;
  // Hopper path (flash_fwd_sm90.cuh) for head dims 64 and 128 without dropout, when enabled and built.
  if constexpr (kHeadDim == 64 || kHeadDim == 128) {
    if (p.use_sm90 && !dropout) {
      const bool sparse = p.block_mask != nullptr;
      bool launched;
      if (p.is_causal)
        launched = sparse ? sm90::launch_fwd<kHeadDim, T, true, true>(p, stream)
                          : sm90::launch_fwd<kHeadDim, T, true, false>(p, stream);
      else
        launched = sparse ? sm90::launch_fwd<kHeadDim, T, false, true>(p, stream)
                          : sm90::launch_fwd<kHeadDim, T, false, false>(p, stream);
      if (launched) return;
    }
  }
  if (p.is_causal) {
    if (dropout) launch_for_arch<WithDropout, true, true>(p, stream);
    else launch_for_arch<NoDropout, true, false>(p, stream);
  } else {
    if (dropout) launch_for_arch<WithDropout, false, true>(p, stream);
    else launch_for_arch<NoDropout, false, false>(p, stream);
  }
}

}  // namespace longctx
