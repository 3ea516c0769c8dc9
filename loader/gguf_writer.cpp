#include "loader/gguf_writer.h"

#include "loader/atomic_file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include "kernels/error.h"
#include "loader/bundle.h"
#include "loader/ggml_quants.h"
#include "loader/gguf_tokenizer.h"
#include "loader/llama2c_tokenizer.h"
#include "loader/mmap_file.h"

namespace qkd {

namespace fs = std::filesystem;

namespace {

constexpr uint32_t kGgufVersion = 3;
constexpr uint64_t kAlignment = 32;  // general.alignment's default, so the file need not name it
// llama.cpp's llama_ftype values for general.file_type.
constexpr uint32_t kFileTypeMostlyQ4_0 = 2, kFileTypeMostlyQ4_1 = 3;
constexpr const char* kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

uint32_t ggml_type_of(DType t) {
  switch (t) {
    case DType::F32: return 0;
    case DType::F16: return 1;
    case DType::Q4_0: return 2;
    case DType::Q4_1: return 3;
    case DType::Q8_0: return 8;
    case DType::I32: return 26;
    case DType::BF16: return 30;
    case DType::I4: break;
  }
  fail("GGUF has no tensor type for dtype {}", dtype_name(t));
}

size_t scalar_bytes(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    case GgufType::STRING: case GgufType::ARRAY: break;
  }
  fail("GGUF type {} has no fixed size", gguf_type_name(t));
}

template <typename T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // GGUF is little-endian, like every host qkd runs on
  out.append(b, sizeof(T));
}

void put_string(std::string& out, std::string_view s) {
  put<uint64_t>(out, s.size());
  out.append(s);
}

// The payload of a value (its type is written by the caller).
void put_value(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufType::U8: case GgufType::BOOL: put<uint8_t>(out, static_cast<uint8_t>(v.u)); return;
    case GgufType::U16: put<uint16_t>(out, static_cast<uint16_t>(v.u)); return;
    case GgufType::U32: put<uint32_t>(out, static_cast<uint32_t>(v.u)); return;
    case GgufType::U64: put<uint64_t>(out, v.u); return;
    case GgufType::I8: put<int8_t>(out, static_cast<int8_t>(v.i)); return;
    case GgufType::I16: put<int16_t>(out, static_cast<int16_t>(v.i)); return;
    case GgufType::I32: put<int32_t>(out, static_cast<int32_t>(v.i)); return;
    case GgufType::I64: put<int64_t>(out, v.i); return;
    case GgufType::F32: put<float>(out, static_cast<float>(v.f)); return;  // read from an f32: exact
    case GgufType::F64: put<double>(out, v.f); return;
    case GgufType::STRING: put_string(out, v.str); return;
    case GgufType::ARRAY:
      put<uint32_t>(out, static_cast<uint32_t>(v.elem_type));
      put<uint64_t>(out, v.count);
      if (v.elem_type == GgufType::STRING) {
        for (std::string_view s : v.strings) put_string(out, s);
      } else if (v.elem_type == GgufType::ARRAY) {
        for (const GgufValue& a : v.arrays) {
          put_value(out, a);
        }
      } else {
        out.append(reinterpret_cast<const char*>(v.scalars), v.count * scalar_bytes(v.elem_type));
      }
      return;
  }
  fail("GGUF value type {} is unknown", static_cast<uint32_t>(v.type));
}

bool starts_with_gguf(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

// ------------------------------------------------------------------------------------------------ tokenizer

void add_spm_vocab(GgufWriter& g, std::vector<std::string> tokens, std::vector<float> scores,
                   std::vector<int32_t> types, int32_t bos, int32_t eos, int32_t unk, int32_t pad, bool space_prefix,
                   int vocab_size, const std::string& source) {
  QKD_CHECK(static_cast<int>(tokens.size()) <= vocab_size,
            "{}: the tokenizer has {} tokens, the model's vocab_size is {}", source, tokens.size(), vocab_size);
  // llama.cpp sizes the vocabulary by the token list, the embeddings by the model: pad the list as its
  // converter does, with tokens that can never be produced by encoding.
  for (int i = static_cast<int>(tokens.size()); i < vocab_size; ++i) {
    tokens.push_back(fmt::format("[PAD{}]", i));
    scores.push_back(0.0f);
    types.push_back(static_cast<int32_t>(TokenType::Unused));
  }
  g.add_string("tokenizer.ggml.model", "llama");
  g.add_string_array("tokenizer.ggml.tokens", tokens);
  g.add_f32_array("tokenizer.ggml.scores", scores);
  g.add_i32_array("tokenizer.ggml.token_type", types);
  if (bos >= 0) g.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(bos));
  if (eos >= 0) g.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(eos));
  if (unk >= 0) g.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(unk));
  if (pad >= 0) g.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(pad));
  g.add_bool("tokenizer.ggml.add_space_prefix", space_prefix);
}

