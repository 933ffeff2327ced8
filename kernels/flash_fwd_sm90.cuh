// FlashAttention forward, Hopper path (sm_90a): TMA + mbarriers + warp-specialised wgmma.
//
// Same mathematics and outputs as flash_fwd_kernel (flash_fwd.cuh). Work comes in tiles of
// (kBlockM = 64 x kConsumers query rows, head, batch) on a persistent grid (one block per SM, blocks
// claiming tiles from a global counter in launch order).
// 1 + kConsumers warpgroups (FwdTraits):
//   producer   (warpgroup 0, 40 / 56 / 32 registers, see FwdTraits): one thread claims the tiles
//              (block-sparse: one warp, which also stages each tile's mask row) and issues the TMA
//              loads of the Q tile and of the K / V tiles into kStages-deep shared-memory rings; "full"
//              mbarriers count the bytes in, "empty" mbarriers the consumer warps done with a slot;
//   consumers  (warpgroups 1.., 232 / 224 / 160 registers): 64 query rows each, walking the key tiles
//              (kBlockN = 128) from the last visible one down, like the stage-1 kernel.
// Iteration i of a consumer issues, in one "GEMM turn",
//   S(i)       = Q_c K(i)^T     wgmma m64n128, A = Q (smem, K-major), B = K (K-major)
//   O         += P(i-1) V(i-1)  wgmma m64nD,   A = P (registers),     B = V (MN-major)
// then waits for both and runs the online softmax of S(i) (P(i), rescale of O) on the CUDA cores. With two
// consumers the main loop's softmax is speculative: P = exp2(S scale - the row's current reference)
// without the tile's row max, checked afterwards through the row sums (rare fix-up: `respeculate`).
// The consumers take GEMM turns round-robin (named barriers 1.., "ping-pong" for two), so one
// warpgroup's softmax runs while another's GEMMs occupy the tensor cores (two consumers at head dim 64
// also take the softmaxes in turns: FwdTraits::kSoftmaxTurns); no block-wide
// barrier sits in the loop, and the turns run on from one tile to the next (Q has two buffers, so the
// producer loads the next tile's Q as soon as it is done issuing the current tile's K / V; the
// epilogue stages O in its tile's Q buffer). A consumer takes a turn without GEMMs for the key tiles
// it sees nothing of (causal: the top rows of a tile on the diagonal). Dropout stays on the stage-1
// kernel.
//
// Included by flash_fwd.cuh (after TileLoader, before run_flash_fwd_hdim), not on its own.
#pragma once

#include <type_traits>

