// The qkd int4 weight format, defined once for the whole project: the loader writes it, the trainer's fake
// quantization rounds onto it, the CUDA GEMV/GEMM and the CPU twin read it. docs/int4-format.md has the prose.
//
// A weight W[n, k] (nn.Linear layout: n outputs, k inputs) is cut along k into groups of group_size
// consecutive columns of one row: 32, 64, 128, or the whole row (per-channel, group_size == k). Group g of row r
// has a scale s = scales[r, g] and, when asymmetric, a min m = mins[r, g], both bf16 or fp16 bits (ScaleType):
//   symmetric:   W[r, c] = s * (u - 8)        u in [0, 15]   (exact in fp32: 11-bit scale times 4-bit integer)
//   asymmetric:  W[r, c] = fma(s, u, m)       u in [0, 15]   (one rounding to fp32)
// GGUF Q4_0 (fp16 d, x = d (q - 8)) is symmetric fp16 g32 with s = d, u = q; Q4_1 (fp16 d, m, x = d q + m)
// is asymmetric fp16 g32 with s = d, m = m. int4_from_q4_0 / int4_from_q4_1 copy the bits, nothing is rounded.
//
// Buffers, row-major, no padding:
//   packed  uint32 [n, k/8]             word w of row r holds columns 8w .. 8w+7
//   scales  uint16 [n, k/group_size]    bf16 or fp16 bits; may be negative (see int4_quantize_group)
//   mins    uint16 [n, k/group_size]    asymmetric only
// Inside a word, column 8w + j sits in nibble int4_nibble(j) (bits 4*nibble .. 4*nibble+3): even columns in
// nibbles 0-3, odd columns in nibbles 4-7. Why: the pair (2i, 2i+1) then sits at bits 4i and 16+4i, so a
// shift, an AND and an OR (one lop3) turn it into a bf16x2 pair with the first column in the low half
// (int4_device::magic_pair below). k must be a multiple of 32: the CUDA kernels read a row 32 columns
// (16 bytes) at a time, and every group size covers whole 32-column pieces.
//
// Device dequantization (int4_device::dequant_word) rounds each weight to bf16 once, because the tensor cores
// take bf16 operands: w = bf16(s * (u - 8)) or bf16(s * u + m). The CPU twin keeps the exact fp32 value above.
// The batch-1 decode GEMV of g128 / per-channel weights rounds none (int4_device::ChunkConsts).
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qkd {

enum class Int4Symmetry : uint8_t { Symmetric, Asymmetric };
enum class ScaleType : uint8_t { BF16, FP16 };
// How a group's scale (and min) are chosen before its values are rounded to nearest on the grid:
//   None:    the group's full range (int4_quantize_group below);
//   ClipMse: the full range and the range clipped to r max|x| for r = 1 - i / 40, i = 1..19 (down to 0.525),
//            keeping the candidate with the smallest squared error of the group (ties keep the earlier, so the
//            full range wins unless clipping is strictly better): a few outliers no longer stretch the step of
//            every other value (llama.cpp's k-quants and AWQ's clip search do the same kind of search).
enum class Int4ScaleSearch : uint8_t { None, ClipMse };
constexpr int kInt4ClipSteps = 20;  // candidates of ClipMse, r = 1 - i / 40 for i in [0, kInt4ClipSteps)

constexpr int kInt4KMultiple = 32;   // k must be a multiple of this (see the header comment)
constexpr int kInt4PerChannel = 0;   // group_size code for "the whole row"; int4_group_size() resolves it to k
constexpr int kInt4Zero = 8;         // the symmetric zero point: u = 8 is the value 0

// A read-only view of an int4 weight, on the host or the device (the pointers say which).
struct Int4Weight {
  const uint32_t* packed = nullptr;  // [n, k/8]
  const uint16_t* scales = nullptr;  // [n, k/group_size]
  const uint16_t* mins = nullptr;    // [n, k/group_size] when Asymmetric; ignored when Symmetric
  int n = 0, k = 0;
  int group_size = 0;                // 32, 64, 128, or k (per-channel)
  Int4Symmetry sym = Int4Symmetry::Symmetric;
  ScaleType scale_type = ScaleType::BF16;
};

// ------------------------------------------------------------------------------------------- sizes and layout

constexpr int64_t int4_groups_per_row(int k, int group_size) { return k / group_size; }
constexpr int64_t int4_packed_bytes(int n, int k) { return static_cast<int64_t>(n) * (k / 8) * 4; }
constexpr int64_t int4_scales_bytes(int n, int k, int group_size) {
  return static_cast<int64_t>(n) * int4_groups_per_row(k, group_size) * 2;
}
constexpr int64_t int4_mins_bytes(int n, int k, int group_size, Int4Symmetry sym) {
  return sym == Int4Symmetry::Asymmetric ? int4_scales_bytes(n, k, group_size) : 0;
}

// Column c of a row lies in group c >> int4_group_shift(group_size, k): log2 of the group size (32, 64, 128), or
// 31 for a whole row, so that every column maps to group 0. group_size as int4_group_size resolves it.
constexpr int int4_group_shift(int group_size, int k) {
  if (group_size == k) return 31;
  int shift = 0;
  while ((1 << shift) < group_size) ++shift;
  return shift;
}
// Nibble of column 8w + j inside word w: even j in nibbles 0-3, odd j in 4-7 (the pair trick above).
constexpr int int4_nibble(int j) { return (j & 1) ? 4 + (j >> 1) : (j >> 1); }

// u of column c in a packed row (constexpr so device code may call it too).
constexpr uint32_t int4_get(const uint32_t* row, int c) {
  return (row[c >> 3] >> (4 * int4_nibble(c & 7))) & 0xFu;
}

// ---------------------------------------------------------------------------------------------- host side

// Resolves a group-size code (32, 64, 128, kInt4PerChannel or k itself) to the column count of a group, and
// throws naming `what` when it is not one of those or does not divide k.
int int4_group_size(int group_size, int k, const char* what);

// Throws qkd::Error naming `what` and the offending field unless w is a valid int4 weight view.
void int4_check(const Int4Weight& w, const char* what);

float int4_scale_to_float(uint16_t bits, ScaleType t);

// The value of one weight, given its nibble and its group's scale and min as floats (the CPU's definition).
inline float int4_dequant_value(uint32_t u, float s, float m, Int4Symmetry sym) {
  if (sym == Int4Symmetry::Symmetric) return s * static_cast<float>(static_cast<int>(u) - kInt4Zero);
  return __builtin_fmaf(s, static_cast<float>(u), m);  // fma: one rounding, whatever the compiler flags
}

// u [n, k] (values 0..15, one per byte) <-> packed [n, k/8].
void int4_pack(const uint8_t* u, int n, int k, uint32_t* packed);
void int4_unpack(const uint32_t* packed, int n, int k, uint8_t* u);

// Round-to-nearest quantization of one group of len values (all finite) into u[len] and the stored codes.
//   symmetric:  two candidate scales, s = amax / 7 (no value clips) and s = x_ext / -8 (GGUF Q4_0's choice: the
//               value of largest magnitude lands exactly on u = 0, the other side may clip at u = 15); each is
//               rounded to the storage type first, and the one with the smaller squared error is kept.
//   asymmetric: min/max. The min is rounded down and the scale up to the storage type, so the 16 levels
//               m, m + s, ..., m + 15 s still cover [min, max] and every error is at most s / 2.
//   search ClipMse: the same rules on each clipped range as well (Int4ScaleSearch), the best by squared error.
// Throws when a scale or min does not fit the storage type (fp16 beyond 65504).
struct Int4GroupCodes {
  uint16_t scale = 0;
  uint16_t min = 0;  // 0 for symmetric
};
Int4GroupCodes int4_quantize_group(const float* x, int len, Int4Symmetry sym, ScaleType t, uint8_t* u,
                                   Int4ScaleSearch search = Int4ScaleSearch::None);
// The nibble of one value on a group's grid, the rounding int4_quantize_group applies to each of its values:
// symmetric u = int4_symmetric_q(x, s, -8, 7) + 8, asymmetric u = clamp(round_half_even((x - m) / s), 0, 15) in
// double (u = 0 when s = 0). GPTQ (kernels/int4_gptq.h) rounds each column with it on scales fixed earlier.
uint8_t int4_quantize_value(float x, const Int4GroupCodes& codes, Int4Symmetry sym, ScaleType t);

// The symmetric rule above on any signed grid [qmin, qmax] (int4: -8..7, u = q + 8), shared with the trainer's
// fake quantization (kernels/fake_quant.h) so that its 4-bit initial scales are int4_quantize's bit for bit.
//   int4_symmetric_q:     q = clamp(round_half_even(x / s), qmin, qmax); s == 0 gives q = 0
//   int4_symmetric_scale: the code of the better of bf16/fp16(amax / qmax) and (x_ext / qmin) by squared error
//                         (ties keep amax / qmax); throws when neither fits the storage type. With ClipMse, the
//                         same two candidates for every clipped range r amax, r x_ext, in that order.
int int4_symmetric_q(float x, float s, int qmin, int qmax);
uint16_t int4_symmetric_scale(const float* x, int len, int qmin, int qmax, ScaleType t,
                              Int4ScaleSearch search = Int4ScaleSearch::None);

// An owning host copy, e.g. what int4_quantize returns or a loader fills.
struct Int4HostWeight {
  std::vector<uint32_t> packed;  // [n, k/8]
  std::vector<uint16_t> scales;  // [n, k/group_size]
  std::vector<uint16_t> mins;    // [n, k/group_size] when asymmetric, else empty
  int n = 0, k = 0, group_size = 0;
  Int4Symmetry sym = Int4Symmetry::Symmetric;
  ScaleType scale_type = ScaleType::BF16;

  Int4Weight view() const {
    return {packed.data(), scales.data(), mins.empty() ? nullptr : mins.data(), n, k, group_size, sym, scale_type};
  }
};

// Quantizes w [n, k] (fp32, finite) group by group. group_size as for int4_group_size.
Int4HostWeight int4_quantize(const float* w, int n, int k, int group_size, Int4Symmetry sym, ScaleType t,
                             Int4ScaleSearch search = Int4ScaleSearch::None);

// GGUF blocks -> qkd int4, bit for bit. blocks holds n rows of k/32 blocks each (k a multiple of 32), as GGUF
// stores a Q4_0 / Q4_1 tensor: Q4_0 block = fp16 d, 16 bytes of nibbles; Q4_1 block = fp16 d, fp16 m, 16 bytes.
// Outputs are sized as Int4Weight describes them for group_size 32 (mins for Q4_1 only).
void int4_from_q4_0(const uint8_t* blocks, int n, int k, uint32_t* packed, uint16_t* scales);
void int4_from_q4_1(const uint8_t* blocks, int n, int k, uint32_t* packed, uint16_t* scales, uint16_t* mins);

}  // namespace qkd

