// GPTQ onto the int4 format (kernels/int4_gptq.h): the Cholesky factor of H^-1 in double, then the rows in
// parallel tiles, column by column with lazy block updates.
#include "kernels/int4_gptq.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/error.h"

namespace qkd {
namespace {

// Rows quantized together: the block update of a tile reads each row of U once for all its rows.
constexpr int kRowTile = 16;

// In place: the lower Cholesky factor L of a (A = L L^T, row-major [k, k]; the strict upper triangle is set to 0).
// Only the lower triangle of a is read. False when a pivot is not positive (or not finite): a is not positive
// definite in double. Left-looking, so each entry is one dot product of two contiguous row prefixes.
bool cholesky_lower(std::vector<double>& a, int k) {
  for (int j = 0; j < k; ++j) {
    double* rj = a.data() + static_cast<size_t>(j) * k;
    double d = rj[j];
    for (int p = 0; p < j; ++p) d -= rj[p] * rj[p];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    rj[j] = ljj;
#pragma omp parallel for schedule(static)
    for (int i = j + 1; i < k; ++i) {
      double* ri = a.data() + static_cast<size_t>(i) * k;
      double s = ri[j];
      for (int p = 0; p < j; ++p) s -= ri[p] * rj[p];
      ri[j] = s / ljj;
    }
  }
  for (int i = 0; i < k; ++i) std::fill(a.begin() + static_cast<size_t>(i) * k + i + 1, a.begin() + static_cast<size_t>(i + 1) * k, 0.0);
  return true;
}

// H^-1 from H's lower Cholesky factor l: H^-1 = L^-T L^-1. x = L^-T (upper) is built row by row, row j being
// column j of L^-1, i.e. the solution of L y = e_j (zero above j); then H^-1[a, b] = sum_i x[a, i] x[b, i].
std::vector<double> inverse_from_cholesky(const std::vector<double>& l, int k) {
  std::vector<double> x(static_cast<size_t>(k) * k, 0.0);
#pragma omp parallel for schedule(dynamic, 8)
  for (int j = 0; j < k; ++j) {
    double* y = x.data() + static_cast<size_t>(j) * k;
    y[j] = 1.0 / l[static_cast<size_t>(j) * k + j];
    for (int i = j + 1; i < k; ++i) {
      const double* li = l.data() + static_cast<size_t>(i) * k;
      double s = 0.0;
      for (int p = j; p < i; ++p) s -= li[p] * y[p];
      y[i] = s / li[i];
    }
  }
  std::vector<double> inv(static_cast<size_t>(k) * k);
#pragma omp parallel for schedule(dynamic, 8)
  for (int a = 0; a < k; ++a) {
    const double* xa = x.data() + static_cast<size_t>(a) * k;
    for (int b = 0; b <= a; ++b) {
      const double* xb = x.data() + static_cast<size_t>(b) * k;
      double s = 0.0;
      for (int i = a; i < k; ++i) s += xa[i] * xb[i];  // x is upper: entries below the diagonal are 0
      inv[static_cast<size_t>(a) * k + b] = s;
      inv[static_cast<size_t>(b) * k + a] = s;
    }
  }
  return inv;
}

// The upper Cholesky factor U of H^-1 (H^-1 = U^T U) for H + damp I, or an empty vector when either factorization
// meets a non-positive pivot.
std::vector<double> inverse_cholesky_upper(const std::vector<double>& h, int k, double damp) {
  std::vector<double> a = h;
  for (int i = 0; i < k; ++i) a[static_cast<size_t>(i) * k + i] += damp;
  if (!cholesky_lower(a, k)) return {};
  std::vector<double> inv = inverse_from_cholesky(a, k);
  if (!cholesky_lower(inv, k)) return {};
  // U = L2^T for H^-1 = L2 L2^T
  std::vector<double> u(static_cast<size_t>(k) * k, 0.0);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j <= i; ++j) u[static_cast<size_t>(j) * k + i] = inv[static_cast<size_t>(i) * k + j];
  return u;
}

struct TileArgs {
  const std::vector<double>& u;  // [k, k] upper Cholesky factor of H^-1
  const std::vector<char>& dead; // [k]
  const Int4GptqArgs& a;
  int gs;
};

// Rows [r0, r0 + rows) of the weight: GPTQ's column loop on a double copy of the rows, writing the nibbles
// into codes [rows, k] and the group codes into out's scales / mins.
void quantize_tile(const TileArgs& t, int r0, int rows, std::vector<double>& w, std::vector<double>& err,
                   std::vector<uint8_t>& codes, std::vector<float>& group, Int4HostWeight& out) {
  const Int4GptqArgs& a = t.a;
  const int k = a.k, gs = t.gs, groups = k / gs;
  for (int r = 0; r < rows; ++r) {
    const float* src = a.w + static_cast<int64_t>(r0 + r) * k;
    for (int c = 0; c < k; ++c) {
      QKD_CHECK(std::isfinite(src[c]), "int4_gptq_quantize: weight [{}, {}] is {}", r0 + r, c, src[c]);
      w[static_cast<size_t>(r) * k + c] = t.dead[static_cast<size_t>(c)] ? 0.0 : src[c];
    }
  }
  std::vector<uint8_t> scratch(static_cast<size_t>(gs));
  std::vector<Int4GroupCodes> cur(static_cast<size_t>(rows));
  for (int b0 = 0; b0 < k; b0 += kGptqBlock) {
    const int b1 = std::min(b0 + kGptqBlock, k);
    for (int j = b0; j < b1; ++j) {
      const double* uj = t.u.data() + static_cast<size_t>(j) * k;
      for (int r = 0; r < rows; ++r) {
        double* wr = w.data() + static_cast<size_t>(r) * k;
        if (j % gs == 0) {
          // The group's grid from its current weights: every earlier column's error has reached them, since a
          // group (32, 64, 128 columns) never straddles a block and a per-channel group starts at column 0.
          for (int c = 0; c < gs; ++c) group[static_cast<size_t>(c)] = static_cast<float>(wr[j + c]);
          try {
            cur[static_cast<size_t>(r)] =
                int4_quantize_group(group.data(), gs, a.sym, a.scale_type, scratch.data(), a.search);
          } catch (const Error& e) {
            fail("int4_gptq_quantize: row {} group {}: {}", r0 + r, j / gs, e.what());
          }
          const size_t gi = static_cast<size_t>(r0 + r) * groups + j / gs;
          out.scales[gi] = cur[static_cast<size_t>(r)].scale;
          if (a.sym == Int4Symmetry::Asymmetric) out.mins[gi] = cur[static_cast<size_t>(r)].min;
        }
        const Int4GroupCodes& g = cur[static_cast<size_t>(r)];
        const uint8_t q = int4_quantize_value(static_cast<float>(wr[j]), g, a.sym, a.scale_type);
        codes[static_cast<size_t>(r) * k + j] = q;
        const float deq = int4_dequant_value(q, int4_scale_to_float(g.scale, a.scale_type),
                                             int4_scale_to_float(g.min, a.scale_type), a.sym);
        const double e = (wr[j] - deq) / uj[j];
        for (int c = j + 1; c < b1; ++c) wr[c] -= e * uj[c];
        err[static_cast<size_t>(r) * kGptqBlock + (j - b0)] = e;
      }
    }
    // The lazy update: the block's errors reach the rest of each row at once.
    for (int j = b0; j < b1; ++j) {
      const double* uj = t.u.data() + static_cast<size_t>(j) * k;
      for (int r = 0; r < rows; ++r) {
        const double e = err[static_cast<size_t>(r) * kGptqBlock + (j - b0)];
        double* wr = w.data() + static_cast<size_t>(r) * k;
        for (int c = b1; c < k; ++c) wr[c] -= e * uj[c];
      }
    }
  }
  int4_pack(codes.data(), rows, k, out.packed.data() + static_cast<size_t>(r0) * (k / 8));
}

}  // namespace

