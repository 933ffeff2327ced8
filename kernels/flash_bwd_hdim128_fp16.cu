// Backward instance: head dim 128, fp16. One translation unit per instance so builds parallelise.
#include "flash_bwd.cuh"

namespace longctx {
template void run_flash_bwd_hdim<128, __half>(const FlashBwdParams&, cudaStream_t);
}  // namespace longctx
