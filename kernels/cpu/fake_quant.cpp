// CPU reference: group-wise symmetric fake quantization with LSQ step sizes and a module clip factor
// (kernels/fake_quant.h), plus the initial scales and the export to the int4 format.
//   s_e = bf16(gamma * s[r, g]);  q = clamp(round_half_even(w / s_e), qmin, qmax);  wq = s_e * q   (overwritten)
//   dw = dwq inside [qmin, qmax] else 0 (overwritten);  dscale = lsq_scale * gamma * ds_e (overwritten);  dclip += sum s * ds_e
// wq here is the exact fp32 product s_e * q (a bf16 scale times |q| <= 2^7 has at most 16 significant bits), the
// value the exported int4 weight dequantizes to; the CUDA forward rounds that product to bf16 once, as the
// int4 GEMM's device dequantization does. The rounding rule is the int4 format's own (int4_symmetric_q), so a
// weight, its fake quantization and its export can never disagree on a code.
// A zero effective scale (an all-zero group initialised by the int4 rule) maps the group to 0; its weights are
// treated as in range at v = 0, so their gradients pass straight through and the group adds nothing to ds_e.
// The group sums of the backward run in double: the reference for the CUDA kernel's fp32 sums.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/fake_quant.h"

namespace qkd::cpu {

namespace {

struct Grid {
  int qmin, qmax;
};
Grid grid_of(int bits) { return {-(1 << (bits - 1)), (1 << (bits - 1)) - 1}; }

// The effective scale's bf16 code: gamma * s in fp32, then rounded to nearest even.
uint16_t effective_scale_code(float s, float gamma) { return float_to_bf16(gamma * s); }

}  // namespace

void fake_quant_check(int n, int k, int group_size, int bits, const char* what) {
  QKD_CHECK(bits >= kFakeQuantMinBits && bits <= kFakeQuantMaxBits, "{}: bits {} must be in [{}, {}]", what, bits,
            kFakeQuantMinBits, kFakeQuantMaxBits);
  QKD_CHECK(n > 0, "{}: n {} must be positive", what, n);
  // The scales are [n, k / group_size], so the per-channel code 0 must already be resolved to k.
  QKD_CHECK(group_size > 0, "{}: group_size {} must be positive (per-channel is group_size = k = {})", what,
            group_size, k);
  // The groups are the int4 format's (32, 64, 128 or k, k a multiple of 32) so that every trained weight
  // exports bit for bit; the CUDA kernels rely on it too (8-column vectors never straddle a group).
  int4_group_size(group_size, k, what);
}

void fake_quant_forward(const FakeQuantArgs<float>& a) {
  fake_quant_check(a.n, a.k, a.group_size, a.bits, "fake_quant_forward");
  const Grid q = grid_of(a.bits);
  const float gamma = a.clip != nullptr ? *a.clip : 1.0f;
  const int groups = a.k / a.group_size;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(a.n) * a.k > 65536)
  for (int r = 0; r < a.n; ++r) {
    for (int g = 0; g < groups; ++g) {
      const float s_e = bf16_to_float(effective_scale_code(a.scale[static_cast<int64_t>(r) * groups + g], gamma));
      const int64_t base = static_cast<int64_t>(r) * a.k + static_cast<int64_t>(g) * a.group_size;
      for (int i = 0; i < a.group_size; ++i) {
        a.wq[base + i] = s_e * static_cast<float>(int4_symmetric_q(a.w[base + i], s_e, q.qmin, q.qmax));
      }
    }
  }
}

void fake_quant_backward(const FakeQuantBackwardArgs& a) {
  fake_quant_check(a.n, a.k, a.group_size, a.bits, "fake_quant_backward");
  // A clip factor may be frozen (clip given, dclip null); a gradient without one has nothing to differentiate.
  QKD_CHECK(a.dclip == nullptr || a.clip != nullptr, "fake_quant_backward: dclip is given but clip is null");
  const Grid q = grid_of(a.bits);
  const float gamma = a.clip != nullptr ? *a.clip : 1.0f;
  const int groups = a.k / a.group_size;
  const double lsq_scale = 1.0 / std::sqrt(static_cast<double>(a.group_size) * q.qmax);
  // Per-row partials of dclip, summed in row order after the loop: the same result for any thread count.
  std::vector<double> clip_rows(a.n, 0.0);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(a.n) * a.k > 65536)
  for (int r = 0; r < a.n; ++r) {
    double clip_row = 0.0;
    for (int g = 0; g < groups; ++g) {
      const int64_t gi = static_cast<int64_t>(r) * groups + g;
      const float s_e = bf16_to_float(effective_scale_code(a.scale[gi], gamma));
      const int64_t base = static_cast<int64_t>(r) * a.k + static_cast<int64_t>(g) * a.group_size;
      double sum = 0.0;
      for (int i = 0; i < a.group_size; ++i) {
        const float dwq = a.dwq[base + i];  // read before dw overwrites it (dw may alias dwq)
        if (s_e == 0.0f) {
          a.dw[base + i] = dwq;
          continue;
        }
        const float v = a.w[base + i] / s_e;
        const int qi = int4_symmetric_q(a.w[base + i], s_e, q.qmin, q.qmax);
        const bool in_range = v >= static_cast<float>(q.qmin) && v <= static_cast<float>(q.qmax);
        a.dw[base + i] = in_range ? dwq : 0.0f;
        sum += static_cast<double>(dwq) * (in_range ? qi - static_cast<double>(v) : qi);
      }
      const double ds_e = sum;
      a.dscale[gi] = static_cast<float>(lsq_scale * gamma * ds_e);
      clip_row += static_cast<double>(a.scale[gi]) * ds_e;
    }
    clip_rows[r] = clip_row;
  }
  if (a.dclip != nullptr) {
    double total = 0.0;
    for (double c : clip_rows) total += c;
    *a.dclip += static_cast<float>(total);
  }
}

