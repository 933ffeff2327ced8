// FlashAttention backward, Hopper path (sm_90a): the dK / dV kernel on warpgroup MMA (wgmma).
//
// Same mathematics and outputs as flash_bwd_dkdv_kernel (flash_bwd.cuh), different machinery. The
// stage-1 kernel is bound by shared-memory reads: each of its 8 warps streams the whole Q and dO tile
// through ldmatrix twice per iteration (~720 KB per 64 x 128 iteration at head dim 128). wgmma reads
// its shared-memory operands once per warpgroup (4 warps) and keeps P^T / dS^T in registers, so the
// same iteration reads ~290 KB, and the tensor cores run at the Hopper rate.
//
// One thread block per (kBlockN = 128 keys, query head, batch), three warpgroups (384 threads).
// Math warpgroup g (0, 1) owns keys [64g, 64g + 64) of the block and loops over the query tiles
// (kBlockM = 64, 128 at head dim 64) that see them:
//   S^T  = K_g Q^T                     wgmma m64n64,  A = K (smem, K-major),  B = Q (K-major)
//   P^T  = exp2(S^T scale_log2 - lse2)  in registers, packed (masked where needed: causal, past the end;
//                                      empty and padding rows have lse2 = +inf)
//   dP^T = V_g dO^T                    wgmma m64n64,  A = V,                  B = dO (K-major)
//   dV  += P^T dO                      wgmma m64nD,   A = P^T (registers),    B = dO (MN-major)
//   dS^T = P^T (dP^T - rowsum(dO O))    in registers, in place of P^T (P^T as rounded for dV, as
//                                      PyTorch's own low-precision backward does), also stored to
//                                      shared memory for the dQ warpgroup
//   dK  += dS^T Q                      wgmma m64nD,   A = dS^T (registers),   B = Q (MN-major)
// The dQ warpgroup (2) computes dQ = dS K in two 64 x 64 parts (query rows 64p.. at 128 queries, else
// columns 64p..): wgmma m64n64, A = dS (smem, M-major), B = K (MN-major), staged in shared memory and
// added to dq_accum by the copy engine (one bulk reduce-add per warp and part; DqTiles); its warp 0
// also loads the query tiles from the third on (thread 0 of the block loads the first two in the
// prologue): Q and dO by TMA, their row statistics (lse2 and rowsum(dO O), prepared
// per query tile by flash_bwd_dot_do_o_kernel: StatTiles) by a bulk copy, into a two-stage ring.
// No block-wide barrier in the loop: mbarriers hand over a query stage (full: loaded; empty: both math
// warpgroups are done with it) and a dS^T buffer (two, by tile parity; full: both math warpgroups
// stored theirs; empty: dQ has read it), so the three warpgroups drift and fill each other's gaps on
// the tensor cores. Registers: 2 x 216 (math) + 72 (dQ) = the block's 3 x 168, hence S^T alone first
// and dP^T with dV (one 64 x kBlockM accumulator next to dK / dV at a time). dK / dV stay in registers
// and are written once at the end (dK scaled).
// Dropout stays on the stage-1 kernel; the deterministic mode uses this kernel without its dQ part
// (flash_bwd_dq_kernel computes dQ).
//
// Included by flash_bwd.cuh (after its bwd:: helpers, before run_flash_bwd_hdim), not on its own.
#pragma once

#include <type_traits>

