// GPTQ onto the int4 format (kernels/int4_gptq.h): round to nearest when the inputs are uncorrelated, a clearly
// smaller layer-output error than round to nearest when they are correlated, the same codes as an unblocked
// textbook GPTQ written here (explicit H^-1, Schur-complement updates), dead columns, dampening retries, errors.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"
#include "kernels/int4_gptq.h"
#include "tests/test_util.h"

using namespace qkd;

namespace {

std::vector<float> gaussian(std::mt19937& rng, size_t count, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng);
  return v;
}

// Inputs X [rows, k] = Z A with Z and the mixing A [k, k] standard normal: strongly correlated columns.
std::vector<double> correlated_inputs(std::mt19937& rng, int rows, int k) {
  const std::vector<float> z = gaussian(rng, static_cast<size_t>(rows) * k);
  const std::vector<float> a = gaussian(rng, static_cast<size_t>(k) * k, 1.0f / std::sqrt(static_cast<float>(k)));
  std::vector<double> x(static_cast<size_t>(rows) * k, 0.0);
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < k; ++p)
      for (int c = 0; c < k; ++c)
        x[static_cast<size_t>(r) * k + c] += static_cast<double>(z[static_cast<size_t>(r) * k + p]) * a[static_cast<size_t>(p) * k + c];
  return x;
}

// H = (2 / rows) X^T X
std::vector<double> hessian_of(const std::vector<double>& x, int rows, int k) {
  std::vector<double> h(static_cast<size_t>(k) * k, 0.0);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < k; ++j)
        h[static_cast<size_t>(i) * k + j] += 2.0 / rows * x[static_cast<size_t>(r) * k + i] * x[static_cast<size_t>(r) * k + j];
  return h;
}

std::vector<float> dequant(const Int4HostWeight& q) {
  std::vector<float> d(static_cast<size_t>(q.n) * q.k);
  cpu::dequantize_int4(q.view(), d.data());
  return d;
}

// ||(W - Wq) X^T||_F: the layer's output error on the inputs
double output_error(const std::vector<float>& w, const Int4HostWeight& q, const std::vector<double>& x, int rows) {
  const std::vector<float> d = dequant(q);
  double sum = 0.0;
  for (int o = 0; o < q.n; ++o) {
    for (int r = 0; r < rows; ++r) {
      double y = 0.0;
      for (int c = 0; c < q.k; ++c) {
        const size_t i = static_cast<size_t>(o) * q.k + c;
        y += (static_cast<double>(w[i]) - d[i]) * x[static_cast<size_t>(r) * q.k + c];
      }
      sum += y * y;
    }
  }
  return std::sqrt(sum);
}

// Gauss-Jordan inverse with partial pivoting, double.
std::vector<double> invert(std::vector<double> a, int k) {
  std::vector<double> inv(static_cast<size_t>(k) * k, 0.0);
  for (int i = 0; i < k; ++i) inv[static_cast<size_t>(i) * k + i] = 1.0;
  for (int c = 0; c < k; ++c) {
    int p = c;
    for (int r = c + 1; r < k; ++r)
      if (std::fabs(a[static_cast<size_t>(r) * k + c]) > std::fabs(a[static_cast<size_t>(p) * k + c])) p = r;
    for (int j = 0; j < k; ++j) {
      std::swap(a[static_cast<size_t>(c) * k + j], a[static_cast<size_t>(p) * k + j]);
      std::swap(inv[static_cast<size_t>(c) * k + j], inv[static_cast<size_t>(p) * k + j]);
    }
    const double d = a[static_cast<size_t>(c) * k + c];
    for (int j = 0; j < k; ++j) {
      a[static_cast<size_t>(c) * k + j] /= d;
      inv[static_cast<size_t>(c) * k + j] /= d;
    }
    for (int r = 0; r < k; ++r) {
      if (r == c) continue;
      const double f = a[static_cast<size_t>(r) * k + c];
      for (int j = 0; j < k; ++j) {
        a[static_cast<size_t>(r) * k + j] -= f * a[static_cast<size_t>(c) * k + j];
        inv[static_cast<size_t>(r) * k + j] -= f * inv[static_cast<size_t>(c) * k + j];
      }
    }
  }
  return inv;
}

