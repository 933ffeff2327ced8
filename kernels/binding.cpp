// Torch boundary of the FlashAttention kernels: validates every input, allocates outputs and
// workspaces, fills the torch-free FlashFwdParams / FlashBwdParams and launches on the stream
// passed from Python as an integer. Registered as operators in the `longctx_C` namespace; the
// user-facing custom ops (`longctx::flash_fwd`, ...) with fake tensors and autograd live in
// src/longctx/ops/flash.py and call these.
//
// Head dims: the kernels are compiled for 32 / 64 / 96 / 128 only; flash.py zero-pads other head
// dims up to the next one (and slices the results), so here head_dim must be one of those.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "flash.h"

namespace {

using at::Tensor;

bool supported_head_dim(int64_t d) { return d == 32 || d == 64 || d == 96 || d == 128; }

// Checks shared by every op; returns the number of sequences (batch).
int64_t check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& cu_q,
                  const c10::optional<Tensor>& cu_k, int64_t max_q, int64_t max_k) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q: must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                    "q: dtype must be float16 or bfloat16, got ", q.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), name, ": must be on ", q.device(), " like q, got ",
                      t->device());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), name, ": dtype must match q (", q.scalar_type(),
                      "), got ", t->scalar_type());
  }
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->stride(-1) == 1, name, ": last dimension must be contiguous (stride 1), got stride ",
                      t->stride(-1));
    // cp.async moves 16-byte pieces: every row start must be 16-byte aligned.
    for (int64_t dim = 0; dim < t->dim() - 1; ++dim)
      TORCH_CHECK_VALUE(t->stride(dim) % 8 == 0 || t->size(dim) == 1, name,
                        ": strides must be multiples of 8 elements (16 bytes), got ", t->strides());
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, name,
                      ": data must be 16-byte aligned");
  }
  const bool varlen = cu_q.has_value();
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(),
                    "cu_seqlens_q, cu_seqlens_k: give both (packed varlen) or neither");
  const int64_t nd = varlen ? 3 : 4;
  TORCH_CHECK_VALUE(q.dim() == nd && k.dim() == nd && v.dim() == nd, "q, k, v: expected ",
                    varlen ? "(total, heads, head_dim) with cu_seqlens" : "(batch, seqlen, heads, head_dim)",
                    ", got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  const int64_t d = q.size(-1);
  TORCH_CHECK_VALUE(supported_head_dim(d), "q: head_dim must be 32, 64, 96 or 128 here (padded by flash.py), got ",
                    d);
  TORCH_CHECK_VALUE(k.size(-1) == d && v.size(-1) == d, "k, v: head_dim must equal q's (", d, "), got ",
                    k.size(-1), " and ", v.size(-1));
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "v: shape must equal k's ", k.sizes(), ", got ", v.sizes());
  const int64_t hq = q.size(-2), hk = k.size(-2);
  TORCH_CHECK_VALUE(hk > 0 && hq % hk == 0, "k: number of heads (", hk, ") must divide q's (", hq, ")");
  if (!varlen) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k: batch must equal q's (", q.size(0), "), got ", k.size(0));
    return q.size(0);
  }
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"cu_seqlens_q", &*cu_q},
                                {"cu_seqlens_k", &*cu_k}}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), name, ": must be on ", q.device());
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt, name, ": dtype must be int32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->is_contiguous() && t->numel() >= 2, name,
                      ": must be a contiguous 1-D tensor of batch + 1 >= 2 offsets, got ", t->sizes());
  }
  TORCH_CHECK_VALUE(cu_q->numel() == cu_k->numel(), "cu_seqlens_k: length must equal cu_seqlens_q's (",
                    cu_q->numel(), "), got ", cu_k->numel());
  TORCH_CHECK_VALUE(max_q > 0 && max_k > 0, "max_seqlen_q, max_seqlen_k: must be positive, got ", max_q, ", ",
                    max_k);
  return cu_q->numel() - 1;
}

