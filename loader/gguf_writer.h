// Writing GGUF v3 files (the layout loader/gguf.h describes), and exporting an int4-quantized model as the GGUF
// that llama.cpp and ollama load.
//
// export_gguf writes:
//  - the linear weights as Q4_0 (symmetric) or Q4_1 (asymmetric), which are qkd int4 with group 32 and fp16
//    scales bit for bit (kernels/int4_format.h), so nothing is rounded on the way;
//  - unquantized embeddings / LM head in their dtype (F32, F16, BF16), norms as F32 (what llama.cpp's converter
//    writes);
//  - llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output) and llama.* hyperparameters; q/k rows
//    stay in the interleaved RoPE order, which is what llama.cpp's converter stores for LLaMA;
//  - the tokenizer as tokenizer.ggml.*: copied key for key from a GGUF source; built from a sentencepiece
//    tokenizer.model or a llama2.c tokenizer.bin (model "llama": tokens with U+2581 for spaces, scores, token
//    types) otherwise; the chat template (tokenizer.chat_template) from the GGUF source or tokenizer_config.json.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "loader/gguf.h"
#include "loader/int4_checkpoint.h"

namespace qkd {

class GgufWriter {
 public:
  void add_string(const std::string& key, std::string_view v);
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
  // A value as GgufFile read it (any type, nested arrays too), re-encoded unchanged.
  void add_value(const std::string& key, const GgufValue& v);
  bool has(const std::string& key) const { return keys_.count(key) != 0; }

  // A tensor in qkd's row-major shape (written with ne reversed), dtype F32, F16, BF16, I32, Q8_0, Q4_0 or Q4_1.
  // The bytes are not copied: they must stay valid until write(), which `keep` (when given) guarantees.
  void add_tensor(const std::string& name, DType dtype, std::vector<int64_t> shape, const std::byte* data,
                  size_t nbytes, std::shared_ptr<const void> keep = {});

  // Writes the file atomically (temp file beside it, fsync, rename). Overwrite as for check_gguf_output.
  void write(const std::string& path, Overwrite overwrite) const;

 private:
  struct Tensor {
    std::string name;
    uint32_t ggml_type;
    std::vector<int64_t> shape;
    const std::byte* data;
    size_t nbytes;
    std::shared_ptr<const void> keep;
  };
  void begin_kv(const std::string& key, GgufType type);

  std::string kv_;  // the encoded key/value section
  uint64_t n_kv_ = 0;
  std::set<std::string> keys_, tensor_names_;
  std::vector<Tensor> tensors_;
};

// Throws qkd::Error unless `path` may be written: with Refuse it must not exist; with Replace it may also be an
// existing GGUF file (never anything else).
void check_gguf_output(const std::string& path, Overwrite overwrite);

// Writes a vocabulary-only GGUF at `path` (general.architecture and every tokenizer.* key of the GGUF file
// `gguf_source`, no tensors), which load_gguf_tokenizer reads. Refuses an existing `path`.
void write_gguf_tokenizer(const std::string& gguf_source, const std::string& path);

// The quantization parameters whose groups a GGUF Q4_0 (symmetric) or Q4_1 (asymmetric) tensor stores exactly:
// group 32, fp16 scales (and mins), for the given modules.
inline Int4Params gguf_q4_params(Int4Symmetry sym, Int4ModuleSet modules = kInt4LinearModules) {
  return {.group_size = 32, .sym = sym, .scale_type = ScaleType::FP16, .modules = modules};
}

// Writes q (from gguf_q4_params: symmetric -> Q4_0, asymmetric -> Q4_1) as a
// llama.cpp GGUF, with the tokenizer of q.source_model (see the header comment). Throws qkd::Error when the
// parameters cannot be stored as Q4_0/Q4_1, when the RoPE scaling has no GGUF key qkd reads back (llama3), or
// when no tokenizer is found.
void export_gguf(const std::string& path, const Int4Quantized& q, Overwrite overwrite);

}  // namespace qkd
