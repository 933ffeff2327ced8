// longctx FlashAttention: the one parameter struct shared by the forward and backward kernels.
// Torch-free on purpose: the .cu files include CUDA headers only; binding.cpp fills this struct
// from torch tensors after validating them.
//
// Layout: every token tensor is (batch, seqlen, heads, head_dim) or, for packed variable-length
// batches, (total_tokens, heads, head_dim); the last dimension is contiguous and strides are in
// elements. For varlen, batch strides are 0 and the sequence b starts at row cu_seqlens[b].
//
// LSE (fp32, natural log): element (b, h, i) lives at
//   lse[b * lse_batch_stride + h * lse_head_stride + (cu_seqlens_q ? cu_seqlens_q[b] : 0) + i]
// i.e. (B, Hq, Sq) for padded batches and (Hq, total_q) for varlen.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace longctx {

struct FlashFwdParams {
  const void* __restrict__ q;
  const void* __restrict__ k;
  const void* __restrict__ v;
  void* __restrict__ o;
  float* __restrict__ lse;

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int batch;
  int num_heads_q, num_heads_k;  // num_heads_q % num_heads_k == 0 (MQA / GQA)
  int head_dim;                  // actual head dim (<= the compiled instance's)
  int seqlen_q, seqlen_k;        // padded batch: the lengths; varlen: max_seqlen_q / max_seqlen_k
  int64_t rows_q, rows_k;        // rows of the token tensors: seqlen (padded) or total tokens (varlen)

  // Packed variable-length batches: int32 prefix sums of length batch + 1, or nullptr.
  const int* __restrict__ cu_seqlens_q;
  const int* __restrict__ cu_seqlens_k;

  float softmax_scale;       // applied to q.k
  float softmax_scale_log2;  // softmax_scale * log2(e): the kernels work in base 2
  bool is_causal;            // bottom-right aligned: query i sees keys j <= i + seqlen_k - seqlen_q
  bool is_bf16;              // else fp16

  // Dropout (see philox.cuh): keep with probability 1 - p_dropout, scale kept values by
  // 1 / (1 - p_dropout). rng_state is a device pointer to {seed, offset} so that CUDA graphs can
  // replay with a fresh offset written by the host before each launch.
  float p_dropout;
  const uint64_t* __restrict__ rng_state;
  // Debug only: when non-null the forward writes its keep mask here as uint8,
  // (B, Hq, seqlen_q, seqlen_k) for padded batches.
  uint8_t* __restrict__ dropout_mask;

  // Block-sparse attention (block_mask.cuh), or nullptr for dense: uint8 keep flags of 128 x 128
  // blocks, (mask batch, mask heads, ceil(seqlen_q / 128), ceil(seqlen_k / 128)) with stride 0 on a
  // broadcast (size 1) batch or head dimension. Varlen: per sequence, in its own coordinates.
  const uint8_t* __restrict__ block_mask;
  int64_t block_mask_batch_stride, block_mask_head_stride;
  int block_mask_cols;  // row stride: key blocks per query block

  int num_sm;  // multiprocessor count, for grid heuristics
  int* tile_counter;  // one int of scratch: the Hopper forward's persistent schedule (zeroed by the launch)
  // Hopper kernels (sm_90a, wgmma) where they cover the case: set by the binding on compute
  // capability 9.0 unless LONGCTX_SM90=0; a build without sm_90a code falls back by itself.
  bool use_sm90;
};

struct FlashBwdParams : FlashFwdParams {
  const void* __restrict__ dout;   // same layout as o
  void* __restrict__ dq;
  void* __restrict__ dk;           // (.., Hk, D): GQA heads are summed into their K/V head
  void* __restrict__ dv;
  float* __restrict__ dq_accum;    // fp32 workspace, (B, Sq, Hq, D_padded) or (total_q, Hq, D_padded)
  int64_t dq_accum_floats;         // its size; it arrives uninitialised (run_flash_bwd_hdim zeroes it)
  bool zero_dq_tiles;              // set by run_flash_bwd_hdim: flash_bwd_dot_do_o_kernel zeroes its tiles
  float* __restrict__ dsoftmax_sum;  // fp32 workspace laid out like lse: rowsum(dO * O)
  // fp32 workspace of the Hopper backward, or nullptr: per (query tile, head) the tile's lse in base 2
  // (+inf on empty and padding rows), then its rowsum(dO * O) (0 on padding rows); StatTiles in
  // flash_bwd.cuh. At least 2 x Hq x (total query rows + 128 x batch) floats.
  float* __restrict__ row_stat_tiles;
  float* __restrict__ dk_accum;    // fp32 workspace for GQA / deterministic reductions (may be null)
  float* __restrict__ dv_accum;

  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  bool deterministic;
};

// Dispatch on dtype / head dim / causal; defined in the kernels' launch .cu files.
void run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);
void run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream);

}  // namespace longctx