#include "tile_order.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace longctx {
namespace sm90 {

// dq_accum as the Hopper backward writes it: one chunk of kBlockM x D fp32 per (query tile, head)
// (bwd::tile_chunk: sequence b's tiles start at SeqInfo::query_tile0, so two packed sequences never
// share a tile; the binding sizes dq_accum for kBlockM = 128, which covers 64 too). Inside a chunk the
// values lie in the order of the warps' dQ accumulators, [part 2][warp 4][j 8][lane 32][4] (the dQ
// warpgroup's two GEMMs), so that each warp stores its 4 KB contiguously (conflict-free) and hands it
// to one bulk reduce-add; flash_bwd_convert_dq_tiled_kernel reads it back.
template <int kBlockM, int D>
struct DqTiles {
  static_assert(kBlockM * D == 128 * 64, "a chunk is two 64 x 64 parts");
  static constexpr int kChunk = kBlockM * D;      // floats per (tile, head)
  static constexpr int kWarpFloats = 32 * 32;     // one warp's part of a chunk: 32 lanes x 32 values
  static constexpr bool kByRows = kBlockM == 128;  // part g: rows 64g.. (else columns 64g..)
  __device__ __forceinline__ static float* chunk(const FlashBwdParams& p, const SeqInfo& s, int b, int h, int m) {
    return bwd::tile_chunk<kBlockM, kChunk>(p.dq_accum, p, s, b, h, m);
  }
  // Float4 j of `lane` of `warp` (0..3) of `part` holds the m64n64 accumulator's elements (row, col),
  // (row, col + 1), (row + 8, col), (row + 8, col + 1) of that part (wgmma.cuh), with:
  __device__ __forceinline__ static int row(int part, int warp, int lane) {
    return (kByRows ? 64 * part : 0) + 16 * warp + lane / 4;
  }
  __device__ __forceinline__ static int col(int part, int j, int lane) {
    return (kByRows ? 0 : 64 * part) + 8 * j + 2 * (lane % 4);
  }
};

template <int kHeadDim_, typename T_>
struct BwdTraits {
  using T = T_;
  static constexpr int D = kHeadDim_;
  static_assert(D == 64 || D == 128, "the Hopper backward covers head dims 64 and 128");
  // Queries per iteration: bwd::kSm90BlockM (128 at head dim 64, 64 at head dim 128).
  // Three warpgroups: two "math" warpgroups (keys 64g.., the S^T / dP^T / dV / dK GEMMs and the
  // elementwise work) and one dQ warpgroup (the dQ GEMM, its reduction into dq_accum, the loads).
  static constexpr int kBlockN = 128, kBlockM = bwd::kSm90BlockM<D>, kThreads = 384;
  // Causal block order (tile_order.cuh): the Q, dO (16-bit) and dq_accum (fp32) bytes of the (head,
  // batch) pairs whose key blocks are ordered by length together.
  static constexpr int64_t kWindowBytes = int64_t{32} << 20;
  // setmaxnreg: the block starts with 168 registers per thread (384 threads); 2 x 216 + 72 = 504 =
  // 3 x 168 (more than the block holds makes setmaxnreg.inc wait forever).
  static constexpr int kMathRegs = 216, kDqRegs = 72;
  static_assert(2 * kMathRegs + kDqRegs <= 3 * 168, "the block's register pool");
  using KTile = SwizzledTile<kBlockN, D>;   // K, V: [keys][D]
  using QTile = SwizzledTile<kBlockM, D>;   // Q, dO: [queries][D], two stages each
  using DSTile = SwizzledTile<kBlockN, kBlockM>;  // dS^T: [keys][queries]
  // Byte offsets from the 1024-aligned base; every tile starts on a 1024-byte boundary.
  static constexpr int kOffV = KTile::kBytes;
  static constexpr int kOffQ = 2 * KTile::kBytes;
  static constexpr int kOffdO = kOffQ + 2 * QTile::kBytes;
  static constexpr int kOffdS = kOffdO + 2 * QTile::kBytes;      // two dS^T buffers (by iteration parity)
  static constexpr int kOffdQ = kOffdS + 2 * DSTile::kBytes;     // this tile's dQ (fp32, DqTiles order)
  static constexpr int kOffStats = kOffdQ + 4 * kBlockM * D;     // [2 stages][lse2, rowsum(dO O)][kBlockM]
  // mbarriers, two of each (by stage / dS^T buffer): full (a query tile is in), empty (both math
  // warpgroups are done with it), dS full (both math warpgroups' dS^T is stored), dS empty (dQ read it).
  static constexpr int kOffBar = kOffStats + 4 * kBlockM * 4;
  static constexpr int kOffCount = kOffBar + 64;                 // block-sparse: kept query tiles
  static constexpr int kOffMask = kOffCount + 16;  // block-sparse: the mask column, then the kept-tile list
  static constexpr int kSmemBytes = kOffMask + 1024;  // + alignment slack (+ the mask column and list)
};

// kDq: dQ into dq_accum too (else the deterministic mode's flash_bwd_dq_kernel computes it); a template
// parameter because a run-time test between the GEMMs makes ptxas serialise them.
template <typename Tr, bool kIsCausal, bool kDq>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_dkdv_sm90_kernel(const FlashBwdParams p, const __grid_constant__ QdoMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using KTile = typename Tr::KTile;
  using QTile = typename Tr::QTile;
  using DSTile = typename Tr::DSTile;
  constexpr int D = Tr::D, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kDSteps = D / 16;      // k16 steps over the head dim (S^T, dP^T)
  constexpr int kMSteps = kBlockM / 16;  // k16 steps over the query tile (dV, dK)
  constexpr int kNSteps = kBlockN / 16;  // k16 steps over the key block (dQ)
  using WgS = Wgmma<kBlockM, T>;   // S^T, dP^T: 64 keys x kBlockM queries
  using WgKV = Wgmma<D, T>;        // dK, dV: 64 keys x D
  using WgQ = Wgmma<64, T>;        // dQ: a 64 x 64 part
  static_assert(kBlockM * D == 128 * 64, "dQ is two 64 x 64 parts");
  using DqT = DqTiles<kBlockM, D>;  // the dQ warpgroup computes part p (rows or columns 64p..) in turn
  using StatT = bwd::StatTiles<kBlockM>;

  extern __shared__ char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  char* const smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sK = base, sV = base + Tr::kOffV, sQ0 = base + Tr::kOffQ, sdO0 = base + Tr::kOffdO;
  const uint32_t sdS0 = base + Tr::kOffdS, bars = base + Tr::kOffBar;
  const uint32_t sStats = base + Tr::kOffStats;  // [2 stages][lse2, rowsum(dO O)][kBlockM]

  // Causal key blocks differ in length (key block n sees the query tiles from about n on): the blocks
  // are launched in windows of (head, batch) pairs whose Q, dO and dQ fit a share of L2, by length
  // within a window (tile_order.cuh); the hardware starts blocks in index order.
  int n_block = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  if constexpr (kIsCausal) {
    const int num_pairs = gridDim.y * gridDim.z;
    const int window = tile_window(int64_t{8} * D * p.seqlen_q, num_pairs, Tr::kWindowBytes);
    const WindowedTile wt =
        windowed_tile(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), gridDim.x, num_pairs, window);
    n_block = wt.idx;
    b = wt.pair % gridDim.y;
    h = wt.pair / gridDim.y;
  }
  const int tid = threadIdx.x;
  const SeqInfo s(p, b);
  const int col0 = n_block * kBlockN;
  if (col0 >= s.seqlen_k) return;
  const int hk = h / (p.num_heads_q / p.num_heads_k);
  const int diag = s.seqlen_k - s.seqlen_q;  // query i sees keys j <= i + diag (causal)
  const int m_end = (s.seqlen_q + kBlockM - 1) / kBlockM;
  const int m_begin = kIsCausal ? max(0, col0 - diag) / kBlockM : 0;
  // Block-sparse: only the query tiles of kept mask blocks are visited. The block's mask column is
  // staged in shared memory and compacted into an ascending list of kept tiles, read by visit index
  // (dense: every tile from m_begin).
  const MaskLine<kBlockM> mask = mask_col<kBlockM>(p, b, h, col0);
  const bool sparse = mask.flags != nullptr;
  const int mask_blocks = (s.seqlen_q + kMaskBlock - 1) / kMaskBlock;
  int16_t* const tile_list = reinterpret_cast<int16_t*>(smem + Tr::kOffMask + (mask_blocks + 15) / 16 * 16);
  int n_visits = m_end - m_begin;
  if (sparse) {
    stage_mask_line<kBlockM, kThreads>(reinterpret_cast<uint8_t*>(smem + Tr::kOffMask), mask, mask_blocks, tid);
    __syncthreads();
    if (tid < 32) {
      const int count = compact_kept_asc<kBlockM>(tile_list, base + Tr::kOffMask, m_begin, m_end, tid);
      if (tid == 0) *reinterpret_cast<int*>(smem + Tr::kOffCount) = count;
    }
    __syncthreads();
    n_visits = *reinterpret_cast<const int*>(smem + Tr::kOffCount);
  }
  auto tile = [&](int i) {  // the query tile of visit i < n_visits
    return sparse ? static_cast<int>(tile_list[i]) : m_begin + i;
  };
  const int m_first = n_visits > 0 ? tile(0) : m_end;

