// Forward instance: head dim 96, fp16. One translation unit per instance so builds parallelise.
#include "flash_fwd.cuh"

namespace longctx {
template void run_flash_fwd_hdim<96, __half>(const FlashFwdParams&, cudaStream_t);
}  // namespace longctx