void fake_quant_init_scales(const float* w, int n, int k, int group_size, int bits, float* scale,
                            Int4ScaleSearch search) {
  fake_quant_check(n, k, group_size, bits, "fake_quant_init_scales");
  const Grid q = grid_of(bits);
  const int groups = k / group_size;
  // The lowest failing row is reported whatever the thread timing; no exception may leave the OpenMP region.
  FirstError first_error;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(n) * k > 65536)
  for (int r = 0; r < n; ++r) {
    const float* row = w + static_cast<int64_t>(r) * k;
    try {
      for (int c = 0; c < k; ++c) {
        QKD_CHECK(std::isfinite(row[c]), "fake_quant_init_scales: weight [{}, {}] is {}", r, c, row[c]);
      }
      for (int g = 0; g < groups; ++g) {
        const uint16_t code = int4_symmetric_scale(row + static_cast<int64_t>(g) * group_size, group_size, q.qmin,
                                                   q.qmax, ScaleType::BF16, search);
        scale[static_cast<int64_t>(r) * groups + g] = bf16_to_float(code);
      }
    } catch (const Error& e) {
      first_error.keep(r, e);
    }
  }
  first_error.rethrow();
}

Int4HostWeight fake_quant_export(const float* w, const float* scale, const float* clip, int n, int k, int group_size,
                                 int bits) {
  fake_quant_check(n, k, group_size, bits, "fake_quant_export");
  QKD_CHECK(bits <= 4, "fake_quant_export: bits {} do not fit the int4 format's 16 levels", bits);
  const Grid q = grid_of(bits);
  const float gamma = clip != nullptr ? *clip : 1.0f;
  const int groups = k / group_size;
  Int4HostWeight out;
  out.n = n;
  out.k = k;
  out.group_size = group_size;
  out.sym = Int4Symmetry::Symmetric;
  out.scale_type = ScaleType::BF16;
  out.packed.resize(static_cast<size_t>(n) * (k / 8));
  out.scales.resize(static_cast<size_t>(n) * groups);
  // Checked serially first, so the packing loop below cannot throw inside its parallel region.
  for (int64_t gi = 0; gi < static_cast<int64_t>(n) * groups; ++gi) {
    const float s_e = bf16_to_float(effective_scale_code(scale[gi], gamma));
    QKD_CHECK(std::isfinite(s_e), "fake_quant_export: row {} group {}: effective scale bf16({} * {}) = {} is not finite",
              gi / groups, gi % groups, gamma, scale[gi], s_e);
    out.scales[gi] = effective_scale_code(scale[gi], gamma);
  }
  for (int64_t i = 0; i < static_cast<int64_t>(n) * k; ++i) {
    QKD_CHECK(std::isfinite(w[i]), "fake_quant_export: weight [{}, {}] is {}", i / k, i % k, w[i]);
  }
#pragma omp parallel
  {
    std::vector<uint8_t> u(k);
#pragma omp for schedule(static)
    for (int r = 0; r < n; ++r) {
      for (int c = 0; c < k; ++c) {
        const float s_e = bf16_to_float(out.scales[static_cast<size_t>(r) * groups + c / group_size]);
        // u = q + 8: the symmetric format's zero point; for bits < 4 the codes use the middle of the 16 levels.
        u[c] = static_cast<uint8_t>(int4_symmetric_q(w[static_cast<int64_t>(r) * k + c], s_e, q.qmin, q.qmax) +
                                    kInt4Zero);
      }
      int4_pack(u.data(), 1, k, out.packed.data() + static_cast<size_t>(r) * (k / 8));
    }
  }
  return out;
}

}  // namespace qkd::cpu