// ---------------------------------------------------------------------------------------------- device side
#if defined(__CUDACC__)
namespace qkd::int4_device {

// Per-group constants of dequant_word, one layout per scale storage type:
//  BF16: bf16x2 arithmetic, since the stored scale and min are bf16 already: w = fma((128 + u) - offset, s, m).
//  FP16: fp32 arithmetic, w = fma(128 + u, s, m - 128 s) rounded once to bf16. Rounding an fp16 scale or min to
//        bf16 first would shift every weight of the group the same way, an error that does not average out.
template <qkd::ScaleType T>
struct GroupConsts;
template <>
struct GroupConsts<qkd::ScaleType::BF16> {
  __nv_bfloat162 scale;   // s
  __nv_bfloat162 min;     // m (asymmetric) or 0 (symmetric)
  __nv_bfloat162 offset;  // 136 (symmetric: 128 + 8) or 128 (asymmetric): removes the magic exponent below
};
template <>
struct GroupConsts<qkd::ScaleType::FP16> {
  float scale;  // s
  float bias;   // -136 s (symmetric, exact: 11-bit s times 136) or m - 128 s (asymmetric, one fp32 rounding)
};

template <qkd::ScaleType T>
__device__ GroupConsts<T> group_consts(uint16_t scale_bits, uint16_t min_bits, qkd::Int4Symmetry sym);

template <>
__device__ __forceinline__ GroupConsts<qkd::ScaleType::BF16> group_consts<qkd::ScaleType::BF16>(
    uint16_t scale_bits, uint16_t min_bits, qkd::Int4Symmetry sym) {
  const bool asym = sym == qkd::Int4Symmetry::Asymmetric;
  GroupConsts<qkd::ScaleType::BF16> c;
  c.scale = __bfloat162bfloat162(__ushort_as_bfloat16(scale_bits));
  c.min = __bfloat162bfloat162(__ushort_as_bfloat16(asym ? min_bits : uint16_t{0}));
  // 0x4308 = 136.0, 0x4300 = 128.0 in bf16
  c.offset = __bfloat162bfloat162(__ushort_as_bfloat16(asym ? uint16_t{0x4300} : uint16_t{0x4308}));
  return c;
}

template <>
__device__ __forceinline__ GroupConsts<qkd::ScaleType::FP16> group_consts<qkd::ScaleType::FP16>(
    uint16_t scale_bits, uint16_t min_bits, qkd::Int4Symmetry sym) {
  const float s = __half2float(__ushort_as_half(scale_bits));
  GroupConsts<qkd::ScaleType::FP16> c;
  c.scale = s;
  c.bias = sym == qkd::Int4Symmetry::Asymmetric ? __fmaf_rn(-128.0f, s, __half2float(__ushort_as_half(min_bits)))
                                                : -136.0f * s;
  return c;
}

// The factored form of a group (int4_gemv's factored kernel): sum_c w_c x_c = scale . sum_c (128 + u_c) x_c +
// bias . sum_c x_c, in fp32 with no weight rounded. bias = -136 s (symmetric, exact) or m - 128 s (asymmetric,
// one rounding). codes = scale bits | min bits << 16, of either storage type.
struct ChunkConsts {
  float scale;
  float bias;
};

template <qkd::ScaleType T>
__device__ __forceinline__ ChunkConsts chunk_consts(uint32_t codes, qkd::Int4Symmetry sym) {
  float s, m;
  if constexpr (T == qkd::ScaleType::BF16) {  // a bf16 is the top half of an fp32
    s = __uint_as_float(codes << 16);
    m = __uint_as_float(codes & 0xFFFF0000u);
  } else {
    s = __half2float(__ushort_as_half(static_cast<unsigned short>(codes & 0xFFFFu)));
    m = __half2float(__ushort_as_half(static_cast<unsigned short>(codes >> 16)));
  }
  return {s, sym == qkd::Int4Symmetry::Asymmetric ? __fmaf_rn(-128.0f, s, m) : -136.0f * s};
}

// (a & b) | c in one instruction: 0xEA is the lop3 truth table of that expression (0xF0 & 0xCC | 0xAA).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Nibble pair i of a word (columns 2i, 2i+1) as the bf16x2 (128 + u_2i, 128 + u_2i+1). 0x4300 is bf16 128.0,
// whose 7 mantissa bits have a unit of exactly 1: OR-ing a nibble into them gives 128 + u with no conversion
// instruction. The mask keeps the nibble at bit 0 of each 16-bit half (the layout put the pair there).
__device__ __forceinline__ uint32_t magic_pair(uint32_t q, int i) {
  return and_or(q >> (4 * i), 0x000F000Fu, 0x43004300u);
}

// One packed word (8 columns) -> 4 bf16x2 pairs: out[i] = (column 2i, column 2i+1) of the word.
template <qkd::ScaleType T>
__device__ void dequant_word(uint32_t q, const GroupConsts<T>& c, __nv_bfloat162 (&out)[4]);

template <>
__device__ __forceinline__ void dequant_word<qkd::ScaleType::BF16>(
    uint32_t q, const GroupConsts<qkd::ScaleType::BF16>& c, __nv_bfloat162 (&out)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t v = magic_pair(q, i);
    // (128 + u) - offset is u - 8 or u, exact in bf16; the fma then rounds s (u - 8) (+ m) once.
    out[i] = __hfma2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), c.offset), c.scale, c.min);
  }
}

template <>
__device__ __forceinline__ void dequant_word<qkd::ScaleType::FP16>(
    uint32_t q, const GroupConsts<qkd::ScaleType::FP16>& c, __nv_bfloat162 (&out)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t v = magic_pair(q, i);
    // a bf16 is the top half of an fp32: shifting it up (or masking the low half off) is the exact conversion
    const float lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xFFFF0000u);
    out[i] = __floats2bfloat162_rn(__fmaf_rn(lo, c.scale, c.bias), __fmaf_rn(hi, c.scale, c.bias));
  }
}

}  // namespace qkd::int4_device
#endif
