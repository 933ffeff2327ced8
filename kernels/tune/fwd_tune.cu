// Scratch tuning harness for the Hopper forward (not part of the extension): times several
// sm90::FwdTraits variants of one head dim on bf16 random data with FlashAttention's benchmark shapes
// (16k tokens, hidden 2048), dense and block-sparse (a seeded random mask of density 1/2), and checks
// each against the first variant of its case. Each timed call follows a 256 MB cache flush, as in
// bench/attention.py (--no-flush: back to back). Environment: MASK=random|exact|samerow|stripes picks
// the block-sparse case's mask (make_mask), ITERS the timed calls per case (default 30), and each
// case's line ends with its timed loop's wall-clock span (ms since the epoch), to match against
// `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw -lms 20` samples.
//   nvcc -O3 --use_fast_math -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DHDIM=128 [-DLONGCTX_FWD_TRACE] \
//        -I kernels kernels/tune/fwd_tune.cu -o fwd_tune && ./fwd_tune
#include <cstdio>
#include <algorithm>
#include <chrono>
#include <random>
#include <cstdlib>
#include <string>
#include <vector>

#include "../flash_fwd.cuh"

using namespace longctx;
using bf16 = __nv_bfloat16;

#ifndef HDIM
#define HDIM 128
#endif

#define CK(x)                                                                            \
  do {                                                                                   \
    cudaError_t e = (x);                                                                 \
    if (e != cudaSuccess) {                                                              \
      printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);    \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

// Standard normal values (Box-Muller on two hashed uniforms), like torch.randn in bench/attention.py:
// under the board's power limit the clocks, and so the timings, depend on the data.
__global__ void fill(bf16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    const float u1 = ((h & 0xFFFF) + 0.5f) / 65536.f, u2 = (h >> 16) / 65536.f;
    x[i] = __float2bfloat16(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

__global__ void max_diff(const bf16* a, const bf16* b, size_t n, float* out) {
  float m = 0.f;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    m = fmaxf(m, fabsf(__bfloat162float(a[i]) - __bfloat162float(b[i])));
  m = warp_max(m);
  if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

constexpr size_t kFlushBytes = size_t(256) << 20;
void* g_flush = nullptr;  // set unless --no-flush

#ifdef LONGCTX_FWD_TRACE
// Build with -DLONGCTX_FWD_TRACE: per consumer, the median over the third tile of block 0 of each
// phase of a visit (clock cycles), then a few visits' raw points relative to consumer 0.
void print_trace(int consumers) {
  static unsigned tr[3][128][8];
  CK(cudaMemcpyFromSymbol(tr, sm90::g_fwd_trace, sizeof(tr)));
  const char* names[] = {"data", "turn", "issue+S", "softmax", "PV", "tail", "visit"};
  for (int c = 0; c < consumers; ++c) {
    std::vector<std::vector<int>> d(7);
    for (int i = 4; i + 1 < 128; ++i) {
      if (tr[c][i][0] == 0 || tr[c][i + 1][0] == 0) continue;
      for (int k = 0; k < 6; ++k) d[k].push_back(static_cast<int>(tr[c][i][k + 1] - tr[c][i][k]));
      d[6].push_back(static_cast<int>(tr[c][i + 1][0] - tr[c][i][0]));
    }
    printf("    consumer %d (%zu visits):", c, d[6].size());
    for (int k = 0; k < 7; ++k) {
      std::sort(d[k].begin(), d[k].end());
      printf(" %s %d", names[k], d[k].empty() ? -1 : d[k][d[k].size() / 2]);
    }
    printf("\n");
  }
  unsigned long long ph[5];
  CK(cudaMemcpyFromSymbol(ph, sm90::g_fwd_phase, sizeof(ph)));
  if (ph[4] > 0)
    printf("    every tile (consumer 0, %llu tiles, mean cycles): start %.0f, other visits %.0f (%.0f each), "
           "epilogue %.0f\n", ph[4], double(ph[0]) / ph[4], double(ph[1]) / ph[4],
           ph[3] ? double(ph[1]) / ph[3] : 0.0, double(ph[2]) / ph[4]);
  const unsigned t0 = tr[0][20][0];
  for (int i = 20; i < 24; ++i)
    for (int c = 0; c < consumers; ++c) {
      printf("    i=%d c=%d:", i, c);
      for (int k = 0; k < 7; ++k) printf(" %6d", static_cast<int>(tr[c][i][k] - t0));
      printf("\n");
    }
}
#endif

template <typename Tr, bool kSparse>
void run(const char* name, FlashFwdParams p, bf16* ref, size_t n, float flops) {
  const bool causal = p.is_causal;
  auto go = [&] {
    const bool ok = causal ? sm90::launch_fwd_traits<Tr, true, kSparse>(p, 0)
                           : sm90::launch_fwd_traits<Tr, false, kSparse>(p, 0);
    if (!ok) printf("  %s: not launched\n", name);
  };
#ifdef LONGCTX_FWD_TRACE
  static const unsigned zeros[3][128][8] = {};  // no points left over from the case before
  CK(cudaMemcpyToSymbol(sm90::g_fwd_trace, zeros, sizeof(zeros)));
  const unsigned long long phase_zeros[5] = {};
  CK(cudaMemcpyToSymbol(sm90::g_fwd_phase, phase_zeros, sizeof(phase_zeros)));
#endif
  for (int i = 0; i < 3; ++i) go();
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const char* iters_env = std::getenv("ITERS");  // more iterations: long enough to sample the clocks
  const int iters = iters_env != nullptr ? std::atoi(iters_env) : 30;
  std::vector<float> ms(iters);
  const long long wall0 = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::system_clock::now().time_since_epoch()).count();
  for (int i = 0; i < iters; ++i) {
    // Like triton's do_bench (bench/attention.py): each call starts after a 256 MB write, with a cold L2.
    if (g_flush != nullptr) CK(cudaMemsetAsync(g_flush, 0, kFlushBytes));
    cudaEventRecord(e0);
    go();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms[i], e0, e1);
  }
  const long long wall1 = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::system_clock::now().time_since_epoch()).count();
  std::sort(ms.begin(), ms.end());
  const float med = ms[iters / 2];
  float* d;
  CK(cudaMalloc(&d, 4));
  CK(cudaMemset(d, 0, 4));
  if (ref == nullptr) {  // the first variant: keep its output as the reference
    CK(cudaMemcpy(static_cast<bf16*>(p.o) + n, p.o, n * 2, cudaMemcpyDeviceToDevice));
  } else {
    max_diff<<<256, 256>>>(ref, static_cast<bf16*>(p.o), n, d);
  }
  float diff = 0.f;
  CK(cudaMemcpy(&diff, d, 4, cudaMemcpyDeviceToHost));
  cudaFree(d);
  printf("  %-30s %7.3f ms %6.1f TFLOP/s  maxdiff %.2e  wall %lld-%lld\n", name, med, flops / med * 1e-9, diff,
         wall0, wall1);
#ifdef LONGCTX_FWD_TRACE
  print_trace(Tr::kConsumers);
#endif
}

__global__ void fill_mask(uint8_t* m, size_t n, uint32_t seed) {  // keep about half the blocks
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    m[i] = (h >> 7) & 1;
  }
}

