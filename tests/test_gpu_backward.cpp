// The CUDA backward kernels (kernels/{rmsnorm,rope,swiglu,embedding,attention}.cu) against the float backward of
// their CPU twins (kernels/cpu/*.cpp), on fresh random bf16-representable inputs (the twin gets the same values as
// floats) at awkward sizes: 1 and 3 rows, widths off the tiles, seq_len 1, 3, 67, 200, 513, GQA 1/3/4/8, head_dim
// 64 and 128, batch 2. Overwritten outputs are poisoned with NaN first, so an element the kernel skips fails;
// accumulated outputs (dx, dweight, dtable) start from random values, so `=` where `+=` is meant fails too. Every
// backward also runs twice on the same inputs and must give the same bits (training resumes rely on it).
//
// Bounds, from precision (each derivation is next to its check):
//   - a value stored as bf16 is the kernel's fp32 result rounded once: relative error <= 2^-8 (bf16's unit
//     roundoff, 8 significant bits), as in the forward tests;
//   - an fp32 result that the kernel and the twin compute in different orders (a sum of n terms) differs by at
//     most 2 gamma_n sum|terms|, gamma_n ~ n 2^-24 (the worst case of recursive summation, either order);
//   - attention rounds P and dS to bf16 for the tensor cores (relative <= 2^-8 each, independent signs), which
//     gives each gradient an error of a few 2^-10 of its row's scale, plus the output's own rounding:
//     a float64 emulation of exactly this rounding model on these shapes gives ||err|| / ||ref|| ~ 2.4e-3 and
//     per element at most 0.6 x 2^-6 (|ref| + rms(ref row)). The checks are ||err|| / ||ref|| <= 1e-2 over the
//     tensor and |err| <= 2^-5 (|ref| + rms(ref row)) per element: 4x and 3x above that model.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/embedding.h"
#include "kernels/error.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/gpu_test_util.h"

using namespace qkd;

namespace {

constexpr double kBf16Eps = 1.0 / 256.0;        // 2^-8: bf16's unit roundoff (8 significant bits)
constexpr double kFp32U = 1.0 / 16777216.0;     // 2^-24: fp32's unit roundoff

using qkd::test::DeviceArray;

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

// Random bf16 values: the bits for the device and the same values as floats for the twin.
std::vector<uint16_t> random_bf16(size_t count, std::vector<float>& values, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<uint16_t> bits(count);
  values.resize(count);
  for (size_t i = 0; i < count; ++i) {
    bits[i] = float_to_bf16(d(rng()));
    values[i] = bf16_to_float(bits[i]);
  }
  return bits;
}

std::vector<float> random_floats(size_t count, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng());
  return v;
}

std::vector<float> to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = bf16_to_float(bits[i]);
  return f;
}

double max_abs_of(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// |got - ref| <= bound[i] for every element (NaN fails); reports max abs/rel error, the error norm relative to
// the reference norm, and the first mismatches. Returns the norm-relative error.
double expect_within(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref,
                     const std::vector<double>& bound) {
  REQUIRE(got.size() == ref.size());
  REQUIRE(bound.size() == ref.size());
  double max_abs = 0.0, max_rel = 0.0, err2 = 0.0, ref2 = 0.0;
  size_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    err2 += err * err;
    ref2 += static_cast<double>(ref[i]) * ref[i];
    max_abs = std::max(max_abs, std::isnan(err) ? INFINITY : err);
    if (ref[i] != 0.0f) max_rel = std::max(max_rel, err / std::fabs(ref[i]));
    if (!(err <= bound[i])) {
      if (bad < 5) first += fmt::format("  [{}] got {} want {} (bound {:.3g})\n", i, got[i], ref[i], bound[i]);
      ++bad;
    }
  }
  const double norm_rel = std::sqrt(err2 / std::max(ref2, 1e-300));
  MESSAGE(what << ": max abs " << max_abs << ", max rel " << max_rel << ", norm rel " << norm_rel);
  INFO(what << ": " << bad << " of " << got.size() << " outside the bound\n" << first);
  CHECK(bad == 0);
  return norm_rel;
}

void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref, double rel,
                  double abs) {
  std::vector<double> bound(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) bound[i] = rel * std::fabs(ref[i]) + abs;
  expect_within(what, got, ref, bound);
}