  const T* k_ptr = static_cast<const T*>(p.k) + s.tok(b, s.k_start, p.k_batch_stride, p.k_row_stride, hk, p.k_head_stride);
  const T* v_ptr = static_cast<const T*>(p.v) + s.tok(b, s.k_start, p.v_batch_stride, p.v_row_stride, hk, p.v_head_stride);
  // This block's chunk of query tile m is dq_tiles + m x dq_tile_stride (DqTiles), its row statistics
  // StatTiles::chunk(.., m) (lse2 then rowsum(dO O), padding rows included).
  float* const dq_tiles = DqT::chunk(p, s, b, h, 0);
  const int64_t dq_tile_stride = static_cast<int64_t>(p.num_heads_q) * DqT::kChunk;

  // Prologue: K, V (cp.async, all threads) and the first two query tiles. A query tile is Q and dO by
  // TMA and its row statistics by a bulk copy (one thread), all completing on the stage's "full" mbarrier.
  T* const smem_t = reinterpret_cast<T*>(smem);
  auto full = [&](int st) { return bars + 8 * st; };
  auto empty = [&](int st) { return bars + 16 + 8 * st; };
  auto ds_full = [&](int st) { return bars + 32 + 8 * st; };
  auto ds_empty = [&](int st) { return bars + 48 + 8 * st; };
  if (tid == 0) {
    for (int st = 0; st < 2; ++st) {
      mbar_init(full(st), 1);
      mbar_init(empty(st), 8);     // lane 0 of each math warp
      mbar_init(ds_full(st), 8);   // lane 0 of each math warp
      mbar_init(ds_empty(st), 4);  // lane 0 of each dQ warp
    }
    mbar_init_fence();
  }
  __syncthreads();
  bwd::copy_tile<KTile, kThreads>(smem_t, k_ptr, p.k_row_stride, col0, s.seqlen_k, tid);
  bwd::copy_tile<KTile, kThreads>(smem_t + Tr::kOffV / 2, v_ptr, p.v_row_stride, col0, s.seqlen_k, tid);
  cp_async_commit();
  auto load_query_tile = [&](int m, int stage) {  // one thread
    const uint32_t bar = full(stage);
    // Packed varlen tensors are one "batch" whose rows start at the sequence's offset.
    const int tma_row = (s.varlen ? s.q_start : 0) + m * kBlockM, tma_batch = s.varlen ? 0 : b;
    mbar_arrive_expect_tx(bar, 2 * QTile::kBytes + 4 * StatT::kChunk);
    tma_load_tile<QTile>(sQ0 + stage * QTile::kBytes, &maps.q, bar, tma_row, h, tma_batch);
    tma_load_tile<QTile>(sdO0 + stage * QTile::kBytes, &maps.dout, bar, tma_row, h, tma_batch);
    bulk_load(sStats + stage * 4 * StatT::kChunk, StatT::chunk(p, s, b, h, m), 4 * StatT::kChunk, bar);
  };
  if (tid == 0) {
    if (n_visits > 0) load_query_tile(m_first, 0);
    if (n_visits > 1) load_query_tile(tile(1), 1);
  }
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();  // K and V are in