// MASK=random (default; independent blocks, about half), exact (each row exactly half, random
// positions), samerow (one random half per head, every row the same), stripes (the even key blocks).
void make_mask(uint8_t* mask, int heads, int nb) {
  const char* env = std::getenv("MASK");
  const std::string kind = env != nullptr ? env : "random";
  const size_t n = static_cast<size_t>(heads) * nb * nb;
  if (kind == "random") {
    fill_mask<<<1024, 256>>>(mask, n, 4);
    return;
  }
  std::vector<uint8_t> h(n);
  std::mt19937 rng(4);
  std::vector<int> cols(nb);
  for (int hd = 0; hd < heads; ++hd)
    for (int r = 0; r < nb; ++r) {
      uint8_t* row = &h[(static_cast<size_t>(hd) * nb + r) * nb];
      if (kind == "stripes") {
        for (int j = 0; j < nb; ++j) row[j] = j % 2 == 0;
      } else if (kind == "samerow" && r > 0) {
        std::copy(row - nb, row, row);
      } else if (kind == "exact" || kind == "samerow") {
        for (int j = 0; j < nb; ++j) cols[j] = j;
        std::shuffle(cols.begin(), cols.end(), rng);
        for (int j = 0; j < nb; ++j) row[cols[j]] = j < nb / 2;
      } else {
        printf("MASK must be random, exact, samerow or stripes, got %s\n", kind.c_str());
        exit(2);
      }
    }
  CK(cudaMemcpy(mask, h.data(), n, cudaMemcpyHostToDevice));
}