template <typename T>
void expect_same_bits(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
  INFO(what);
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// ------------------------------------------------------------------------------------------------------ RMSNorm

struct RmsNormCase {
  int rows, dim;
  bool with_dweight;
};

// Inputs of one RMSNorm backward: bf16 bits for the device, the same values as floats for the twin.
struct RmsNormInputs {
  std::vector<uint16_t> x, dout, weight, dx0;
  std::vector<float> x_f, dout_f, weight_f, dx0_f, dweight0, rstd;
};

RmsNormInputs rmsnorm_inputs(int rows, int dim) {
  RmsNormInputs in;
  const size_t n = static_cast<size_t>(rows) * dim;
  in.x = random_bf16(n, in.x_f, 3.0f);
  in.dout = random_bf16(n, in.dout_f);
  in.weight = random_bf16(dim, in.weight_f);
  in.dx0 = random_bf16(n, in.dx0_f);
  in.dweight0 = random_floats(dim, 10.0f);
  // rstd as the forward leaves it (fp32), given to both sides.
  std::vector<float> out(n);
  in.rstd.resize(rows);
  cpu::rmsnorm_forward({out.data(), in.x_f.data(), nullptr, in.weight_f.data(), in.rstd.data(), rows, dim, 1e-5f});
  return in;
}

// Runs the CUDA backward from the inputs' starting dx/dweight; returns dx bits and dweight.
void rmsnorm_backward_gpu(const RmsNormInputs& in, int rows, int dim, bool with_dweight, std::vector<uint16_t>& dx,
                          std::vector<float>& dweight) {
  DeviceArray<uint16_t> d_x(in.x), d_dout(in.dout), d_w(in.weight), d_dx(in.dx0);
  DeviceArray<float> d_rstd(in.rstd), d_dweight(in.dweight0);
  DeviceArray<float> d_scratch(static_cast<size_t>(cuda::rmsnorm_backward_scratch_floats(rows, dim)));
  d_scratch.poison();  // every partial the reduction reads must have been written
  cuda::rmsnorm_backward({d_dx.bf16(), with_dweight ? d_dweight.ptr : nullptr, d_dout.bf16(), d_x.bf16(),
                          d_w.bf16(), d_rstd.ptr, rows, dim, with_dweight ? d_scratch.ptr : nullptr},
                         nullptr);
  dx = d_dx.download();
  dweight = d_dweight.download();
}

}  // namespace

TEST_CASE("rmsnorm_backward matches the twin and accumulates into dx and dweight") {
  // dim 392: 49 vectors, a partial warp; 4104 and 16384: 2+ vectors per thread (VPT 4 and 8); rows 1500 and 3000:
  // more rows than the 512 backward blocks, so blocks sum several rows into one partial.
  const std::vector<RmsNormCase> cases = {
      {1, 8, true},     {3, 392, true},    {3, 392, false},   {67, 2048, true}, {1500, 392, true},
      {1, 16384, true}, {67, 4104, true},  {3000, 64, true},  {5, 2048, false}, {200, 8, true},
  };
  for (const RmsNormCase& c : cases) {
    const std::string what = fmt::format("rmsnorm_backward rows={} dim={} dweight={}", c.rows, c.dim, c.with_dweight);
    const RmsNormInputs in = rmsnorm_inputs(c.rows, c.dim);
    std::vector<uint16_t> dx_bits;
    std::vector<float> dweight;
    rmsnorm_backward_gpu(in, c.rows, c.dim, c.with_dweight, dx_bits, dweight);

    std::vector<float> dx_ref = in.dx0_f, dweight_ref = in.dweight0;
    cpu::rmsnorm_backward({dx_ref.data(), c.with_dweight ? dweight_ref.data() : nullptr, in.dout_f.data(),
                           in.x_f.data(), in.weight_f.data(), in.rstd.data(), c.rows, c.dim});

    // dx = dx0 + rstd (g - n m), m = mean(g n): both sides compute it in fp32, m as a sum of dim terms in
    // different orders (|dm| <= 2 gamma_dim mean|g n|), the rest a few roundings of terms of size
    // rstd (|g| + |n m|); then the device rounds to bf16 once.
    std::vector<double> dx_bound(dx_ref.size()), dw_bound(c.dim), dw_terms(c.dim, 0.0);
    for (int r = 0; r < c.rows; ++r) {
      const double rs = in.rstd[r];
      double m = 0.0, m_abs = 0.0;
      for (int i = 0; i < c.dim; ++i) {
        const size_t e = static_cast<size_t>(r) * c.dim + i;
        const double gn = static_cast<double>(in.dout_f[e]) * in.weight_f[i] * in.x_f[e] * rs;
        m += gn / c.dim;
        m_abs += std::fabs(gn) / c.dim;
        dw_terms[i] += std::fabs(static_cast<double>(in.dout_f[e]) * in.x_f[e] * rs);
      }
      for (int i = 0; i < c.dim; ++i) {
        const size_t e = static_cast<size_t>(r) * c.dim + i;
        const double g = std::fabs(static_cast<double>(in.dout_f[e]) * in.weight_f[i]);
        const double n = std::fabs(in.x_f[e] * rs);
        dx_bound[e] = kBf16Eps * std::fabs(dx_ref[e]) +
                      kFp32U * rs * (16.0 * (g + n * std::fabs(m)) + 2.0 * (c.dim + 2) * n * m_abs) +
                      16.0 * kFp32U * std::fabs(in.dx0_f[e]);
      }
    }
    expect_within(what + " dx", to_float(dx_bits), dx_ref, dx_bound);
    // dweight = dweight0 + sum_r dout n: rows + 1 fp32 terms summed in different orders on the two sides.
    for (int i = 0; i < c.dim; ++i) {
      dw_bound[i] = 2.0 * (c.rows + 4) * kFp32U * (std::fabs(in.dweight0[i]) + dw_terms[i]);
    }
    expect_within(what + " dweight", dweight, dweight_ref, dw_bound);
  }
}

