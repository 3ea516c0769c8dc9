// GGUF writing (loader/gguf_writer.h): the writer's values and tensors read back by qkd's own GGUF reader; the
// int4 export as Q4_0/Q4_1 with llama.cpp's names, bit for bit against the int4 weights (and against Q4_0/Q4_1
// source blocks, end to end); the tokenizer carried over from GGUF, sentencepiece and llama2.c sources; the CPU
// logits of the exported file equal those of the int4 model it came from; refused parameters and outputs.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <unistd.h>

#include "kernels/error.h"
#include "kernels/int4_format.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/gguf_writer.h"
#include "loader/int4_checkpoint.h"
#include "loader/mmap_file.h"
#include "loader/tokenizer.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using qkd::DType;
using qkd::GgufFile;
using qkd::Int4Params;
using qkd::Int4Symmetry;
using qkd::ModelWeights;
using qkd::ScaleType;
using qkd::TensorView;

namespace {

std::string fixture(const std::string& rel) { return qkd::test::fixtures_dir() + "/" + rel; }

using qkd::test::error_of;
using qkd::test::TempDir;

// (llama.cpp name, view) for every tensor the export writes.
std::vector<std::pair<std::string, const TensorView*>> gguf_names(const ModelWeights& w) {
  std::vector<std::pair<std::string, const TensorView*>> v{{"token_embd.weight", &w.tok_embeddings}};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const qkd::LayerWeights& l = w.layers[i];
    const std::string p = fmt::format("blk.{}.", i);
    v.insert(v.end(), {{p + "attn_norm.weight", &l.attn_norm}, {p + "attn_q.weight", &l.wq},
                       {p + "attn_k.weight", &l.wk}, {p + "attn_v.weight", &l.wv}, {p + "attn_output.weight", &l.wo},
                       {p + "ffn_norm.weight", &l.ffn_norm}, {p + "ffn_gate.weight", &l.w_gate},
                       {p + "ffn_up.weight", &l.w_up}, {p + "ffn_down.weight", &l.w_down}});
  }
  v.emplace_back("output_norm.weight", &w.norm);
  if (!w.config.tied_embeddings) v.emplace_back("output.weight", &w.lm_head);
  return v;
}

// Every exported tensor against the int4 model: Q4_0/Q4_1 blocks repacked by int4_from_q4_* give back the same
// packed words, scales and mins; norms are F32 with the same values; other dense tensors keep bytes and dtype.
void check_tensors(const GgufFile& f, const qkd::Int4Quantized& q) {
  const auto names = gguf_names(q.weights);
  CHECK(f.tensors().size() == names.size());
  for (const auto& [name, t] : names) {
    INFO("tensor " << name);
    const qkd::GgufTensorInfo* info = f.find_tensor(name);
    REQUIRE(info != nullptr);
    CHECK(info->offset % f.alignment() == 0);
    const TensorView v = f.view(*info);
    REQUIRE(v.shape == t->shape);
    if (t->dtype == DType::I4) {
      const qkd::Int4Weight w = t->int4_weight();
      const bool asym = w.sym == Int4Symmetry::Asymmetric;
      REQUIRE(v.dtype == (asym ? DType::Q4_1 : DType::Q4_0));
      std::vector<uint32_t> packed(static_cast<size_t>(w.n) * (w.k / 8));
      std::vector<uint16_t> scales(static_cast<size_t>(w.n) * (w.k / 32)), mins(asym ? scales.size() : 0);
      const auto* blocks = reinterpret_cast<const uint8_t*>(v.data);
      if (asym) {
        qkd::int4_from_q4_1(blocks, w.n, w.k, packed.data(), scales.data(), mins.data());
        CHECK(std::memcmp(mins.data(), w.mins, mins.size() * 2) == 0);
      } else {
        qkd::int4_from_q4_0(blocks, w.n, w.k, packed.data(), scales.data());
      }
      CHECK(std::memcmp(packed.data(), w.packed, packed.size() * 4) == 0);
      CHECK(std::memcmp(scales.data(), w.scales, scales.size() * 2) == 0);
    } else if (name.find("norm") != std::string::npos) {
      CHECK(v.dtype == DType::F32);
      CHECK(qkd::to_f32(v) == qkd::to_f32(*t));
    } else {
      REQUIRE(v.dtype == t->dtype);
      REQUIRE(v.nbytes == t->nbytes);
      CHECK(std::memcmp(v.data, t->data, v.nbytes) == 0);
    }
  }
}

