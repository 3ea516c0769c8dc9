// A model placed on a backend with its KV cache: the one interface generation, evaluation and benchmarks use.
// Backends: the CPU reference (runtime/cpu_model.cpp, fp32) and CUDA (runtime/cuda_model.cpp, bf16/int4).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "loader/model.h"

namespace qkd::runtime {

enum class BackendKind { Auto, Cpu, Cuda };
enum class LogitsMode { Last, All };  // logits for each sequence's last token only, or for every token

BackendKind parse_backend(const std::string& name);  // "auto" | "cpu" | "cuda", else qkd::Error
const char* backend_name(BackendKind k);

struct ModelOptions {
  int max_batch = 1;
  int ctx = 0;  // KV-cache length per sequence; 0 = the model's max_seq_len
  BackendKind backend = BackendKind::Auto;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  virtual BackendKind backend() const = 0;
  virtual int max_batch() const = 0;
  virtual int ctx() const = 0;

  // Runs tokens [batch, seq_len] whose first tokens sit at positions start_pos[b]; their keys/values are
  // written into the cache at those positions (overwriting whatever was there), and attention sees positions
  // 0..start_pos[b]+i of sequence b. logits: [batch, vocab] for LogitsMode::Last or [batch, seq_len, vocab]
  // for LogitsMode::All, fp32, on the host. Throws if start_pos[b] + seq_len > ctx() or batch > max_batch().
  virtual void forward(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
                       LogitsMode mode, float* logits) = 0;
};

// Builds the model on the requested backend. Auto picks CUDA when a GPU and the CUDA backend are available,
// otherwise the CPU with a note on stderr.
std::unique_ptr<Model> make_model(const ModelWeights& w, const ModelOptions& opt);
std::unique_ptr<Model> make_cpu_model(const ModelWeights& w, const ModelOptions& opt);

// RoPE inverse frequencies [head_dim/2] for a config, with its scaling applied (kernels/rope.h).
std::vector<float> rope_inv_freq(const ModelConfig& c);

}  // namespace qkd::runtime