#include "seq_info.cuh"
#include "tile_order.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace longctx {
namespace sm90 {

// kConsumers: consumer warpgroups of 64 query rows each, taking GEMM turns round-robin. Two, except at
// head dim 64 dense, where the softmax (64 exponentials per thread per tile, MUFU-bound) takes longer
// than one other warpgroup's GEMMs: three consumers (192 query rows) give each softmax two turns to
// hide under. Block-sparse keeps two (its tiles must lie inside a 128-row mask block).
template <int kHeadDim_, typename T_, int kConsumers_ = 2>
struct FwdTraits {
  using T = T_;
  static constexpr int D = kHeadDim_;
  static_assert(D == 64 || D == 128, "the Hopper forward covers head dims 64 and 128");
  static constexpr int kConsumers = kConsumers_;
  static_assert(kConsumers == 2 || (kConsumers == 3 && D == 64), "3 consumers fit the registers at head dim 64");
  static constexpr int kBlockM = 64 * kConsumers, kBlockN = 128;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kStages = D == 64 ? 4 : 2;  // K / V ring depth
  // Causal tile order (tile_order.cuh): the K / V bytes of the (head, batch) pairs whose tiles are
  // ordered by length together. Of 16 / 32 / 48 / 64 / 128 MB (of the 50 MB L2), 32 measured best over
  // head dims 64 and 128 at 2k-16k (kernels/NOTES_sm90.md).
  static constexpr int64_t kWindowBytes = int64_t{32} << 20;
  // setmaxnreg: 40 + 2 x 232 = 504 = 3 x 168, the launch allocation of 384 threads (the producer's
  // tile loop spills at 24; 56 + 2 x 224 at head dim 64, block-sparse, whose producer warp also stages
  // the mask rows); with three consumers 32 + 3 x 160 = 512 = 4 x 128.
  static constexpr int kProducerRegs = kConsumers == 2 ? (D == 64 ? 56 : 40) : 32;
  static constexpr int kConsumerRegs = kConsumers == 2 ? (D == 64 ? 224 : 232) : 160;
  // P(i) in two register sets (packed while P(i-1) V(i-1) still reads the other), or one where
  // registers are short (three consumers: packed after that P V is waited for).
  static constexpr int kPSets = kConsumers == 2 ? 2 : 1;
  // Softmax turns (two consumers at head dim 64, the block-sparse instance): the consumers' softmaxes
  // alternate as their GEMMs do, instead of overlapping and sharing the MUFU queue (at head dim 64 the
  // MUFU needs as many cycles per visit as the tensor cores). At head dim 128 (GEMMs twice as long) the
  // extra barriers cost more than they gain (kernels/NOTES_sm90.md, session 14).
  static constexpr bool kSoftmaxTurns = kConsumers == 2 && D == 64;
  using QTile = SwizzledTile<kBlockM, D>;
  using KTile = SwizzledTile<kBlockN, D>;
  // Byte offsets from the 1024-aligned base: two Q buffers (tiles alternate; the epilogue stages O in
  // its tile's buffer, so that the next tile's Q loads a whole tile ahead), K ring, V ring, mbarriers
  // (full and empty of the two Q buffers, full K, full V, empty K, empty V, then the tile hand-over:
  // full and empty of two slots), the two slots' tile indices and kept-tile counts, the softmax scale
  // (kSoftmaxTurns), then (block-sparse) per slot the mask row and the kept-tile list.
  static constexpr int kOffK = 2 * QTile::kBytes;
  static constexpr int kOffV = kOffK + kStages * KTile::kBytes;
  static constexpr int kOffBar = kOffV + kStages * KTile::kBytes;
  static constexpr int kOffSlots = kOffBar + 8 * (4 + 4 * kStages + 4);
  static constexpr int kOffCount = kOffSlots + 8;  // block-sparse: per slot the kept-tile count
  static constexpr int kOffScale = kOffCount + 8;  // kSoftmaxTurns: the softmax scale (log2 units)
  static constexpr int kOffMask = kOffCount + 16;  // block-sparse: per slot the mask row and the kept-tile list
  static constexpr int kSmemBytes = kOffMask + 1024;  // + alignment slack (+ the two slots' rows and lists)
};

#ifdef LONGCTX_FWD_TRACE
// Scratch timeline (kernels/tune/fwd_tune.cu only): clock() at 7 points of each visit of block 0's
// third tile, per consumer warpgroup (warp 0, lane 0).
__device__ unsigned g_fwd_trace[3][128][8];
#define FWD_TRACE(k) \
  if (blockIdx.x == 0 && j == 2 && tid % 128 == 0 && i < 128) g_fwd_trace[c][i][k] = static_cast<unsigned>(clock())
// And summed over every tile of every block (consumer 0): cycles of the tile's start (its slot and Q
// waits, the first visit, the last tile's O store), of its other visits, of the epilogue's first half;
// then the visits after the first and the tiles.
__device__ unsigned long long g_fwd_phase[5];
#define FWD_PHASE_ADD(k, v) \
  if (c == 0 && tid % 128 == 0) atomicAdd(&g_fwd_phase[k], static_cast<unsigned long long>(v))
#define FWD_PHASE_VARS long long ph_start = 0, ph_loop = 0, ph_epilogue = 0
#define FWD_CLOCK(var) var = clock64()
#else
#define FWD_TRACE(k)
#define FWD_PHASE_ADD(k, v)
#define FWD_PHASE_VARS
#define FWD_CLOCK(var)
#endif

// Softmax modes of a visit (the consumers' main loop below).
enum SoftmaxMode : int { kMasked, kExact, kSpeculative };

template <typename Tr, bool kIsCausal, bool kSparse>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_fwd_sm90_kernel(const FlashFwdParams p, const __grid_constant__ QkvMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using QTile = typename Tr::QTile;
  using KTile = typename Tr::KTile;
  constexpr int D = Tr::D, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages, kConsumers = Tr::kConsumers;
  constexpr int kDSteps = D / 16, kNSteps = kBlockN / 16;
  constexpr int kTurnThreads = 2 * 128;  // a turn barrier: the waiting warpgroup + the one handing over
  using WgS = Wgmma<kBlockN, T>;         // S: 64 rows x 128 keys
  using WgO = Wgmma<D, T>;               // O: 64 rows x D

  extern __shared__ char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  char* const smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sK0 = base + Tr::kOffK, sV0 = base + Tr::kOffV, bars = base + Tr::kOffBar;
  auto q_buffer = [&](int qb) { return base + qb * QTile::kBytes; };
  auto full_q = [&](int qb) { return bars + 8 * qb; };
  auto empty_q = [&](int qb) { return bars + 8 * (2 + qb); };
  auto full_k = [&](int st) { return bars + 8 * (4 + st); };
  auto full_v = [&](int st) { return bars + 8 * (4 + kStages + st); };
  auto empty_k = [&](int st) { return bars + 8 * (4 + 2 * kStages + st); };
  auto empty_v = [&](int st) { return bars + 8 * (4 + 3 * kStages + st); };
  auto tile_full = [&](int j) { return bars + 8 * (4 + 4 * kStages + j); };
  auto tile_empty = [&](int j) { return bars + 8 * (6 + 4 * kStages + j); };
  int* const tile_slot = reinterpret_cast<int*>(smem + Tr::kOffSlots);
  const int tid = threadIdx.x;

  // Work comes in tiles t = (query tile, head, batch): a head's query tiles consecutive, so that the
  // tiles running at once share K / V in L2 (causal: longest first within windows of heads, below). The
  // grid is persistent (one block per SM); block x starts with tile x and then takes the next
  // unclaimed one from a global counter (p.tile_counter), so that blocks that finish early take more
  // (a dynamic schedule keeps the launch order's L2 window, a static one loses it for causal). The
  // producer claims the next tile at the top of its iteration for the current one (the atomic's round
  // trip hides behind the current tile's loads), and loads its Q and K / V as soon as it has issued
  // the current tile's.
  // Causal tiles differ in length: they come in windows of (head, batch) pairs whose K / V fit a share
  // of L2, and by length within a window (tile_order.cuh).
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
  // Causal with three consumers (192-row tiles), padded batches: the query tiles end at the sequence's
  // end (row0 = 192 m - row_shift), so that the partial tile is the top one, which sees one or two key
  // tiles, not the bottom one, which sees them all with one or two of its consumers idle (at 2k the
  // bottom tile had 128 rows and 16 visits). row_shift is a multiple of 64: a consumer's rows are all
  // before the start (it skips the tile, as past the end) or none are. Varlen keeps row_shift = 0 (a
  // shift per sequence, and the rows before one are another sequence's).
  constexpr bool kEndAligned = kIsCausal && kConsumers == 3;  // (the other kernels' code stays as it was)
  const int row_shift = kEndAligned && p.cu_seqlens_q == nullptr ? (num_m * kBlockM - p.seqlen_q) / 64 * 64 : 0;
  const int num_hb = p.num_heads_q * p.batch;
  const int num_tiles = num_m * num_hb;
  const int window = tile_window(int64_t{4} * D * p.seqlen_k, num_hb, Tr::kWindowBytes);
  struct TileInfo {
    SeqInfo s;
    int m_block, h, b, row0, n_block_max;  // n_block_max: key tiles up to the last visible one
  };
  auto tile_info = [&](int t) {
    int m_idx, hb;  // hb = b * num_heads_q + h
    if constexpr (kIsCausal) {
      const WindowedTile wt = windowed_tile(t, num_m, num_hb, window);
      m_idx = wt.idx;
      hb = wt.pair;
    } else {
      m_idx = t % num_m;
      hb = t / num_m;
    }
    const int h = hb % p.num_heads_q, b = hb / p.num_heads_q;
    TileInfo w{SeqInfo(p, b), num_m - 1 - m_idx, h, b, 0, 0};
    w.row0 = w.m_block * kBlockM - row_shift;  // negative for the top tile when row_shift > 0 (TMA zero-fills)
    const int diag = w.s.seqlen_k - w.s.seqlen_q;  // query i sees keys j <= i + diag (causal)
    w.n_block_max = (w.s.seqlen_k + kBlockN - 1) / kBlockN;
    if (kIsCausal) {
      const int last_key = min(w.row0 + kBlockM, w.s.seqlen_q) + diag;  // one past the last visible key
      w.n_block_max = min(w.n_block_max, last_key <= 0 ? 0 : (last_key + kBlockN - 1) / kBlockN);
    }
    return w;
  };

  if (tid == 0) {
    if (Tr::kSoftmaxTurns) *reinterpret_cast<float*>(smem + Tr::kOffScale) = p.softmax_scale_log2;
    for (int qb = 0; qb < 2; ++qb) {
      mbar_init(full_q(qb), 1);
      mbar_init(empty_q(qb), 4 * kConsumers);  // lane 0 of every consumer warp, after its epilogue
    }
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full_k(st), 1);
      mbar_init(full_v(st), 1);
      mbar_init(empty_k(st), 4 * kConsumers);  // lane 0 of every consumer warp
      mbar_init(empty_v(st), 4 * kConsumers);
    }
    for (int j = 0; j < 2; ++j) {
      mbar_init(tile_full(j), 1);
      mbar_init(tile_empty(j), 4 * kConsumers);
    }
    mbar_init_fence();
  }
  // Block-sparse (kSparse): only the key tiles of kept mask blocks are visited. For each tile the
  // producer warp stages its mask row in shared memory and compacts it into a descending list of kept
  // tiles, one row and list per tile slot, which producer and consumers read by visit index; dense:
  // visit i is key tile n_block_max - 1 - i.
  const int mask_row_bytes = (p.block_mask_cols + 15) / 16 * 16;
  const int mask_slot_bytes = mask_row_bytes + (2 * p.block_mask_cols + 15) / 16 * 16;
  auto mask_line = [&](int slot) { return Tr::kOffMask + slot * mask_slot_bytes; };  // byte offset
  auto tile_list = [&](int slot) { return reinterpret_cast<int16_t*>(smem + mask_line(slot) + mask_row_bytes); };
  int* const tile_count = reinterpret_cast<int*>(smem + Tr::kOffCount);  // per slot
  __syncthreads();
  auto key_tile = [&](const TileInfo& w, int slot, int i) {  // the key tile of visit i, or -1 past the last
    if constexpr (kSparse) return i < tile_count[slot] ? static_cast<int>(tile_list(slot)[i]) : -1;
    else return i < w.n_block_max ? w.n_block_max - 1 - i : -1;
  };
  // With three consumers (160 registers) warp-uniform by construction (a shuffle from lane 0), so that
  // ptxas keeps what derives from it (the consumer's Q descriptors) in uniform registers: in vector
  // registers they spill there.
  const int wg = kConsumers == 3 ? __shfl_sync(0xffffffffu, tid / 128, 0) : tid / 128;

  // Both roles walk the same tiles (handed over through two shared-memory slots) and count the same
  // loads: `q_loads` Q buffers taken so far (one per tile with rows; buffer q_loads % 2 in round
  // q_loads / 2), `visits` K / V ring slots (slot v is stage v % kStages in round v / kStages).
  if (wg == 0) {  // producer: thread 0 (block-sparse: warp 0, lane 0 issuing the loads)
    regs_dec<Tr::kProducerRegs>();
    if (tid >= (kSparse ? 32 : 1)) return;
    const int lane = tid;
    int q_loads = 0, visits = 0;
    for (int j = 0, t = blockIdx.x;; ++j) {
      const int slot = j % 2;
      // The consumers are done with slot's last tile (its mask list too).
      mbar_wait(tile_empty(slot), ((j / 2) & 1) ^ 1);
      if (t >= num_tiles) {  // no more work: tell the consumers
        if (lane == 0) {
          tile_slot[slot] = t;
          mbar_arrive(tile_full(slot));
        }
        break;
      }
      // Claim the tile after this one now: the atomic's round trip hides behind this tile's loads.
      int next = 0;
      if (lane == 0) next = static_cast<int>(gridDim.x) + atomicAdd(p.tile_counter, 1);
      const TileInfo w = tile_info(t);
      const bool has_rows = w.row0 < w.s.seqlen_q;  // else a padding tile of a shorter (varlen) sequence
      int n_visits = has_rows ? w.n_block_max : 0;
      if constexpr (kSparse) {
        if (n_visits > 0) {
          stage_mask_line<kBlockN, 32>(reinterpret_cast<uint8_t*>(smem + mask_line(slot)),
                                       mask_row<kBlockN>(p, w.b, w.h, w.row0), w.n_block_max, lane);
          __syncwarp();
          n_visits = compact_kept_desc(tile_list(slot), base + mask_line(slot), w.n_block_max, lane);
        }
        // Always written: a tile with nothing visible must not leave the slot's previous count behind.
        if (lane == 0) tile_count[slot] = n_visits;
        __syncwarp();
      }
      if (lane == 0) {
        tile_slot[slot] = t;
        mbar_arrive(tile_full(slot));
      }
      if (lane == 0 && has_rows) {
        // Packed varlen tensors are one "batch" whose rows start at the sequence's offset.
        const int tb = w.s.varlen ? 0 : w.b, k_row = w.s.varlen ? w.s.k_start : 0;
        const int hk = w.h / (p.num_heads_q / p.num_heads_k);
        // The Q buffer is free once the tile before last has staged and stored its O there. A tile that
        // sees no keys takes a buffer too (its epilogue stages O there), without loading Q.
        const int qb = q_loads % 2;
        mbar_wait(empty_q(qb), ((q_loads / 2) & 1) ^ 1);  // round 0 finds both buffers free
        if (n_visits > 0) {
          mbar_arrive_expect_tx(full_q(qb), QTile::kBytes);
          tma_load_tile<QTile>(q_buffer(qb), &maps.q, full_q(qb), (w.s.varlen ? w.s.q_start : 0) + w.row0, w.h, tb);
        } else {
          mbar_arrive(full_q(qb));
        }
        for (int i = 0; i < n_visits; ++i) {
          const int v = visits + i, n = key_tile(w, slot, i), st = v % kStages;
          const uint32_t free_parity = ((v / kStages) & 1) ^ 1;  // round 0 finds every slot free
          mbar_wait(empty_k(st), free_parity);
          mbar_arrive_expect_tx(full_k(st), KTile::kBytes);
          tma_load_tile<KTile>(sK0 + st * KTile::kBytes, &maps.k, full_k(st), k_row + n * kBlockN, hk, tb);
          mbar_wait(empty_v(st), free_parity);
          mbar_arrive_expect_tx(full_v(st), KTile::kBytes);
          tma_load_tile<KTile>(sV0 + st * KTile::kBytes, &maps.v, full_v(st), k_row + n * kBlockN, hk, tb);
        }
      }
      if (has_rows) ++q_loads;
      visits += n_visits;
      t = kSparse ? __shfl_sync(0xffffffffu, next, 0) : next;
    }
    return;
  }
  regs_inc<Tr::kConsumerRegs>();

  // Consumer c: rows 64 c .. 64 c + 63 of each tile. Thread coordinates in the warpgroup's m64
  // accumulators (wgmma.cuh): rows 16 warp + g (+8).
  const int c = wg - 1, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int row_in_tile = 64 * c + 16 * warp + g;  // this thread's first row (the second is +8)
  const int my_turn = 1 + c, next_turn = 1 + (c + 1) % kConsumers;  // named barrier ids
  const float scale_log2 = p.softmax_scale_log2;
  // Softmax turns (Tr::kSoftmaxTurns): each visit's softmax takes a turn (named barriers 2 kConsumers +
  // 1 + c), a skipped visit an empty one, so both consumers take n_visits turns per tile.
  constexpr bool kSoftmaxTurns = Tr::kSoftmaxTurns;
  const int my_sm_turn = 1 + 2 * kConsumers + c, next_sm_turn = 1 + 2 * kConsumers + (c + 1) % kConsumers;
  // ptxas moves arithmetic across barriers. So the softmax reads its scale from shared memory after the
  // turn's barrier (a load stays behind it), and the hand-over's barrier id is computed from the
  // softmax's sums: +1 only for the bit pattern 0xFFFFFFFF, which no arithmetic here produces (a NaN
  // sum is the canonical 0x7FFFFFFF). A test ptxas can decide (sum < 0: MUFU.EX2 is never negative)
  // is folded away and leaves the arrive free to move. Both barriers then stay around the exponentials.
  auto softmax_turn_begin = [&]() -> float {
    if constexpr (kSoftmaxTurns) {
      named_sync(my_sm_turn, kTurnThreads);
      return ld_volatile_shared_f32(base + Tr::kOffScale);
    }
    return scale_log2;
  };
  auto softmax_turn_end = [&](float sum) {
    if constexpr (kSoftmaxTurns) {
      // (warp-uniform by a shuffle from lane 0: a divergent-looking arrive makes ptxas serialise wgmmas)
      named_arrive(__shfl_sync(0xffffffffu, next_sm_turn + (__float_as_uint(sum) == 0xFFFFFFFFu), 0), kTurnThreads);
    }
  };
  // The GEMM turns run on across tiles: consumer 0 takes the first one, every turn hands over to the
  // next consumer, and consumer 0 takes the last hand-over at the end, so every turn barrier ends
  // balanced.
  if (c == kConsumers - 1) named_arrive(1, kTurnThreads);
  if (kSoftmaxTurns && c == kConsumers - 1) named_arrive(1 + 2 * kConsumers, kTurnThreads);

  auto issue_s = [&](float (&acc_s)[WgS::kRegs], uint32_t sQ, int st) {  // S = Q_c K^T
    const uint32_t q_c = sQ + 64 * c * 128, k_st = sK0 + st * KTile::kBytes;
#pragma unroll
    for (int kk = 0; kk < kDSteps; ++kk) {
      const uint32_t a_off = (kk / 4) * QTile::kBlockBytes + (kk % 4) * 32;
      const uint32_t b_off = (kk / 4) * KTile::kBlockBytes + (kk % 4) * 32;
      WgS::template ss<0, 0>(acc_s, smem_desc(q_c + a_off, 16, 1024),
                             smem_desc(k_st + b_off, 16, 1024), kk);
    }
    wgmma_commit();
  };

  // The epilogue's second half, for the last tile (pending_t, -1 for none; its Q buffer pending_qb),
  // under the next tile's first S: O from the staging (its Q buffer; the next tile's Q is in the
  // other) to global memory in 16-byte stores, then the buffer back to the producer. Branch-free; an
  // invalid tile writes nothing.
  int pending_t = -1, pending_qb = 0;
  auto store_o = [&](int t_e, int qb_e, bool valid) {
    const TileInfo we = tile_info(opaque(valid ? t_e : 0));
    const SeqInfo& s = we.s;
    T* o_ptr = static_cast<T*>(p.o) + s.tok(we.b, s.q_start, p.o_batch_stride, p.o_row_stride, we.h, p.o_head_stride);
    const T* const sO = reinterpret_cast<const T*>(smem + qb_e * QTile::kBytes);
    named_sync(1 + kConsumers + c, 128);  // this warpgroup's rows are staged
    constexpr int kChunks = D / 8;        // 16-byte chunks per row
#pragma unroll
    for (int it = 0; it < 64 * kChunks / 128; ++it) {
      const int idx = it * 128 + opaque(tid % 128);
      const int r = 64 * c + idx / kChunks, col = 8 * (idx % kChunks);
      if (valid && (!kEndAligned || we.row0 + r >= 0) && we.row0 + r < s.seqlen_q)
        *reinterpret_cast<uint4*>(o_ptr + static_cast<int64_t>(we.row0 + r) * p.o_row_stride + col) =
            *reinterpret_cast<const uint4*>(sO + QTile::offset(r, col));
    }
    // The buffer's next Q comes by TMA (the async proxy) over what these threads wrote and read.
    fence_proxy_async();
    __syncwarp();
    mbar_arrive_if(empty_q(qb_e), lane == 0 && valid);
  };

  int q_loads = 0, visits = 0;
  FWD_PHASE_VARS;
  for (int j = 0;; ++j) {
    const int slot = j % 2;
    FWD_CLOCK(ph_start);
    mbar_wait(tile_full(slot), (j / 2) & 1);
    const int t = tile_slot[slot];
    if (t >= num_tiles) break;
    // What the main loop needs of the tile; the epilogue decodes the tile again (from an opaque copy of
    // t), so that its coordinates are not held in registers across the loop.
    const TileInfo w = tile_info(t);
    const int seqlen_q = w.s.seqlen_q, seqlen_k = w.s.seqlen_k, row0 = w.row0;
    if (row0 >= seqlen_q) {  // a padding tile of a shorter (varlen) sequence
      mbar_arrive_if(tile_empty(slot), lane == 0);
      continue;
    }
    const int diag = seqlen_k - seqlen_q;  // query i sees keys j <= i + diag (causal)
    const int n_visits = kSparse ? tile_count[slot] : w.n_block_max;
    // This consumer's rows start at my_row0. The visits are the tile's; the first `first` of them are
    // key tiles this consumer sees nothing of (causal: past its last row's limit, e.g. the top 64 rows
    // of a 192-row tile on the diagonal; every visit for rows past the sequence end). It skips them:
    // a turn without GEMMs, releasing the ring slots.
    const int my_row0 = __shfl_sync(0xffffffffu, row0 + 64 * c, 0);  // warp-uniform (see `first`)
    int first = 0;
    if (my_row0 >= seqlen_q || (kEndAligned && my_row0 < 0)) {  // past the end, or before the start
      first = n_visits;
    } else if (kIsCausal) {
      const int last_key = min(my_row0 + 63, seqlen_q - 1) + diag;
      while (first < n_visits && key_tile(w, slot, first) * kBlockN > last_key) ++first;
    }
    // Warp-uniform for ptxas (a shuffle from lane 0): branching on it otherwise serialises every wgmma.
    first = __shfl_sync(0xffffffffu, first, 0);
    // The tile's Q buffer (loaded, or for a tile that sees no keys only handed over).
    const int qb = q_loads % 2;
    const uint32_t sQ = q_buffer(qb);
    mbar_wait(full_q(qb), (q_loads / 2) & 1);
    ++q_loads;

    float acc_o[WgO::kRegs];
#pragma unroll
    for (int i = 0; i < WgO::kRegs; ++i) acc_o[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // max in log2 units
    // P(i) as the A operand of the next turn's P V; with two register sets (Tr::kPSets), by the parity
    // of i (the loop is unrolled by two): P(i) is packed while P(i-1) V(i-1) still reads the other set.
    uint32_t p_a[Tr::kPSets][kNSteps][4];

    auto issue_pv = [&](const uint32_t (&pa)[kNSteps][4], int st) {  // O += P V (B = V, MN-major: k16 = 16 keys)
      const uint32_t sV = sV0 + st * KTile::kBytes;
#pragma unroll
      for (int kk = 0; kk < kNSteps; ++kk)
        WgO::template rs<1>(acc_o, pa[kk], smem_desc(sV + kk * 16 * 128, KTile::kBlockBytes, 1024));
      wgmma_commit();
    };
    // Scores of key tile n_block, hidden keys (past the end, causal) at -inf, then the online softmax in
    // log2 units: new row max, P = exp2(s scale_log2 - max) in place, running sum; corr = the factor
    // for O.
    // `masked` instances (for tiles that may hold hidden keys: need_mask) mask branch-free, a select
    // against each row's key limit: control flow here would make ptxas wait for the P V in flight first.
    // need_mask grows with the tile index, so those tiles come first in the descending walk (the
    // sequence end, the causal diagonal) and the main loop runs an instance without the mask.
    auto need_mask = [&](int n_block) {
      const int col0 = n_block * kBlockN;
      return col0 + kBlockN > seqlen_k || (kIsCausal && col0 + kBlockN - 1 > my_row0 + diag);
    };
    auto softmax = [&](float (&acc_s)[WgS::kRegs], int n_block, float (&corr)[2], float scale, auto masked) {
      if constexpr (decltype(masked)::value) {
        const int col0 = n_block * kBlockN;
        int key_limit[2];  // visible: 8 j + (e % 2) < key_limit (keys relative to col0 + 2 t4)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = row0 + row_in_tile + 8 * hh;
          const int limit = kIsCausal ? min(seqlen_k, row + diag + 1) : seqlen_k;
          key_limit[hh] = need_mask(n_block) ? limit - col0 - 2 * t4 : kBlockN;
        }
#pragma unroll
        for (int jj = 0; jj < kBlockN / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!(8 * jj + (e % 2) < key_limit[e / 2])) acc_s[4 * jj + e] = -INFINITY;
      }
      // Raw scores from here: the row max is taken unscaled (scale > 0) in four independent chains, and
      // each exponential's scaling is one FFMA with it; the row sum in two chains.
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float m4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
        for (int jj = 0; jj < kBlockN / 8; ++jj)
          m4[jj % 4] = fmaxf(m4[jj % 4], fmaxf(acc_s[4 * jj + 2 * hh], acc_s[4 * jj + 2 * hh + 1]));
        const float tile_max = quad_max(fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]))) * scale;
        // The row's reference max (log2 units), lazy (FlashAttention-4's rescale): it moves only when the
        // tile's max exceeds it by more than kRescaleGapLog2 (so P <= 2^8), and most turns skip O's
        // correction; O, the row sum and the LSE all use the same reference.
        const bool move = tile_max > row_max[hh] + kRescaleGapLog2;
        const float mx = move ? fmaxf(row_max[hh], tile_max) : row_max[hh];
        const float ref = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet stays at 0
        corr[hh] = move ? fast_exp2(row_max[hh] - ref) : 1.f;  // exp2(-inf) = 0 on the first tile
        row_max[hh] = mx;
        float sum[2] = {0.f, 0.f};
