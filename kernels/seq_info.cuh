// Where sequence b of a batch lives: its first rows in the token tensors and its lengths, for
// padded batches (batch strides) and packed variable-length ones (cu_seqlens). Shared by the
// backward kernels and the Hopper forward (the stage-1 forward keeps its own spelling: ptxas
// allocates that kernel's registers without spills only as written).
#pragma once

#include <cstdint>

#include "flash.h"

namespace longctx {

// Row offsets and lengths of sequence b (padded batch or packed varlen).
struct SeqInfo {
  int q_start, k_start;  // first row of the sequence in the varlen token tensors (0 when padded)
  int seqlen_q, seqlen_k;
  bool varlen;
  __device__ __forceinline__ SeqInfo(const FlashFwdParams& p, int b) {
    varlen = p.cu_seqlens_q != nullptr;
    q_start = varlen ? p.cu_seqlens_q[b] : 0;
    k_start = varlen ? p.cu_seqlens_k[b] : 0;
    seqlen_q = varlen ? p.cu_seqlens_q[b + 1] - q_start : p.seqlen_q;
    seqlen_k = varlen ? p.cu_seqlens_k[b + 1] - k_start : p.seqlen_k;
  }
  // Element offset of row 0 of head h of sequence b in a token tensor.
  __device__ __forceinline__ int64_t tok(int b, int start, int64_t batch_stride, int64_t row_stride, int h,
                                         int64_t head_stride) const {
    return (varlen ? start * row_stride : b * batch_stride) + h * head_stride;
  }
  // Row of (b, i = 0) in dq_accum (rows, Hq, D).
  __device__ __forceinline__ int64_t dq_accum_row(int b, int max_seqlen_q) const {
    return varlen ? q_start : static_cast<int64_t>(b) * max_seqlen_q;
  }
  // Index of sequence b's first kBlockM-row query tile in a per-tile workspace (the Hopper backward's
  // dq_accum and row statistics): padded batch b x tiles per sequence; packed varlen q_start / kBlockM + b,
  // so that two sequences never share a tile. At most rows / kBlockM + batch tiles either way.
  template <int kBlockM>
  __device__ __forceinline__ int64_t query_tile0(int b, int max_seqlen_q) const {
    return varlen ? q_start / kBlockM + b : static_cast<int64_t>(b) * ((max_seqlen_q + kBlockM - 1) / kBlockM);
  }
};

}  // namespace longctx
