#include "kernels/cuda_check.h"

#include <cstdlib>
#include <cstring>

namespace qkd::detail {

void cuda_fail(cudaError_t err, const char* stmt, const char* file, int line) {
  // A failed launch also leaves its (non-sticky) error as the runtime's last error; take it now, so the next
  // KERNEL_CHECK does not report this failure a second time against an unrelated launch.
  (void)cudaGetLastError();
  fail("CUDA error {} ({}) in `{}` at {}:{}", cudaGetErrorName(err), cudaGetErrorString(err), stmt, file, line);
}

void cublas_fail(cublasStatus_t st, const char* stmt, const char* file, int line) {
  fail("cuBLAS error {} ({}) in `{}` at {}:{}", cublasLtGetStatusName(st), cublasLtGetStatusString(st), stmt,
       file, line);
}

static bool sync_launches() {
  static const bool on = [] {
    const char* v = std::getenv("QKD_SYNC_LAUNCHES");
    return v != nullptr && std::strcmp(v, "0") != 0;
  }();
  return on;
}

void kernel_check(const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && sync_launches()) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) cuda_fail(err, "kernel launch", file, line);
}

}  // namespace qkd::detail