// The textbook GPTQ/OBQ step, unblocked and written independently of the library's Cholesky form: with the
// inverse Hessian of the columns not yet quantized, Hinv, quantize column j, move every later column by
// -(w_j - q_j) / Hinv[j, j] * Hinv[j, c], and remove j from Hinv by its Schur complement
// Hinv <- Hinv - Hinv[:, j] Hinv[j, :] / Hinv[j, j]. Group grids as the library documents them.
struct Reference {
  std::vector<uint8_t> u;        // [n, k]
  std::vector<uint16_t> scales;  // [n, k / gs]
  std::vector<uint16_t> mins;
};
Reference textbook_gptq(const std::vector<float>& w, std::vector<double> h, int n, int k, int gs, Int4Symmetry sym,
                        double percdamp) {
  double mean = 0.0;
  for (int i = 0; i < k; ++i) mean += h[static_cast<size_t>(i) * k + i];
  for (int i = 0; i < k; ++i) h[static_cast<size_t>(i) * k + i] += percdamp * mean / k;
  const std::vector<double> hinv0 = invert(h, k);
  Reference ref;
  ref.u.resize(static_cast<size_t>(n) * k);
  ref.scales.resize(static_cast<size_t>(n) * (k / gs));
  ref.mins.resize(ref.scales.size());
  // Hinv does not depend on the row: the column loop is outside, every row takes its step inside.
  std::vector<double> hinv = hinv0;
  std::vector<double> rows(w.begin(), w.end());
  std::vector<Int4GroupCodes> g(static_cast<size_t>(n));
  for (int j = 0; j < k; ++j) {
    const double djj = hinv[static_cast<size_t>(j) * k + j];
    for (int r = 0; r < n; ++r) {
      double* row = rows.data() + static_cast<size_t>(r) * k;
      Int4GroupCodes& gr = g[static_cast<size_t>(r)];
      if (j % gs == 0) {
        std::vector<float> grp(row + j, row + j + gs);
        std::vector<uint8_t> scratch(static_cast<size_t>(gs));
        gr = int4_quantize_group(grp.data(), gs, sym, ScaleType::BF16, scratch.data());
        ref.scales[static_cast<size_t>(r) * (k / gs) + j / gs] = gr.scale;
        ref.mins[static_cast<size_t>(r) * (k / gs) + j / gs] = gr.min;
      }
      const uint8_t q = int4_quantize_value(static_cast<float>(row[j]), gr, sym, ScaleType::BF16);
      ref.u[static_cast<size_t>(r) * k + j] = q;
      const double deq = int4_dequant_value(q, int4_scale_to_float(gr.scale, ScaleType::BF16),
                                            int4_scale_to_float(gr.min, ScaleType::BF16), sym);
      const double e = (row[j] - deq) / djj;
      for (int c = j + 1; c < k; ++c) row[c] -= e * hinv[static_cast<size_t>(j) * k + c];
    }
    std::vector<double> next = hinv;
    for (int a = j + 1; a < k; ++a)
      for (int b = j + 1; b < k; ++b)
        next[static_cast<size_t>(a) * k + b] -=
            hinv[static_cast<size_t>(a) * k + j] * hinv[static_cast<size_t>(j) * k + b] / djj;
    hinv = std::move(next);
  }
  return ref;
}

Int4GptqArgs args_of(const std::vector<float>& w, const std::vector<double>& h, int n, int k, int gs,
                     Int4Symmetry sym) {
  Int4GptqArgs a;
  a.w = w.data();
  a.hessian = h.data();
  a.n = n;
  a.k = k;
  a.group_size = gs;
  a.sym = sym;
  return a;
}

}  // namespace

TEST_CASE("gptq: with H = c I (uncorrelated inputs) it is round to nearest, bit for bit") {
  std::mt19937 rng(11);
  const int n = 24, k = 256;
  const std::vector<float> w = gaussian(rng, static_cast<size_t>(n) * k, 0.05f);
  std::vector<double> h(static_cast<size_t>(k) * k, 0.0);
  for (int i = 0; i < k; ++i) h[static_cast<size_t>(i) * k + i] = 3.0;
  for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    for (int gs : {32, 64, 128, kInt4PerChannel}) {
      for (Int4ScaleSearch search : {Int4ScaleSearch::None, Int4ScaleSearch::ClipMse}) {
        CAPTURE(gs);
        CAPTURE(static_cast<int>(sym));
        Int4GptqArgs a = args_of(w, h, n, k, gs, sym);
        a.search = search;
        const Int4GptqResult g = int4_gptq_quantize(a);
        const Int4HostWeight r = int4_quantize(w.data(), n, k, gs, sym, ScaleType::BF16, search);
        CHECK(g.weight.packed == r.packed);
        CHECK(g.weight.scales == r.scales);
        CHECK(g.weight.mins == r.mins);
        CHECK(g.weight.group_size == r.group_size);
        CHECK(g.percdamp == kGptqDefaultDamp);
        CHECK(g.dead_columns == 0);
      }
    }
  }
}

