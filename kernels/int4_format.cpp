// Host side of the int4 format (kernels/int4_format.h): validation, pack/unpack, round-to-nearest quantization
// and the GGUF Q4_0/Q4_1 repacking. The device side lives in the header beside the layout it decodes.
#include "kernels/int4_format.h"

#include <cmath>
#include <cstring>
#include <string>

#include "kernels/dtype.h"
#include "kernels/error.h"

namespace qkd {
namespace {

uint16_t to_code(float v, ScaleType t) { return t == ScaleType::BF16 ? float_to_bf16(v) : float_to_fp16(v); }

// The neighbours of a 16-bit float code towards -inf / +inf. bf16 and fp16 are both sign-magnitude, so one
// rule serves both: a positive code moves by one in the magnitude, a negative one the other way, and zero
// steps to the smallest subnormal of the right sign.
uint16_t step_down(uint16_t c) {
  if (c == 0x0000u) return 0x8001u;
  return (c & 0x8000u) ? c + 1 : c - 1;
}
uint16_t step_up(uint16_t c) {
  if (c == 0x8000u) return 0x0001u;
  return (c & 0x8000u) ? c - 1 : c + 1;
}

// The largest code <= v and the smallest code >= v (v finite); a value beyond the format's range yields infinity.
uint16_t round_down(double v, ScaleType t) {
  uint16_t c = to_code(static_cast<float>(v), t);
  while (static_cast<double>(int4_scale_to_float(c, t)) > v) c = step_down(c);
  return c;
}
uint16_t round_up(double v, ScaleType t) {
  uint16_t c = to_code(static_cast<float>(v), t);
  while (static_cast<double>(int4_scale_to_float(c, t)) < v) c = step_up(c);
  return c;
}

const char* type_name(ScaleType t) { return t == ScaleType::BF16 ? "bf16" : "fp16"; }

// Squared error of the grid [qmin, qmax] with step s; s * q is exact in fp32 (a 16-bit float times |q| <= 2^7).
double symmetric_sse(const float* x, int len, float s, int qmin, int qmax) {
  double sse = 0.0;
  for (int i = 0; i < len; ++i) {
    const double e = static_cast<double>(x[i]) - s * static_cast<float>(int4_symmetric_q(x[i], s, qmin, qmax));
    sse += e * e;
  }
  return sse;
}

}  // namespace

int int4_symmetric_q(float x, float s, int qmin, int qmax) {
  if (s == 0.0f) return 0;  // an all-zero group: every value on the zero point
  const float q = std::nearbyint(x / s);  // the default rounding mode: half to even
  return q < static_cast<float>(qmin) ? qmin : (q > static_cast<float>(qmax) ? qmax : static_cast<int>(q));
}

uint16_t int4_symmetric_scale(const float* x, int len, int qmin, int qmax, ScaleType t, Int4ScaleSearch search) {
  QKD_CHECK(len > 0, "int4_symmetric_scale: length {} must be positive", len);
  QKD_CHECK(qmin < 0 && qmax > 0, "int4_symmetric_scale: grid [{}, {}] must straddle 0", qmin, qmax);
  float amax = 0.0f, ext = 0.0f;
  for (int i = 0; i < len; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      ext = x[i];
    }
  }
  const int steps = search == Int4ScaleSearch::ClipMse ? kInt4ClipSteps : 1;
  double best_sse = INFINITY;
  uint16_t best = 0;
  for (int i = 0; i < steps; ++i) {
    const float r = 1.0f - static_cast<float>(i) / 40.0f;
    const uint16_t candidates[2] = {to_code(r * amax / static_cast<float>(qmax), t),
                                    to_code(r * ext / static_cast<float>(qmin), t)};
    for (uint16_t c : candidates) {
      const float s = int4_scale_to_float(c, t);
      if (!std::isfinite(s)) continue;
      const double sse = symmetric_sse(x, len, s, qmin, qmax);
      if (sse < best_sse) {
        best_sse = sse;
        best = c;
      }
    }
  }
  QKD_CHECK(best_sse < INFINITY, "int4_symmetric_scale: max |x| {} needs a scale beyond the {} range", amax,
            type_name(t));
  return best;
}

float int4_scale_to_float(uint16_t bits, ScaleType t) {
  return t == ScaleType::BF16 ? bf16_to_float(bits) : fp16_to_float(bits);
}

int int4_group_size(int group_size, int k, const char* what) {
  QKD_CHECK(k > 0 && k % kInt4KMultiple == 0, "{}: k {} must be a positive multiple of {}", what, k, kInt4KMultiple);
  if (group_size == kInt4PerChannel) return k;
  QKD_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == k,
            "{}: group_size {} must be 32, 64, 128 or k = {} (per-channel)", what, group_size, k);
  QKD_CHECK(k % group_size == 0, "{}: k {} is not a multiple of group_size {}", what, k, group_size);
  return group_size;
}

