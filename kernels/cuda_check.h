// CUDA_CHECK / CUBLAS_CHECK: report the failing statement, file:line and the library's error string, then
// throw qkd::Error. KERNEL_CHECK() follows every launch; with QKD_SYNC_LAUNCHES=1 in the environment it also
// synchronises, so an asynchronous fault is reported at the launch that caused it (a debugging switch only).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "kernels/error.h"

namespace qkd::detail {

[[noreturn]] void cuda_fail(cudaError_t err, const char* stmt, const char* file, int line);
[[noreturn]] void cublas_fail(cublasStatus_t st, const char* stmt, const char* file, int line);
void kernel_check(const char* file, int line);

}  // namespace qkd::detail

#define CUDA_CHECK(expr)                                                                   \
  do {                                                                                     \
    cudaError_t qkd_err_ = (expr);                                                         \
    if (qkd_err_ != cudaSuccess) ::qkd::detail::cuda_fail(qkd_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                      \
    cublasStatus_t qkd_st_ = (expr);                                                        \
    if (qkd_st_ != CUBLAS_STATUS_SUCCESS) ::qkd::detail::cublas_fail(qkd_st_, #expr, __FILE__, __LINE__); \
  } while (0)

#define KERNEL_CHECK() ::qkd::detail::kernel_check(__FILE__, __LINE__)