  // Warpgroup index, warp-uniform by construction (a shuffle from lane 0) so that ptxas keeps what
  // derives from it in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;

  if (wg == 2) {
    // dQ warpgroup. Iteration it: once both math warpgroups' dS^T of tile it is in shared memory, dQ =
    // dS K in two 64 x 64 parts (query rows 64p.. at 128 queries, else columns 64p..), each staged in
    // shared memory in DqTiles order and added to dq_accum by the copy engine (one bulk reduce-add per
    // warp and part; rows past the sequence's end land in its own padding tile, which the conversion
    // skips). Warp 0 loads tile it + 2 into the stage both math warpgroups have released (load_ahead).
    regs_dec<Tr::kDqRegs>();
    for (int it = 0; it < n_visits; ++it) {
      const int stage = it & 1;
      // Warp 0: tile it + 2 into the stage once both math warpgroups are done with tile it (whole warps
      // wait: this warpgroup issues wgmmas). With dQ, right behind the first dQ GEMM of tile it, ahead
      // of its shared-memory stores and their fence (the math warpgroups' dK GEMMs, after which they
      // release the stage, run beside it).
      auto load_ahead = [&] {
        if (warp == 0 && it + 2 < n_visits) {
          mbar_wait(empty(stage), (it >> 1) & 1);
          if (lane == 0) load_query_tile(tile(it + 2), stage);
          __syncwarp();
        }
      };
      if constexpr (kDq) {
        const uint32_t sdS = sdS0 + stage * DSTile::kBytes;
        const int m_block = tile(it);
        mbar_wait(ds_full(stage), (it >> 1) & 1);
#pragma unroll 1
        for (int part = 0; part < 2; ++part) {
          // A = dS (M-major view of dS^T), B = K (MN-major), k16 step = 16 keys.
          const uint32_t a_start = sdS + (DqT::kByRows ? part * DSTile::kBlockBytes : 0);
          const uint32_t b_start = sK + (DqT::kByRows ? 0 : part * KTile::kBlockBytes);
          float acc_dq[WgQ::kRegs];
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kNSteps; ++kk)
            WgQ::template ss<1, 1>(acc_dq, smem_desc(a_start + kk * 16 * 128, DSTile::kBlockBytes, 1024),
                                   smem_desc(b_start + kk * 16 * 128, KTile::kBlockBytes, 1024), kk);
          wgmma_commit();
          wgmma_wait<0>();
          fence_operand(acc_dq);
          if (part == 0) load_ahead();
          if (part == 1) mbar_arrive_if(ds_empty(stage), lane == 0);  // dS^T buffer read
          // This warp's 32 x 32 values of the part, once its bulk reduce-add of the tile before has read
          // them (the most recent bulk group, the other part's, may still be reading its own region).
          const int warp_off = (4 * part + warp) * DqT::kWarpFloats;
          float* const sdq_warp = reinterpret_cast<float*>(smem + Tr::kOffdQ) + warp_off;
          if (lane == 0) bulk_wait_read<1>();
          __syncwarp();
#pragma unroll
          for (int j = 0; j < 8; ++j)
            *reinterpret_cast<float4*>(sdq_warp + 4 * (32 * j + lane)) =
                make_float4(acc_dq[4 * j], acc_dq[4 * j + 1], acc_dq[4 * j + 2], acc_dq[4 * j + 3]);
          fence_proxy_async();
          __syncwarp();
          if (lane == 0) {
            bulk_reduce_add_f32(dq_tiles + m_block * dq_tile_stride + warp_off, base + Tr::kOffdQ + 4 * warp_off,
                                4 * DqT::kWarpFloats);
            bulk_commit();
          }
        }
      }
      if constexpr (!kDq) load_ahead();
    }
    // Done with sK (every dQ GEMM has been waited for): the math warpgroups may stage dK / dV over it
    // while the last bulk reductions still read this warpgroup's dQ staging, which they do not touch.
    named_arrive(1, kThreads);
    if (kDq && lane == 0) bulk_wait_read<0>();  // the reductions' shared-memory source outlives their reads
    return;
  }
  // Math warpgroup wg: keys 64 wg .. 64 wg + 63 of the block, every query tile.
  regs_inc<Tr::kMathRegs>();
  const int key_row = 64 * wg + 16 * warp + g;  // this thread's first key row inside the block
  float acc_dk[WgKV::kRegs], acc_dv[WgKV::kRegs];