TEST_CASE("rmsnorm_backward is deterministic and rejects bad arguments") {
  const int rows = 3000, dim = 2048;
  const RmsNormInputs in = rmsnorm_inputs(rows, dim);
  std::vector<uint16_t> dx1, dx2;
  std::vector<float> dw1, dw2;
  rmsnorm_backward_gpu(in, rows, dim, true, dx1, dw1);
  rmsnorm_backward_gpu(in, rows, dim, true, dx2, dw2);
  expect_same_bits("rmsnorm_backward dx", dx1, dx2);
  expect_same_bits("rmsnorm_backward dweight", dw1, dw2);

  DeviceArray<uint16_t> buf(4096);
  DeviceArray<float> f(4096);
  // dim not a multiple of 8; dweight without scratch; a misaligned pointer.
  CHECK_THROWS_AS(cuda::rmsnorm_backward({buf.bf16(), nullptr, buf.bf16(), buf.bf16(), buf.bf16(), f.ptr, 2, 12},
                                         nullptr),
                  Error);
  CHECK_THROWS_AS(cuda::rmsnorm_backward({buf.bf16(), f.ptr, buf.bf16(), buf.bf16(), buf.bf16(), f.ptr, 2, 16},
                                         nullptr),
                  Error);
  CHECK_THROWS_AS(cuda::rmsnorm_backward({buf.bf16() + 1, nullptr, buf.bf16(), buf.bf16(), buf.bf16(), f.ptr, 2, 16},
                                         nullptr),
                  Error);
  CHECK(cuda::rmsnorm_backward_scratch_floats(0, 64) == 0);
}

// --------------------------------------------------------------------------------------------------------- RoPE

namespace {

struct RopeCase {
  int n_tokens, n_heads, head_dim;
};

struct RopeInputs {
  std::vector<uint16_t> dx;
  std::vector<float> dx_f, inv_freq;
  std::vector<int32_t> positions;
};

RopeInputs rope_inputs(const RopeCase& s) {
  RopeInputs in;
  in.dx = random_bf16(static_cast<size_t>(s.n_tokens) * s.n_heads * s.head_dim, in.dx_f);
  in.positions.resize(s.n_tokens);
  std::uniform_int_distribution<int> pick(0, 100000);  // past 2^16: where an fp32 angle alone drifts
  for (int32_t& p : in.positions) p = pick(rng());
  in.positions[0] = 0;
  in.inv_freq.resize(s.head_dim / 2);
  for (int i = 0; i < s.head_dim / 2; ++i) {
    in.inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / s.head_dim));
  }
  return in;
}

std::vector<uint16_t> rope_backward_gpu(const RopeInputs& in, const RopeCase& s) {
  DeviceArray<uint16_t> d_x(in.dx);
  DeviceArray<int32_t> d_pos(in.positions);
  DeviceArray<float> d_freq(in.inv_freq);
  cuda::rope_backward({d_x.bf16(), d_pos.ptr, d_freq.ptr, s.n_tokens, s.n_heads, s.head_dim}, nullptr);
  return d_x.download();
}

}  // namespace