template <int D>
void sweep(const std::vector<int>& seqlens) {
  int num_sm = 0;
  CK(cudaDeviceGetAttribute(&num_sm, cudaDevAttrMultiProcessorCount, 0));
  int* counter;
  CK(cudaMalloc(&counter, 4));
  for (int sparse = 0; sparse < 2; ++sparse)
    for (int causal = 0; causal < 2; ++causal)
      for (int S : seqlens) {
        if (sparse && (causal || S != 16384)) continue;
        const int B = 16384 / S, H = 2048 / D;
        const size_t n = static_cast<size_t>(B) * S * H * D;
        const int nb = S / 128;
        bf16 *q, *k, *v, *o;
        float* lse;
        uint8_t* mask;
        CK(cudaMalloc(&q, n * 2));
        CK(cudaMalloc(&k, n * 2));
        CK(cudaMalloc(&v, n * 2));
        CK(cudaMalloc(&o, n * 4));  // second half keeps the first variant's output
        CK(cudaMalloc(&lse, static_cast<size_t>(B) * H * S * 4));
        CK(cudaMalloc(&mask, static_cast<size_t>(B) * H * nb * nb));
        fill<<<1024, 256>>>(q, n, 1);
        fill<<<1024, 256>>>(k, n, 2);
        fill<<<1024, 256>>>(v, n, 3);
        if (sparse) make_mask(mask, B * H, nb);
        FlashFwdParams p{};
        p.q = q; p.k = k; p.v = v; p.o = o; p.lse = lse;
        p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = static_cast<int64_t>(S) * H * D;
        p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = H * D;
        p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = D;
        p.lse_batch_stride = static_cast<int64_t>(H) * S;
        p.lse_head_stride = S;
        p.batch = B; p.num_heads_q = p.num_heads_k = H; p.head_dim = D;
        p.seqlen_q = p.seqlen_k = S;
        p.rows_q = p.rows_k = S;
        p.softmax_scale = 1.f / sqrtf(D);
        p.softmax_scale_log2 = p.softmax_scale * 1.44269504f;
        p.is_causal = causal; p.is_bf16 = true;
        p.num_sm = num_sm; p.tile_counter = counter;
        if (sparse) {
          p.block_mask = mask;
          p.block_mask_cols = nb;
          p.block_mask_head_stride = static_cast<int64_t>(nb) * nb;
          p.block_mask_batch_stride = static_cast<int64_t>(H) * nb * nb;
        }
        const float flops = 4.f * B * H * static_cast<float>(S) * S * D / (causal ? 2.f : 1.f) / (sparse ? 2.f : 1.f);
        printf("D=%d causal=%d sparse=%d S=%d B=%d H=%d\n", D, causal, sparse, S, B, H);
        bf16* ref = o + n;
        if (sparse) {
          run<sm90::FwdTraits<D, bf16, 2>, true>("2 consumers (sparse default)", p, nullptr, n, flops);
        } else if constexpr (D == 64) {
          run<sm90::FwdTraits<64, bf16, 3>, false>("3 consumers (default)", p, nullptr, n, flops);
          run<sm90::FwdTraits<64, bf16, 2>, false>("2 consumers", p, ref, n, flops);
        } else {
          run<sm90::FwdTraits<128, bf16, 2>, false>("2 consumers (default)", p, nullptr, n, flops);
        }
        cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse); cudaFree(mask);
      }
  cudaFree(counter);
}

// ./fwd_tune [--no-flush] [seqlens...] (default 2048 4096 16384; block-sparse at 16384 only)
int main(int argc, char** argv) {
  std::vector<int> seqlens;
  bool flush = true;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--no-flush") flush = false;
    else seqlens.push_back(std::atoi(argv[i]));
  }
  if (seqlens.empty()) seqlens = {2048, 4096, 16384};
  if (flush) CK(cudaMalloc(&g_flush, kFlushBytes));
  sweep<HDIM>(seqlens);
  return 0;
}
