#include "runtime/calibrate.h"

#include <algorithm>
#include <vector>

#include "kernels/error.h"
#include "runtime/model.h"

namespace qkd::runtime {
namespace {

// h [cols, cols] += x^T x over the rows of x [rows, cols], lower triangle only (mirrored at the end). x is first
// transposed into double so that every entry is one dot product of two contiguous columns.
void add_gram(std::vector<double>& h, const float* x, int rows, int cols, std::vector<double>& xt) {
  xt.resize(static_cast<size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) xt[static_cast<size_t>(c) * rows + r] = x[static_cast<size_t>(r) * cols + c];
#pragma omp parallel for schedule(dynamic, 4)
  for (int i = 0; i < cols; ++i) {
    const double* xi = xt.data() + static_cast<size_t>(i) * rows;
    for (int j = 0; j <= i; ++j) {
      const double* xj = xt.data() + static_cast<size_t>(j) * rows;
      double s = 0.0;
      for (int r = 0; r < rows; ++r) s += xi[r] * xj[r];
      h[static_cast<size_t>(i) * cols + j] += s;
    }
  }
}

}  // namespace

Int4Calibration collect_hessians(const ModelWeights& w, std::span<const int32_t> stream,
                                 const CalibrationOptions& opt) {
  const ModelConfig& c = w.config;
  const int window = opt.window > 0 ? opt.window : std::min(c.max_seq_len > 0 ? c.max_seq_len : kCalibrationMaxWindow,
                                                            kCalibrationMaxWindow);
  QKD_CHECK(c.max_seq_len == 0 || window <= c.max_seq_len,
            "calibration: window {} is longer than the model's context {}", window, c.max_seq_len);
  QKD_CHECK(opt.tokens >= window, "calibration: {} tokens are fewer than one window of {}", opt.tokens, window);
  const int64_t available = static_cast<int64_t>(stream.size());
  QKD_CHECK(available >= window, "calibration: the text has {} tokens, fewer than one window of {}", available,
            window);
  const int64_t windows = std::min(opt.tokens, available) / window;

  Int4Calibration cal;
  cal.percdamp = opt.percdamp;
  cal.tokens = windows * window;
  const int cols[kLinearInputCount] = {c.dim, c.n_heads * c.head_dim, c.dim, c.ffn_dim};
  cal.hessians.resize(static_cast<size_t>(c.n_layers));
  for (auto& layer : cal.hessians)
    for (int i = 0; i < kLinearInputCount; ++i) layer[static_cast<size_t>(i)].assign(static_cast<size_t>(cols[i]) * cols[i], 0.0);

  std::vector<double> xt;
  LinearInputHook hook = [&](int layer, LinearInput in, const float* x, int rows, int n_cols) {
    add_gram(cal.hessians[static_cast<size_t>(layer)][static_cast<size_t>(in)], x, rows, n_cols, xt);
  };
  ModelOptions mo;
  mo.backend = BackendKind::Cpu;
  mo.ctx = window;
  const std::unique_ptr<Model> model = make_cpu_model(w, mo, hook);
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));  // only the last token's, which nothing reads
  const int32_t start = 0;
  for (int64_t i = 0; i < windows; ++i)
    model->forward(stream.subspan(static_cast<size_t>(i * window), static_cast<size_t>(window)), 1, window,
                   std::span<const int32_t>(&start, 1), LogitsMode::Last, logits.data());

  const double scale = 2.0 / static_cast<double>(cal.tokens);
  for (auto& layer : cal.hessians) {
    for (int in = 0; in < kLinearInputCount; ++in) {
      std::vector<double>& h = layer[static_cast<size_t>(in)];
      const int k = cols[in];
      for (int i = 0; i < k; ++i) {
        for (int j = 0; j <= i; ++j) {
          const double v = h[static_cast<size_t>(i) * k + j] * scale;
          h[static_cast<size_t>(i) * k + j] = v;
          h[static_cast<size_t>(j) * k + i] = v;
        }
      }
    }
  }
  return cal;
}

}  // namespace qkd::runtime
