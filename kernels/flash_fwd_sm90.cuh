// FlashAttention forward, Hopper path (sm_90a): warpgroup MMA (wgmma) instead of mma.sync.
//
// Same mathematics and outputs as flash_fwd_kernel (flash_fwd.cuh). One thread block per
// (kBlockM = 128 query rows, head, batch), 2 warpgroups of 64 rows each; the block walks the key
// tiles (kBlockN = 128) from the last visible one down, like the stage-1 kernel:
//   S  = Q_g K^T          wgmma m64n128, A = Q (smem, K-major), B = K (K-major)
//   online softmax in registers (base 2, one row pair per thread quad)
//   O += P V              wgmma m64nD,   A = P (registers),     B = V (MN-major)
// K / V tiles are double-buffered with cp.async: tile n-1 streams in while tile n is computed,
// with one barrier per tile. Dropout stays on the stage-1 kernel.
//
// Included by flash_fwd.cuh (after TileLoader, before run_flash_fwd_hdim), not on its own.
#pragma once

#include "seq_info.cuh"
#include "wgmma.cuh"

namespace longctx {
namespace sm90 {

template <int kHeadDim_, typename T_>
struct FwdTraits {
  using T = T_;
  static constexpr int D = kHeadDim_;
  static_assert(D == 64 || D == 128, "the Hopper forward covers head dims 64 and 128");
  static constexpr int kBlockM = 128, kBlockN = 128, kThreads = 256;
  using QTile = SwizzledTile<kBlockM, D>;
  using KTile = SwizzledTile<kBlockN, D>;
  // Byte offsets from the 1024-aligned base: Q, then [2 stages] x (K, V).
  static constexpr int kOffKV = QTile::kBytes;
  static constexpr int kStageBytes = 2 * KTile::kBytes;
  static constexpr int kOffMask = kOffKV + 2 * kStageBytes;  // block-sparse: the mask row
  static constexpr int kSmemBytes = kOffMask + 1024;  // + alignment slack (+ the mask row's bytes)
};

template <typename Tr, bool kIsCausal, bool kSparse>
__global__ void __launch_bounds__(Tr::kThreads, 1) flash_fwd_sm90_kernel(const FlashFwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using QTile = typename Tr::QTile;
  using KTile = typename Tr::KTile;
  constexpr int D = Tr::D, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kDSteps = D / 16, kNSteps = kBlockN / 16;
  using WgS = Wgmma<kBlockN, T>;  // S: 64 rows x 128 keys
  using WgO = Wgmma<D, T>;        // O: 64 rows x D

  extern __shared__ char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  char* const smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sQ = base, sKV0 = base + Tr::kOffKV;

  // Heaviest (causal) query tiles first so the tail of the grid is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;

  const SeqInfo s(p, b);
  const int seqlen_q = s.seqlen_q, seqlen_k = s.seqlen_k;
  const int row0 = m_block * kBlockM;
  if (row0 >= seqlen_q) return;
  const int hk = h / (p.num_heads_q / p.num_heads_k);
  const T* q_ptr = static_cast<const T*>(p.q) + s.tok(b, s.q_start, p.q_batch_stride, p.q_row_stride, h, p.q_head_stride);
  // K and V have identical strides (the binding guarantees it).
  const int64_t kv_off = s.tok(b, s.k_start, p.k_batch_stride, p.k_row_stride, hk, p.k_head_stride);
  const T* k_ptr = static_cast<const T*>(p.k) + kv_off;
  const T* v_ptr = static_cast<const T*>(p.v) + kv_off;
  T* o_ptr = static_cast<T*>(p.o) + s.tok(b, s.q_start, p.o_batch_stride, p.o_row_stride, h, p.o_head_stride);
  float* lse_ptr = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;

  const int diag = seqlen_k - seqlen_q;  // query i sees keys j <= i + diag (causal)
  int n_block_max = (seqlen_k + kBlockN - 1) / kBlockN;
  if (kIsCausal) {
    const int last_key = min(row0 + kBlockM, seqlen_q) + diag;  // one past the last visible key
    n_block_max = min(n_block_max, last_key <= 0 ? 0 : (last_key + kBlockN - 1) / kBlockN);
  }
  // Block-sparse (kSparse): only the key tiles of kept mask blocks are visited, walking the block's
  // mask row staged in shared memory.
  if constexpr (kSparse) {
    stage_mask_line<kBlockN, kThreads>(reinterpret_cast<uint8_t*>(smem + Tr::kOffMask), mask_row<kBlockN>(p, b, h, row0),
                                       n_block_max, tid);
    __syncthreads();
  }
  auto prev_tile = [&](int t) { return kSparse ? prev_kept_smem<kBlockN>(base + Tr::kOffMask, t) : t - 1; };
  const int n_first = prev_tile(n_block_max);

  TileLoader<QTile, kThreads> q_loader(tid);
  TileLoader<KTile, kThreads> kv_loader(tid);
  const int64_t q_lane = q_loader.lane_offset(tid, p.q_row_stride);
  const int64_t kv_lane = kv_loader.lane_offset(tid, p.k_row_stride);
  auto load_kv = [&](int n_block, int stage) {
    const uint32_t sK = sKV0 + stage * Tr::kStageBytes;
    kv_loader.load(sK, k_ptr + kv_lane, k_ptr, p.k_row_stride, n_block * kBlockN, seqlen_k);
    kv_loader.load(sK + KTile::kBytes, v_ptr + kv_lane, v_ptr, p.k_row_stride, n_block * kBlockN, seqlen_k);
  };
  if (n_first >= 0) {
    q_loader.load(sQ, q_ptr + q_lane, q_ptr, p.q_row_stride, row0, seqlen_q);
    load_kv(n_first, 0);
  }
  cp_async_commit();

  // Thread coordinates in the warpgroup's m64 accumulators (wgmma.cuh): rows 16 warp + g (+8).
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int row_in_tile = 64 * wg + 16 * warp + g;  // this thread's first row (the second is +8)
  const float scale_log2 = p.softmax_scale_log2;

  float acc_o[WgO::kRegs];
#pragma unroll
  for (int i = 0; i < WgO::kRegs; ++i) acc_o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // max in log2 units

  int stage = 0;
  for (int n_block = n_first; n_block >= 0; stage ^= 1) {
    const int n_next = prev_tile(n_block);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // tile n_block is in; every warpgroup is done with the other stage
    if (n_next >= 0) load_kv(n_next, stage ^ 1);
    cp_async_commit();

    const uint32_t sK = sKV0 + stage * Tr::kStageBytes, sV = sK + KTile::kBytes;
    float acc_s[WgS::kRegs];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDSteps; ++kk) {
      const uint32_t a_off = (kk / 4) * QTile::kBlockBytes + 64 * wg * 128 + (kk % 4) * 32;
      const uint32_t b_off = (kk / 4) * KTile::kBlockBytes + (kk % 4) * 32;
      WgS::template ss<0, 0>(acc_s, smem_desc(sQ + a_off, 16, 1024), smem_desc(sK + b_off, 16, 1024), kk);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(acc_s);

    // Scores in log2 units; hidden keys (past the end, causal) at -inf.
    const int col0 = n_block * kBlockN;
    const bool need_mask = col0 + kBlockN > seqlen_k || (kIsCausal && col0 + kBlockN - 1 > row0 + diag);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = acc_s[4 * j + e] * scale_log2;
        if (need_mask) {
          const int key = col0 + 8 * j + 2 * t4 + (e % 2), row = row0 + row_in_tile + 8 * (e / 2);
          if (key >= seqlen_k || (kIsCausal && key > row + diag)) s = -INFINITY;
        }
        acc_s[4 * j + e] = s;
      }
    // Online softmax: new row max, rescale O and the running sum, P = exp2(s - max).
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = row_max[hh];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(acc_s[4 * j + 2 * hh], acc_s[4 * j + 2 * hh + 1]));
      mx = quad_max(mx);
      const float ref = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet stays at 0
      const float corr = fast_exp2(row_max[hh] - ref);  // exp2(-inf) = 0 on the first tile
      row_max[hh] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = fast_exp2(acc_s[4 * j + 2 * hh + e] - ref);
          acc_s[4 * j + 2 * hh + e] = pv;
          sum += pv;
        }
      row_sum[hh] = row_sum[hh] * corr + sum;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc_o[4 * j + 2 * hh] *= corr;
        acc_o[4 * j + 2 * hh + 1] *= corr;
      }
    }
    uint32_t p_a[kNSteps][4];
