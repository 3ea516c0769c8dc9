// GPTQ's calibration (kernels/int4_gptq.h): the Hessian H = (2 / N) sum x x^T of every decoder layer's linear
// inputs (loader/model.h's LinearInput: q/k/v share the attention norm's output, o reads the attention output,
// gate/up share the FFN norm's output, down reads the SwiGLU output), collected through a hook of the CPU
// backend's own forward pass (runtime/cpu_model.cpp), not a second implementation of it.
//
// The calibration stream is cut like evaluate()'s (runtime/eval.h): non-overlapping windows
// stream[i * window : (i + 1) * window], each run from position 0 with a fresh cache; the first
// min(tokens, stream size) / window whole windows are used, N = their token count. The sums are in double.
// One pass of the unquantized model: every layer's statistics come from full-precision activations, not from
// those of the already quantized layers before it (GPTQ's sequential variant); one forward serves all layers.
#pragma once

#include <cstdint>
#include <span>

#include "loader/int4_checkpoint.h"
#include "loader/model.h"

namespace qkd::runtime {

constexpr int64_t kCalibrationTokens = 16384;  // default N: GPTQ's 128 x 2048 tokens, scaled to small models
constexpr int kCalibrationMaxWindow = 512;     // the default window: the model's context, at most this

struct CalibrationOptions {
  int64_t tokens = kCalibrationTokens;  // at most this many tokens, in whole windows
  int window = 0;                       // tokens per window; 0 = min(model context, kCalibrationMaxWindow)
  double percdamp = kGptqDefaultDamp;   // passed on in the result (Int4Calibration::percdamp)
};

// Runs `w` on the CPU backend over the stream's windows and returns the Hessians [n_layers][LinearInput]. Throws
// qkd::Error naming the values when the options are invalid or fewer than one window of tokens is available.
Int4Calibration collect_hessians(const ModelWeights& w, std::span<const int32_t> stream,
                                 const CalibrationOptions& opt);

}  // namespace qkd::runtime