void int4_check(const Int4Weight& w, const char* what) {
  QKD_CHECK(w.n > 0, "{}: n {} must be positive", what, w.n);
  QKD_CHECK(w.group_size != kInt4PerChannel, "{}: group_size 0 must be resolved to k (int4_group_size)", what);
  int4_group_size(w.group_size, w.k, what);
  QKD_CHECK(w.sym == Int4Symmetry::Symmetric || w.sym == Int4Symmetry::Asymmetric, "{}: symmetry code {} is unknown",
            what, static_cast<int>(w.sym));
  QKD_CHECK(w.scale_type == ScaleType::BF16 || w.scale_type == ScaleType::FP16, "{}: scale type code {} is unknown",
            what, static_cast<int>(w.scale_type));
  QKD_CHECK(w.packed != nullptr, "{}: packed is null", what);
  QKD_CHECK(w.scales != nullptr, "{}: scales is null", what);
  QKD_CHECK(w.sym == Int4Symmetry::Symmetric || w.mins != nullptr, "{}: asymmetric weight has no mins", what);
}

void int4_pack(const uint8_t* u, int n, int k, uint32_t* packed) {
  QKD_CHECK(n >= 0 && k >= 0 && k % 8 == 0, "int4_pack: shape [{}, {}] invalid (k must be a multiple of 8)", n, k);
  for (int64_t r = 0; r < n; ++r) {
    for (int w = 0; w < k / 8; ++w) {
      uint32_t word = 0;
      for (int j = 0; j < 8; ++j) {
        const uint8_t v = u[r * k + 8 * w + j];
        QKD_CHECK(v <= 15, "int4_pack: value {} at [{}, {}] is not a nibble", v, r, 8 * w + j);
        word |= static_cast<uint32_t>(v) << (4 * int4_nibble(j));
      }
      packed[r * (k / 8) + w] = word;
    }
  }
}

void int4_unpack(const uint32_t* packed, int n, int k, uint8_t* u) {
  QKD_CHECK(n >= 0 && k >= 0 && k % 8 == 0, "int4_unpack: shape [{}, {}] invalid (k must be a multiple of 8)", n, k);
  for (int64_t r = 0; r < n; ++r) {
    for (int c = 0; c < k; ++c) u[r * k + c] = static_cast<uint8_t>(int4_get(packed + r * (k / 8), c));
  }
}

namespace {

// Asymmetric codes for the range [lo, hi]: the min rounded down and the scale up to the storage type, so the 16
// levels m, m + s, ..., m + 15 s cover the range. Throws when either does not fit the type.
Int4GroupCodes asymmetric_codes(float lo, float hi, ScaleType t) {
  Int4GroupCodes codes;
  codes.min = round_down(lo, t);
  const double m = int4_scale_to_float(codes.min, t);
  QKD_CHECK(std::isfinite(m), "int4_quantize_group: min {} is beyond the {} range", lo, type_name(t));
  codes.scale = round_up((static_cast<double>(hi) - m) / 15.0, t);
  const double s = int4_scale_to_float(codes.scale, t);
  QKD_CHECK(std::isfinite(s), "int4_quantize_group: range [{}, {}] needs a scale beyond the {} range", lo, hi,
            type_name(t));
  return codes;
}

uint8_t asymmetric_u(float x, double m, double s) {
  const double q = s == 0.0 ? 0.0 : std::nearbyint((static_cast<double>(x) - m) / s);
  return static_cast<uint8_t>(q < 0.0 ? 0.0 : (q > 15.0 ? 15.0 : q));
}

}  // namespace

Int4GroupCodes int4_quantize_group(const float* x, int len, Int4Symmetry sym, ScaleType t, uint8_t* u,
                                   Int4ScaleSearch search) {
  QKD_CHECK(len > 0, "int4_quantize_group: length {} must be positive", len);
  if (sym == Int4Symmetry::Symmetric) {
    constexpr int kQmin = -kInt4Zero, kQmax = 15 - kInt4Zero;
    Int4GroupCodes codes;
    codes.scale = int4_symmetric_scale(x, len, kQmin, kQmax, t, search);
    for (int i = 0; i < len; ++i) u[i] = int4_quantize_value(x[i], codes, sym, t);
    return codes;
  }

  float lo = x[0], hi = x[0];
  for (int i = 1; i < len; ++i) {
    lo = std::fmin(lo, x[i]);
    hi = std::fmax(hi, x[i]);
  }
  // The full range first (it must fit the storage type); with ClipMse also [max(lo, -c), min(hi, c)] for
  // c = r max|x|, where that range is not empty, keeping the smallest squared error (ties keep the earlier).
  Int4GroupCodes best = asymmetric_codes(lo, hi, t);
  if (search == Int4ScaleSearch::ClipMse) {
    const float amax = std::fmax(std::fabs(lo), std::fabs(hi));
    auto sse = [&](const Int4GroupCodes& c) {
      const double m = int4_scale_to_float(c.min, t), s = int4_scale_to_float(c.scale, t);
      double e2 = 0.0;
      for (int i = 0; i < len; ++i) {
        const double e = static_cast<double>(x[i]) - (m + s * asymmetric_u(x[i], m, s));
        e2 += e * e;
      }
      return e2;
    };
    double best_sse = sse(best);
    for (int i = 1; i < kInt4ClipSteps; ++i) {
      const float c = (1.0f - static_cast<float>(i) / 40.0f) * amax;
      const float lo_c = std::fmax(lo, -c), hi_c = std::fmin(hi, c);
      if (!(lo_c <= hi_c)) continue;
      const Int4GroupCodes cand = asymmetric_codes(lo_c, hi_c, t);  // inside the full range: fits if it did
      const double e = sse(cand);
      if (e < best_sse) {
        best_sse = e;
        best = cand;
      }
    }
  }
  for (int i = 0; i < len; ++i) u[i] = int4_quantize_value(x[i], best, sym, t);
  return best;
}

