// Next-token selection from logits: greedy (argmax) or temperature + top-k + top-p sampling, on the GPU and in
// its CPU twin, by one exact rule. The host owns the random number generator (seeded by the user); each call
// takes one uniform draw u in [0, 1) per row from it, so a seed reproduces a generation on either backend and
// the twin returns the same token as the kernel for the same logits and draw.
//   tokens[b] = the token chosen for row b                                              (tokens overwritten)
//
// THE RULE (for one row; every step is exact integer or correctly rounded IEEE arithmetic, so host and device
// agree bit for bit):
//  1. Rank tokens by sampling_order_key(logit) descending, ties by lower index first. (The key orders floats
//     numerically, -0 below +0; NaN ranks as -inf.)
//  2. Greedy when temperature <= 0 or top_k == 1: the first token in rank order (argmax, lowest index on ties).
//  3. The pool is the first K = min(top_k, vocab_size) tokens in rank order, j = 0..K-1.
//  4. z_j = logit_j / temperature (fp32). If z_0 is not finite, the answer is pool token 0.
//  5. Integer weights w_j = sampling_weight(z_j - z_0): floor(2^32 * exp(z_j - z_0)) with exp evaluated by a
//     fixed sequence of fma/rint/ldexp below; tokens more than 23 nats below the top weigh 0.
//  6. Prefix sums C_j = w_0 + ... + w_j (exact in uint64). Nucleus: J = K when top_p >= 1, else J = 1 + the
//     smallest j with C_j >= sampling_nucleus_threshold(top_p, C_{K-1}) = ceil(top_p * C_{K-1}).
//  7. target = sampling_target(u, C_{J-1}) = floor(u * C_{J-1}) clamped to [0, C_{J-1} - 1] (u outside [0, 1)
//     or NaN is clamped too); the answer is pool token j for the smallest j with C_j > target.
// So top-p acts inside the top-k pool (llama.cpp's default chain: top-k, then top-p, then the draw), each token
// of the nucleus is drawn with probability proportional to its weight, and the weights are exp(z) rounded down
// to multiples of 2^-32 of the top token's.
//
// The pool holds at most kSamplingMaxTopK tokens (the GPU keeps it in one CTA's shared memory): sampling from
// the full vocabulary means top_k = kSamplingMaxTopK, which leaves out tokens past the 1024th.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

constexpr int kSamplingMaxTopK = 1024;

template <typename T>
struct SamplingArgs {
  int32_t* tokens;        // [batch]  out
  const T* logits;        // [batch, ld], the first vocab_size columns used
  const float* uniform;   // [batch]  one draw in [0, 1) per row; may be null when greedy
  int batch, vocab_size;
  int64_t ld;             // row stride of logits in elements (= vocab_size when contiguous)
  float temperature;      // <= 0: greedy
  int top_k;              // pool size, 1..kSamplingMaxTopK (1: greedy); ignored when greedy
  float top_p;            // nucleus mass in (0, 1]; 1 keeps the whole pool; ignored when greedy
};

// Rank key of a logit: unsigned order equals numeric order (-0 < +0), NaN ranks as -inf.
__host__ __device__ inline uint32_t sampling_order_key(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN -> -inf
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

// Rank key and index in one integer: larger means earlier in rank order (lower index wins ties), and every
// token's value is distinct, so selections and sorts on it need no tie handling.
__host__ __device__ inline uint64_t sampling_rank(float logit, int index) {
  return (static_cast<uint64_t>(sampling_order_key(logit)) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}

__host__ __device__ inline int sampling_rank_index(uint64_t rank) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(rank & 0xffffffffu));
}

// floor(2^32 * exp(x)) for x <= 0, through one fixed sequence of correctly rounded operations: fmaf, rintf and
// ldexpf give the same bits on every IEEE platform (a library expf does not), and a lone product followed by
// rintf leaves a compiler nothing to contract into an fma.
__host__ __device__ inline uint64_t sampling_weight(float x) {
  if (!(x >= -23.0f)) return 0;  // exp(-23) * 2^32 < 1 (and NaN weighs 0)
  const float n = rintf(x * 1.44269504f);                 // x / ln 2 to the nearest integer
  float r = fmaf(n, -0.693145751953125f, x);              // x - n ln2, ln2's high part (n * it is exact)
  r = fmaf(n, -1.428606765330187045e-06f, r);             // ... and its low part; |r| <= ~0.35
  float p = 1.0f / 720.0f;                                // Taylor series of exp(r) to r^6: error < 2e-7
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const float e = ldexpf(p, static_cast<int>(n));
  return static_cast<uint64_t>(e * 4294967296.0f);       // scaling by 2^32 is exact; the cast truncates
}

// ceil(top_p * total) in double: total < 2^42 (1024 weights of at most 2^32) is exact there.
__host__ __device__ inline uint64_t sampling_nucleus_threshold(float top_p, uint64_t total) {
  return static_cast<uint64_t>(ceil(static_cast<double>(top_p) * static_cast<double>(total)));
}

// floor(u * mass) clamped to [0, mass - 1]; mass >= 1.
__host__ __device__ inline uint64_t sampling_target(float u, uint64_t mass) {
  const double t = floor(static_cast<double>(u) * static_cast<double>(mass));
  if (!(t > 0.0)) return 0;  // also NaN
  return t >= static_cast<double>(mass) ? mass - 1 : static_cast<uint64_t>(t);
}

// The argument checks shared by the CPU twin and the CUDA launcher (messages name the values); returns whether
// the call is greedy (temperature <= 0 or top_k == 1). Defined in kernels/cpu/sampling.cpp.
bool sampling_check(int batch, int vocab_size, int64_t ld, float temperature, int top_k, float top_p);

namespace cpu {
void sampling_forward(const SamplingArgs<float>& a);
}
namespace cuda {
void sampling_forward(const SamplingArgs<float>& a, cudaStream_t stream);
void sampling_forward(const SamplingArgs<__nv_bfloat16>& a, cudaStream_t stream);
}

}  // namespace qkd