void add_sentencepiece_vocab(GgufWriter& g, const std::string& path, const std::string& bytes, int vocab_size) {
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.LoadFromSerializedProto(bytes);
  QKD_CHECK(status.ok(), "{}: not a sentencepiece model: {}", path, status.ToString());
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    tokens.push_back(sp.IdToPiece(id));
    scores.push_back(sp.GetScore(id));
    const TokenType t = sp.IsUnknown(id) ? TokenType::Unknown
                        : sp.IsControl(id) ? TokenType::Control
                        : sp.IsUnused(id)  ? TokenType::Unused
                        : sp.IsByte(id)    ? TokenType::Byte
                                           : TokenType::Normal;
    types.push_back(static_cast<int32_t>(t));
  }
  // The model's add_dummy_prefix is not exposed directly: with it, the first piece of "a" starts with U+2581.
  const std::vector<std::string> first = sp.EncodeAsPieces("a");
  const bool space_prefix = !first.empty() && first[0].rfind(kSpace, 0) == 0;
  add_spm_vocab(g, std::move(tokens), std::move(scores), std::move(types), sp.bos_id(), sp.eos_id(), sp.unk_id(),
                sp.pad_id(), space_prefix, vocab_size, path);
}

// llama2.c's tokenizer.bin: the format's fixed ids (<unk> 0, <s> 1, </s> 2, <0xNN> byte pieces) give the types,
// and the pieces get back the U+2581 that the format writes as ' '.
void add_llama2c_vocab(GgufWriter& g, const std::string& path, const std::string& bytes, int vocab_size) {
  const auto tok = Llama2cTokenizer::from_bytes(path, bytes);
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (int32_t id = 0; id < tok->vocab_size(); ++id) {
    std::string piece = tok->id_to_piece(id);
    TokenType t = TokenType::Normal;
    if (id == 0) {
      piece = "<unk>", t = TokenType::Unknown;
    } else if (id == 1 || id == 2) {
      piece = id == 1 ? "<s>" : "</s>", t = TokenType::Control;  // stored as "\n<s>\n" for run.c's printing
    } else if (parse_byte_piece(piece) >= 0) {
      t = TokenType::Byte;
    } else {
      std::string sp;
      for (char c : piece) sp += c == ' ' ? std::string(kSpace) : std::string(1, c);
      piece = std::move(sp);
    }
    tokens.push_back(std::move(piece));
    scores.push_back(tok->score(id));
    types.push_back(static_cast<int32_t>(t));
  }
  add_spm_vocab(g, std::move(tokens), std::move(scores), std::move(types), 1, 2, 0, -1, true, vocab_size, path);
}

// tokenizer_config.json beside an HF model: its chat template and BOS/EOS flags, as llama.cpp's converter reads them.
void add_hf_tokenizer_config(GgufWriter& g, const std::string& model_dir) {
  const fs::path p = fs::path(model_dir) / "tokenizer_config.json";
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(p.string()));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", p.string(), e.what());
  }
  if (!j.is_object()) return;
  for (const char* key : {"add_bos_token", "add_eos_token"}) {
    auto it = j.find(key);
    if (it != j.end() && it->is_boolean()) g.add_bool(std::string("tokenizer.ggml.") + key, it->get<bool>());
  }
  auto t = j.find("chat_template");
  if (t == j.end()) return;
  if (t->is_string()) {
    g.add_string("tokenizer.chat_template", t->get<std::string>());
  } else if (t->is_array()) {  // named templates: the one called "default"
    for (const auto& e : *t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        g.add_string("tokenizer.chat_template", e["template"].get<std::string>());
  }
}