TEST_CASE("rope_backward matches the twin at large positions and inverts the forward") {
  for (const RopeCase s : {RopeCase{1, 32, 128}, RopeCase{3, 8, 64}, RopeCase{17, 4, 2}, RopeCase{5, 3, 8},
                           RopeCase{2, 5, 24}}) {
    const std::string what = fmt::format("rope_backward n_tokens={} n_heads={} head_dim={}", s.n_tokens, s.n_heads,
                                         s.head_dim);
    const RopeInputs in = rope_inputs(s);
    const std::vector<float> got = to_float(rope_backward_gpu(in, s));
    std::vector<float> ref = in.dx_f;
    cpu::rope_backward({ref.data(), in.positions.data(), in.inv_freq.data(), s.n_tokens, s.n_heads, s.head_dim});
    // Each output is x0 c -/+ x1 s: one bf16 rounding, plus fp32 math with cos/sin that agree to a few fp32 ulps
    // (the device corrects its fp32 angle; the twin takes it in double), which is <= 1e-6 (|x0| + |x1|).
    std::vector<double> bound(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
      const size_t pair = i & ~static_cast<size_t>(1);
      bound[i] = kBf16Eps * std::fabs(ref[i]) + 1e-6 * (std::fabs(in.dx_f[pair]) + std::fabs(in.dx_f[pair + 1]));
    }
    expect_within(what, got, ref, bound);
  }
  // forward then backward is the identity up to two bf16 roundings (each <= 2^-8 of the pair's norm, the first
  // carried through the rotation unchanged in norm) and fp32 math (2.5% of slack).
  const RopeCase s{4, 6, 64};
  RopeInputs in = rope_inputs(s);
  DeviceArray<uint16_t> d_x(in.dx);
  DeviceArray<int32_t> d_pos(in.positions);
  DeviceArray<float> d_freq(in.inv_freq);
  cuda::rope_forward({d_x.bf16(), d_pos.ptr, d_freq.ptr, s.n_tokens, s.n_heads, s.head_dim}, nullptr);
  cuda::rope_backward({d_x.bf16(), d_pos.ptr, d_freq.ptr, s.n_tokens, s.n_heads, s.head_dim}, nullptr);
  std::vector<double> bound(in.dx_f.size());
  for (size_t i = 0; i < bound.size(); ++i) {
    const size_t pair = i & ~static_cast<size_t>(1);
    bound[i] = 2.05 * kBf16Eps * std::hypot(in.dx_f[pair], in.dx_f[pair + 1]);
  }
  expect_within("rope forward + backward", to_float(d_x.download()), in.dx_f, bound);
}

// ------------------------------------------------------------------------------------------------------- SwiGLU

namespace {

enum class SwigluLayout { Contiguous, Fused, Padded };  // ld_in = ffn_dim, 2 ffn_dim (gate|up), ffn_dim + 8

struct SwigluInputs {
  int rows, ffn_dim;
  int64_t ld_in, up_off;  // up (and dup) start up_off elements into their buffer
  std::vector<uint16_t> gate, up, dout;  // gate/up: [rows, ld_in] (one shared buffer when fused)
  std::vector<float> gate_f, up_f, dout_f;
};

SwigluInputs swiglu_inputs(int rows, int ffn_dim, SwigluLayout layout) {
  SwigluInputs in;
  in.rows = rows;
  in.ffn_dim = ffn_dim;
  in.ld_in = layout == SwigluLayout::Fused ? 2 * ffn_dim : layout == SwigluLayout::Padded ? ffn_dim + 8 : ffn_dim;
  in.up_off = layout == SwigluLayout::Fused ? ffn_dim : 0;
  in.gate = random_bf16(static_cast<size_t>(rows) * in.ld_in, in.gate_f, 3.0f);
  if (layout == SwigluLayout::Fused) {
    in.up = in.gate;
    in.up_f = in.gate_f;
  } else {
    in.up = random_bf16(static_cast<size_t>(rows) * in.ld_in, in.up_f);
  }
  in.dout = random_bf16(static_cast<size_t>(rows) * ffn_dim, in.dout_f);
  return in;
}

// Returns dgate's and dup's buffers ([rows, ld_in] each; one buffer holding both when fused), poisoned first.
void swiglu_backward_gpu(const SwigluInputs& in, bool fused, std::vector<uint16_t>& dgate,
                         std::vector<uint16_t>& dup) {
  const size_t n = static_cast<size_t>(in.rows) * in.ld_in;
  DeviceArray<uint16_t> d_gate(in.gate), d_up(in.up), d_dout(in.dout), d_dgate(n), d_dup(n);
  d_dgate.poison();
  d_dup.poison();
  __nv_bfloat16* dup_ptr = (fused ? d_dgate.bf16() : d_dup.bf16()) + in.up_off;
  const __nv_bfloat16* up_ptr = (fused ? d_gate.bf16() : d_up.bf16()) + in.up_off;
  cuda::swiglu_backward(
      {d_dgate.bf16(), dup_ptr, d_dout.bf16(), d_gate.bf16(), up_ptr, in.rows, in.ffn_dim, in.ld_in}, nullptr);
  dgate = d_dgate.download();
  dup = fused ? dgate : d_dup.download();
}

}  // namespace

