// Small device helpers shared by the FlashAttention forward and backward kernels (sm_80+):
// tensor-core MMA (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate), ldmatrix, cp.async,
// the shared-memory swizzle, fp32 -> 16-bit packing and quad (4-lane) reductions.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), lane = threadIdx.x % 32, g = lane / 4, t = lane % 4:
//   A (16x16, row-major), 4 x .b32 of two 16-bit values each:
//     a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   B (16x8, "col": for each output column n, k is contiguous), 2 x .b32:
//     b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C/D (16x8, fp32), 4 floats:
//     c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// So the accumulator of S = Q K^T for two adjacent n8 tiles packs directly into the A operand of
// the next product P V (see pack_c_to_a).
//
// Do not rename anything here: the backward kernels include this file. Additions go at the end,
// in the marked section.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace longctx {

// ----------------------------------------------------------------------------------------------
// Element types
// ----------------------------------------------------------------------------------------------

// Maps the 16-bit element type to its packed pair type and the PTX type name used by mma.sync.
template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__half> {
  using Pair = __half2;
  static constexpr bool kIsBf16 = false;
};

template <>
struct TypeTraits<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr bool kIsBf16 = true;
};

// Two fp32 values -> one .b32 register holding (lo, hi) as 16-bit values (round to nearest).
template <typename T>
__device__ __forceinline__ uint32_t pack_float2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_float2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack_float2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The inverse: one .b32 of two 16-bit values -> two floats.
template <typename T>
__device__ __forceinline__ float2 unpack_float2(uint32_t v);

template <>
__device__ __forceinline__ float2 unpack_float2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}

template <>
__device__ __forceinline__ float2 unpack_float2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}

// ----------------------------------------------------------------------------------------------
// Tensor-core MMA: D = A * B + C, m16n8k16, fp32 accumulators (C and D may alias).
// ----------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Accumulators of two adjacent n8 tiles (columns 0-7 and 8-15 of a 16x16 block) -> A operand.
template <typename T>
__device__ __forceinline__ void pack_c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_float2<T>(c0[0], c0[1]);
  a[1] = pack_float2<T>(c0[2], c0[3]);
  a[2] = pack_float2<T>(c1[0], c1[1]);
  a[3] = pack_float2<T>(c1[2], c1[3]);
}

// ----------------------------------------------------------------------------------------------
// Shared memory addressing, ldmatrix, cp.async
// ----------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices; lane l supplies the address of row (l % 8) of matrix (l / 8).
// Register r[i] of lane l then holds matrix i's row (l / 4), elements 2*(l % 4) .. +1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// Same, each matrix transposed: r[i] of lane l holds column (l / 4), rows 2*(l % 4) .. +1.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// Two matrices; lanes 0-15 supply the addresses (lanes 16-31 must still hold valid addresses).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr));
}

// 16-byte global -> shared copy that bypasses L1 (.cg). When !pred nothing is read and the 16
// destination bytes are zero-filled (src-size 0), so out-of-range rows become zeros.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, bool pred = true) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Swizzled layout of a (rows x cols) 16-bit tile in shared memory, cols a multiple of 32.
// The tile is stored as column blocks of kBlockCols = 64 halves (128 B rows, 8 chunks of 16 B) when
// cols % 64 == 0, else 32 halves (64 B rows, 4 chunks); block b holds columns [b*kBlockCols, ...)
// of every row, rows contiguous. Inside a block the 16-byte chunk c of row r is stored at
//   8-chunk rows: c ^ (r % 8)            4-chunk rows: c ^ ((r / 2) % 4)
// so that the 8 row addresses of one ldmatrix 8x8 matrix (8 consecutive rows, same chunk), and 8
// consecutive 16-byte stores along a 128-byte span, hit 8 distinct 16-byte bank groups.
template <int kRows_, int kCols>
struct SwizzledTile {
  static constexpr int kRows = kRows_;
  static_assert(kCols % 32 == 0, "tile width must be a multiple of 32 elements");
  static constexpr int kBlockCols = (kCols % 64 == 0) ? 64 : 32;
  static constexpr int kBlockChunks = kBlockCols / 8;
  static constexpr int kNumBlocks = kCols / kBlockCols;
  static constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  static constexpr int kElems = kRows * kCols;
  static constexpr int kBytes = kElems * 2;

  // Element offset of (row, col), col a multiple of 8 (the start of a 16-byte chunk).
  __device__ __forceinline__ static int offset(int row, int col) {
    const int chunk = col >> 3;
    const int block = chunk / kBlockChunks;
    const int c = chunk % kBlockChunks;
    const int sc = (kBlockChunks == 8) ? (c ^ (row & 7)) : (c ^ ((row >> 1) & 3));
    return block * (kRows * kBlockCols) + row * kBlockCols + sc * 8;
  }

  static constexpr int kRowBytes = kBlockCols * 2;
  static constexpr int kBlockBytes = kRows * kRowBytes;

  // Byte offset of 16-byte chunk `chunk` of row `row`.
  __device__ __forceinline__ static uint32_t byte_offset(int row, int chunk) {
    const int c = chunk % kBlockChunks;
    const int sc = (kBlockChunks == 8) ? (c ^ (row & 7)) : (c ^ ((row >> 1) & 3));
    return (chunk / kBlockChunks) * kBlockBytes + row * kRowBytes + sc * 16;
  }

  // Cheap fragment addressing. With base = byte_offset(lane_row, lane_chunk), lane_chunk in {0, 1},
  // the chunk (R + lane_row, C + lane_chunk) for R % 8 == 0 and C % 2 == 0 lies at the returned
  // offset: the swizzle only flips bits 4-6 of base, so for compile-time R and C this is one XOR
  // plus an immediate (and keeps the compiler from holding one address register per fragment).
  __device__ __forceinline__ static uint32_t frag_offset(uint32_t base, int R, int C) {
    return (C / kBlockChunks) * kBlockBytes + R * kRowBytes + (base ^ ((C % kBlockChunks) * 16));
  }

  // The i-th 16-byte chunk of the tile in copy order (column block, row, chunk): consecutive
  // threads read consecutive 16-byte pieces of one global row and store to distinct banks.
  __device__ __forceinline__ static void copy_coords(int i, int& row, int& col) {
    const int c = i % kBlockChunks;
    const int rest = i / kBlockChunks;
    row = rest % kRows;
    col = (rest / kRows) * kBlockCols + c * 8;
  }
};

// ----------------------------------------------------------------------------------------------
// Reductions and math
// ----------------------------------------------------------------------------------------------

// The four lanes of a quad (lane / 4 equal) hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

// Returns x, hiding its value from the optimiser: what derives from it inside a loop is recomputed
// there (one XOR or add per use) instead of being hoisted into registers held across the loop.
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// 2^x with the hardware approximation (ex2.approx.ftz.f32); exp2f under --use_fast_math is the
// same instruction, this makes it explicit and independent of the flag.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ==============================================================================================
// Backward-kernel additions (appended by the backward engineer; keep the names above stable).
// ==============================================================================================
// ---- backward helpers ----

// 4-byte global -> shared copy (.ca: the only cp.async size class below 16 bytes); zero-fills when
// !pred. Used for per-row fp32 statistics (lse, rowsum(dO * O)), whose rows need not be 16-byte
// aligned in varlen batches.
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* gmem, bool pred = true) {
  const int src_size = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_size));
}

// dst[0] += a, dst[1] += b in global memory (dst 8-byte aligned), result unused: one vector
// reduction on sm_90+, two scalar ones before.
__device__ __forceinline__ void atomic_add_f32x2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

}  // namespace longctx
