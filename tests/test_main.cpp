// doctest main shared by every test executable. A test built with the `gpu` label gets QKD_REQUIRE_GPU=1 from
// ctest; with no CUDA device it prints why and exits 77, which ctest reports as skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

int main(int argc, char** argv) {
  const char* need_gpu = std::getenv("QKD_REQUIRE_GPU");
  if (need_gpu != nullptr && std::strcmp(need_gpu, "1") == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      std::printf("SKIP: no CUDA device on this machine; GPU tests run on the GPU machine (tools/gpu-check.sh)\n");
      return 77;
    }
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
