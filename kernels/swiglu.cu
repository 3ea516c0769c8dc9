// CUDA SwiGLU activation of the LLaMA MLP (kernels/swiglu.h), bf16 storage, fp32 math.
//   out[r, c] = silu(gate[r, c]) * up[r, c],  silu(g) = g / (1 + exp(-g))      (out overwritten)
//   backward (both overwritten, row stride ld_in like gate/up), sig = sigmoid(gate):
//     dgate = dout * up * sig * (1 + gate * (1 - sig)),   dup = dout * silu(gate)
// Elementwise and bound by memory: 16-byte accesses (8 bf16), a grid-stride loop sized to fill the GPU. Each
// thread reads gate and up of an element before it writes dgate and dup of the same element, so the backward may
// run in place (dgate/dup aliasing gate/up).
#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/swiglu.h"

namespace qkd::cuda {

namespace {

constexpr int kThreads = 256;
// 16 blocks of 256 threads for each of an H100's 132 SMs fill the machine; the grid-stride loop takes the rest.
constexpr int64_t kMaxBlocks = 132 * 16;

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

static __global__ void swiglu_forward_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate,
                                             const __nv_bfloat16* up, int64_t n_vecs, int vecs_per_row,
                                             int64_t ld_in) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < n_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / vecs_per_row;
    const int64_t in_off = r * ld_in + (v - r * vecs_per_row) * 8;
    const uint4 g_raw = *reinterpret_cast<const uint4*>(gate + in_off);
    const uint4 u_raw = *reinterpret_cast<const uint4*>(up + in_off);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g_raw);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u_raw);
    uint4 o_raw;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&o_raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 g = __bfloat1622float2(g2[k]);
      const float2 u = __bfloat1622float2(u2[k]);
      // exp(-g) overflows to inf for g < -88 and g / inf = -0, silu's limit: no special case needed.
      o2[k] = __floats2bfloat162_rn(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y);
    }
    reinterpret_cast<uint4*>(out)[v] = o_raw;
  }
}

void swiglu_forward(const SwigluArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.rows >= 0 && a.ffn_dim > 0, "swiglu_forward: rows {} / ffn_dim {} invalid", a.rows, a.ffn_dim);
  QKD_CHECK(a.ld_in >= a.ffn_dim, "swiglu_forward: row stride ld_in {} is smaller than ffn_dim {}", a.ld_in,
            a.ffn_dim);
  QKD_CHECK(a.ffn_dim % 8 == 0 && a.ld_in % 8 == 0,
            "swiglu_forward: ffn_dim {} and ld_in {} must be multiples of 8 (16-byte accesses)", a.ffn_dim, a.ld_in);
  for (const void* p : {static_cast<const void*>(a.out), static_cast<const void*>(a.gate),
                        static_cast<const void*>(a.up)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "swiglu_forward: pointer {} is not 16-byte aligned", p);
  }
  if (a.rows == 0) return;
  const int vecs_per_row = a.ffn_dim / 8;
  const int64_t n_vecs = static_cast<int64_t>(a.rows) * vecs_per_row;
  const int64_t blocks = std::min<int64_t>((n_vecs + kThreads - 1) / kThreads, kMaxBlocks);
  swiglu_forward_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a.out, a.gate, a.up, n_vecs,
                                                                                 vecs_per_row, a.ld_in);
  KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------------------- backward

static __global__ void swiglu_backward_kernel(__nv_bfloat16* dgate, __nv_bfloat16* dup, const __nv_bfloat16* dout,
                                              const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n_vecs,
                                              int vecs_per_row, int64_t ld_in) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < n_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / vecs_per_row;
    const int64_t in_off = r * ld_in + (v - r * vecs_per_row) * 8;
    const uint4 g_raw = *reinterpret_cast<const uint4*>(gate + in_off);
    const uint4 u_raw = *reinterpret_cast<const uint4*>(up + in_off);
    const uint4 d_raw = reinterpret_cast<const uint4*>(dout)[v];
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g_raw);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u_raw);
    const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&d_raw);
    uint4 dg_raw, du_raw;
    __nv_bfloat162* dg2 = reinterpret_cast<__nv_bfloat162*>(&dg_raw);
    __nv_bfloat162* du2 = reinterpret_cast<__nv_bfloat162*>(&du_raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 g = __bfloat1622float2(g2[k]);
      const float2 u = __bfloat1622float2(u2[k]);
      const float2 d = __bfloat1622float2(d2[k]);
      // For g < -88 exp(-g) is inf: sig = 0, silu = g / inf = -0 and silu' = 0, the limits; no special case.
      const float ex = expf(-g.x), ey = expf(-g.y);
      const float sx = 1.0f / (1.0f + ex), sy = 1.0f / (1.0f + ey);
      dg2[k] = __floats2bfloat162_rn(d.x * u.x * (sx * (1.0f + g.x * (1.0f - sx))),
                                     d.y * u.y * (sy * (1.0f + g.y * (1.0f - sy))));
      du2[k] = __floats2bfloat162_rn(d.x * (g.x / (1.0f + ex)), d.y * (g.y / (1.0f + ey)));  // silu as the forward
    }
    *reinterpret_cast<uint4*>(dgate + in_off) = dg_raw;
    *reinterpret_cast<uint4*>(dup + in_off) = du_raw;
  }
}

void swiglu_backward(const SwigluBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.rows >= 0 && a.ffn_dim > 0, "swiglu_backward: rows {} / ffn_dim {} invalid", a.rows, a.ffn_dim);
  QKD_CHECK(a.ld_in >= a.ffn_dim, "swiglu_backward: row stride ld_in {} is smaller than ffn_dim {}", a.ld_in,
            a.ffn_dim);
  QKD_CHECK(a.ffn_dim % 8 == 0 && a.ld_in % 8 == 0,
            "swiglu_backward: ffn_dim {} and ld_in {} must be multiples of 8 (16-byte accesses)", a.ffn_dim, a.ld_in);
  for (const void* p : {static_cast<const void*>(a.dgate), static_cast<const void*>(a.dup),
                        static_cast<const void*>(a.dout), static_cast<const void*>(a.gate),
                        static_cast<const void*>(a.up)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "swiglu_backward: pointer {} is not 16-byte aligned", p);
  }
  if (a.rows == 0) return;
  QKD_CHECK(a.dgate != nullptr && a.dup != nullptr && a.dout != nullptr && a.gate != nullptr && a.up != nullptr,
            "swiglu_backward: dgate, dup, dout, gate and up must all be given");
  const int vecs_per_row = a.ffn_dim / 8;
  const int64_t n_vecs = static_cast<int64_t>(a.rows) * vecs_per_row;
  const int64_t blocks = std::min<int64_t>((n_vecs + kThreads - 1) / kThreads, kMaxBlocks);
  swiglu_backward_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a.dgate, a.dup, a.dout, a.gate,
                                                                                  a.up, n_vecs, vecs_per_row, a.ld_in);
  KERNEL_CHECK();
}

}  // namespace qkd::cuda
