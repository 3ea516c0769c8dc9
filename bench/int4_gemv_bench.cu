// Benchmark, not a test: the int4 linear layer (kernels/int4_gemm.cu) on Llama-2-7B shapes, int4 g128
// symmetric bf16 scales, random weights.
//  1. device-to-device copy bandwidth (cudaMemcpyAsync, bytes read + written), the ceiling of the GEMV;
//  2. the decode step's linears (32 layers x qkv, o, gate_up, down at m = 1), captured once as a CUDA graph
//     and replayed: bytes moved / time, as a fraction of the copy;
//  3. each shape alone at m = 1, 4, 8, 16 (32 launches over the 32 layers' weights, so L2 holds none of them);
//  4. prefill m = 512: the int4 GEMM forward and backward against cuBLASLt bf16 (kernels/gemm.h).
// Times are medians of event-timed graph replays after warm-up.
// Flags: --no-prefill skips 4; --profile runs each shape once at m = 1 and 16 without graphs and stops (for a
// profiler's kernel filter), after the copy measurement.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/gemm.h"
#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"

using namespace qkd;
using bf16 = __nv_bfloat16;

namespace {

struct Shape {
  const char* name;
  int n, k;
};
const Shape kShapes[] = {{"qkv", 12288, 4096}, {"o", 4096, 4096}, {"gate_up", 22016, 4096}, {"down", 4096, 11008}};
constexpr int kLayers = 32;
constexpr int kGroup = 128;
constexpr int kPrefill = 512;

__device__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u + static_cast<uint32_t>(i >> 32) * 0x85EBCA77u + seed;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

__global__ void fill_words_kernel(uint32_t* p, size_t count, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count; i += size_t{gridDim.x} * blockDim.x) {
    p[i] = hash32(i, seed);
  }
}

// Uniform values in [lo, hi) as bf16 (never zeros: they can run faster than real data).
__global__ void fill_bf16_kernel(bf16* p, size_t count, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count; i += size_t{gridDim.x} * blockDim.x) {
    p[i] = __float2bfloat16_rn(lo + (hi - lo) * (hash32(i, seed) >> 8) * (1.0f / 16777216.0f));
  }
}

void fill_words(void* p, size_t count, uint32_t seed) {
  fill_words_kernel<<<1024, 256>>>(static_cast<uint32_t*>(p), count, seed);
  KERNEL_CHECK();
}
void fill_bf16(void* p, size_t count, uint32_t seed, float lo, float hi) {
  fill_bf16_kernel<<<1024, 256>>>(static_cast<bf16*>(p), count, seed, lo, hi);
  KERNEL_CHECK();
}

void* dalloc(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

// Median over `reps` timed calls of `run` (each enqueues work on `stream`), after 3 warm-up calls.
template <typename F>
float median_ms(cudaStream_t stream, int reps, F&& run) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) run();
  CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> t(reps);
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(a, stream));
    run();
    CUDA_CHECK(cudaEventRecord(b, stream));
    CUDA_CHECK(cudaEventSynchronize(b));
    CUDA_CHECK(cudaEventElapsedTime(&t[i], a, b));
  }
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[reps / 2];
}

// Captures `enqueue` (launches on `stream`) into a graph; returns the median replay time.
template <typename F>
float graph_ms(cudaStream_t stream, int reps, F&& enqueue) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  enqueue();
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const float ms = median_ms(stream, reps, [&] { CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  return ms;
}

struct LayerWeights {
  Int4Weight w[4];
};

double weight_bytes(const Shape& s) {
  return static_cast<double>(int4_packed_bytes(s.n, s.k)) + static_cast<double>(int4_scales_bytes(s.n, s.k, kGroup));
}

}  // namespace

