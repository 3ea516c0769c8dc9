// Hugging Face LLaMA checkpoint directories: config.json plus model.safetensors, or shards listed in
// model.safetensors.index.json ("weight_map": tensor name -> shard file).
//
// config.json -> ModelConfig: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size and
// vocab_size are required; rope_theta comes from the top level or rope_parameters (transformers 5), default 10000;
// RoPE scaling from rope_parameters / rope_scaling (rope_type "default", "linear", "llama3"); head_dim defaults to
// hidden_size / num_attention_heads, num_key_value_heads to num_attention_heads, rms_norm_eps to 1e-6 and
// max_position_embeddings to 2048 (transformers' LlamaConfig defaults); only model_type "llama" without biases.
//
// Weights are zero-copy views into the mapped shards, except q_proj and k_proj: HF stores their rows permuted for
// the rotate-half RoPE form, and the loader writes them back in Meta's interleaved order (kernels/rope.h) into
// buffers it owns, in the file's dtype.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "loader/model.h"
#include "loader/safetensors.h"

namespace qkd {

// Parses the text of a config.json; `source` (the file's path) starts every error message.
ModelConfig parse_hf_config(const std::string& json_text, const std::string& source);
// Reads and parses `config_path` (a config.json file).
ModelConfig load_hf_config(const std::string& config_path);

// All tensors of a checkpoint directory, across its shards.
class HfSafetensors {
 public:
  struct Located {
    const TensorView* view;
    const SafetensorsFile* file;
  };
  // Opens model.safetensors, or every shard the index names. A shard listed but missing, or one that lacks a
  // tensor the index places in it, throws qkd::Error naming the shard and the index.
  static HfSafetensors open(const std::string& dir);

  const Located* find(const std::string& name) const;  // nullptr when absent
  // "<dir>/model.safetensors.index.json" or "<dir>/model.safetensors", for messages.
  const std::string& listing() const { return listing_; }
  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }

 private:
  std::string listing_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::unordered_map<std::string, Located> tensors_;
};

// Loads config.json and the weights of an HF LLaMA checkpoint directory, checking every tensor's dtype (F32, F16,
// BF16) and shape against the config. format = "hf". Unexpected extra tensors are ignored.
ModelWeights load_hf_checkpoint(const std::string& dir);

// HF rotate-half row order -> Meta interleaved row order for one projection of n_heads heads:
//   dst row h*head_dim + 2p + s  =  src row h*head_dim + s*(head_dim/2) + p      (p < head_dim/2, s in {0, 1}).
// src and dst hold n_heads * head_dim rows of row_bytes each and must not overlap.
void hf_rope_rows_to_interleaved(const std::byte* src, std::byte* dst, int n_heads, int head_dim, size_t row_bytes);

}  // namespace qkd