#pragma unroll
  for (int i = 0; i < WgKV::kRegs; ++i) acc_dk[i] = acc_dv[i] = 0.f;
  {
    const float scale_log2 = p.softmax_scale_log2;
    for (int it = 0; it < n_visits; ++it) {
      const int stage = it & 1;
      const int m_block = tile(it);
      const uint32_t sQ = sQ0 + stage * QTile::kBytes, sdO = sdO0 + stage * QTile::kBytes;
      const float* const lse2_s = reinterpret_cast<const float*>(smem + Tr::kOffStats) + stage * StatT::kChunk;
      const float* const dsum_s = lse2_s + kBlockM;
      const int row0 = m_block * kBlockM;
      mbar_wait(full(stage), (it >> 1) & 1);  // this tile's Q / dO / stats
      // Packed varlen: a sequence's last query tile holds the next sequence's rows past its end. Their
      // P^T is 0 only for finite S^T, and 0 x NaN / inf is NaN in dV and dP^T: this warpgroup zeroes them
      // in Q and dO first (the other math warpgroup writes the same zeros; the dQ warpgroup reads neither).
      if (s.varlen && row0 + kBlockM > s.seqlen_q) {
        zero_tile_rows<QTile, 128>(sQ, s.seqlen_q - row0, tid % 128);
        zero_tile_rows<QTile, 128>(sdO, s.seqlen_q - row0, tid % 128);
        fence_proxy_async();
        if (wg == 0) named_sync(3, 128);  // constant ids (a computed one makes ptxas reserve all 16)
        else named_sync(4, 128);
      }

      // S^T = K_g Q^T first (dP^T goes out with dV: registers hold one 64 x kBlockM accumulator at a time
      // next to dK / dV; the other warpgroups keep the tensor cores busy meanwhile).
      float acc_s[WgS::kRegs], acc_dp[WgS::kRegs];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        const uint32_t a_off = (kk / 4) * KTile::kBlockBytes + 64 * wg * 128 + (kk % 4) * 32;
        const uint32_t b_off = (kk / 4) * QTile::kBlockBytes + (kk % 4) * 32;
        WgS::template ss<0, 0>(acc_s, smem_desc(sK + a_off, 16, 1024), smem_desc(sQ + b_off, 16, 1024), kk);
      }
      wgmma_commit();
      wgmma_wait<0>();  // S^T
      fence_operand(acc_s);

      // P^T = exp2(S^T scale_log2 - lse2[query]), packed at once into the A operand of dV. Exactly 0 on
      // empty and padding query rows (lse2 = +inf). Register r of k16 step kk holds the accumulators
      // 8 kk + 2 r (+1): query columns 16 kk + 8 (r / 2) + 2 t4 (+1) of key row key_row + 8 (r % 2).
      uint32_t p_a[kMSteps][4];
#pragma unroll
      for (int kk = 0; kk < kMSteps; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int i = 8 * kk + 2 * r, qcol = 16 * kk + 8 * (r / 2) + 2 * t4;
          const float2 lse2 = *reinterpret_cast<const float2*>(lse2_s + qcol);
          p_a[kk][r] =
              pack_float2<T>(fast_exp2(acc_s[i] * scale_log2 - lse2.x), fast_exp2(acc_s[i + 1] * scale_log2 - lse2.y));
        }
      // Keys past the end and hidden keys (causal) are zeroed in the packed values, only in the tiles
      // that need_mask (a branch around a pass of its own, so that the other tiles pay nothing for it).
      const bool need_mask = col0 + kBlockN > s.seqlen_k || (kIsCausal && col0 + kBlockN - 1 > row0 + diag);
      if (need_mask) {
#pragma unroll
        for (int kk = 0; kk < kMSteps; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int key = col0 + key_row + 8 * (r % 2), last = row0 + 16 * kk + 8 * (r / 2) + 2 * t4 + diag;
            const bool past_end = key >= s.seqlen_k;
            const bool keep_lo = !past_end && !(kIsCausal && key > last);
            const bool keep_hi = !past_end && !(kIsCausal && key > last + 1);
            p_a[kk][r] &= (keep_lo ? 0x0000ffffu : 0u) | (keep_hi ? 0xffff0000u : 0u);
          }
      }
      // dP^T = V_g dO^T, then dV += P^T dO (B = dO, MN-major: k16 step = 16 query rows).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        const uint32_t a_off = (kk / 4) * KTile::kBlockBytes + 64 * wg * 128 + (kk % 4) * 32;
        const uint32_t b_off = (kk / 4) * QTile::kBlockBytes + (kk % 4) * 32;
        WgS::template ss<0, 0>(acc_dp, smem_desc(sV + a_off, 16, 1024), smem_desc(sdO + b_off, 16, 1024), kk);
      }
