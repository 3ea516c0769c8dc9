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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
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
  // ZeRO-1: this engine keeps the AdamW moments and updates the master weights of one shard of the flat buffer,
  // [shard_rank * chunk, ...) with chunk = ceil(total / shard_count) rounded up to 64 floats (Engine::shard()).
  // The data-parallel engine sets these; a lone engine owns everything (rank 0 of 1).
  int shard_rank = 0;
  int shard_count = 1;
};

// The flat parameter layout split into shard_count chunks of equal size (the collectives need equal pieces); the
// buffers are padded to shard_count * chunk floats, and the last shards may end early or be empty.
struct ShardLayout {
  int64_t total = 0;   // floats of the plan
  int64_t chunk = 0;   // floats a shard, a multiple of 64
  int64_t padded = 0;  // chunk * count
  int count = 1;
  int64_t lo(int rank) const { return std::min(total, chunk * rank); }
  int64_t hi(int rank) const { return std::min(total, chunk * (rank + 1)); }
};
ShardLayout shard_layout(int64_t total, int count);

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
  // The two halves of finish_gradients. With a gradient-ready callback set, the quantizer's backward already ran
  // layer by layer during the last backward pass, and quantizer_backward() does nothing.
  virtual void quantizer_backward() = 0;
  virtual double gradient_norm() { return std::sqrt(shard_sum_squares()); }
  // Sum of squares of the gradient over this engine's shard [shard_lo, shard_hi) (the whole buffer when alone).
  virtual double shard_sum_squares() = 0;

  // Data parallelism (train/data_parallel.h). With a callback set, the engine calls it on its own thread during
  // the last micro-batch's backward pass of accumulate(), each time a range [lo, hi) of the flat gradient is
  // final: one range a layer as soon as that layer's backward (and its quantizer backward) is enqueued, then the
  // embedding, final norm and LM head ranges. The ranges cover [0, total) once a step. CUDA engines call it from
  // the host when the work that finishes the range has been enqueued on cuda_stream(), not when it has run.
  // A step then takes exactly one accumulate() call. An empty function removes the callback.
  using GradientReady = std::function<void(int64_t lo, int64_t hi)>;
  virtual void set_gradient_ready(GradientReady f) = 0;
  // The flat buffers, padded to shard().padded elements (host pointers on the CPU, device pointers on CUDA).
  // compute is the compute-precision copy the forward reads (== master on the fp32 CPU backend).
  struct Flat {
    float* master = nullptr;  // [padded]
    float* grad = nullptr;    // [padded]
    void* compute = nullptr;  // [padded] of compute_bytes each
    size_t compute_bytes = 4;
  };
  virtual Flat flat() = 0;
  virtual ShardLayout shard() const = 0;
  // CUDA engines: the stream that runs the engine's work (null on the CPU).
  virtual cudaStream_t cuda_stream() { return nullptr; }
  // AdamW on this engine's shard of the master weights (the whole buffer when alone).
  virtual void apply(const AdamWStep& s) = 0;
  // Validation: losses (no gradients) of the current weights, same loss definitions, unweighted sums. Any positive
  // n_seqs: a last partial micro-batch is padded inside and its padding rows are left out of the sums.
  virtual LossSums evaluate(const int32_t* windows, int n_seqs) = 0;

  // Optimizer state as host copies (the checkpoint), and back. master is always the whole flat buffer [total];
  // m and v are the engine's shard [shard_hi - shard_lo] (the whole buffer for a lone or a data-parallel engine).
  void get_state(std::vector<float>& master, std::vector<float>& m, std::vector<float>& v) {
    get_master(master);
    get_moments(m, v);
  }
  virtual void get_master(std::vector<float>& master) = 0;
  virtual void get_moments(std::vector<float>& m, std::vector<float>& v) = 0;
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
