// llama2.c checkpoints (karpathy/llama2.c export.py), fp32 only:
//  - legacy ("version 0"): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
//    negative vocab_size means the classifier is not shared with the embeddings), then
//    tok_embeddings [vocab, dim], per-layer stacks rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, then the final
//    norm, two unused RoPE tables of seq_len * head_dim / 2 floats each, then wcls when not shared;
//  - version 1: uint32 magic "ak42" (0x616b3432), int32 version 1, the 7 int32 (vocab_size positive), uint8
//    shared_classifier, zero padding to 256 bytes; then rms_att, rms_ffn (stacked), norm, tok_embeddings,
//    wq, wk, wv, wo, w1, w2, w3 (stacked), wcls when not shared; no RoPE tables.
// Version 2 (int8 Q8_0) is refused. Matrices are [out, in] (nn.Linear layout); w1 = gate, w3 = up, w2 = down.
// llama2.c's RoPE already rotates interleaved pairs, so no rows are permuted. The file size must match the header
// exactly. Weights are zero-copy views into the mapped file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "loader/model.h"

namespace qkd {

struct Llama2cHeader {
  int version = 0;  // 0 = legacy
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0;
  int vocab_size = 0;  // always positive here; the legacy sign is folded into shared_classifier
  int seq_len = 0;
  bool shared_classifier = true;
  size_t header_bytes = 0;    // 28 (legacy) or 256 (version 1)
  uint64_t expected_bytes = 0;  // the whole file's size that the header implies
};

// Parses and validates the header of the `size` bytes at `data` (the file `path`, named in errors), including the
// file size it implies.
Llama2cHeader parse_llama2c_header(const std::byte* data, size_t size, const std::string& path);

// Loads a llama2.c checkpoint. format = "llama2c"; rope_theta 10000, norm_eps 1e-5, bos 1, eos 2 (run.c's values).
ModelWeights load_llama2c(const std::string& path);

}  // namespace qkd