void add_gguf_tokenizer(GgufWriter& g, const std::string& src) {
  const GgufFile f = GgufFile::open(src);
  for (const auto& [key, value] : f.metadata())
    if (key.rfind("tokenizer.", 0) == 0) g.add_value(std::string(key), value);
  QKD_CHECK(g.has("tokenizer.ggml.model"), "{}: has no tokenizer (tokenizer.ggml.model) to export", src);
}

void add_tokenizer(GgufWriter& g, const Int4Quantized& q) {
  const std::string& src = q.source_model;
  if (q.source_format == "gguf") {
    add_gguf_tokenizer(g, src);
    return;
  }
  const std::string path = find_tokenizer(src);
  QKD_CHECK(!path.empty(), "{}: no tokenizer found beside the model (tokenizer.model, tokenizer.bin, tok*.bin); a "
                           "GGUF needs one", src);
  const std::string bytes = read_text_file(path);
  sentencepiece::SentencePieceProcessor probe;
  if (probe.LoadFromSerializedProto(bytes).ok()) {
    add_sentencepiece_vocab(g, path, bytes, q.weights.config.vocab_size);
  } else {
    add_llama2c_vocab(g, path, bytes, q.weights.config.vocab_size);
  }
  std::error_code ec;
  if (fs::is_directory(src, ec)) add_hf_tokenizer_config(g, src);
  // What llama.cpp's converter writes for a SentencePiece vocabulary unless the tokenizer config says otherwise.
  if (!g.has("tokenizer.ggml.add_bos_token")) g.add_bool("tokenizer.ggml.add_bos_token", true);
  if (!g.has("tokenizer.ggml.add_eos_token")) g.add_bool("tokenizer.ggml.add_eos_token", false);
}

// ------------------------------------------------------------------------------------------------ tensors

// An int4 weight of group 32 with fp16 scales as GGUF blocks: Q4_0 = fp16 d + 16 bytes, Q4_1 = fp16 d, fp16 m +
// 16 bytes, where byte j of a block holds column j in its low nibble and column j + 16 in its high nibble.
std::shared_ptr<std::vector<std::byte>> int4_to_blocks(const TensorView& t, DType* dtype) {
  const Int4Weight w = t.int4_weight();
  QKD_CHECK(w.group_size == 32 && w.scale_type == ScaleType::FP16,
            "tensor '{}': GGUF Q4_0/Q4_1 need group 32 with fp16 scales; it has group {} with {} scales", t.name,
            w.group_size, w.scale_type == ScaleType::BF16 ? "bf16" : "fp16");
  const bool asym = w.sym == Int4Symmetry::Asymmetric;
  *dtype = asym ? DType::Q4_1 : DType::Q4_0;
  const size_t block_bytes = ggml_block_bytes(*dtype);
  const int64_t groups = w.k / 32;
  auto out = std::make_shared<std::vector<std::byte>>(static_cast<size_t>(w.n * groups) * block_bytes);
  for (int64_t r = 0; r < w.n; ++r) {
    const uint32_t* row = w.packed + r * (w.k / 8);
    for (int64_t b = 0; b < groups; ++b) {
      std::byte* blk = out->data() + static_cast<size_t>(r * groups + b) * block_bytes;
      std::memcpy(blk, &w.scales[r * groups + b], 2);
      if (asym) std::memcpy(blk + 2, &w.mins[r * groups + b], 2);
      std::byte* qs = blk + (asym ? 4 : 2);
      for (int j = 0; j < 16; ++j) {
        const int c = static_cast<int>(b * 32) + j;
        qs[j] = static_cast<std::byte>(int4_get(row, c) | (int4_get(row, c + 16) << 4));
      }
    }
  }
  return out;
}

void add_weight(GgufWriter& g, const std::string& name, const TensorView& t, bool as_f32) {
  if (t.dtype == DType::I4) {
    DType dtype;
    auto blocks = int4_to_blocks(t, &dtype);
    g.add_tensor(name, dtype, t.shape, blocks->data(), blocks->size(), blocks);
  } else if (as_f32 && t.dtype != DType::F32) {
    auto f = std::make_shared<std::vector<float>>(to_f32(t));
    g.add_tensor(name, DType::F32, t.shape, reinterpret_cast<const std::byte*>(f->data()), f->size() * 4, f);
  } else {
    g.add_tensor(name, t.dtype, t.shape, t.data, t.nbytes);
  }
}