int main(int argc, char** argv) {
  bool prefill = true, profile = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--no-prefill") == 0) {
      prefill = false;
    } else if (std::strcmp(argv[i], "--profile") == 0) {
      profile = true;
    } else {
      std::fprintf(stderr, "int4_gemv_bench: unknown flag %s (--no-prefill, --profile)\n", argv[i]);
      return 2;
    }
  }
  try {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    // 1. copy bandwidth
    const size_t copy_bytes = size_t{1} << 30;
    void* src = dalloc(copy_bytes);
    void* dst = dalloc(copy_bytes);
    fill_words(src, copy_bytes / 4, 1);
    const float copy_ms = median_ms(stream, 20, [&] {
      CUDA_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, stream));
    });
    const double copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
    std::printf("copy: %.3f ms for 2 x %.2f GB -> %.0f GB/s\n", copy_ms, copy_bytes / 1e9, copy_gbs);
    CUDA_CHECK(cudaFree(src));
    CUDA_CHECK(cudaFree(dst));

    // weights of all 32 layers, int4 g128 symmetric bf16 scales (scales 0.002..0.02)
    std::vector<LayerWeights> layers(kLayers);
    uint32_t seed = 100;
    for (auto& L : layers) {
      for (int s = 0; s < 4; ++s) {
        const Shape& sh = kShapes[s];
        void* packed = dalloc(int4_packed_bytes(sh.n, sh.k));
        void* scales = dalloc(int4_scales_bytes(sh.n, sh.k, kGroup));
        fill_words(packed, int4_packed_bytes(sh.n, sh.k) / 4, seed++);
        fill_bf16(scales, int4_scales_bytes(sh.n, sh.k, kGroup) / 2, seed++, 0.002f, 0.02f);
        L.w[s] = {static_cast<uint32_t*>(packed), static_cast<uint16_t*>(scales), nullptr, sh.n, sh.k, kGroup,
                  Int4Symmetry::Symmetric, ScaleType::BF16};
      }
    }
    // activations: up to kPrefill rows of the widest input and output
    const size_t act = static_cast<size_t>(kPrefill) * 22016;
    auto* x = static_cast<bf16*>(dalloc(act * 2));
    auto* y = static_cast<bf16*>(dalloc(act * 2));
    fill_bf16(x, act, 7, -1.0f, 1.0f);
    fill_bf16(y, act, 8, -1.0f, 1.0f);
    CUDA_CHECK(cudaDeviceSynchronize());

    if (profile) {
      for (int m : {1, 16}) {
        for (int s = 0; s < 4; ++s) cuda::int4_gemm_forward({y, x, layers[1].w[s], m, Accumulate::Overwrite}, stream);
      }
      CUDA_CHECK(cudaStreamSynchronize(stream));
      std::printf("profile launches done\n");
      return 0;
    }

    // 2. the decode step's linears
    double chain_bytes = 0.0;
    for (const Shape& s : kShapes) chain_bytes += kLayers * (weight_bytes(s) + 2.0 * (s.k + s.n));
    auto chain = [&] {
      return graph_ms(stream, 20, [&] {
        for (auto& L : layers) {
          for (int s = 0; s < 4; ++s) cuda::int4_gemm_forward({y, x, L.w[s], 1, Accumulate::Overwrite}, stream);
        }
      });
    };
    const float chain_ms = chain();
    const float chain_again_ms = chain();  // the spread between two identical measurements
    const double chain_gbs = chain_bytes / (chain_ms * 1e-3) / 1e9;

    // 3. each shape alone
    struct Row {
      const char* name;
      int m;
      float us;
      double gbs;
    };
    std::vector<Row> rows;
    for (int m : {1, 4, 8, 16}) {
      for (int s = 0; s < 4; ++s) {
        const Shape& sh = kShapes[s];
        const float ms = graph_ms(stream, 20, [&] {
          for (auto& L : layers) cuda::int4_gemm_forward({y, x, L.w[s], m, Accumulate::Overwrite}, stream);
        });
        const double bytes = weight_bytes(sh) + 2.0 * m * (sh.k + sh.n);
        rows.push_back({sh.name, m, ms * 1000.0f / kLayers, bytes / (ms * 1e-3 / kLayers) / 1e9});
      }
    }

    // 4. prefill m = 512 against cuBLASLt bf16
    CublasLt lt;
    struct GemmRow {
      const char* name;
      float int4_fwd_us, cublas_fwd_us, int4_bwd_us, cublas_bwd_us;
    };
    std::vector<GemmRow> grows;
    for (int s = 0; s < (prefill ? 4 : 0); ++s) {
      const Shape& sh = kShapes[s];
      auto* wb = static_cast<bf16*>(dalloc(static_cast<size_t>(sh.n) * sh.k * 2));
      fill_bf16(wb, static_cast<size_t>(sh.n) * sh.k, 900 + s, -0.05f, 0.05f);
      constexpr int kRot = 8;  // layers rotated through, so each launch's weight is a different one
      const float i4f = graph_ms(stream, 10, [&] {
        for (int l = 0; l < kRot; ++l)
          cuda::int4_gemm_forward({y, x, layers[l].w[s], kPrefill, Accumulate::Overwrite}, stream);
      }) / kRot;
      const float i4b = graph_ms(stream, 10, [&] {
        for (int l = 0; l < kRot; ++l)
          cuda::int4_gemm_backward({y, x, layers[l].w[s], kPrefill, Accumulate::Overwrite}, stream);
      }) / kRot;
      GemmArgs fwd{y, x, wb, kPrefill, sh.n, sh.k};  // y = x W^T
      cuda::gemm(lt, fwd, stream);                    // choose the plan outside capture
      const float cbf = graph_ms(stream, 10, [&] {
        for (int l = 0; l < kRot; ++l) cuda::gemm(lt, fwd, stream);
      }) / kRot;
      GemmArgs bwd{y, x, wb, kPrefill, sh.k, sh.n};  // dx = dy W: b = W [n, k] seen as [K = n, N = k]
      bwd.trans_b = Transpose::No;
      cuda::gemm(lt, bwd, stream);
      const float cbb = graph_ms(stream, 10, [&] {
        for (int l = 0; l < kRot; ++l) cuda::gemm(lt, bwd, stream);
      }) / kRot;
      CUDA_CHECK(cudaFree(wb));
      grows.push_back({sh.name, i4f * 1000.0f, cbf * 1000.0f, i4b * 1000.0f, cbb * 1000.0f});
    }

    std::printf("\n== decode GEMV, int4 g128 (copy ceiling %.0f GB/s) ==\n", copy_gbs);
    std::printf("7B decode linears (128 launches, one graph): %.3f ms, %.2f GB, %.0f GB/s = %.1f%% of copy; "
                "floor at copy bandwidth %.3f ms\n",
                chain_ms, chain_bytes / 1e9, chain_gbs, 100.0 * chain_gbs / copy_gbs, chain_bytes / copy_gbs / 1e6);
    std::printf("same graph timed again: %.3f ms\n", chain_again_ms);
    std::printf("%-8s %3s %9s %8s %7s\n", "matrix", "m", "us", "GB/s", "copy%");
    for (const Row& r : rows) {
      std::printf("%-8s %3d %9.2f %8.0f %6.1f%%\n", r.name, r.m, r.us, r.gbs, 100.0 * r.gbs / copy_gbs);
    }
    std::printf("\n== prefill m = %d: int4 GEMM vs cuBLASLt bf16 ==\n", kPrefill);
    std::printf("%-8s %9s %7s %9s %7s %6s | %9s %7s %9s %7s %6s\n", "shape", "int4 us", "TF/s", "cublas us", "TF/s",
                "ratio", "bwd int4", "TF/s", "bwd cubl", "TF/s", "ratio");
    for (size_t s = 0; s < grows.size(); ++s) {
      const GemmRow& g = grows[s];
      const double flop = 2.0 * kPrefill * kShapes[s].n * kShapes[s].k;
      auto tf = [&](float us) { return flop / (us * 1e-6) / 1e12; };
      std::printf("%-8s %9.1f %7.0f %9.1f %7.0f %6.2f | %9.1f %7.0f %9.1f %7.0f %6.2f\n", g.name, g.int4_fwd_us,
                  tf(g.int4_fwd_us), g.cublas_fwd_us, tf(g.cublas_fwd_us), g.int4_fwd_us / g.cublas_fwd_us,
                  g.int4_bwd_us, tf(g.int4_bwd_us), g.cublas_bwd_us, tf(g.cublas_bwd_us),
                  g.int4_bwd_us / g.cublas_bwd_us);
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "int4_gemv_bench: %s\n", e.what());
    return 1;
  }
}