std::vector<float> last_logits(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  qkd::runtime::ModelOptions opt;
  opt.ctx = static_cast<int>(tokens.size());
  opt.backend = qkd::runtime::BackendKind::Cpu;
  auto model = qkd::runtime::make_cpu_model(w, opt);
  std::vector<float> logits(tokens.size() * static_cast<size_t>(w.config.vocab_size));
  const int32_t start = 0;
  model->forward(tokens, 1, static_cast<int>(tokens.size()), {&start, 1}, qkd::runtime::LogitsMode::All, logits.data());
  return logits;
}

}  // namespace

TEST_CASE("GgufWriter: every value type and tensor dtype reads back through GgufFile") {
  TempDir dir;
  qkd::GgufWriter g;
  g.add_string("s", "h\xC3\xA9llo");
  g.add_u32("u", 4000000000u);
  g.add_i32("i", -7);
  g.add_f32("f", 0.1f);
  g.add_bool("b", true);
  g.add_string_array("sa", {"a", "", "ccc"});
  g.add_f32_array("fa", {1.5f, -2.0f});
  g.add_i32_array("ia", {1, -1, 3});
  CHECK_ERROR_CONTAINS(g.add_u32("u", 1), "'u'", "given twice");
  std::vector<float> f32{1, 2, 3, 4, 5, 6};
  std::vector<uint16_t> bf16{0x3F80, 0x4000, 0x4040};  // 1, 2, 3
  std::vector<std::byte> q40(18 * 2);                   // two Q4_0 blocks: a row of 64
  for (size_t i = 0; i < q40.size(); ++i) q40[i] = static_cast<std::byte>(i * 7);
  g.add_tensor("a", DType::F32, {2, 3}, reinterpret_cast<const std::byte*>(f32.data()), 24);
  g.add_tensor("b", DType::BF16, {3}, reinterpret_cast<const std::byte*>(bf16.data()), 6);
  g.add_tensor("c", DType::Q4_0, {1, 64}, q40.data(), q40.size());
  CHECK_ERROR_CONTAINS(g.add_tensor("d", DType::F32, {2, 3}, q40.data(), 20), "'d'", "needs 24 bytes, got 20");
  g.write(dir / "w.gguf", qkd::Overwrite::Refuse);

  // A second writer copies every value through add_value, nested arrays included.
  const GgufFile f = GgufFile::open(dir / "w.gguf");
  qkd::GgufWriter copy;
  for (const auto& [key, value] : f.metadata()) copy.add_value(std::string(key), value);
  copy.write(dir / "copy.gguf", qkd::Overwrite::Refuse);
  for (const std::string& path : {dir / "w.gguf", dir / "copy.gguf"}) {
    INFO(path);
    const GgufFile r = GgufFile::open(path);
    CHECK(r.version() == 3);
    CHECK(r.get_string("s") == "h\xC3\xA9llo");
    CHECK(r.get_uint("u") == 4000000000u);
    CHECK(r.get_int("i") == -7);
    CHECK(r.get_float("f") == 0.1f);
    CHECK(r.get_bool("b"));
    CHECK(r.get_string_array("sa") == std::vector<std::string_view>{"a", "", "ccc"});
    CHECK(r.get_float_array("fa") == std::vector<float>{1.5f, -2.0f});
    CHECK(r.get_int_array("ia") == std::vector<int64_t>{1, -1, 3});
  }
  const GgufFile r = GgufFile::open(dir / "w.gguf");
  REQUIRE(r.tensors().size() == 3);
  const TensorView a = r.view(*r.find_tensor("a")), b = r.view(*r.find_tensor("b")), c = r.view(*r.find_tensor("c"));
  CHECK(a.shape == std::vector<int64_t>{2, 3});
  CHECK(qkd::to_f32(a) == f32);
  CHECK(qkd::to_f32(b) == std::vector<float>{1, 2, 3});
  CHECK(c.dtype == DType::Q4_0);
  CHECK(std::memcmp(c.data, q40.data(), q40.size()) == 0);
  for (const auto& t : r.tensors()) CHECK(t.offset % 32 == 0);
}