std::string model_name(const std::string& source) {
  fs::path p = fs::path(source);
  if (!p.has_filename()) p = p.parent_path();  // "dir/" names dir
  return fs::is_directory(p) ? p.filename().string() : p.stem().string();
}

}  // namespace

// ------------------------------------------------------------------------------------------------ GgufWriter

void GgufWriter::begin_kv(const std::string& key, GgufType type) {
  QKD_CHECK(!key.empty() && keys_.insert(key).second, "GGUF key '{}' is empty or given twice", key);
  put_string(kv_, key);
  put<uint32_t>(kv_, static_cast<uint32_t>(type));
  ++n_kv_;
}

void GgufWriter::add_string(const std::string& key, std::string_view v) {
  begin_kv(key, GgufType::STRING);
  put_string(kv_, v);
}
void GgufWriter::add_u32(const std::string& key, uint32_t v) {
  begin_kv(key, GgufType::U32);
  put<uint32_t>(kv_, v);
}
void GgufWriter::add_i32(const std::string& key, int32_t v) {
  begin_kv(key, GgufType::I32);
  put<int32_t>(kv_, v);
}
void GgufWriter::add_f32(const std::string& key, float v) {
  begin_kv(key, GgufType::F32);
  put<float>(kv_, v);
}
void GgufWriter::add_bool(const std::string& key, bool v) {
  begin_kv(key, GgufType::BOOL);
  put<uint8_t>(kv_, v ? 1 : 0);
}

void GgufWriter::add_string_array(const std::string& key, const std::vector<std::string>& v) {
  begin_kv(key, GgufType::ARRAY);
  put<uint32_t>(kv_, static_cast<uint32_t>(GgufType::STRING));
  put<uint64_t>(kv_, v.size());
  for (const std::string& s : v) put_string(kv_, s);
}
void GgufWriter::add_f32_array(const std::string& key, const std::vector<float>& v) {
  begin_kv(key, GgufType::ARRAY);
  put<uint32_t>(kv_, static_cast<uint32_t>(GgufType::F32));
  put<uint64_t>(kv_, v.size());
  for (float x : v) put<float>(kv_, x);
}
void GgufWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  begin_kv(key, GgufType::ARRAY);
  put<uint32_t>(kv_, static_cast<uint32_t>(GgufType::I32));
  put<uint64_t>(kv_, v.size());
  for (int32_t x : v) put<int32_t>(kv_, x);
}

void GgufWriter::add_value(const std::string& key, const GgufValue& v) {
  begin_kv(key, v.type);
  put_value(kv_, v);
}

void GgufWriter::add_tensor(const std::string& name, DType dtype, std::vector<int64_t> shape, const std::byte* data,
                            size_t nbytes, std::shared_ptr<const void> keep) {
  QKD_CHECK(!name.empty() && tensor_names_.insert(name).second, "GGUF tensor '{}' is unnamed or given twice", name);
  QKD_CHECK(!shape.empty(), "GGUF tensor '{}' has no dimensions", name);
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  const size_t expected = static_cast<size_t>(rows) * ggml_row_bytes(dtype, shape.back());
  QKD_CHECK(nbytes == expected, "GGUF tensor '{}': {} [{}] needs {} bytes, got {}", name, dtype_name(dtype),
            fmt::join(shape, ", "), expected, nbytes);
  tensors_.push_back({name, ggml_type_of(dtype), std::move(shape), data, nbytes, std::move(keep)});
}

void GgufWriter::write(const std::string& path, Overwrite overwrite) const {
  check_gguf_output(path, overwrite);
  std::string head;
  head.append("GGUF", 4);
  put<uint32_t>(head, kGgufVersion);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, n_kv_);
  head += kv_;
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.shape.size()));
    for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) put<uint64_t>(head, static_cast<uint64_t>(*d));
    put<uint32_t>(head, t.ggml_type);
    put<uint64_t>(head, offset);
    offset += (t.nbytes + kAlignment - 1) / kAlignment * kAlignment;
  }
  head.append((kAlignment - head.size() % kAlignment) % kAlignment, '\0');

  AtomicFile out(path);
  out.write(head.data(), head.size());
  const char zeros[kAlignment] = {};
  for (const Tensor& t : tensors_) {
    out.write(t.data, t.nbytes);
    out.write(zeros, (kAlignment - t.nbytes % kAlignment) % kAlignment);
  }
  out.commit(overwrite);
}

