// The ov-freeze paper's sensitivity analysis (arXiv 2403.18159), automated: quantize ONE projection type of every
// layer at a time (round to nearest, `bits`, `group_size`; everything else stays at full precision) and measure
// the damage against the unquantized model on the same token windows:
//   forward   relative L2 error of the final logits, and of each layer's output (the residual stream after it)
//   backward  relative L2 error of the gradients that reach the other layers' weights (cross-entropy on the
//             data as the loss; the quantized projection itself gets no gradient), mean and max over tensors
// The projections are ranked by their logits error, and the two most damaging are suggested as the freeze list.
#pragma once

#include <string>
#include <vector>

#include "loader/int4_checkpoint.h"
#include "loader/model.h"
#include "runtime/model.h"

namespace qkd::train {

struct AnalyzeOptions {
  runtime::BackendKind backend = runtime::BackendKind::Auto;
  int bits = 4;
  int group_size = 128;  // 32, 64, 128 or kInt4PerChannel
  int seq_len = 256;
  int batch = 4;         // windows analysed together
};

struct ProjectionDamage {
  Int4Module module = Int4Module::Q;
  double logits_rel = 0.0;
  std::vector<double> layer_rel;  // [n_layers]
  double grad_rel_mean = 0.0, grad_rel_max = 0.0;
  double weight_rel = 0.0;        // relative RMS quantization error of the weights themselves
};

struct AnalyzeResult {
  std::vector<ProjectionDamage> ranked;  // most damaging first (by logits_rel)
  Int4ModuleSet suggested_freeze = 0;    // the first two
  std::string backend;
};

// windows: [batch, seq_len + 1] token windows of real text.
AnalyzeResult analyze_projections(const ModelWeights& model, const std::vector<int32_t>& windows,
                                  const AnalyzeOptions& opt);

}  // namespace qkd::train
