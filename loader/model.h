// What a loader hands the runtime: the model's hyperparameters and views of its weights, in qkd's one internal
// convention:
//  - linear weights in nn.Linear layout [out_features, in_features];
//  - q/k projection rows in Meta's INTERLEAVED RoPE order (kernels/rope.h); Hugging Face checkpoints are
//    un-permuted at load;
//  - lm_head aliases tok_embeddings when the embeddings are tied.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "loader/tensor.h"

namespace qkd {

enum class RopeScalingType { None, Linear, Llama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::None;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;   // llama3
  float high_freq_factor = 4.0f;  // llama3
  int original_max_position = 8192;  // llama3
};

struct ModelConfig {
  std::string arch = "llama";
  int dim = 0;          // hidden_size
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int ffn_dim = 0;      // intermediate_size
  int vocab_size = 0;
  int max_seq_len = 0;  // max_position_embeddings
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tied_embeddings = false;
  int32_t bos_id = 1;
  std::vector<int32_t> eos_ids{2};
};

struct LayerWeights {
  TensorView attn_norm;  // [dim]
  TensorView wq;         // [n_heads * head_dim, dim]
  TensorView wk;         // [n_kv_heads * head_dim, dim]
  TensorView wv;         // [n_kv_heads * head_dim, dim]
  TensorView wo;         // [dim, n_heads * head_dim]
  TensorView ffn_norm;   // [dim]
  TensorView w_gate;     // [ffn_dim, dim]
  TensorView w_up;       // [ffn_dim, dim]
  TensorView w_down;     // [dim, ffn_dim]
};

// The four distinct inputs of a decoder layer's linear modules: q, k and v read the attention norm's output, o
// the attention's output, gate and up the FFN norm's output, down the SwiGLU output.
enum class LinearInput : uint8_t { AttnNorm, Attention, FfnNorm, Swiglu };
constexpr int kLinearInputCount = 4;

struct ModelWeights {
  ModelConfig config;
  std::string source;          // the path it was loaded from, for messages
  std::string format;          // "hf", "llama2c", "gguf", "qkd-int4"
  TensorView tok_embeddings;   // [vocab_size, dim]
  std::vector<LayerWeights> layers;
  TensorView norm;             // [dim]
  TensorView lm_head;          // [vocab_size, dim]; same bytes as tok_embeddings when tied
  std::vector<std::shared_ptr<const void>> storage;  // keeps mmaps and owned buffers alive
};

// Loads a model from an HF checkpoint directory (config.json + safetensors), a llama2.c .bin, or (when those
// loaders exist) a GGUF file or a qkd int4 checkpoint. Throws qkd::Error naming the file, field and value.
ModelWeights load_model(const std::string& path);

}  // namespace qkd