#pragma unroll
        for (int jj = 0; jj < kBlockN / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(fmaf(acc_s[4 * jj + 2 * hh + e], scale, -ref));
            acc_s[4 * jj + 2 * hh + e] = pv;
            sum[e] += pv;
          }
        row_sum[hh] = row_sum[hh] * corr[hh] + (sum[0] + sum[1]);
      }
    };
    auto pack_p = [&](const float (&acc_s)[WgS::kRegs], uint32_t (&pa)[kNSteps][4]) {
#pragma unroll
      for (int kk = 0; kk < kNSteps; ++kk) {
        pa[kk][0] = pack_float2<T>(acc_s[8 * kk + 0], acc_s[8 * kk + 1]);
        pa[kk][1] = pack_float2<T>(acc_s[8 * kk + 2], acc_s[8 * kk + 3]);
        pa[kk][2] = pack_float2<T>(acc_s[8 * kk + 4], acc_s[8 * kk + 5]);
        pa[kk][3] = pack_float2<T>(acc_s[8 * kk + 6], acc_s[8 * kk + 7]);
      }
    };
    // Speculative softmax (visits after the first fully visible one, two P register sets): P = exp2(x)
    // with x = S scale - reference, the row's current reference max, without the tile's max. That max
    // (a dependent chain of 64 FMNMX and two shuffles per row pair) held every exponential back; here
    // they start as soon as S is in. x stays in acc_s and each thread's partial row sums in tsum; a sum
    // <= 2^8 bounds every P of the thread's row by the lazy rescale's limit, the common case. A larger
    // one (scores risen past the reference) takes `respeculate` after the P V wait.
    auto softmax_speculative = [&](float (&acc_s)[WgS::kRegs], uint32_t (&pa)[kNSteps][4], float (&tsum)[2],
                                   const float shift[2]) {
      float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
      for (int i = 0; i < WgS::kRegs; i += 2) {
        const int hh = (i / 2) % 2;  // accumulator layout (wgmma.cuh): pairs alternate the two rows
        const float p0 = fast_exp2(acc_s[i] - shift[hh]), p1 = fast_exp2(acc_s[i + 1] - shift[hh]);
        sum[hh][0] += p0;
        sum[hh][1] += p1;
        pa[i / 8][(i % 8) / 2] = pack_float2<T>(p0, p1);
      }
      tsum[0] = sum[0][0] + sum[0][1];
      tsum[1] = sum[1][0] + sum[1][1];
    };
    auto scores_to_x = [&](float (&acc_s)[WgS::kRegs], float scale) {
#pragma unroll
      for (int i = 0; i < WgS::kRegs; ++i) acc_s[i] = fmaf(acc_s[i], scale, -row_max[(i / 2) % 2]);
    };
    // The rare case: a row whose tile max exceeds its reference by more than kRescaleGapLog2 moves the
    // reference there (the exact softmax's rule), and the tile's P is recomputed from x (corr for O).
    auto respeculate = [&](float (&acc_s)[WgS::kRegs], uint32_t (&pa)[kNSteps][4], float (&tsum)[2],
                           float (&corr)[2]) {
      float m[2] = {-INFINITY, -INFINITY}, shift[2];
#pragma unroll
      for (int i = 0; i < WgS::kRegs; ++i) m[(i / 2) % 2] = fmaxf(m[(i / 2) % 2], acc_s[i]);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float tile_max = quad_max(m[hh]);
        const bool move = tile_max > kRescaleGapLog2;
        shift[hh] = move ? tile_max : 0.f;
        corr[hh] = move ? fast_exp2(-tile_max) : 1.f;
        row_max[hh] += shift[hh];
      }
      softmax_speculative(acc_s, pa, tsum, shift);
    };

    if (n_visits > 0) {
      // The skipped visits. Their slots are released only once loaded: an early arrival would count
      // towards the slot's previous round, which other consumers may still be reading.
      for (int i = 0; i < first; ++i) {
        const int v = visits + i, st = v % kStages;
        mbar_wait(full_k(st), (v / kStages) & 1);
        mbar_wait(full_v(st), (v / kStages) & 1);
        named_sync(my_turn, kTurnThreads);
        named_arrive(next_turn, kTurnThreads);
        softmax_turn_begin();
        softmax_turn_end(0.f);
        mbar_arrive_if(empty_k(st), lane == 0);
        mbar_arrive_if(empty_v(st), lane == 0);
      }
    }
    if (n_visits == 0 || first == n_visits) {  // nothing to see (warp-uniform)
      store_o(pending_t, pending_qb, pending_t >= 0);
      if (n_visits > 0) {  // the last P V turn empty too
        named_sync(my_turn, kTurnThreads);
        named_arrive(next_turn, kTurnThreads);
        visits += n_visits;
      }
    } else {
      float corr[2];
      {  // the first visit: its S is in flight while the last tile's O goes out (store_o reads only
         // the other Q buffer)
        const int v_first = visits + first, st_first = v_first % kStages;
        float acc_s0[WgS::kRegs];
        mbar_wait(full_k(st_first), (v_first / kStages) & 1);
        named_sync(my_turn, kTurnThreads);
        wgmma_fence();
        issue_s(acc_s0, sQ, st_first);
        named_arrive(next_turn, kTurnThreads);
        store_o(pending_t, pending_qb, pending_t >= 0);
        wgmma_wait<0>();
        fence_operand(acc_s0);
        mbar_arrive_if(empty_k(st_first), lane == 0);
        const int first_tile = key_tile(w, slot, first);
        const float scale = softmax_turn_begin();
        softmax(acc_s0, first_tile, corr, scale, std::true_type{});
        pack_p(acc_s0, p_a[0]);  // O is still 0: no correction
        softmax_turn_end(row_sum[0] + row_sum[1]);
        // Packed varlen: a sequence's last key tile (first in the walk) holds the next sequence's rows
        // past its end. Their P is 0, but 0 x NaN / inf is NaN in P V: this consumer zeroes them in V
        // before its P V (the other consumer writes the same zeros).
        const int v_rows = seqlen_k - first_tile * kBlockN;
        if (w.s.varlen && v_rows < kBlockN) {
          mbar_wait(full_v(st_first), (v_first / kStages) & 1);
          zero_tile_rows<KTile, 128>(sV0 + st_first * KTile::kBytes, v_rows, tid % 128);
          fence_proxy_async();
          named_sync(1 + kConsumers + c, 128);
        }
      }
      FWD_CLOCK(ph_loop);
      FWD_PHASE_ADD(0, ph_loop - ph_start);
      // Visit i > first (key tile n_block, ring slot v = visits + i): one turn issues S(i) and
      // P(i-1) V(i-1) (set kSet ^ 1), the softmax of S(i) runs while P V does, P(i) goes to set kSet
      // (by the parity of i - first), then O's correction. Softmax modes: kMasked (hidden keys possible),
      // kExact, kSpeculative (every row has a finite reference: see the walk below).
      auto iteration = [&](auto set, auto mode, int i, int n_block) {
        constexpr int kSet = decltype(set)::value, kMode = decltype(mode)::value;
        static_assert(kMode != kSpeculative || Tr::kPSets == 2, "x stays in acc_s across the P V wait");
        const int v = visits + i, st = v % kStages, st_prev = (v - 1) % kStages;
        FWD_TRACE(0);
        mbar_wait(full_k(st), (v / kStages) & 1);
        mbar_wait(full_v(st_prev), ((v - 1) / kStages) & 1);
        FWD_TRACE(1);
        named_sync(my_turn, kTurnThreads);
        FWD_TRACE(2);
        float acc_s[WgS::kRegs];
        wgmma_fence();
        issue_s(acc_s, sQ, st);
        issue_pv(p_a[(kSet ^ 1) % Tr::kPSets], st_prev);
        named_arrive(next_turn, kTurnThreads);
        wgmma_wait<1>();  // S(i) done
        FWD_TRACE(3);
        fence_operand(acc_s);
        const float scale = softmax_turn_begin();
        float tsum[2];  // speculative: this thread's partial row sums of the tile
        if constexpr (kMode == kSpeculative) {
          const float no_shift[2] = {0.f, 0.f};
          scores_to_x(acc_s, scale);
          softmax_speculative(acc_s, p_a[kSet], tsum, no_shift);
          fence_operand(p_a[kSet]);
        } else {
          softmax(acc_s, n_block, corr, scale, std::bool_constant<kMode == kMasked>{});
          if constexpr (Tr::kPSets == 2) {
            pack_p(acc_s, p_a[kSet]);
            fence_operand(p_a[kSet]);  // P(i) is packed before the wait (the compiler would sink it)
          }
        }
        softmax_turn_end(kMode == kSpeculative ? tsum[0] + tsum[1] : row_sum[0] + row_sum[1]);
        // ptxas keeps the wait right behind the preceding mbarrier arrive and schedules that arrive as
        // early as its operands allow; a predicate that reads the row sums (never negative, so it is
        // lane == 0) holds both behind the whole softmax.
        // (The speculative form: with `||` ptxas arrives early in lane 0 and pulls the wait up.)
        if constexpr (kMode == kSpeculative) mbar_arrive_if(empty_k(st), lane == 0 && !(tsum[0] + tsum[1] < 0.f));
        else mbar_arrive_if(empty_k(st), lane == 0 || row_sum[0] + row_sum[1] < 0.f);
        FWD_TRACE(4);
        wgmma_wait<0>();           // O now holds every tile before this one
        FWD_TRACE(5);
        fence_operand(acc_o);
        fence_operand(p_a[(kSet ^ 1) % Tr::kPSets]);
        if constexpr (kMode == kSpeculative) {
          corr[0] = corr[1] = 1.f;
          // A row sum within the bound bounds every P of the row by it.
          if (__any_sync(0xffffffffu, !(tsum[0] <= kRescaleBound) || !(tsum[1] <= kRescaleBound))) {
            respeculate(acc_s, p_a[kSet], tsum, corr);
            fence_operand(p_a[kSet]);
          }
          row_sum[0] = row_sum[0] * corr[0] + tsum[0];
          row_sum[1] = row_sum[1] * corr[1] + tsum[1];
        }
        // One set: P(i) goes into the registers P(i-1) V(i-1) read only now (packing them while that
        // GEMM runs makes ptxas serialise every wgmma).
        if constexpr (Tr::kPSets == 1) pack_p(acc_s, p_a[0]);
        mbar_arrive_if(empty_v(st_prev), lane == 0);
        // O's correction, only in warps where a row's reference moved (no wgmma is in flight).
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
          for (int jj = 0; jj < D / 8; ++jj)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              acc_o[4 * jj + 2 * hh] *= corr[hh];
              acc_o[4 * jj + 2 * hh + 1] *= corr[hh];
            }
        }
        FWD_TRACE(6);
      };
      using Set0 = std::integral_constant<int, 0>;
      using Set1 = std::integral_constant<int, Tr::kPSets - 1>;  // one set: always 0
      using Masked = std::integral_constant<int, kMasked>;
      using Exact = std::integral_constant<int, kExact>;
      // The main loop's mode: speculative where there are two P sets (three consumers have no room
      // for x across the P V wait).
      using Main = std::integral_constant<int, Tr::kPSets == 2 ? kSpeculative : kExact>;
      // The walk runs on the visit count (a register): in block-sparse walks key_tile reads shared
      // memory, two dependent loads that would sit at the end of every turn. Only the masked prefix and
      // the exact visit need their key tile.
      int i = first + 1;
      // Visit i in the P set of its parity (counted from the first visit), outside the unrolled loop.
      auto iteration_at = [&](auto mode, int i, int n_block) {
        if ((i - first) % 2) iteration(Set1{}, mode, i, n_block);
        else iteration(Set0{}, mode, i, n_block);
      };
      // Tiles that need the mask (a prefix of the walk), then the rest unrolled by two (the P sets).
      for (; i < n_visits; ++i) {
        const int n_block = key_tile(w, slot, i);
        if (!need_mask(n_block)) break;
        iteration_at(Masked{}, i, n_block);
      }
      // The speculative softmax needs a finite reference in every row. After the first visit every row
      // has seen a key, unless causal masking hid all of that tile from the consumer's first row (Sq > Sk,
      // or a block-sparse walk without its diagonal block); then the first tile without hidden keys,
      // which gives every row one, is exact.
      const bool first_row_saw_key = !kIsCausal || my_row0 + diag >= key_tile(w, slot, first) * kBlockN;
      if (Main::value == kSpeculative && !first_row_saw_key && i < n_visits) {
        iteration_at(Exact{}, i, -1);  // only the masked mode reads its key tile
        ++i;
      }
      // The main mode takes no mask, so no key tile either.
      if (i < n_visits && (i - first) % 2 == 0) {
        iteration(Set0{}, Main{}, i, -1);
        ++i;
      }
      while (i < n_visits) {
        iteration(Set1{}, Main{}, i, -1);
        if (++i == n_visits) break;
        iteration(Set0{}, Main{}, i, -1);
        ++i;
      }
      // The last tile's P V, in a turn of its own.
      const int v_last = visits + i - 1, st_prev = v_last % kStages;
      mbar_wait(full_v(st_prev), (v_last / kStages) & 1);
      named_sync(my_turn, kTurnThreads);
      wgmma_fence();
      if ((i - 1 - first) % Tr::kPSets) issue_pv(p_a[1 % Tr::kPSets], st_prev);
      else issue_pv(p_a[0], st_prev);
      named_arrive(next_turn, kTurnThreads);
      wgmma_wait<0>();
      fence_operand(acc_o);
      mbar_arrive_if(empty_v(st_prev), lane == 0);
      visits += n_visits;
      FWD_CLOCK(ph_epilogue);
      FWD_PHASE_ADD(1, ph_epilogue - ph_loop);
      FWD_PHASE_ADD(3, n_visits - first - 1);
    }
    // Done with the slot (the tile's mask list): the producer may stage the tile after next there.
    mbar_arrive_if(tile_empty(slot), lane == 0);

    // Epilogue, first half: normalise, write LSE, stage O in this consumer's Q rows of the tile's Q buffer
    // (no other warpgroup reads them); store_o writes it out under the next tile's first S.
    const TileInfo we = tile_info(opaque(t));
    const SeqInfo& s = we.s;
    float* lse_ptr = p.lse + we.b * p.lse_batch_stride + we.h * p.lse_head_stride + s.q_start;
    T* const sO = reinterpret_cast<T*>(smem + qb * QTile::kBytes);
    named_sync(1 + kConsumers + c, 128);  // this warpgroup's S GEMMs are done with its Q rows
    // The staging addresses from opaque thread coordinates: they do not depend on the tile, and hoisted
    // out of the tile loop they would be held (spilled) across it.
    const int row_e = opaque(row_in_tile), t4_e = opaque(t4);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float l = quad_sum(row_sum[hh]);
      const bool empty = !(l > 0.f);
      const float inv = empty ? 0.f : 1.f / l;
      const int r = row_e + 8 * hh;
      if (t4_e == 0 && (!kEndAligned || we.row0 + r >= 0) && we.row0 + r < s.seqlen_q)
        lse_ptr[we.row0 + r] = empty ? -INFINITY : (row_max[hh] + __log2f(l)) * 0.69314718055994531f;