#pragma unroll
      for (int kk = 0; kk < kMSteps; ++kk)
        WgKV::template rs<1>(acc_dv, p_a[kk], smem_desc(sdO + kk * 16 * 128, QTile::kBlockBytes, 1024));
      wgmma_commit();
      wgmma_wait<0>();  // dP^T and dV done: p_a is free to take dS^T
      fence_operand(acc_dp);
      fence_operand(p_a);

      // dS^T = P^T (dP^T - rowsum(dO O)[query]), P^T from its packed form (as rounded for dV, as
      // PyTorch's own low-precision backward does), in place of P^T (registers are short; the other
      // warpgroups keep the tensor cores busy meanwhile).
      uint32_t (&ds_a)[kMSteps][4] = p_a;
#pragma unroll
      for (int kk = 0; kk < kMSteps; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int qcol = 16 * kk + 8 * (r / 2) + 2 * t4;
          const float2 pv = unpack_float2<T>(p_a[kk][r]);
          const float2 dsum = *reinterpret_cast<const float2*>(dsum_s + qcol);
          const int i = 8 * kk + 2 * r;  // accumulator index of that pair
          ds_a[kk][r] = pack_float2<T>(pv.x * (acc_dp[i] - dsum.x), pv.y * (acc_dp[i + 1] - dsum.y));
        }
      if constexpr (kDq) {
        // dS^T to shared memory for the dQ warpgroup (once it has read this buffer's tile it - 2),
        // before the dK GEMM takes ds_a as its A operand (registers a wgmma in flight reads must not be
        // accessed until it is waited for):
        // element (key, query) at DSTile (row key, column query), one stmatrix per k16 step: its four
        // 8 x 8 matrices are ds_a[kk][0..3] (keys +0 / +8, queries +0 / +8), and lane l gives the
        // address of row l % 8 of matrix l / 8 (16 bytes: one swizzled chunk).
        mbar_wait(ds_empty(stage), ((it >> 1) & 1) ^ 1);
        const uint32_t sdS = sdS0 + stage * DSTile::kBytes;
        const int st_key = 64 * wg + 16 * warp + lane % 8 + 8 * ((lane / 8) % 2), st_col = 8 * (lane / 16);
#pragma unroll
        for (int kk = 0; kk < kMSteps; ++kk)
          stmatrix_x4(sdS + 2 * DSTile::offset(st_key, 16 * kk + st_col), ds_a[kk]);
        fence_proxy_async();
        __syncwarp();
        mbar_arrive_if(ds_full(stage), lane == 0);
      }
      // dK += dS^T Q (B = Q, MN-major).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kMSteps; ++kk)
        WgKV::template rs<1>(acc_dk, ds_a[kk], smem_desc(sQ + kk * 16 * 128, QTile::kBlockBytes, 1024));
      wgmma_commit();
      wgmma_wait<0>();  // dV, dK: this warpgroup is done with the stage
      fence_operand(acc_dv);
      fence_operand(acc_dk);
      __syncwarp();
      mbar_arrive_if(empty(stage), lane == 0);
    }
  }

  // Epilogue (math warpgroups): dK (scaled) and dV through shared memory (the K / V tiles) for 16-byte
  // stores.
  named_sync(1, kThreads);  // every warpgroup is done reading sK, sV
  const float scale = p.softmax_scale;
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int off = 2 * (KTile::offset(key_row + 8 * hh, 8 * j) + 2 * t4);
      *reinterpret_cast<uint32_t*>(smem + off) =
          pack_float2<T>(acc_dk[4 * j + 2 * hh] * scale, acc_dk[4 * j + 2 * hh + 1] * scale);
      *reinterpret_cast<uint32_t*>(smem + Tr::kOffV + off) = pack_float2<T>(acc_dv[4 * j + 2 * hh], acc_dv[4 * j + 2 * hh + 1]);
    }
  named_sync(2, 256);  // both math warpgroups' dK / dV are staged
  T* dk_ptr = static_cast<T*>(p.dk) + s.tok(b, s.k_start, p.dk_batch_stride, p.dk_row_stride, h, p.dk_head_stride);
  T* dv_ptr = static_cast<T*>(p.dv) + s.tok(b, s.k_start, p.dv_batch_stride, p.dv_row_stride, h, p.dv_head_stride);
  bwd::store_tile<KTile, 256>(dk_ptr, smem_t, p.dk_row_stride, col0, s.seqlen_k, tid);
  bwd::store_tile<KTile, 256>(dv_ptr, smem_t + Tr::kOffV / 2, p.dv_row_stride, col0, s.seqlen_k, tid);
