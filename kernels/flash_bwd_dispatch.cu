// run_flash_bwd: dispatch on (head dim, dtype) to the explicit instances in flash_bwd_hdim*_*.cu.
// The binding pads head dims to 32 / 64 / 96 / 128 before calling, so head_dim is one of those.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash.h"

namespace longctx {

template <int kHeadDim, typename T>
void run_flash_bwd_hdim(const FlashBwdParams& p, cudaStream_t stream);

#define LONGCTX_BWD_EXTERN(D)                                                             \
  extern template void run_flash_bwd_hdim<D, __half>(const FlashBwdParams&, cudaStream_t); \
  extern template void run_flash_bwd_hdim<D, __nv_bfloat16>(const FlashBwdParams&, cudaStream_t);
LONGCTX_BWD_EXTERN(32)
LONGCTX_BWD_EXTERN(64)
LONGCTX_BWD_EXTERN(96)
LONGCTX_BWD_EXTERN(128)
#undef LONGCTX_BWD_EXTERN

template <typename T>
static void dispatch_bwd_hdim(const FlashBwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: run_flash_bwd_hdim<32, T>(p, stream); break;
    case 64: run_flash_bwd_hdim<64, T>(p, stream); break;
    case 96: run_flash_bwd_hdim<96, T>(p, stream); break;
    case 128: run_flash_bwd_hdim<128, T>(p, stream); break;
    default: break;  // unreachable: the binding validates the head dim
  }
}

void run_flash_bwd(const FlashBwdParams& p, cudaStream_t stream) {
  if (p.is_bf16) dispatch_bwd_hdim<__nv_bfloat16>(p, stream);
  else dispatch_bwd_hdim<__half>(p, stream);
}

}  // namespace longctx
