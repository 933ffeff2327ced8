// Block-sparse attention: walking the kept 128 x 128 blocks of a block mask.
//
// The mask (FlashFwdParams::block_mask) holds one uint8 keep flag per (query block, key block) of
// kMaskBlock x kMaskBlock elements. The kernels keep their own tile sizes (kMaskBlock is a multiple
// of every tile), so a tile t of kTile rows or keys belongs to block t / (kMaskBlock / kTile), and a
// loop over tiles jumps from one kept block to the next, never touching the skipped ones: the work
// is proportional to the number of kept blocks. With no mask every tile is visited.
#pragma once

#include <cstdint>

#include "flash.h"

namespace longctx {

constexpr int kMaskBlock = 128;

// One line of the mask seen in tiles of kTile: a row of key blocks (forward, deterministic dQ) or a
// column of query blocks (dK / dV); `flags` points at its first block, `stride` steps one block.
template <int kTile>
struct MaskLine {
  static_assert(kMaskBlock % kTile == 0, "a tile lies inside one mask block");
  static constexpr int kTilesPerBlock = kMaskBlock / kTile;
  const uint8_t* flags;  // nullptr: dense
  int64_t stride;

  __device__ __forceinline__ bool kept(int t) const { return flags[(t / kTilesPerBlock) * stride] != 0; }
  // The first visited tile in [t, t_end), else t_end.
  __device__ __forceinline__ int next(int t, int t_end) const {
    if (flags != nullptr)
      while (t < t_end && !kept(t)) t = (t / kTilesPerBlock + 1) * kTilesPerBlock;
    return t < t_end ? t : t_end;
  }
  // The last visited tile before t, else -1.
  __device__ __forceinline__ int prev(int t) const {
    --t;
    if (flags != nullptr)
      while (t >= 0 && !kept(t)) t = (t / kTilesPerBlock) * kTilesPerBlock - 1;
    return t;
  }
};

// The same walk over a mask line staged in shared memory (one byte per block at byte address
// `smem`, see stage_mask_line): plain shared loads on a 32-bit address, which costs the caller no
// 64-bit pointer, and no dependent global load per step (at low density a step probes many blocks).
__device__ __forceinline__ bool kept_smem(uint32_t smem, int block) {
  uint32_t flag;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(flag) : "r"(smem + block));
  return flag != 0;
}

template <int kTile>
__device__ __forceinline__ int prev_kept_smem(uint32_t smem, int t) {
  constexpr int kTilesPerBlock = kMaskBlock / kTile;
  --t;
  while (t >= 0 && !kept_smem(smem, t / kTilesPerBlock)) t = (t / kTilesPerBlock) * kTilesPerBlock - 1;
  return t;
}

// Compaction of a staged mask line into the list of its kept tiles, by one warp (lane = 0..31): a
// loop then reads its next tile in one load instead of probing the skipped blocks one by one (at
// density 1/16 a step of prev_kept_smem probes ~16 flags in a dependent chain). One step: the warp's
// 32 candidate tiles t (kept or not) appended in lane order at `count`, which it advances.
__device__ __forceinline__ void append_kept(int16_t* list, int& count, int t, bool kept, int lane) {
  const unsigned ballot = __ballot_sync(0xffffffffu, kept);
  if (kept) list[count + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int16_t>(t);
  count += __popc(ballot);
}

// The kept tiles below t_end (tiles of kMaskBlock) in descending order; returns their count on every lane.
__device__ __forceinline__ int compact_kept_desc(int16_t* list, uint32_t smem, int t_end, int lane) {
  int count = 0;
  for (int top = t_end - 1; top >= 0; top -= 32) {
    const int t = top - lane;
    append_kept(list, count, t, t >= 0 && kept_smem(smem, t), lane);
  }
  return count;
}

// The kept tiles of [t_begin, t_end) (tiles of kTile) in ascending order; returns their count.
template <int kTile>
__device__ __forceinline__ int compact_kept_asc(int16_t* list, uint32_t smem, int t_begin, int t_end, int lane) {
  constexpr int kTilesPerBlock = kMaskBlock / kTile;
  int count = 0;
  for (int base = t_begin; base < t_end; base += 32) {
    const int t = base + lane;
    append_kept(list, count, t, t < t_end && kept_smem(smem, t / kTilesPerBlock), lane);
  }
  return count;
}

// Copies the first `blocks` flags of a mask line to shared memory, one byte each; the caller
// synchronises before walking it.
template <int kTile, int kThreads>
__device__ __forceinline__ void stage_mask_line(uint8_t* smem, const MaskLine<kTile>& line, int blocks, int tid) {
  for (int i = tid; i < blocks; i += kThreads) smem[i] = line.flags[i * line.stride];
}

// Key blocks seen by the query block of row `row` (sequence coordinates) of (batch b, query head h).
template <int kTile>
__device__ __forceinline__ MaskLine<kTile> mask_row(const FlashFwdParams& p, int b, int h, int row) {
  if (p.block_mask == nullptr) return {nullptr, 0};
  return {p.block_mask + b * p.block_mask_batch_stride + h * p.block_mask_head_stride +
              static_cast<int64_t>(row / kMaskBlock) * p.block_mask_cols,
          1};
}

// Query blocks that see the key block of key `col` of (batch b, query head h).
template <int kTile>
__device__ __forceinline__ MaskLine<kTile> mask_col(const FlashFwdParams& p, int b, int h, int col) {
  if (p.block_mask == nullptr) return {nullptr, 0};
  return {p.block_mask + b * p.block_mask_batch_stride + h * p.block_mask_head_stride + col / kMaskBlock,
          p.block_mask_cols};
}

}  // namespace longctx