#endif
}

// dq = scale * dq_accum from the tiled layout (DqTiles): one block per (query tile, batch, head). Each
// warp reads its part of the chunk (512 contiguous bytes per j) and writes the scaled, rounded values
// to a row-major tile in shared memory (rows padded by 16 bytes: the 8 rows a store touches fall in
// distinct banks); then every thread copies 16-byte row pieces out, so the global writes are whole rows.
template <typename Tr>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_tiled_kernel(const FlashBwdParams p) {
  using T = typename Tr::T;
  using DqT = DqTiles<Tr::kBlockM, Tr::D>;
  constexpr int kRowBytes = 2 * Tr::D + 16;  // padded row of the staging tile
  __shared__ __align__(16) char tile[Tr::kBlockM * kRowBytes];
  const int m = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const SeqInfo s(p, b);
  if (m * Tr::kBlockM >= s.seqlen_q) return;
  const int part = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const float* src = DqT::chunk(p, s, b, h, m) + threadIdx.x / 32 * DqT::kWarpFloats + 4 * lane;
  const int r0 = DqT::row(part, warp, lane);  // rows r0 (values 0, 1) and r0 + 8 (2, 3) of the tile
  const float sc = p.softmax_scale;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float4 v = *reinterpret_cast<const float4*>(src + 4 * 32 * j);
    const int c = DqT::col(part, j, lane);
    *reinterpret_cast<uint32_t*>(tile + r0 * kRowBytes + 2 * c) = pack_float2<T>(v.x * sc, v.y * sc);
    *reinterpret_cast<uint32_t*>(tile + (r0 + 8) * kRowBytes + 2 * c) = pack_float2<T>(v.z * sc, v.w * sc);
  }
  __syncthreads();
  T* const dq = static_cast<T*>(p.dq) + s.tok(b, s.q_start, p.dq_batch_stride, p.dq_row_stride, h, p.dq_head_stride);
  constexpr int kPieces = Tr::D / 8;  // 16-byte pieces per row
