// Forward instance: head dim 128, bf16. One translation unit per instance so builds parallelise.
#include "flash_fwd.cuh"

namespace longctx {
template void run_flash_fwd_hdim<128, __nv_bfloat16>(const FlashFwdParams&, cudaStream_t);
}  // namespace longctx