void fill_fwd_params(longctx::FlashFwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, const c10::optional<Tensor>& cu_q,
                     const c10::optional<Tensor>& cu_k, int64_t batch, int64_t max_q, int64_t max_k,
                     double p_drop, double scale, bool causal, const c10::optional<Tensor>& rng_state) {
  std::memset(&p, 0, sizeof(p));
  const bool varlen = cu_q.has_value();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int r = varlen ? 0 : 1;  // index of the row dimension
  p.q_batch_stride = varlen ? 0 : q.stride(0);
  p.k_batch_stride = varlen ? 0 : k.stride(0);
  p.v_batch_stride = varlen ? 0 : v.stride(0);
  p.o_batch_stride = varlen ? 0 : out.stride(0);
  p.q_row_stride = q.stride(r);
  p.k_row_stride = k.stride(r);
  p.v_row_stride = v.stride(r);
  p.o_row_stride = out.stride(r);
  p.q_head_stride = q.stride(r + 1);
  p.k_head_stride = k.stride(r + 1);
  p.v_head_stride = v.stride(r + 1);
  p.o_head_stride = out.stride(r + 1);
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(varlen ? 0 : 1);
  p.batch = static_cast<int>(batch);
  p.num_heads_q = static_cast<int>(q.size(-2));
  p.num_heads_k = static_cast<int>(k.size(-2));
  p.head_dim = static_cast<int>(q.size(-1));
  p.seqlen_q = static_cast<int>(varlen ? max_q : q.size(1));
  p.seqlen_k = static_cast<int>(varlen ? max_k : k.size(1));
  p.rows_q = q.size(r);
  p.rows_k = k.size(r);
  p.cu_seqlens_q = varlen ? cu_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_k->data_ptr<int>() : nullptr;
  p.softmax_scale = static_cast<float>(scale);
  p.softmax_scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_causal = causal;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  p.p_dropout = static_cast<float>(p_drop);
  p.rng_state = nullptr;
  if (p_drop > 0) {
    TORCH_CHECK_VALUE(rng_state.has_value(), "rng_state: required when dropout_p > 0");
    TORCH_CHECK_VALUE(rng_state->device() == q.device() && rng_state->scalar_type() == at::kLong &&
                          rng_state->numel() == 2 && rng_state->is_contiguous(),
                      "rng_state: must be a contiguous int64 tensor {seed, offset} on ", q.device());
    p.rng_state = reinterpret_cast<const uint64_t*>(rng_state->data_ptr<int64_t>());
  }
  int device = q.get_device();
  cudaDeviceGetAttribute(&p.num_sm, cudaDevAttrMultiProcessorCount, device);
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  const char* sm90_env = std::getenv("LONGCTX_SM90");
  p.use_sm90 = major == 9 && minor == 0 && !(sm90_env != nullptr && std::string(sm90_env) == "0");
}

// Block-sparse: bool / uint8 keep flags (batch or 1, heads_q or 1, ceil(max_q / 128), ceil(max_k / 128)),
// per sequence in its own coordinates for varlen batches.
void set_block_mask(longctx::FlashFwdParams& p, const c10::optional<Tensor>& block_mask, const Tensor& q) {
  if (!block_mask.has_value()) return;
  const Tensor& m = *block_mask;
  const int64_t rows = (p.seqlen_q + 127) / 128, cols = (p.seqlen_k + 127) / 128;
  TORCH_CHECK_VALUE(m.device() == q.device() && (m.scalar_type() == at::kBool || m.scalar_type() == at::kByte),
                    "block_mask: must be a bool or uint8 tensor on ", q.device());
  TORCH_CHECK_VALUE(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == p.batch) &&
                        (m.size(1) == 1 || m.size(1) == p.num_heads_q) && m.size(2) == rows && m.size(3) == cols,
                    "block_mask: expected (", p.batch, " or 1, ", p.num_heads_q, " or 1, ", rows, ", ", cols,
                    "), got ", m.sizes());
  TORCH_CHECK_VALUE(m.stride(3) == 1 && m.stride(2) == cols, "block_mask: the last two dimensions must be contiguous");
  p.block_mask = reinterpret_cast<const uint8_t*>(m.data_ptr());
  p.block_mask_batch_stride = m.size(0) == 1 ? 0 : m.stride(0);
  p.block_mask_head_stride = m.size(1) == 1 ? 0 : m.stride(1);
  p.block_mask_cols = static_cast<int>(cols);
}

void check_scalars(double p_drop, double scale) {
  TORCH_CHECK_VALUE(p_drop >= 0.0 && p_drop < 1.0, "dropout_p: must be in [0, 1), got ", p_drop);
  TORCH_CHECK_VALUE(scale > 0.0 && std::isfinite(scale), "softmax_scale: must be positive and finite, got ",
                    scale);
}