TEST_CASE("gptq: correlated inputs give a clearly smaller layer-output error than round to nearest") {
  std::mt19937 rng(5);
  const int n = 32, k = 256, rows = 1024;
  const std::vector<float> w = gaussian(rng, static_cast<size_t>(n) * k, 0.05f);
  const std::vector<double> x = correlated_inputs(rng, rows, k);
  const std::vector<double> h = hessian_of(x, rows, k);
  for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    for (int gs : {32, kInt4PerChannel}) {
      CAPTURE(gs);
      CAPTURE(static_cast<int>(sym));
      const Int4GptqResult g = int4_gptq_quantize(args_of(w, h, n, k, gs, sym));
      const Int4HostWeight r = int4_quantize(w.data(), n, k, gs, sym, ScaleType::BF16);
      const double eg = output_error(w, g.weight, x, rows), er = output_error(w, r, x, rows);
      MESSAGE("output error gptq / rtn = " << eg / er << " (group " << gs << ")");
      // Measured on this seed: 0.68-0.71 for all four. A ratio near 1 would mean the error feedback does
      // nothing; 0.8 asks for a real gain and still leaves room for a different seed's luck.
      CHECK(eg < 0.8 * er);
    }
  }
}

TEST_CASE("gptq: the blocked Cholesky form gives the textbook unblocked GPTQ's codes") {
  // k = 320 spans two full lazy blocks and a partial one, so the deferred block updates take part. Both sides
  // compute in double and differ only by rounding (~1e-13 relative), so a code could differ only where a value
  // sits that close to a rounding boundary; on this seed none does and the codes must be identical.
  std::mt19937 rng(9);
  const int n = 6, k = 320, rows = 640;
  const std::vector<float> w = gaussian(rng, static_cast<size_t>(n) * k, 0.05f);
  const std::vector<double> x = correlated_inputs(rng, rows, k);
  const std::vector<double> h = hessian_of(x, rows, k);
  for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    for (int gs : {32, 64, kInt4PerChannel}) {
      CAPTURE(gs);
      CAPTURE(static_cast<int>(sym));
      const int gsr = gs == kInt4PerChannel ? k : gs;
      const Reference ref = textbook_gptq(w, h, n, k, gsr, sym, kGptqDefaultDamp);
      const Int4GptqResult g = int4_gptq_quantize(args_of(w, h, n, k, gs, sym));
      std::vector<uint8_t> u(static_cast<size_t>(n) * k);
      int4_unpack(g.weight.packed.data(), n, k, u.data());
      int mismatches = 0;
      for (size_t i = 0; i < u.size(); ++i) mismatches += u[i] != ref.u[i];
      CHECK(mismatches == 0);
      CHECK(g.weight.scales == ref.scales);
      if (sym == Int4Symmetry::Asymmetric) CHECK(g.weight.mins == ref.mins);
    }
  }
}

TEST_CASE("gptq: dead columns are zeroed, a singular Hessian is dampened, bad arguments throw") {
  std::mt19937 rng(3);
  const int n = 8, k = 64, rows = 256;
  const std::vector<float> w = gaussian(rng, static_cast<size_t>(n) * k, 0.05f);
  std::vector<double> x = correlated_inputs(rng, rows, k);
  for (int r = 0; r < rows; ++r) x[static_cast<size_t>(r) * k + 5] = 0.0;  // input 5 is always 0
  const std::vector<double> h = hessian_of(x, rows, k);
  const Int4GptqResult g = int4_gptq_quantize(args_of(w, h, n, k, 32, Int4Symmetry::Symmetric));
  CHECK(g.dead_columns == 1);
  const std::vector<float> d = dequant(g.weight);
  for (int r = 0; r < n; ++r) CHECK(d[static_cast<size_t>(r) * k + 5] == 0.0f);

  // Rank one: positive definite only thanks to the dampening (semi-definite H + lambda I).
  std::vector<double> rank1(static_cast<size_t>(k) * k);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) rank1[static_cast<size_t>(i) * k + j] = (1.0 + i % 3) * (1.0 + j % 3);
  CHECK(int4_gptq_quantize(args_of(w, rank1, n, k, 32, Int4Symmetry::Symmetric)).percdamp == kGptqDefaultDamp);

  // Indefinite: a negative eigenvalue larger than any dampening tried.
  std::vector<double> bad(static_cast<size_t>(k) * k, 0.0);
  for (int i = 0; i < k; ++i) bad[static_cast<size_t>(i) * k + i] = i == 7 ? -1e6 : 1.0;
  CHECK_ERROR_CONTAINS(int4_gptq_quantize(args_of(w, bad, n, k, 32, Int4Symmetry::Symmetric)),
                       "not positive definite", "percdamp 10");

  Int4GptqArgs a = args_of(w, h, n, k, 32, Int4Symmetry::Symmetric);
  a.percdamp = 0.0;
  CHECK_ERROR_CONTAINS(int4_gptq_quantize(a), "percdamp 0 must be positive");
  a = args_of(w, h, n, k, 48, Int4Symmetry::Symmetric);
  CHECK_ERROR_CONTAINS(int4_gptq_quantize(a), "group_size 48");
  std::vector<float> nan_w = w;
  nan_w[3 * k + 9] = NAN;
  CHECK_ERROR_CONTAINS(int4_gptq_quantize(args_of(nan_w, h, n, k, 32, Int4Symmetry::Symmetric)),
                       "weight [3, 9] is nan");
}