#pragma unroll
      for (int jj = 0; jj < D / 8; ++jj) {
        const int col = 8 * jj + 2 * t4_e;
        *reinterpret_cast<uint32_t*>(sO + QTile::offset(r, col) + (col & 7)) =
            pack_float2<T>(acc_o[4 * jj + 2 * hh] * inv, acc_o[4 * jj + 2 * hh + 1] * inv);
      }
    }
    pending_t = t;
    pending_qb = qb;
    FWD_PHASE_ADD(2, clock64() - ph_epilogue);
    FWD_PHASE_ADD(4, 1);
  }
  store_o(pending_t, pending_qb, pending_t >= 0);  // the last tile's
  if (c == 0) named_sync(my_turn, kTurnThreads);  // the last hand-over
  if (kSoftmaxTurns && c == 0) named_sync(my_sm_turn, kTurnThreads);
#endif
}

// Launches the Hopper forward; returns false, launching nothing, when this build has no sm_90a code
// or TMA cannot address the tensors (16-byte alignment); the caller then runs the stage-1 kernel.
template <typename Tr, bool kIsCausal, bool kSparse>
bool launch_fwd_traits(const FlashFwdParams& p, cudaStream_t stream) {
  constexpr int D = Tr::D;
  using T = typename Tr::T;
  auto kernel = flash_fwd_sm90_kernel<Tr, kIsCausal, kSparse>;
  static const bool available = has_sm90_code(kernel);
  if (!available) return false;
  QkvMaps maps;
  const bool bf16 = TypeTraits<T>::kIsBf16;
  const int batch = p.cu_seqlens_q != nullptr ? 1 : p.batch;  // packed varlen: one "batch" of total rows
  if (!make_token_map(&maps.q, p.q, bf16, D, p.rows_q, p.num_heads_q, batch, p.q_row_stride, p.q_head_stride,
                      p.q_batch_stride, Tr::kBlockM) ||
      !make_token_map(&maps.k, p.k, bf16, D, p.rows_k, p.num_heads_k, batch, p.k_row_stride, p.k_head_stride,
                      p.k_batch_stride, Tr::kBlockN) ||
      !make_token_map(&maps.v, p.v, bf16, D, p.rows_k, p.num_heads_k, batch, p.v_row_stride, p.v_head_stride,
                      p.v_batch_stride, Tr::kBlockN))
    return false;
  // + per tile slot: the mask row and the kept-tile list (int16)
  const int smem = Tr::kSmemBytes + (kSparse ? 2 * ((p.block_mask_cols + 15) / 16 * 16 + (2 * p.block_mask_cols + 15) / 16 * 16) : 0);
  static const int max_smem = [] {
    int device = 0, bytes = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return bytes;
  }();
  if (smem > max_smem) return false;  // block-sparse rows of ~700k+ keys: the stage-1 kernel takes them
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  // A persistent grid of at most one block per SM, whose blocks claim tiles from p.tile_counter (zeroed
  // here, on the kernel's stream).
  const int64_t num_tiles = static_cast<int64_t>((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM) * p.num_heads_q * p.batch;
  cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream);
  const int blocks = static_cast<int>(std::min<int64_t>(num_tiles, p.num_sm));
  kernel<<<blocks, Tr::kThreads, smem, stream>>>(p, maps);
  return true;
}

// The configuration each case runs: three consumers at head dim 64 dense, else two.
template <int D, typename T, bool kIsCausal, bool kSparse>
bool launch_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  return launch_fwd_traits<FwdTraits<D, T, D == 64 && !kSparse ? 3 : 2>, kIsCausal, kSparse>(p, stream);
}

}  // namespace sm90
}  // namespace longctx