TEST_CASE("export of the tiny GGUF model: Q4_0 and Q4_1 bit for bit, tokenizer carried over, same logits") {
  const std::string src_path = fixture("gguf/tiny-llama.gguf");
  const ModelWeights src = qkd::load_model(src_path);
  const GgufFile src_file = GgufFile::open(src_path);
  TempDir dir;
  for (const Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    const bool asym = sym == Int4Symmetry::Asymmetric;
    INFO("export as " << (asym ? "Q4_1" : "Q4_0"));
    const qkd::Int4Quantized q = qkd::quantize_model_int4(src, qkd::gguf_q4_params(sym));
    const std::string out = dir / (asym ? "q41.gguf" : "q40.gguf");
    qkd::export_gguf(out, q, qkd::Overwrite::Refuse);
    const GgufFile f = GgufFile::open(out);
    CHECK(f.get_string("general.architecture") == "llama");
    CHECK(f.get_uint("general.file_type") == (asym ? 3u : 2u));
    check_tensors(f, q);

    // the source's own Q4_0 (Q4_1) blocks come out unchanged
    DType exact = asym ? DType::Q4_1 : DType::Q4_0;
    int same = 0;
    for (const auto& t : src_file.tensors()) {
      if (t.dtype != exact) continue;
      const TensorView v = f.view(*f.find_tensor(t.name));
      INFO(t.name);
      REQUIRE(v.nbytes == t.nbytes);
      CHECK(std::memcmp(v.data, t.data, t.nbytes) == 0);
      ++same;
    }
    CHECK(same == 4);

    // every tokenizer key, byte for byte the same values
    int keys = 0;
    for (const auto& [key, value] : src_file.metadata()) {
      if (key.rfind("tokenizer.", 0) != 0) continue;
      ++keys;
      REQUIRE(f.has(key));
      CHECK(f.find(key)->type == value.type);
    }
    CHECK(keys >= 3);
    const qkd::GgufVocab a = qkd::read_gguf_vocab(src_file), b = qkd::read_gguf_vocab(f);
    CHECK(a.tokens == b.tokens);
    CHECK(a.scores == b.scores);
    CHECK(a.types == b.types);
    CHECK(a.bos_id == b.bos_id);
    CHECK(a.eos_id == b.eos_id);

    const ModelWeights back = qkd::load_model(out);
    CHECK(back.format == "gguf");
    CHECK(back.config.dim == src.config.dim);
    CHECK(back.config.n_kv_heads == src.config.n_kv_heads);
    CHECK(back.config.ffn_dim == src.config.ffn_dim);
    CHECK(back.config.rope_theta == src.config.rope_theta);
    CHECK(back.config.norm_eps == src.config.norm_eps);
    CHECK(back.config.max_seq_len == src.config.max_seq_len);
    const std::vector<int32_t> tokens{1, 17, 200, 5, 99, 3, 250, 42};
    // Q4_0 / Q4_1 dequantize to the int4 format's exact fp32 values, so the CPU model is the same model.
    CHECK(last_logits(back, tokens) == last_logits(q.weights, tokens));
  }
}

TEST_CASE("export from sentencepiece and llama2.c tokenizers, with padding and the chat template") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string data = qkd::test::shared_data();
  TempDir dir;
  const std::vector<std::string> texts{"Once upon a time, there was a little girl.", "Hello world",
                                       "the king's 3 dogs"};

  SUBCASE("teacher-25m with tokenizer.model") {
    const std::string teacher = data + "/models/teacher-25m";
    const ModelWeights src = qkd::load_model(teacher);
    const qkd::Int4Quantized q = qkd::quantize_model_int4(src, qkd::gguf_q4_params(Int4Symmetry::Symmetric));
    qkd::export_gguf(dir / "t.gguf", q, qkd::Overwrite::Refuse);
    const GgufFile f = GgufFile::open(dir / "t.gguf");
    check_tensors(f, q);
    const auto sp = qkd::load_tokenizer(teacher + "/tokenizer.model");
    const auto gt = qkd::load_gguf_tokenizer(f);
    REQUIRE(gt->vocab_size() == sp->vocab_size());
    for (int32_t id : {0, 1, 2, 3, 300, 1000, 31999}) CHECK(gt->id_to_piece(id) == sp->id_to_piece(id));
    for (const std::string& t : texts) CHECK(gt->encode(t, true) == sp->encode(t, true));
    const std::vector<int32_t> tokens = sp->encode(texts[0], true);
    CHECK(last_logits(qkd::load_model(dir / "t.gguf"), tokens) == last_logits(q.weights, tokens));
  }
  SUBCASE("stories260K with llama2.c's tok512.bin") {
    const std::string model = data + "/models/stories260K/stories260K.bin";
    const ModelWeights src = qkd::load_model(model);
    const qkd::Int4Quantized q =
        qkd::quantize_model_int4(src, qkd::gguf_q4_params(Int4Symmetry::Asymmetric,
                                                          qkd::parse_int4_modules("q,k,v,o", "m")));
    qkd::export_gguf(dir / "s.gguf", q, qkd::Overwrite::Refuse);
    const GgufFile f = GgufFile::open(dir / "s.gguf");
    check_tensors(f, q);
    const qkd::GgufVocab v = qkd::read_gguf_vocab(f);
    REQUIRE(v.tokens.size() == 512);
    CHECK(v.tokens[0] == "<unk>");
    CHECK(v.tokens[1] == "<s>");
    CHECK(v.tokens[2] == "</s>");
    CHECK(v.tokens[3 + 0x41] == "<0x41>");
    CHECK(v.types[1] == qkd::TokenType::Control);
    CHECK(v.types[3 + 0x41] == qkd::TokenType::Byte);
    const auto l2c = qkd::load_tokenizer(data + "/models/stories260K/tok512.bin", 512);
    const auto gt = qkd::load_gguf_tokenizer(f);
    for (const std::string& t : texts) CHECK(gt->encode(t, true) == l2c->encode(t, true));
  }
  SUBCASE("a vocabulary smaller than the model is padded; tokenizer_config.json gives the chat template") {
    // the tiny HF model (vocab 128) with babyllama's 105-piece sentencepiece vocabulary beside it
    const fs::path hf = dir.path / "hf";
    fs::create_directories(hf);
    for (const char* f : {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                          "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"})
      fs::copy_file(fixture("hf/tiny-llama/") + f, hf / f);
    fs::copy_file(data + "/models/babyllama-tok105/tok105.model", hf / "tokenizer.model");
    std::ofstream(hf / "tokenizer_config.json") << R"({"chat_template": "{{ messages }}", "add_bos_token": false})";
    const qkd::Int4Quantized q =
        qkd::quantize_model_int4(qkd::load_model(hf.string()), qkd::gguf_q4_params(Int4Symmetry::Symmetric));
    qkd::export_gguf(dir / "p.gguf", q, qkd::Overwrite::Refuse);
    const GgufFile f = GgufFile::open(dir / "p.gguf");
    const qkd::GgufVocab v = qkd::read_gguf_vocab(f);
    REQUIRE(v.tokens.size() == 128);
    CHECK(v.tokens[105] == "[PAD105]");
    CHECK(v.types[127] == qkd::TokenType::Unused);
    CHECK(f.get_string("tokenizer.chat_template") == "{{ messages }}");
    CHECK_FALSE(f.get_bool("tokenizer.ggml.add_bos_token"));
  }
}

