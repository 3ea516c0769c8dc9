// qkd-bench --train: the speed of one distillation step of the CUDA training engine (train/engine.h) on a model
// shape with random weights. One step is what qkd-train does per optimizer step: begin_step (fake-quantize the
// trainable linear layers), accumulate (the teacher's forward, the student's forward, the KL loss, the student's
// backward), finish_gradients (the quantizer's gradients and the global gradient norm) and apply (AdamW). The
// student is int4, group 128, with o_proj and v_proj frozen (train/plan.h QuantSpec defaults); the teacher is the
// same random model in bf16. Steps are timed whole on the host clock: apply() synchronises, so each step's time
// covers all of its device work.
//
// Model FLOPs of a step, with T = batch * seq_len tokens, L layers, P the matmul parameters (every linear layer
// of every block plus the LM head; the embedding is a lookup) and a = n_heads * head_dim the attention width:
//   student linear layers   6 P T      forward 2PT, backward 4PT (input and weight gradients)
//   teacher linear layers   2 P T      forward only
//   student attention       6 L T seq_len a    causal: QK^T and PV each 2 T seq_len a / 2 forward, twice that
//                                              backward (the recomputation inside flash attention not counted)
//   teacher attention       2 L T seq_len a
// This is the usual "model FLOPs" count (PaLM, appendix B). The step does a little less: the frozen layers get
// no weight gradient (2 P_frozen T fewer, reported as frozen_wgrad). Elementwise work, the norms, the softmax
// and the optimizer are not counted. MFU is the model FLOPs over the step time, as a fraction of the bf16 dense
// peak (989.4 TFLOP/s, H100 SXM) and of a cuBLASLt bf16 GEMM rate measured in the same run.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "loader/model.h"
#include "train/plan.h"

namespace qkd::bench {

// NVIDIA's H100 SXM figure for dense bf16 with fp32 accumulation (the datasheet's 1979 is with sparsity).
constexpr float kH100SxmBf16Tflops = 989.4f;

struct TrainBenchOptions {
  int batch = 8;
  int seq_len = 1024;
  int steps = 10;   // timed steps
  int warmup = 2;   // untimed steps before them
  uint64_t seed = 1;
  float peak_tflops = kH100SxmBf16Tflops;
  int gemm_size = 8192;  // m = n = k of the measured GEMM
};

struct StepFlops {
  double student_linear = 0, teacher_linear = 0, student_attention = 0, teacher_attention = 0;
  double frozen_wgrad = 0;  // counted in student_linear, not done by the engine
  double total() const { return student_linear + teacher_linear + student_attention + teacher_attention; }
};

// The model FLOPs of one distillation step of `plan`'s student (formula above), its teacher of the same shape.
StepFlops distill_step_flops(const train::Plan& plan, int batch, int seq_len);

// Runs the benchmark on CUDA device 0 and returns the results (qkd-bench --train --json prints this object).
// Throws qkd::Error when there is no CUDA device or the engine does not fit the GPU.
nlohmann::json train_bench(const ModelConfig& c, const std::string& label, const TrainBenchOptions& o);

// The results as a short human-readable report on stdout.
void print_train_bench(const nlohmann::json& r);

}  // namespace qkd::bench