TEST_CASE("swiglu_backward matches the twin, contiguous, fused and padded") {
  for (int rows : {1, 3, 37}) {
    for (int ffn_dim : {8, 1000, 5632}) {
      for (SwigluLayout layout : {SwigluLayout::Contiguous, SwigluLayout::Fused, SwigluLayout::Padded}) {
        const bool fused = layout == SwigluLayout::Fused;
        const std::string what =
            fmt::format("swiglu_backward rows={} ffn_dim={} layout={}", rows, ffn_dim, static_cast<int>(layout));
        const SwigluInputs in = swiglu_inputs(rows, ffn_dim, layout);
        std::vector<uint16_t> dgate_bits, dup_bits;
        swiglu_backward_gpu(in, fused, dgate_bits, dup_bits);

        const size_t n = static_cast<size_t>(rows) * in.ld_in;
        std::vector<float> dgate_ref(n, NAN), dup_ref(n, NAN);
        float* dup_ref_ptr = (fused ? dgate_ref.data() : dup_ref.data()) + in.up_off;
        cpu::swiglu_backward({dgate_ref.data(), dup_ref_ptr, in.dout_f.data(), in.gate_f.data(),
                              (fused ? in.gate_f.data() : in.up_f.data()) + in.up_off, rows, ffn_dim, in.ld_in});
        if (fused) dup_ref = dgate_ref;

        // Compare the written columns; the padding past ffn_dim must keep its poison (0xffff).
        std::vector<float> dg, dg_ref, du, du_ref;
        std::vector<double> dg_bound, du_bound;
        size_t touched_padding = 0;
        for (int r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < in.ld_in; ++c) {
            const size_t e = static_cast<size_t>(r) * in.ld_in + c;
            if (c >= ffn_dim) {
              if (!fused && (dgate_bits[e] != 0xffff || dup_bits[e] != 0xffff)) ++touched_padding;
              continue;
            }
            const size_t eu = e + in.up_off;
            const double g = in.gate_f[e], u = (fused ? in.gate_f : in.up_f)[eu];
            const double d = in.dout_f[static_cast<size_t>(r) * ffn_dim + c];
            dg.push_back(bf16_to_float(dgate_bits[e]));
            dg_ref.push_back(dgate_ref[e]);
            du.push_back(bf16_to_float(dup_bits[eu]));
            du_ref.push_back(dup_ref[eu]);
            // silu'(g) = s (1 + g (1 - s)) crosses zero near g = -1.28, where its fp32 evaluation (expf, a
            // division and four more roundings, each side) keeps an absolute error of about 16 2^-24 (1 + |g|);
            // times |dout up|, plus the final bf16 rounding. dup = dout silu(g) has no cancellation.
            dg_bound.push_back(kBf16Eps * std::fabs(dg_ref.back()) +
                               16.0 * kFp32U * std::fabs(d * u) * (1.0 + std::fabs(g)));
            du_bound.push_back(kBf16Eps * std::fabs(du_ref.back()) + 16.0 * kFp32U * std::fabs(d * g));
          }
        }
        CHECK_MESSAGE(touched_padding == 0, what << ": wrote " << touched_padding << " padding elements");
        expect_within(what + " dgate", dg, dg_ref, dg_bound);
        expect_within(what + " dup", du, du_ref, du_bound);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------- embedding

namespace {

struct EmbeddingCase {
  int n_tokens, dim, vocab_size;
  bool one_id;  // every token the same id: the longest per-id run (a full window of matches)
};

struct EmbeddingInputs {
  std::vector<uint16_t> dout;
  std::vector<float> dout_f, dtable0;
  std::vector<int32_t> tokens;
};

EmbeddingInputs embedding_inputs(const EmbeddingCase& c) {
  EmbeddingInputs in;
  in.dout = random_bf16(static_cast<size_t>(c.n_tokens) * c.dim, in.dout_f);
  in.dtable0 = random_floats(static_cast<size_t>(c.vocab_size) * c.dim);
  in.tokens.resize(c.n_tokens);
  std::uniform_int_distribution<int> pick(0, c.vocab_size - 1);
  const int32_t fixed = pick(rng());
  for (int32_t& t : in.tokens) t = c.one_id ? fixed : pick(rng());
  return in;
}

std::vector<float> embedding_backward_gpu(const EmbeddingInputs& in, const EmbeddingCase& c) {
  DeviceArray<uint16_t> d_dout(in.dout);
  DeviceArray<float> d_table(in.dtable0);
  DeviceArray<int32_t> d_tokens(in.tokens);
  cuda::embedding_backward({d_table.ptr, d_dout.bf16(), d_tokens.ptr, c.n_tokens, c.dim, c.vocab_size}, nullptr);
  return d_table.download();
}

}  // namespace

TEST_CASE("embedding_backward matches the twin and accumulates into dtable") {
  // dim 2056: three column slices of 1024 (the last 8 wide); 3000 tokens: three 1024-token windows; vocab 50:
  // every id repeats many times; 2500 tokens of one id: full windows of one id.
  const std::vector<EmbeddingCase> cases = {
      {1, 8, 50, false},        {3, 2056, 50, false},  {1000, 392, 50, false},
      {3000, 1032, 32000, false}, {2500, 64, 300, true}, {5000, 136, 7, false},
  };
  for (const EmbeddingCase& c : cases) {
    const std::string what = fmt::format("embedding_backward n_tokens={} dim={} vocab={} one_id={}", c.n_tokens,
                                         c.dim, c.vocab_size, c.one_id);
    const EmbeddingInputs in = embedding_inputs(c);
    const std::vector<float> got = embedding_backward_gpu(in, c);
    std::vector<float> ref = in.dtable0;
    cpu::embedding_backward({ref.data(), in.dout_f.data(), in.tokens.data(), c.n_tokens, c.dim, c.vocab_size});
    // dtable[id, c] = dtable0 + the id's count fp32 terms: the twin adds them one by one (count roundings), the
    // device sums each window's terms, then adds the window sum (at most 2 count roundings on a term).
    std::vector<int> count(c.vocab_size, 0);
    std::vector<double> terms(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) terms[i] = std::fabs(in.dtable0[i]);
    for (int t = 0; t < c.n_tokens; ++t) {
      ++count[in.tokens[t]];
      for (int col = 0; col < c.dim; ++col) {
        terms[static_cast<size_t>(in.tokens[t]) * c.dim + col] +=
            std::fabs(in.dout_f[static_cast<size_t>(t) * c.dim + col]);
      }
    }
    std::vector<double> bound(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) bound[i] = 3.0 * (count[i / c.dim] + 2) * kFp32U * terms[i];
    expect_within(what, got, ref, bound);
  }
}

TEST_CASE("embedding_backward is deterministic and rejects bad shapes") {
  const EmbeddingCase c{5000, 2048, 300, false};
  const EmbeddingInputs in = embedding_inputs(c);
  expect_same_bits("embedding_backward dtable", embedding_backward_gpu(in, c), embedding_backward_gpu(in, c));
  DeviceArray<uint16_t> dout(64);
  DeviceArray<float> table(64);
  DeviceArray<int32_t> tokens(std::vector<int32_t>{0, 1});
  CHECK_THROWS_AS(cuda::embedding_backward({table.ptr, dout.bf16(), tokens.ptr, 2, 12, 4}, nullptr), Error);
  CHECK_THROWS_AS(cuda::embedding_backward({table.ptr + 1, dout.bf16(), tokens.ptr, 2, 8, 4}, nullptr), Error);
}

// ---------------------------------------------------------------------------------------------------- attention

namespace {

struct AttentionCase {
  int batch, n_heads, n_kv_heads, head_dim, seq_len;
};

std::string describe(const AttentionCase& c) {
  return fmt::format("attention_backward batch={} heads={}/{} head_dim={} seq_len={}", c.batch, c.n_heads,
                     c.n_kv_heads, c.head_dim, c.seq_len);
}

// Inputs of one attention backward in the training layout. out and lse come from a forward on the same inputs and
// are given to both sides: the twin's (out rounded to bf16, as the device stores it) for the comparisons, the
// device's where only the bits of two backward runs are compared (it is much faster at seq_len ~1000).
enum class Forward { Twin, Device };

struct AttentionInputs {
  std::vector<uint16_t> q, k, v, out, dout;
  std::vector<float> q_f, k_f, v_f, out_f, dout_f, lse;
  float scale;
};

AttentionInputs attention_inputs(const AttentionCase& c, Forward forward = Forward::Twin) {
  AttentionInputs in;
  const size_t q_count = static_cast<size_t>(c.batch) * c.seq_len * c.n_heads * c.head_dim;
  const size_t kv_count = static_cast<size_t>(c.batch) * c.seq_len * c.n_kv_heads * c.head_dim;
  in.q = random_bf16(q_count, in.q_f);
  in.k = random_bf16(kv_count, in.k_f);
  in.v = random_bf16(kv_count, in.v_f);
  in.dout = random_bf16(q_count, in.dout_f);
  in.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  in.lse.resize(static_cast<size_t>(c.batch) * c.n_heads * c.seq_len);
  const std::vector<int32_t> start(c.batch, 0);
  const int64_t kv_seq_stride = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  const int64_t kv_batch_stride = kv_seq_stride * c.seq_len;
  if (forward == Forward::Twin) {
    std::vector<float> out(q_count);
    cpu::attention_forward({out.data(), in.q_f.data(), in.k_f.data(), in.v_f.data(), in.lse.data(), start.data(),
                            c.batch, c.seq_len, c.n_heads, c.n_kv_heads, c.head_dim, kv_batch_stride, c.head_dim,
                            kv_seq_stride, in.scale});
    in.out.resize(q_count);
    for (size_t i = 0; i < q_count; ++i) in.out[i] = float_to_bf16(out[i]);
  } else {
    DeviceArray<uint16_t> d_q(in.q), d_k(in.k), d_v(in.v), d_out(q_count);
    DeviceArray<float> d_lse(in.lse.size());
    DeviceArray<int32_t> d_start(start);
    cuda::attention_forward({d_out.bf16(), d_q.bf16(), d_k.bf16(), d_v.bf16(), d_lse.ptr, d_start.ptr, c.batch,
                             c.seq_len, c.n_heads, c.n_kv_heads, c.head_dim, kv_batch_stride, c.head_dim,
                             kv_seq_stride, in.scale},
                            nullptr);
    in.out = d_out.download();
    in.lse = d_lse.download();
  }
  in.out_f = to_float(in.out);
  return in;
}

struct AttentionGrads {
  std::vector<uint16_t> dq, dk, dv;
};

AttentionGrads attention_backward_gpu(const AttentionInputs& in, const AttentionCase& c) {
  DeviceArray<uint16_t> d_q(in.q), d_k(in.k), d_v(in.v), d_out(in.out), d_dout(in.dout);
  DeviceArray<uint16_t> d_dq(in.q.size()), d_dk(in.k.size()), d_dv(in.v.size());
  // sized by the library, poisoned: delta and the dK/dV partials of the head splits must all be written before read
  DeviceArray<float> d_lse(in.lse), d_scratch(static_cast<size_t>(cuda::attention_backward_scratch_floats(
                                        c.batch, c.seq_len, c.n_heads, c.n_kv_heads, c.head_dim)));
  d_dq.poison();
  d_dk.poison();
  d_dv.poison();
  d_scratch.poison();
  AttentionBackwardArgs<__nv_bfloat16> a{};
  a.dq = d_dq.bf16();
  a.dk = d_dk.bf16();
  a.dv = d_dv.bf16();
  a.dout = d_dout.bf16();
  a.q = d_q.bf16();
  a.k = d_k.bf16();
  a.v = d_v.bf16();
  a.out = d_out.bf16();
  a.lse = d_lse.ptr;
  a.batch = c.batch;
  a.seq_len = c.seq_len;
  a.n_heads = c.n_heads;
  a.n_kv_heads = c.n_kv_heads;
  a.head_dim = c.head_dim;
  a.scale = in.scale;
  a.scratch = d_scratch.ptr;
  cuda::attention_backward(a, nullptr);
  return {d_dq.download(), d_dk.download(), d_dv.download()};
}

// The attention bound (file comment): per element 2^-5 (|ref| + rms of its head_dim row) + noise_floor, and the
// norm of the error within 1e-2 of the reference's. noise_floor covers gradients whose exact value cancels to zero
// (query 0 sees only key 0, where P = 1 and dP - delta = 0): both sides then hold fp32 rounding noise of
// dP - delta, head_dim-term dot products of bf16 values, ~sqrt(head_dim) 2^-24 |dout| |v|, passed through scale
// (k or q) and summed over the row's keys or queries; 2^-18 max|dout| max|v| max(|q|, |k|) is a wide margin.
void expect_attention_grad(const std::string& what, const std::vector<uint16_t>& got_bits,
                           const std::vector<float>& ref, int head_dim, double noise_floor) {
  const std::vector<float> got = to_float(got_bits);
  std::vector<double> bound(ref.size());
  for (size_t r = 0; r < ref.size(); r += head_dim) {
    double ss = 0.0;
    for (int d = 0; d < head_dim; ++d) ss += static_cast<double>(ref[r + d]) * ref[r + d];
    const double rms = std::sqrt(ss / head_dim);
    for (int d = 0; d < head_dim; ++d) bound[r + d] = 0x1p-5 * (std::fabs(ref[r + d]) + rms) + noise_floor;
  }
  const double norm_rel = expect_within(what, got, ref, bound);
  // The norm check only means something where the gradient is not all rounding noise (seq_len 1 has dq = dk = 0).
  if (max_abs_of(ref) > 1e3 * noise_floor) {
    CHECK_MESSAGE(norm_rel <= 1e-2, what << ": norm rel " << norm_rel);
  }
}

void run_attention_case(const AttentionCase& c) {
  INFO(describe(c));
  const AttentionInputs in = attention_inputs(c);
  const AttentionGrads got = attention_backward_gpu(in, c);

  std::vector<float> dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  AttentionBackwardArgs<float> ref{};
  ref.dq = dq.data();
  ref.dk = dk.data();
  ref.dv = dv.data();
  ref.dout = in.dout_f.data();
  ref.q = in.q_f.data();
  ref.k = in.k_f.data();
  ref.v = in.v_f.data();
  ref.out = in.out_f.data();
  ref.lse = in.lse.data();
  ref.batch = c.batch;
  ref.seq_len = c.seq_len;
  ref.n_heads = c.n_heads;
  ref.n_kv_heads = c.n_kv_heads;
  ref.head_dim = c.head_dim;
  ref.scale = in.scale;
  cpu::attention_backward(ref);

  const double noise_floor = 0x1p-18 * max_abs_of(in.dout_f) * max_abs_of(in.v_f) *
                       std::max(max_abs_of(in.q_f), max_abs_of(in.k_f));
  expect_attention_grad(describe(c) + " dq", got.dq, dq, c.head_dim, noise_floor);
  expect_attention_grad(describe(c) + " dk", got.dk, dk, c.head_dim, noise_floor);
  expect_attention_grad(describe(c) + " dv", got.dv, dv, c.head_dim, noise_floor);
}

}  // namespace

TEST_CASE("attention_backward matches the twin") {
  // GQA 1, 3, 4, 8 each with both head dims; seq_len 1 and 3 (one partial tile), 67 and 130 (a full tile and a
  // sliver), 200 and 513 (several key tiles, each walking several query tiles and heads).
  const std::vector<AttentionCase> cases = {
      {2, 4, 4, 64, 1},   {2, 4, 4, 128, 3},  {2, 4, 4, 128, 200}, {2, 6, 2, 64, 67},  {2, 3, 1, 128, 200},
      {1, 12, 3, 128, 67}, {2, 8, 2, 64, 130}, {2, 8, 1, 64, 200},  {1, 16, 2, 128, 130}, {1, 3, 1, 64, 513},
  };
  for (const AttentionCase& c : cases) run_attention_case(c);
}

TEST_CASE("attention_backward is deterministic and rejects unsupported shapes") {
  for (const AttentionCase& c : {AttentionCase{2, 16, 2, 128, 700}, AttentionCase{1, 8, 1, 64, 1030}}) {
    const AttentionInputs in = attention_inputs(c, Forward::Device);
    const AttentionGrads a = attention_backward_gpu(in, c), b = attention_backward_gpu(in, c);
    expect_same_bits(describe(c) + " dq", a.dq, b.dq);
    expect_same_bits(describe(c) + " dk", a.dk, b.dk);
    expect_same_bits(describe(c) + " dv", a.dv, b.dv);
  }
  DeviceArray<uint16_t> buf(1 << 16);
  DeviceArray<float> f(1024);
  AttentionBackwardArgs<__nv_bfloat16> a{};
  a.dq = a.dk = a.dv = buf.bf16();
  a.dout = a.q = a.k = a.v = a.out = buf.bf16();
  a.lse = f.ptr;
  a.scratch = f.ptr;
  a.batch = 1;
  a.seq_len = 4;
  a.n_heads = 4;
  a.n_kv_heads = 4;
  a.head_dim = 96;
  a.scale = 0.1f;
  CHECK_THROWS_AS(cuda::attention_backward(a, nullptr), Error);  // head_dim 96
  a.head_dim = 64;
  a.n_kv_heads = 3;
  CHECK_THROWS_AS(cuda::attention_backward(a, nullptr), Error);  // 4 heads over 3 kv heads
  a.n_kv_heads = 4;
  a.scratch = nullptr;
  CHECK_THROWS_AS(cuda::attention_backward(a, nullptr), Error);  // no scratch for delta
  a.scratch = f.ptr;
  a.dq = buf.bf16() + 4;
  CHECK_THROWS_AS(cuda::attention_backward(a, nullptr), Error);  // misaligned
}

// ----------------------------------------------------------------------------------------- the other determinism

TEST_CASE("rope_backward and swiglu_backward are deterministic") {
  const RopeCase s{64, 32, 64};
  const RopeInputs rin = rope_inputs(s);
  expect_same_bits("rope_backward", rope_backward_gpu(rin, s), rope_backward_gpu(rin, s));
  const SwigluInputs sw = swiglu_inputs(300, 5632, SwigluLayout::Fused);
  std::vector<uint16_t> g1, u1, g2, u2;
  swiglu_backward_gpu(sw, true, g1, u1);
  swiglu_backward_gpu(sw, true, g2, u2);
  expect_same_bits("swiglu_backward", g1, g2);
  DeviceArray<uint16_t> buf(1024);
  CHECK_THROWS_AS(cuda::swiglu_backward({buf.bf16(), buf.bf16(), buf.bf16(), buf.bf16(), buf.bf16(), 2, 16, 8},
                                        nullptr),
                  Error);  // ld_in < ffn_dim
}