// ------------------------------------------------------------------------------------------------ export

void check_gguf_output(const std::string& path, Overwrite overwrite) {
  QKD_CHECK(!path.empty(), "no output path given");
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(path, ec);
  if (!fs::exists(st)) return;
  QKD_CHECK(overwrite == Overwrite::Replace, "{}: already exists (pass --force to replace a GGUF file)", path);
  QKD_CHECK(fs::is_regular_file(st) && starts_with_gguf(path),
            "{}: exists and is not a GGUF file; refusing to replace it even with --force", path);
}

void write_gguf_tokenizer(const std::string& gguf_source, const std::string& path) {
  GgufWriter g;
  g.add_string("general.architecture", "llama");
  add_gguf_tokenizer(g, gguf_source);
  g.write(path, Overwrite::Refuse);
}

void export_gguf(const std::string& path, const Int4Quantized& q, Overwrite overwrite) {
  check_gguf_output(path, overwrite);
  const ModelWeights& w = q.weights;
  const ModelConfig& c = w.config;
  QKD_CHECK(q.params.group_size == 32 && q.params.scale_type == ScaleType::FP16,
            "{}: GGUF Q4_0/Q4_1 are group 32 with fp16 scales; the model was quantized with group {} and {} scales",
            path, q.params.group_size, q.params.scale_type == ScaleType::BF16 ? "bf16" : "fp16");
  QKD_CHECK(c.rope_scaling.type != RopeScalingType::Llama3,
            "{}: llama3 RoPE scaling is stored in GGUF as a rope_freqs tensor, which qkd does not export yet", path);

  GgufWriter g;
  g.add_string("general.architecture", "llama");
  g.add_string("general.name", model_name(q.source_model));
  g.add_u32("general.file_type", q.params.sym == Int4Symmetry::Symmetric ? kFileTypeMostlyQ4_0 : kFileTypeMostlyQ4_1);
  g.add_u32("general.quantization_version", 2);  // ggml's current block layout of Q4_0/Q4_1
  g.add_u32("llama.context_length", static_cast<uint32_t>(c.max_seq_len));
  g.add_u32("llama.embedding_length", static_cast<uint32_t>(c.dim));
  g.add_u32("llama.block_count", static_cast<uint32_t>(c.n_layers));
  g.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.ffn_dim));
  g.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.n_heads));
  g.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.n_kv_heads));
  g.add_u32("llama.attention.key_length", static_cast<uint32_t>(c.head_dim));
  g.add_u32("llama.attention.value_length", static_cast<uint32_t>(c.head_dim));
  g.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(c.head_dim));
  g.add_f32("llama.attention.layer_norm_rms_epsilon", c.norm_eps);
  g.add_f32("llama.rope.freq_base", c.rope_theta);
  g.add_u32("llama.vocab_size", static_cast<uint32_t>(c.vocab_size));
  if (c.rope_scaling.type == RopeScalingType::Linear) {
    g.add_string("llama.rope.scaling.type", "linear");
    g.add_f32("llama.rope.scaling.factor", c.rope_scaling.factor);
  }
  add_tokenizer(g, q);

  add_weight(g, "token_embd.weight", w.tok_embeddings, false);
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string p = fmt::format("blk.{}.", i);
    add_weight(g, p + "attn_norm.weight", l.attn_norm, true);
    add_weight(g, p + "attn_q.weight", l.wq, false);
    add_weight(g, p + "attn_k.weight", l.wk, false);
    add_weight(g, p + "attn_v.weight", l.wv, false);
    add_weight(g, p + "attn_output.weight", l.wo, false);
    add_weight(g, p + "ffn_norm.weight", l.ffn_norm, true);
    add_weight(g, p + "ffn_gate.weight", l.w_gate, false);
    add_weight(g, p + "ffn_up.weight", l.w_up, false);
    add_weight(g, p + "ffn_down.weight", l.w_down, false);
  }
  add_weight(g, "output_norm.weight", w.norm, true);
  if (!c.tied_embeddings) add_weight(g, "output.weight", w.lm_head, false);
  g.write(path, overwrite);
}

}  // namespace qkd
