// A model placed on a backend with its KV cache: the one interface generation, evaluation and benchmarks use.
// Backends: the CPU reference (runtime/cpu_model.cpp, fp32) and CUDA (runtime/cuda_model.cpp, bf16/int4).
#pragma once

#include <cstdint>
#include <functional>
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
  // CUDA only. > 0: linear weights stored dense (F32/F16/BF16, GGUF Q8_0) are quantized at load to symmetric
  // int4 with this group size (32, 64 or 128; kernels/int4_format.h, bf16 scales, round to nearest), for models
  // and benchmarks that have no int4 checkpoint. A weight whose input width is not a multiple of the group size
  // stays bf16. Weights that are int4 already (qkd int4, GGUF Q4_0/Q4_1) keep their own format; embeddings and
  // the LM head always stay bf16. 0: dense weights stay bf16.
  int quantize_group = 0;
  // CUDA only: replay decode steps (seq_len 1) from a CUDA graph captured once per batch size. false launches
  // every kernel of the step one by one (same result; for checking the graph and for debugging).
  bool cuda_graph = true;
};

// How forward_sample picks each sequence's next token: the rule of kernels/sampling.h, which the CPU twin and
// the GPU kernel follow bit for bit (greedy when temperature <= 0 or top_k == 1).
struct TokenPick {
  float temperature = 0.0f;
  int top_k = 1;       // 1..kSamplingMaxTopK (kernels/sampling.h)
  float top_p = 1.0f;  // (0, 1]
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

  // forward(..., LogitsMode::Last) followed by the choice of each sequence's next token by `pick`: next[b] for
  // b < batch. uniform holds one draw in [0, 1) per sequence (it may be empty when the pick is greedy). The
  // default runs forward() and the CPU twin of kernels/sampling.h on the host logits; the CUDA backend samples
  // on the device and copies only the token ids back.
  virtual void forward_sample(std::span<const int32_t> tokens, int batch, int seq_len,
                              std::span<const int32_t> start_pos, const TokenPick& pick,
                              std::span<const float> uniform, int32_t* next);
};

// Validates forward()'s arguments against a model (batch, token count, positions within ctx, token ids within
// the vocabulary) with errors that name the values. Every backend calls it first.
void check_forward_inputs(const Model& m, std::span<const int32_t> tokens, int batch, int seq_len,
                          std::span<const int32_t> start_pos);

// Builds the model on the requested backend. Auto picks CUDA when a GPU and the CUDA backend are available,
// otherwise the CPU with a note on stderr.
std::unique_ptr<Model> make_model(const ModelWeights& w, const ModelOptions& opt);
// CPU only: called during each forward step with the rows x [rows, cols] that one of a layer's linear inputs
// (loader/model.h) holds for that step, e.g. to collect GPTQ's calibration statistics (runtime/calibrate.h).
using LinearInputHook = std::function<void(int layer, LinearInput input, const float* x, int rows, int cols)>;
std::unique_ptr<Model> make_cpu_model(const ModelWeights& w, const ModelOptions& opt,
                                      LinearInputHook linear_inputs = {});
// The CUDA backend (runtime/cuda_model.h has its benchmark interface). Throws qkd::Error when no CUDA device is
// present or the model does not fit in the GPU's free memory.
std::unique_ptr<Model> make_cuda_model(const ModelWeights& w, const ModelOptions& opt);

// RoPE inverse frequencies [head_dim/2] for a config, with its scaling applied (kernels/rope.h).
std::vector<float> rope_inv_freq(const ModelConfig& c);

}  // namespace qkd::runtime
