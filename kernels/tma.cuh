// Hopper (sm_90a) data movement and synchronisation for warp-specialised kernels:
//   - TMA (cp.async.bulk.tensor) loads of a token tensor's tile into a 128-byte-swizzled
//     SwizzledTile (mma.cuh / wgmma.cuh) and the host-side tensor map that describes the tensor;
//   - mbarriers (transaction-counted "full" barriers that TMA completes, arrival-counted "empty"
//     barriers that consumers release);
//   - bulk reductions (cp.reduce.async.bulk) of fp32 shared memory into global memory;
//   - named barriers (bar.sync / bar.arrive on ids 1..15) for turn-taking between warpgroups;
//   - setmaxnreg (move registers from the producer warpgroup to the consumers).
//
// A token tensor (batch, rows, heads, D) or packed (rows, heads, D) is described as the 4-D tensor
// (D, rows, heads, batch), innermost first, with a 64-column x kRows box: one box is one column block
// of a SwizzledTile (kRows x 64 elements = kRows x 128 bytes) and TMA's 128-byte swizzle writes the same
// chunk permutation (16-byte chunk c of row r at c ^ (r % 8)) when the destination is 1024-byte
// aligned. Rows past the tensor's end are zero-filled by TMA.
#pragma once

#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

namespace longctx {
namespace sm90 {

// ---- mbarriers ---------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the barrier initialisations visible to the async proxy (TMA) and the other threads (with the
// __syncthreads that follows).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Arrive and announce `bytes` of transactions (the TMA loads that complete this phase).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives when `pred` holds, without a branch (control flow between wgmma waits makes ptxas wait early).
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool pred) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n"
      "@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
      "r"(static_cast<int>(pred))
      : "memory");
}
// Waits until the phase of parity `parity` has completed. A fresh barrier is in phase 0, so waiting on
// parity 1 returns at once (how a producer sees its empty slots on the first round).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_LOOP;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ---- named barriers, register reallocation ---------------------------------------------------------

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// A shared-memory load that stays where it is written (e.g. behind a barrier).
__device__ __forceinline__ float ld_volatile_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.volatile.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
// Zeroes rows [row_begin, Tile::kRows) of a swizzled tile (Tile: SwizzledTile) at shared byte address
// `tile`, by kThreads threads (tid = 0 .. kThreads - 1), 16 bytes per store. For the rows that a TMA load
// brings from past a packed (varlen) sequence's end, i.e. the next sequence's: their probabilities are
// 0, but 0 x NaN / inf is NaN in an MMA. The caller fences (the async proxy reads them) and synchronises.
// Needs 0 <= row_begin (a negative one would store before the tile).
template <typename Tile, int kThreads>
__device__ __forceinline__ void zero_tile_rows(uint32_t tile, int row_begin, int tid) {
  for (int idx = row_begin * Tile::kChunks + tid; idx < Tile::kRows * Tile::kChunks; idx += kThreads) {
    const uint32_t addr = tile + Tile::byte_offset(idx / Tile::kChunks, idx % Tile::kChunks);
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
  }
}
template <int kRegs>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- bulk reduction (TMA) ---------------------------------------------------------------------------

// global[dst, dst + bytes) += shared[src, src + bytes) as fp32, by the copy engine (16-byte aligned,
// bytes a multiple of 16). Completion is tracked in this thread's bulk groups (bulk_commit / bulk_wait*).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's bulk groups still read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Waits until at most kPending of this thread's bulk groups are incomplete (writes done).
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- TMA -----------------------------------------------------------------------------------------

// shared[dst, dst + bytes) = global[src, src + bytes), by the copy engine, completing `bytes` on
// mbarrier `bar` (both addresses 16-byte aligned, bytes a multiple of 16).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// One 64-column x box-rows tile of a (D, rows, heads, batch) tensor into shared memory at `dst`,
// completing `bytes` on mbarrier `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int col, int row,
                                            int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(col), "r"(row), "r"(head), "r"(batch)
      : "memory");
}

// Loads rows [row, row + Tile::kRows) of (head, batch) into a SwizzledTile at `dst`, one box per
// 64-column block; the caller has announced Tile::kBytes on `bar`.
template <typename Tile>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const CUtensorMap* map, uint32_t bar, int row, int head,
                                              int batch) {
  static_assert(Tile::kBlockCols == 64, "TMA tiles use 64-column (128-byte) blocks");
#pragma unroll
  for (int j = 0; j < Tile::kNumBlocks; ++j) tma_load_4d(dst + j * Tile::kBlockBytes, map, bar, 64 * j, row, head, batch);
}

// The tensor maps of Q, K and V, passed to the kernel as a __grid_constant__ parameter.
struct QkvMaps {
  CUtensorMap q, k, v;
};
// The backward's: Q and dO.
struct QdoMaps {
  CUtensorMap q, dout;
};

// Host: describes a 16-bit token tensor (strides in elements; batch_stride 0 for packed varlen
// tensors) with a 64 x box_rows box and 128-byte swizzle. False when TMA cannot address it (pointer
// or strides not 16-byte aligned, or the driver lacks cuTensorMapEncodeTiled); the caller then takes
// another kernel.
inline bool make_token_map(CUtensorMap* map, const void* ptr, bool bf16, int head_dim, int64_t rows, int heads,
                           int batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return false;
  if (batch_stride == 0) batch_stride = rows * row_stride;  // packed: one "batch"; any aligned stride
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row_stride * 2), static_cast<cuuint64_t>(head_stride * 2),
                                 static_cast<cuuint64_t>(batch_stride * 2)};
  for (cuuint64_t s : strides)
    if (s % 16 != 0 || s == 0) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sm90
}  // namespace longctx