#pragma unroll
    for (int kk = 0; kk < kNSteps; ++kk) {
      p_a[kk][0] = pack_float2<T>(acc_s[8 * kk + 0], acc_s[8 * kk + 1]);
      p_a[kk][1] = pack_float2<T>(acc_s[8 * kk + 2], acc_s[8 * kk + 3]);
      p_a[kk][2] = pack_float2<T>(acc_s[8 * kk + 4], acc_s[8 * kk + 5]);
      p_a[kk][3] = pack_float2<T>(acc_s[8 * kk + 6], acc_s[8 * kk + 7]);
    }
    // O += P V (B = V, MN-major: a k16 step is 16 key rows).
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kNSteps; ++kk)
      WgO::template rs<1>(acc_o, p_a[kk], smem_desc(sV + kk * 16 * 128, KTile::kBlockBytes, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(acc_o);
    n_block = n_next;
  }

  // Epilogue: normalise, write LSE, stage O through shared memory (the Q tile) for 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done reading sQ
  T* const sO = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float l = quad_sum(row_sum[hh]);
    const bool empty = !(l > 0.f);
    const float inv = empty ? 0.f : 1.f / l;
    const int r = row_in_tile + 8 * hh;
    if (t4 == 0 && row0 + r < seqlen_q)
      lse_ptr[row0 + r] = empty ? -INFINITY : (row_max[hh] + __log2f(l)) * 0.69314718055994531f;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = 8 * j + 2 * t4;
      *reinterpret_cast<uint32_t*>(sO + QTile::offset(r, col) + (col & 7)) =
          pack_float2<T>(acc_o[4 * j + 2 * hh] * inv, acc_o[4 * j + 2 * hh + 1] * inv);
    }
  }
  __syncthreads();
  constexpr int kTotal = QTile::kElems / 8;
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    int r, c;
    QTile::copy_coords(it * kThreads + tid, r, c);
    if (row0 + r < seqlen_q)
      *reinterpret_cast<uint4*>(o_ptr + static_cast<int64_t>(row0 + r) * p.o_row_stride + c) =
          *reinterpret_cast<const uint4*>(sO + QTile::offset(r, c));
  }
#endif
}

// Launches the Hopper forward; returns false, launching nothing, when this build has no sm_90a code.
template <int D, typename T, bool kIsCausal, bool kSparse>
bool launch_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D, T>;
  auto kernel = flash_fwd_sm90_kernel<Tr, kIsCausal, kSparse>;
  static const bool available = has_sm90_code(kernel);
  if (!available) return false;
  const int smem = Tr::kSmemBytes + (kSparse ? (p.block_mask_cols + 15) / 16 * 16 : 0);  // + the mask row
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.num_heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  return true;
}

}  // namespace sm90
}  // namespace longctx