uint8_t int4_quantize_value(float x, const Int4GroupCodes& codes, Int4Symmetry sym, ScaleType t) {
  if (sym == Int4Symmetry::Symmetric) {
    const float s = int4_scale_to_float(codes.scale, t);
    return static_cast<uint8_t>(int4_symmetric_q(x, s, -kInt4Zero, 15 - kInt4Zero) + kInt4Zero);
  }
  return asymmetric_u(x, int4_scale_to_float(codes.min, t), int4_scale_to_float(codes.scale, t));
}

Int4HostWeight int4_quantize(const float* w, int n, int k, int group_size, Int4Symmetry sym, ScaleType t,
                             Int4ScaleSearch search) {
  QKD_CHECK(n > 0, "int4_quantize: n {} must be positive", n);
  const int gs = int4_group_size(group_size, k, "int4_quantize");
  const int groups = k / gs;
  Int4HostWeight out;
  out.n = n;
  out.k = k;
  out.group_size = gs;
  out.sym = sym;
  out.scale_type = t;
  out.packed.resize(static_cast<size_t>(n) * (k / 8));
  out.scales.resize(static_cast<size_t>(n) * groups);
  if (sym == Int4Symmetry::Asymmetric) out.mins.resize(out.scales.size());

  // Rows are independent; the failure of the lowest row is kept (whatever the thread timing) and rethrown after
  // the loop, since no exception may leave an OpenMP region.
  FirstError first_error;
#pragma omp parallel
  {
    std::vector<uint8_t> u(k);
#pragma omp for schedule(static)
    for (int r = 0; r < n; ++r) {
      const float* row = w + static_cast<int64_t>(r) * k;
      try {
        for (int c = 0; c < k; ++c) {
          QKD_CHECK(std::isfinite(row[c]), "int4_quantize: weight [{}, {}] is {}", r, c, row[c]);
        }
        for (int g = 0; g < groups; ++g) {
          Int4GroupCodes codes;
          try {
            codes = int4_quantize_group(row + g * gs, gs, sym, t, u.data() + g * gs, search);
          } catch (const Error& e) {
            fail("int4_quantize: row {} group {}: {}", r, g, e.what());
          }
          out.scales[static_cast<size_t>(r) * groups + g] = codes.scale;
          if (sym == Int4Symmetry::Asymmetric) out.mins[static_cast<size_t>(r) * groups + g] = codes.min;
        }
        int4_pack(u.data(), 1, k, out.packed.data() + static_cast<size_t>(r) * (k / 8));
      } catch (const Error& e) {
        first_error.keep(r, e);
      }
    }
  }
  first_error.rethrow();
  return out;
}

namespace {

// One 32-value GGUF block's nibbles (byte j: value j low, value j + 16 high) -> 4 packed words.
void repack_block(const uint8_t* qs, uint32_t* words) {
  uint8_t u[32];
  for (int j = 0; j < 16; ++j) {
    u[j] = qs[j] & 0x0Fu;
    u[j + 16] = qs[j] >> 4;
  }
  int4_pack(u, 1, 32, words);
}

void check_gguf_shape(int n, int k, const char* what) {
  QKD_CHECK(n > 0 && k > 0 && k % 32 == 0, "{}: shape [{}, {}] invalid (k must be a positive multiple of 32)", what,
            n, k);
}

}  // namespace

void int4_from_q4_0(const uint8_t* blocks, int n, int k, uint32_t* packed, uint16_t* scales) {
  check_gguf_shape(n, k, "int4_from_q4_0");
  constexpr int kBlockBytes = 18;
  const int64_t n_blocks = static_cast<int64_t>(n) * (k / 32);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = blocks + b * kBlockBytes;
    std::memcpy(&scales[b], blk, 2);  // GGUF is little-endian, like every host qkd runs on
    repack_block(blk + 2, packed + b * 4);
  }
}

void int4_from_q4_1(const uint8_t* blocks, int n, int k, uint32_t* packed, uint16_t* scales, uint16_t* mins) {
  check_gguf_shape(n, k, "int4_from_q4_1");
  constexpr int kBlockBytes = 20;
  const int64_t n_blocks = static_cast<int64_t>(n) * (k / 32);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = blocks + b * kBlockBytes;
    std::memcpy(&scales[b], blk, 2);
    std::memcpy(&mins[b], blk + 2, 2);
    repack_block(blk + 4, packed + b * 4);
  }
}

}  // namespace qkd