TEST_CASE("export refuses what GGUF cannot hold and outputs it must not touch") {
  const ModelWeights src = qkd::load_model(fixture("gguf/tiny-llama.gguf"));
  TempDir dir;
  Int4Params bf16 = qkd::gguf_q4_params(Int4Symmetry::Symmetric);
  bf16.scale_type = ScaleType::BF16;
  CHECK_ERROR_CONTAINS(qkd::export_gguf(dir / "x.gguf", qkd::quantize_model_int4(src, bf16), qkd::Overwrite::Refuse),
                       "group 32 with fp16 scales", "bf16");
  // down's k is ffn_dim 64
  Int4Params g64 = qkd::gguf_q4_params(Int4Symmetry::Symmetric, qkd::parse_int4_modules("down", "m"));
  g64.group_size = 64;
  CHECK_ERROR_CONTAINS(qkd::export_gguf(dir / "x.gguf", qkd::quantize_model_int4(src, g64), qkd::Overwrite::Refuse),
                       "group 64");
  qkd::Int4Quantized llama3 = qkd::quantize_model_int4(src, qkd::gguf_q4_params(Int4Symmetry::Symmetric));
  llama3.weights.config.rope_scaling.type = qkd::RopeScalingType::Llama3;
  CHECK_ERROR_CONTAINS(qkd::export_gguf(dir / "x.gguf", llama3, qkd::Overwrite::Refuse), "llama3 RoPE scaling");
  CHECK_FALSE(fs::exists(dir / "x.gguf"));

  // the tiny HF fixture has no tokenizer, and a GGUF without one is no use to llama.cpp
  const qkd::Int4Quantized hf = qkd::quantize_model_int4(qkd::load_model(fixture("hf/tiny-llama")),
                                                         qkd::gguf_q4_params(Int4Symmetry::Symmetric));
  CHECK_ERROR_CONTAINS(qkd::export_gguf(dir / "x.gguf", hf, qkd::Overwrite::Refuse), "no tokenizer found");

  const qkd::Int4Quantized q = qkd::quantize_model_int4(src, qkd::gguf_q4_params(Int4Symmetry::Symmetric));
  qkd::export_gguf(dir / "a.gguf", q, qkd::Overwrite::Refuse);
  CHECK_ERROR_CONTAINS(qkd::export_gguf(dir / "a.gguf", q, qkd::Overwrite::Refuse), "already exists");
  qkd::export_gguf(dir / "a.gguf", q, qkd::Overwrite::Replace);
  std::ofstream(dir / "notes.txt") << "mine";
  CHECK_ERROR_CONTAINS(qkd::export_gguf(dir / "notes.txt", q, qkd::Overwrite::Replace), "not a GGUF file");
  CHECK(qkd::read_text_file(dir / "notes.txt") == "mine");
  for (const auto& e : fs::directory_iterator(dir.path))
    CHECK_MESSAGE(e.path().filename().string().find(".tmp.") == std::string::npos, e.path().string());
}
