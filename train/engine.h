// The training engine: the student (and the teacher) on one backend, the losses and the optimizer step.
// The trainer (train/trainer.h) drives it with host token windows and never sees a device pointer.
//
// One optimizer step is
//   begin_step()                      fake-quantize the trainable linear layers, zero the gradients
//   accumulate(windows) ...           forward + backward over micro-batches; losses are means over the step's
//                                     tokens (the caller passes the step's token count once, to begin_step)
//   grad_norm(), apply(...)           the global gradient norm (for clipping), then AdamW
// The losses of one row, with student logits z, teacher logits t, target y and final hidden states hs, ht:
//   loss = ce_weight * CE(z, y) + kd_weight * tau^2 KL(softmax(t/tau) || softmax(z/tau))
//        + contrastive_weight * CTR,  CTR_i = -log softmax_j(cos(hs_i, ht_j) / ctr_tau)[i]
// (token-level contrastive distillation, arXiv 2203.10705: a token's positive is the teacher's state of the same
// token, its negatives the teacher's states of the other tokens of the same sequence.)
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "loader/model.h"
#include "runtime/model.h"
#include "train/plan.h"

namespace qkd::train {

struct LossOptions {
  float ce_weight = 0.0f;
  float kd_weight = 1.0f;
  float temperature = 1.0f;
  float contrastive_weight = 0.0f;
  float contrastive_temperature = 0.1f;
};

struct EngineOptions {
  runtime::BackendKind backend = runtime::BackendKind::Auto;
  int gpus = 1;         // > 1: data parallel over that many GPUs through NCCL (train/data_parallel.h)
  int micro_batch = 1;  // sequences per forward/backward pass
  int seq_len = 128;
  LossOptions loss;
};

struct AdamWStep {
  float lr = 1e-4f;
  float scale_lr = 1e-4f;  // learning rate of the quantization scales and clip factors
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.0f;
  float grad_scale = 1.0f;  // the clipping factor
  int64_t step = 1;         // 1-based
};

struct LossSums {
  double ce = 0.0, kl = 0.0, contrastive = 0.0;  // sums over rows
  int64_t rows = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const Plan& plan() const = 0;
  virtual const char* backend_name() const = 0;
  virtual bool has_teacher() const = 0;

  // step_tokens: the rows of every accumulate() call of this step together (the losses' mean divides by it).
  virtual void begin_step(int64_t step_tokens) = 0;
  // windows: host [n_seqs, seq_len + 1]; inputs are [:, :-1], targets [:, 1:]. n_seqs a multiple of micro_batch.
  virtual LossSums accumulate(const int32_t* windows, int n_seqs) = 0;
  // After the last accumulate(): finishes the quantizer's gradients; returns the global L2 norm of all gradients.
  virtual double finish_gradients() {
    quantizer_backward();
    return gradient_norm();
  }
  // The two halves of finish_gradients (a data-parallel engine all-reduces the gradients between them; the
  // quantizer's backward is linear in the gradient it consumes, so the order does not matter).
  virtual void quantizer_backward() = 0;
  virtual double gradient_norm() = 0;
  // CUDA engines: the fp32 gradient buffer [plan().total] on the device, and the stream that writes it.
  virtual float* device_gradients() { return nullptr; }
  virtual cudaStream_t cuda_stream() { return nullptr; }
  virtual void apply(const AdamWStep& s) = 0;
  // Validation: losses (no gradients) of the current weights, same loss definitions, unweighted sums. Any positive
  // n_seqs: a last partial micro-batch is padded inside and its padding rows are left out of the sums.
  virtual LossSums evaluate(const int32_t* windows, int n_seqs) = 0;

  // Optimizer state as host copies (the checkpoint), and back.
  virtual void get_state(std::vector<float>& master, std::vector<float>& m, std::vector<float>& v) = 0;
  virtual void set_state(const std::vector<float>& master, const std::vector<float>& m,
                         const std::vector<float>& v) = 0;
  // The frozen layers' int4 weights as the backend holds them now (for the bit-identity check).
  virtual std::vector<Int4HostWeight> frozen_weights() = 0;
  // The gradient buffer as a host copy (tests).
  virtual std::vector<float> gradients() = 0;

  // One forward and backward pass over micro_batch windows (gradients as after accumulate(), not applied), and
  // host fp32 copies of what it computed: each layer's output (the residual stream after the layer) and the
  // logits of every row. For qkd-analyze.
  struct Probe {
    std::vector<std::vector<float>> layer_out;  // [n_layers][rows * dim]
    std::vector<float> logits;                  // [rows * vocab]
    std::vector<float> grad;                    // [plan().total]
    LossSums loss;
  };
  virtual Probe probe(const int32_t* windows) = 0;

  // With QKD_TRAIN_PHASES set in the environment, the engine synchronises after each phase of a step (teacher
  // forward, student forward, LM head and losses, backward, fake quantization, optimizer) and adds its wall time
  // here, in ms since the engine was built. A diagnostic for speed work: the syncs cost a little overlap.
  virtual std::map<std::string, double> phase_ms() const { return {}; }
};

// teacher may be null (pretraining: cross-entropy only). The student starts from `init`.
std::unique_ptr<Engine> make_engine(const EngineOptions& opt, const Plan& plan, const HostInit& init,
                                    const ModelWeights* teacher);

}  // namespace qkd::train