// The kernels address K and V with one offset, so they must have identical strides.
std::pair<Tensor, Tensor> same_strides(const Tensor& k, const Tensor& v) {
  if (k.strides() == v.strides()) return {k, v};
  return {k.contiguous(), v.contiguous()};
}

// The stream the caller passes (flash.py: the current stream of q's device). Outputs and workspaces
// come from torch's caching allocator, which ties them to the device's current stream, and the zero
// fills below run there too: the kernels must launch on that same stream.
cudaStream_t launch_stream(const Tensor& q, int64_t stream) {
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  TORCH_CHECK_VALUE(s == c10::cuda::getCurrentCUDAStream(q.get_device()).stream(),
                    "stream: must be the current CUDA stream of ", q.device(),
                    " (outputs and workspaces are allocated on it)");
  return s;
}

std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& q, const Tensor& k_in, const Tensor& v_in,
                                       const c10::optional<Tensor>& cu_q, const c10::optional<Tensor>& cu_k,
                                       int64_t max_q, int64_t max_k, double p_drop, double scale, bool causal,
                                       const c10::optional<Tensor>& rng_state, bool return_mask,
                                       const c10::optional<Tensor>& block_mask, int64_t stream) {
  const int64_t batch = check_qkv(q, k_in, v_in, cu_q, cu_k, max_q, max_k);
  check_scalars(p_drop, scale);
  const bool varlen = cu_q.has_value();
  auto [k, v] = same_strides(k_in, v_in);
  TORCH_CHECK_VALUE(!(return_mask && varlen), "cu_seqlens_q: the dropout-mask debug op takes padded batches only");
  TORCH_CHECK_VALUE(!return_mask || p_drop > 0, "dropout_p: the dropout-mask debug op needs dropout_p > 0");
  c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t launch = launch_stream(q, stream);

  Tensor out = at::empty(q.sizes(), q.options());
  const int64_t hq = q.size(-2);
  Tensor lse = varlen ? at::empty({hq, q.size(0)}, q.options().dtype(at::kFloat))
                      : at::empty({batch, hq, q.size(1)}, q.options().dtype(at::kFloat));
  Tensor mask;
  longctx::FlashFwdParams p;
  fill_fwd_params(p, q, k, v, out, lse, cu_q, cu_k, batch, max_q, max_k, p_drop, scale, causal, rng_state);
  set_block_mask(p, block_mask, q);
  Tensor tile_counter = at::empty({1}, q.options().dtype(at::kInt));
  p.tile_counter = tile_counter.data_ptr<int>();
  if (return_mask) {
    mask = at::zeros({batch, hq, q.size(1), k.size(1)}, q.options().dtype(at::kByte));
    p.dropout_mask = mask.data_ptr<uint8_t>();
  }
  if (q.numel() > 0) {
    longctx::run_flash_fwd(p, launch);
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "flash_fwd kernel launch failed: ", cudaGetErrorString(err));
  }
  if (!return_mask) mask = at::empty({0}, q.options().dtype(at::kByte));
  return {out, lse, mask};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout_in, const Tensor& q, const Tensor& k_in,
                                       const Tensor& v_in, const Tensor& out, const Tensor& lse,
                                       const c10::optional<Tensor>& cu_q, const c10::optional<Tensor>& cu_k,
                                       int64_t max_q, int64_t max_k, double p_drop, double scale, bool causal,
                                       const c10::optional<Tensor>& rng_state, bool deterministic,
                                       const c10::optional<Tensor>& block_mask, int64_t stream) {
  const int64_t batch = check_qkv(q, k_in, v_in, cu_q, cu_k, max_q, max_k);
  check_scalars(p_drop, scale);
  const bool varlen = cu_q.has_value();
  auto [k, v] = same_strides(k_in, v_in);
  TORCH_CHECK_VALUE(dout_in.sizes() == q.sizes() && dout_in.scalar_type() == q.scalar_type() &&
                        dout_in.device() == q.device(),
                    "dout: must match q in shape, dtype and device, got ", dout_in.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.stride(-1) == 1,
                    "out: must be the forward's output (q's shape and dtype), got ", out.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.device() == q.device(),
                    "lse: must be the forward's float32 log-sum-exp");
  c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t launch = launch_stream(q, stream);
  // Same 16-byte rules as q for dout (a gradient may arrive with any strides).
  Tensor dout = dout_in;
  bool ok = dout.stride(-1) == 1 && reinterpret_cast<uintptr_t>(dout.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim < dout.dim() - 1; ++dim) ok = ok && dout.stride(dim) % 8 == 0;
  if (!ok) dout = dout.contiguous();

  const int64_t hq = q.size(-2), hk = k.size(-2), d = q.size(-1);
  const int64_t rows = varlen ? q.size(0) : q.size(0) * q.size(1);
  Tensor dq = at::empty(q.sizes(), q.options());
  std::vector<int64_t> kv_shape(k.sizes().begin(), k.sizes().end());
  kv_shape[kv_shape.size() - 2] = hq;  // GQA: one gradient per query head, summed below
  Tensor dk = at::empty(kv_shape, k.options());
  Tensor dv = at::empty(kv_shape, k.options());
  // dq_accum: (rows, hq, d) for the stage-1 kernels; the Hopper backward uses it as whole 128-row tiles
  // per sequence (DqTiles in flash_bwd_sm90.cuh: batch x ceil(Sq / 128) tiles, or total / 128 + batch
  // when packed), never fewer rows than that.
  const int64_t tiled_rows = 128 * (varlen ? rows / 128 + batch : batch * ((q.size(1) + 127) / 128));
  Tensor dq_accum = at::empty({std::max(rows, tiled_rows), hq, d}, q.options().dtype(at::kFloat));
  Tensor dsoftmax_sum = at::empty_strided(lse.sizes(), lse.strides(), lse.options());

  longctx::FlashBwdParams p;
  std::memset(&p, 0, sizeof(p));
  fill_fwd_params(p, q, k, v, out, lse, cu_q, cu_k, batch, max_q, max_k, p_drop, scale, causal, rng_state);
  set_block_mask(p, block_mask, q);
  const int r = varlen ? 0 : 1;
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dq_accum_floats = dq_accum.numel();  // zeroed where it is needed (run_flash_bwd_hdim)
  p.dsoftmax_sum = dsoftmax_sum.data_ptr<float>();
  // The Hopper backward's row statistics per query tile (StatTiles in flash_bwd.cuh), only where that
  // kernel may run.
  Tensor row_stat_tiles;
  if ((d == 64 || d == 128) && p.use_sm90)
    row_stat_tiles = at::empty({2 * hq * (rows + 128 * batch)}, q.options().dtype(at::kFloat));
  p.row_stat_tiles = row_stat_tiles.defined() ? row_stat_tiles.data_ptr<float>() : nullptr;
  p.dk_accum = nullptr;
  p.dv_accum = nullptr;
  p.do_batch_stride = varlen ? 0 : dout.stride(0);
  p.do_row_stride = dout.stride(r);
  p.do_head_stride = dout.stride(r + 1);
  p.dq_batch_stride = varlen ? 0 : dq.stride(0);
  p.dq_row_stride = dq.stride(r);
  p.dq_head_stride = dq.stride(r + 1);
  p.dk_batch_stride = varlen ? 0 : dk.stride(0);
  p.dk_row_stride = dk.stride(r);
  p.dk_head_stride = dk.stride(r + 1);
  p.dv_batch_stride = varlen ? 0 : dv.stride(0);
  p.dv_row_stride = dv.stride(r);
  p.dv_head_stride = dv.stride(r + 1);
  p.deterministic = deterministic;
  if (q.numel() > 0 && k.numel() > 0) {
    longctx::run_flash_bwd(p, launch);
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "flash_bwd kernel launch failed: ", cudaGetErrorString(err));
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  if (hq != hk) {
    std::vector<int64_t> grouped(kv_shape.begin(), kv_shape.end() - 2);
    grouped.insert(grouped.end(), {hk, hq / hk, d});
    dk = dk.view(grouped).sum(-2);
    dv = dv.view(grouped).sum(-2);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(longctx_C, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float dropout_p, float softmax_scale, bool causal, Tensor? rng_state, "
      "bool return_dropout_mask, Tensor? block_mask, int stream) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float dropout_p, float softmax_scale, "
      "bool causal, Tensor? rng_state, bool deterministic, Tensor? block_mask, int stream) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(longctx_C, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}