Int4GptqResult int4_gptq_quantize(const Int4GptqArgs& a) {
  QKD_CHECK(a.n > 0, "int4_gptq_quantize: n {} must be positive", a.n);
  QKD_CHECK(a.w != nullptr && a.hessian != nullptr, "int4_gptq_quantize: weight or Hessian is null");
  QKD_CHECK(std::isfinite(a.percdamp) && a.percdamp > 0.0, "int4_gptq_quantize: percdamp {} must be positive",
            a.percdamp);
  const int k = a.k;
  const int gs = int4_group_size(a.group_size, k, "int4_gptq_quantize");
  QKD_CHECK(gs == k || kGptqBlock % gs == 0, "int4_gptq_quantize: group_size {} must divide the block {}", gs,
            kGptqBlock);

  std::vector<double> h(a.hessian, a.hessian + static_cast<size_t>(k) * k);
  std::vector<char> dead(static_cast<size_t>(k), 0);
  Int4GptqResult res;
  double mean_diag = 0.0;
  for (int i = 0; i < k; ++i) {
    double& d = h[static_cast<size_t>(i) * k + i];
    for (int j = 0; j <= i; ++j)
      QKD_CHECK(std::isfinite(h[static_cast<size_t>(i) * k + j]), "int4_gptq_quantize: Hessian [{}, {}] is {}", i, j,
                h[static_cast<size_t>(i) * k + j]);
    if (d == 0.0) {
      d = 1.0;
      dead[static_cast<size_t>(i)] = 1;
      ++res.dead_columns;
    }
    mean_diag += d;
  }
  mean_diag /= k;

  std::vector<double> u;
  res.percdamp = a.percdamp;
  for (int attempt = 0;; ++attempt) {
    u = inverse_cholesky_upper(h, k, res.percdamp * mean_diag);
    if (!u.empty()) break;
    QKD_CHECK(attempt < kGptqDampRetries,
              "int4_gptq_quantize: the Hessian [{}, {}] is not positive definite even with percdamp {} (tried {} "
              "from {}, x10 each time)",
              k, k, res.percdamp, attempt + 1, a.percdamp);
    res.percdamp *= 10.0;
  }

  Int4HostWeight& out = res.weight;
  out.n = a.n;
  out.k = k;
  out.group_size = gs;
  out.sym = a.sym;
  out.scale_type = a.scale_type;
  out.packed.resize(static_cast<size_t>(a.n) * (k / 8));
  out.scales.resize(static_cast<size_t>(a.n) * (k / gs));
  if (a.sym == Int4Symmetry::Asymmetric) out.mins.resize(out.scales.size());

  // Tiles are independent; the failure of the lowest tile is rethrown after the loop, since no exception may
  // leave an OpenMP region (as in int4_quantize).
  const TileArgs t{u, dead, a, gs};
  const int tiles = (a.n + kRowTile - 1) / kRowTile;
  FirstError first_error;
#pragma omp parallel
  {
    std::vector<double> w(static_cast<size_t>(kRowTile) * k), err(static_cast<size_t>(kRowTile) * kGptqBlock);
    std::vector<uint8_t> codes(static_cast<size_t>(kRowTile) * k);
    std::vector<float> group(static_cast<size_t>(gs));
#pragma omp for schedule(dynamic)
    for (int i = 0; i < tiles; ++i) {
      try {
        quantize_tile(t, i * kRowTile, std::min(kRowTile, a.n - i * kRowTile), w, err, codes, group, out);
      } catch (const Error& e) {
        first_error.keep(i, e);
      }
    }
  }
  first_error.rethrow();
  return res;
}

}  // namespace qkd