#pragma unroll
  for (int k = 0; k < Tr::kBlockM * kPieces / 256; ++k) {
    const int idx = threadIdx.x + 256 * k, r = idx / kPieces, c = 8 * (idx % kPieces);
    const int row = m * Tr::kBlockM + r;
    if (row < s.seqlen_q)
      *reinterpret_cast<uint4*>(dq + static_cast<int64_t>(row) * p.dq_row_stride + c) =
          *reinterpret_cast<const uint4*>(tile + r * kRowBytes + 2 * c);
  }
}

template <int D, typename T>
void launch_convert_dq(const FlashBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<D, T>;
  const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.batch, p.num_heads_q);
  flash_bwd_convert_dq_tiled_kernel<Tr><<<grid, 256, 0, stream>>>(p);
}

// The tensor maps of Q and dO for the Hopper backward; false when this build has no sm_90a code or TMA
// cannot address the tensors (the caller then takes the stage-1 kernels).
template <int D, typename T>
bool make_dkdv_maps(const FlashBwdParams& p, QdoMaps* maps) {
  using Tr = BwdTraits<D, T>;
  static const bool available = has_sm90_code(flash_bwd_dkdv_sm90_kernel<Tr, false, true>);
  if (!available) return false;
  const bool bf16 = TypeTraits<T>::kIsBf16;
  const int batch = p.cu_seqlens_q != nullptr ? 1 : p.batch;  // packed varlen: one "batch" of total rows
  return make_token_map(&maps->q, p.q, bf16, D, p.rows_q, p.num_heads_q, batch, p.q_row_stride, p.q_head_stride,
                        p.q_batch_stride, Tr::kBlockM) &&
         make_token_map(&maps->dout, p.dout, bf16, D, p.rows_q, p.num_heads_q, batch, p.do_row_stride,
                        p.do_head_stride, p.do_batch_stride, Tr::kBlockM);
}

// dK / dV (and dQ into dq_accum unless deterministic) on the Hopper path.
template <int D, typename T, bool kIsCausal>
void launch_dkdv(const FlashBwdParams& p, const QdoMaps& maps, cudaStream_t stream) {
  using Tr = BwdTraits<D, T>;
  auto kernel = p.deterministic ? flash_bwd_dkdv_sm90_kernel<Tr, kIsCausal, false>
                                : flash_bwd_dkdv_sm90_kernel<Tr, kIsCausal, true>;
  // + the mask column and the kept-tile list (int16)
  const int mask_bytes = p.block_mask != nullptr ? ((p.seqlen_q + kMaskBlock - 1) / kMaskBlock + 15) / 16 * 16 +
                                                       2 * ((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM)
                                                 : 0;
  const int smem = Tr::kSmemBytes + mask_bytes;
  bwd::set_smem(kernel, smem);
  const dim3 grid((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, p.batch, p.num_heads_q);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p, maps);
}

}  // namespace sm90
}  // namespace longctx
