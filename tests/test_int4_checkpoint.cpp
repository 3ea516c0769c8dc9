// qkd int4 checkpoints (loader/int4_checkpoint.h): quantize, write, reload bit for bit; the int4 model's CPU logits
// against a model built in the test from int4_quantize + dequantize_int4 of the original weights (no checkpoint
// code on that path); teacher-25m perplexity; every malformed checkpoint rejected with a message that names the
// file, the tensor or key, and the value; the overwrite policy and atomicity of the writer.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <unistd.h>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/int4_gemm.h"
#include "loader/bundle.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/hf_checkpoint.h"
#include "loader/int4_checkpoint.h"
#include "loader/mmap_file.h"
#include "loader/safetensors.h"
#include "runtime/eval.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using qkd::DType;
using qkd::Int4Module;
using qkd::Int4Params;
using qkd::Int4Symmetry;
using qkd::ModelWeights;
using qkd::ScaleType;
using qkd::TensorView;

namespace {

std::string tiny_hf() { return qkd::test::fixtures_dir() + "/hf/tiny-llama"; }
std::string tiny_gguf(const char* name) { return qkd::test::fixtures_dir() + "/gguf/" + name; }

// A fresh directory under the system temp dir, removed at scope exit.
using qkd::test::error_of;
using qkd::test::TempDir;

// The message of the qkd::Error that f throws ("" when it throws none).
std::vector<const TensorView*> all_views(const ModelWeights& w) {
  std::vector<const TensorView*> v{&w.tok_embeddings};
  for (const qkd::LayerWeights& l : w.layers)
    for (const TensorView* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down})
      v.push_back(t);
  v.push_back(&w.norm);
  v.push_back(&w.lm_head);
  return v;
}

// Same dtype, shape and bytes; for int4 also the same scales, mins and parameters.
void check_same_bits(const ModelWeights& a, const ModelWeights& b) {
  const auto va = all_views(a), vb = all_views(b);
  for (size_t i = 0; i < va.size(); ++i) {
    const TensorView &x = *va[i], &y = *vb[i];
    INFO("tensor " << x.name << " vs " << y.name);
    REQUIRE(x.dtype == y.dtype);
    REQUIRE(x.shape == y.shape);
    REQUIRE(x.nbytes == y.nbytes);
    CHECK(std::memcmp(x.data, y.data, x.nbytes) == 0);
    if (x.dtype != DType::I4) continue;
    const qkd::Int4Weight p = x.int4_weight(), q = y.int4_weight();
    CHECK(p.group_size == q.group_size);
    CHECK(p.sym == q.sym);
    CHECK(p.scale_type == q.scale_type);
    const size_t sb = static_cast<size_t>(qkd::int4_scales_bytes(p.n, p.k, p.group_size));
    CHECK(std::memcmp(p.scales, q.scales, sb) == 0);
    REQUIRE((p.mins == nullptr) == (q.mins == nullptr));
    if (p.mins != nullptr) CHECK(std::memcmp(p.mins, q.mins, sb) == 0);
  }
}

void check_same_config(const qkd::ModelConfig& a, const qkd::ModelConfig& b) {
  CHECK(a.dim == b.dim);
  CHECK(a.n_layers == b.n_layers);
  CHECK(a.n_heads == b.n_heads);
  CHECK(a.n_kv_heads == b.n_kv_heads);
  CHECK(a.head_dim == b.head_dim);
  CHECK(a.ffn_dim == b.ffn_dim);
  CHECK(a.vocab_size == b.vocab_size);
  CHECK(a.max_seq_len == b.max_seq_len);
  CHECK(a.norm_eps == b.norm_eps);
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.rope_scaling.type == b.rope_scaling.type);
  CHECK(a.rope_scaling.factor == b.rope_scaling.factor);
  CHECK(a.rope_scaling.low_freq_factor == b.rope_scaling.low_freq_factor);
  CHECK(a.rope_scaling.high_freq_factor == b.rope_scaling.high_freq_factor);
  CHECK(a.rope_scaling.original_max_position == b.rope_scaling.original_max_position);
  CHECK(a.tied_embeddings == b.tied_embeddings);
  CHECK(a.bos_id == b.bos_id);
  CHECK(a.eos_ids == b.eos_ids);
}

Int4Params params(int group, Int4Symmetry sym, ScaleType st, qkd::Int4ModuleSet modules = qkd::kInt4LinearModules) {
  Int4Params p;
  p.group_size = group;
  p.sym = sym;
  p.scale_type = st;
  p.modules = modules;
  return p;
}

// Replaces t's data by dequantize_int4(int4_quantize(t)) in fp32, owned by w: the reference path.
void reference_int4(TensorView& t, const Int4Params& p, ModelWeights& w) {
  const std::vector<float> x = qkd::to_f32(t);
  const int n = static_cast<int>(t.shape[0]), k = static_cast<int>(t.shape[1]);
  const qkd::Int4HostWeight q = qkd::int4_quantize(x.data(), n, k, p.group_size, p.sym, p.scale_type);
  auto out = std::make_shared<std::vector<float>>(x.size());
  qkd::cpu::dequantize_int4(q.view(), out->data());
  t.dtype = DType::F32;
  t.data = reinterpret_cast<const std::byte*>(out->data());
  t.nbytes = out->size() * sizeof(float);
  w.storage.push_back(out);
}

std::vector<float> logits_all(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  qkd::runtime::ModelOptions opt;
  opt.ctx = static_cast<int>(tokens.size());
  opt.backend = qkd::runtime::BackendKind::Cpu;
  auto model = qkd::runtime::make_cpu_model(w, opt);
  std::vector<float> logits(tokens.size() * static_cast<size_t>(w.config.vocab_size));
  const int32_t start = 0;
  model->forward(tokens, 1, static_cast<int>(tokens.size()), {&start, 1}, qkd::runtime::LogitsMode::All, logits.data());
  return logits;
}

// A copy of a checkpoint directory's model.safetensors with its tensors and metadata edited, in `dir`.
std::string rewrite(const std::string& ckpt, const TempDir& dir, const std::string& name,
                    const std::function<void(std::vector<TensorView>&, std::map<std::string, std::string>&)>& edit) {
  const auto st = qkd::SafetensorsFile::open(ckpt + "/model.safetensors");
  std::vector<TensorView> tensors = st->tensors();
  std::map<std::string, std::string> meta = st->metadata();
  edit(tensors, meta);
  const std::string out = dir / name;
  qkd::write_safetensors(out, tensors, meta);
  return out;
}

TensorView* find(std::vector<TensorView>& ts, const std::string& name) {
  for (TensorView& t : ts)
    if (t.name == name) return &t;
  FAIL("no tensor " << name);
  return nullptr;
}

}  // namespace

TEST_CASE("module lists parse and print") {
  CHECK(qkd::parse_int4_modules("q,k,v,o,gate,up,down", "m") == qkd::kInt4LinearModules);
  CHECK(qkd::format_int4_modules(qkd::kInt4LinearModules) == "q,k,v,o,gate,up,down");
  CHECK(qkd::format_int4_modules(qkd::parse_int4_modules("lm_head,q,embed", "m")) == "q,embed,lm_head");
  CHECK(qkd::parse_int4_modules("", "m") == 0);
  CHECK_ERROR_CONTAINS(qkd::parse_int4_modules("q,x", "--modules"), "--modules", "unknown module 'x'");
  CHECK_ERROR_CONTAINS(qkd::parse_int4_modules("q,k,q", "--modules"), "'q' is listed twice");
  CHECK_ERROR_CONTAINS(qkd::parse_int4_modules("q,", "--modules"), "ends with a comma");
}

TEST_CASE("the config survives its Hugging Face JSON form") {
  qkd::ModelConfig c;
  c.dim = 4096;
  c.n_layers = 32;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.ffn_dim = 14336;
  c.vocab_size = 128256;
  c.max_seq_len = 131072;
  c.norm_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.rope_scaling = {qkd::RopeScalingType::Llama3, 8.0f, 1.0f, 4.0f, 8192};
  c.bos_id = 128000;
  c.eos_ids = {128001, 128008, 128009};
  check_same_config(qkd::parse_hf_config(qkd::model_config_to_hf_json(c), "json"), c);
  c.rope_scaling = {qkd::RopeScalingType::Linear, 4.0f};
  c.tied_embeddings = true;
  c.norm_eps = 1e-6f;
  c.eos_ids = {2};
  check_same_config(qkd::parse_hf_config(qkd::model_config_to_hf_json(c), "json"), c);
}

TEST_CASE("tiny HF model: write and reload are bit-identical, for every parameter kind") {
  const ModelWeights src = qkd::load_model(tiny_hf());
  const qkd::Int4ModuleSet all = qkd::kInt4LinearModules | qkd::int4_module_bit(Int4Module::Embed) |
                                 qkd::int4_module_bit(Int4Module::LmHead);
  const Int4Params cases[] = {
      params(32, Int4Symmetry::Symmetric, ScaleType::BF16),
      params(32, Int4Symmetry::Asymmetric, ScaleType::FP16),
      params(qkd::kInt4PerChannel, Int4Symmetry::Symmetric, ScaleType::FP16, all),
      params(64, Int4Symmetry::Asymmetric, ScaleType::BF16,
             qkd::parse_int4_modules("q,k,v,o,gate,up,embed,lm_head", "m")),  // down's k = 96 is not a multiple of 64
  };
  for (const Int4Params& p : cases) {
    INFO("group " << p.group_size << " sym " << int(p.sym) << " scale " << int(p.scale_type) << " modules "
                  << qkd::format_int4_modules(p.modules));
    TempDir dir("bits");
    const qkd::Int4Quantized q = qkd::quantize_model_int4(src, p);
    const std::string out = dir / "ckpt";
    qkd::write_int4_checkpoint(out, q, qkd::int4_companion_files(src), qkd::Overwrite::Refuse);
    CHECK(qkd::is_int4_checkpoint(out));
    CHECK(qkd::is_int4_checkpoint(out + "/model.safetensors"));
    CHECK_FALSE(qkd::is_int4_checkpoint(tiny_hf()));
    CHECK(fs::exists(out + "/config.json"));
    CHECK(fs::exists(out + "/generation_config.json"));  // copied from the source

    const ModelWeights back = qkd::load_model(out);  // load_model recognises the checkpoint directory
    CHECK(back.format == "qkd-int4");
    check_same_config(back.config, src.config);
    check_same_bits(q.weights, back);
    check_same_bits(q.weights, qkd::load_model(out + "/model.safetensors"));
    // unquantized tensors keep the source's bytes and dtype (the fixture is fp32)
    CHECK(back.norm.dtype == src.norm.dtype);
    CHECK(std::memcmp(back.norm.data, src.norm.data, src.norm.nbytes) == 0);
    // config.json beside it says the same as the metadata
    check_same_config(qkd::load_hf_config(out + "/config.json"), src.config);
    const auto meta = qkd::SafetensorsFile::open(out + "/model.safetensors")->metadata();
    CHECK(meta.at("format") == "qkd-int4");
    CHECK(meta.at("format_version") == "1");
    CHECK(meta.at("bits") == "4");
    CHECK(meta.at("rope_layout") == "interleaved");
    CHECK(meta.at("quantized_modules") == qkd::format_int4_modules(p.modules));
    CHECK(meta.at("source_model") == tiny_hf());
    CHECK(meta.at("source_format") == "hf");
  }
}

TEST_CASE("int4 logits on the CPU equal a model built from int4_quantize + dequantize_int4 of the original") {
  const ModelWeights src = qkd::load_model(tiny_hf());
  const qkd::Int4ModuleSet with_head = qkd::kInt4LinearModules | qkd::int4_module_bit(Int4Module::LmHead) |
                                       qkd::int4_module_bit(Int4Module::Embed);
  const Int4Params cases[] = {params(32, Int4Symmetry::Symmetric, ScaleType::BF16),
                              params(qkd::kInt4PerChannel, Int4Symmetry::Asymmetric, ScaleType::FP16, with_head)};
  std::vector<int32_t> tokens;
  for (int i = 0; i < 24; ++i) tokens.push_back((i * 37 + 5) % src.config.vocab_size);
  for (const Int4Params& p : cases) {
    INFO("group " << p.group_size << " modules " << qkd::format_int4_modules(p.modules));
    TempDir dir("logits");
    qkd::write_int4_checkpoint(dir / "ckpt", qkd::quantize_model_int4(src, p), {}, qkd::Overwrite::Refuse);
    const ModelWeights int4 = qkd::load_model(dir / "ckpt");

    ModelWeights ref = src;
    for (qkd::LayerWeights& l : ref.layers)
      for (TensorView* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) reference_int4(*t, p, ref);
    if (p.modules & qkd::int4_module_bit(Int4Module::Embed)) reference_int4(ref.tok_embeddings, p, ref);
    if (p.modules & qkd::int4_module_bit(Int4Module::LmHead)) reference_int4(ref.lm_head, p, ref);

    const std::vector<float> got = logits_all(int4, tokens), want = logits_all(ref, tokens);
    // Both paths hand the CPU backend the same fp32 weights, so the logits agree exactly.
    double max_diff = 0.0;
    size_t first_bad = got.size();
    for (size_t i = 0; i < got.size(); ++i) {
      const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
      if (d > 0 && first_bad == got.size()) first_bad = i;
      max_diff = std::max(max_diff, d);
    }
    INFO("max |diff| " << max_diff << ", first mismatch at " << first_bad);
    CHECK(max_diff == 0.0);
    // and quantization did change them: the reference is not the fp32 model
    const std::vector<float> fp32 = logits_all(src, tokens);
    CHECK(fp32 != want);
  }
}

TEST_CASE("GGUF sources: Q4_0 / Q4_1 weights are taken bit for bit, tied embeddings untie when only one is int4") {
  const ModelWeights src = qkd::load_model(tiny_gguf("tiny-llama.gguf"));
  for (const Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    const qkd::Int4Quantized q = qkd::quantize_model_int4(src, params(32, sym, ScaleType::FP16));
    const DType exact = sym == Int4Symmetry::Symmetric ? DType::Q4_0 : DType::Q4_1;
    int copied = 0;
    const auto vs = all_views(src), vq = all_views(q.weights);
    for (size_t i = 0; i < vs.size(); ++i) {
      if (vs[i]->dtype != exact || vq[i]->dtype != DType::I4) continue;
      const qkd::Int4Weight w = vq[i]->int4_weight();
      // the source blocks, dequantized by the GGUF reader, equal the int4 weight's values exactly
      std::vector<float> a = qkd::to_f32(*vs[i]), b(a.size());
      qkd::cpu::dequantize_int4(w, b.data());
      INFO(vs[i]->name);
      CHECK(a == b);
      ++copied;
    }
    CHECK(copied >= 2);
  }
  TempDir dir("gguf");
  const qkd::Int4Quantized q = qkd::quantize_model_int4(src, params(32, Int4Symmetry::Symmetric, ScaleType::FP16));
  qkd::write_int4_checkpoint(dir / "a", q, {}, qkd::Overwrite::Refuse);
  const ModelWeights back = qkd::load_model(dir / "a");
  // GGUF block types that stay unquantized (Q8_0 embeddings) are stored as their exact fp32 values
  CHECK(back.tok_embeddings.dtype == DType::F32);
  CHECK(qkd::to_f32(back.tok_embeddings) == qkd::to_f32(src.tok_embeddings));
  CHECK(qkd::int4_companion_files(src).empty());
  // the tokenizer, which a GGUF keeps inside, comes along as a vocabulary-only GGUF
  const qkd::GgufVocab want = qkd::read_gguf_vocab(qkd::GgufFile::open(tiny_gguf("tiny-llama.gguf")));
  const qkd::GgufVocab got = qkd::read_gguf_vocab(qkd::GgufFile::open(dir / "a/tokenizer.gguf"));
  CHECK(got.model == want.model);
  CHECK(got.tokens == want.tokens);
  CHECK(got.scores == want.scores);
  CHECK(got.types == want.types);
  CHECK(got.bos_id == want.bos_id);
  CHECK(got.eos_id == want.eos_id);
  CHECK(qkd::load_gguf_tokenizer(dir / "a/tokenizer.gguf")->vocab_size() == src.config.vocab_size);

  const ModelWeights tied = qkd::load_model(tiny_gguf("tiny-llama-tied.gguf"));
  REQUIRE(tied.config.tied_embeddings);
  const qkd::Int4Quantized qe = qkd::quantize_model_int4(
      tied, params(32, Int4Symmetry::Symmetric, ScaleType::BF16,
                   qkd::kInt4LinearModules | qkd::int4_module_bit(Int4Module::Embed)));
  CHECK_FALSE(qe.weights.config.tied_embeddings);
  CHECK(qe.weights.tok_embeddings.dtype == DType::I4);
  CHECK(qkd::to_f32(qe.weights.lm_head) == qkd::to_f32(tied.tok_embeddings));
  qkd::write_int4_checkpoint(dir / "tied", qe, {}, qkd::Overwrite::Refuse);
  const ModelWeights tb = qkd::load_model(dir / "tied");
  CHECK_FALSE(tb.config.tied_embeddings);
  check_same_bits(qe.weights, tb);
}

TEST_CASE("teacher-25m int4 g128: bit-identical reload, perplexity close to bf16") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string teacher = qkd::test::shared_data() + "/models/teacher-25m";
  const ModelWeights src = qkd::load_model(teacher);
  const qkd::Int4Quantized q = qkd::quantize_model_int4(src, params(128, Int4Symmetry::Symmetric, ScaleType::BF16));
  for (const qkd::Int4ModuleError& e : q.errors) {
    INFO(qkd::int4_module_name(e.module) << " rel rms " << e.rel_rms());
    // RTN onto 16 levels of a near-Gaussian group: about 0.1 relative; far more would mean a broken quantizer
    CHECK(e.rel_rms() > 0.0);
    CHECK(e.rel_rms() < 0.2);
  }
  TempDir dir("teacher");
  qkd::write_int4_checkpoint(dir / "ckpt", q, qkd::int4_companion_files(src), qkd::Overwrite::Refuse);
  check_same_bits(q.weights, qkd::load_model(dir / "ckpt"));

  const std::string text = qkd::read_text_file(qkd::test::fixtures_dir() + "/hf/eval.txt");
  auto ppl = [&](const std::string& model_path) {
    const qkd::ModelBundle b = qkd::load_bundle(model_path);  // the int4 one finds its copied tokenizer.model
    qkd::runtime::ModelOptions opt;
    opt.ctx = 128;
    opt.max_batch = 4;
    opt.backend = qkd::runtime::BackendKind::Cpu;
    auto model = qkd::runtime::make_cpu_model(b.weights, opt);
    const auto docs = qkd::runtime::split_documents(text);
    return qkd::runtime::evaluate(*model, qkd::runtime::tokenize_documents(*b.tokenizer, docs), 128);
  };
  const qkd::runtime::EvalResult base = ppl(teacher), int4 = ppl(dir / "ckpt");
  MESSAGE(fmt::format("teacher-25m on eval.txt, ctx 128: bf16 ppl {:.4f} (nll {:.5f}), int4 g128 ppl {:.4f} "
                      "(nll {:.5f})", base.perplexity, base.mean_nll, int4.perplexity, int4.mean_nll));
  CHECK(int4.n_tokens == base.n_tokens);
  CHECK(std::isfinite(int4.mean_nll));
  // Round-to-nearest int4 at group 128 costs LLaMA-7B about 3% perplexity; a 25M model is more fragile, but past
  // +0.2 nats (22%) the quantizer or the loader is wrong rather than merely lossy.
  CHECK(int4.mean_nll - base.mean_nll < 0.2);
  CHECK(int4.mean_nll - base.mean_nll > -0.05);
}

TEST_CASE("malformed checkpoints are rejected with precise errors") {
  const ModelWeights src = qkd::load_model(tiny_hf());
  TempDir dir("bad");
  const std::string good = dir / "good";
  qkd::write_int4_checkpoint(good, qkd::quantize_model_int4(src, params(32, Int4Symmetry::Symmetric, ScaleType::BF16)),
                             {}, qkd::Overwrite::Refuse);
  REQUIRE_NOTHROW(qkd::load_int4_checkpoint(good));
  using Tensors = std::vector<TensorView>;
  using Meta = std::map<std::string, std::string>;

  SUBCASE("truncated file") {
    const std::string bytes = qkd::read_text_file(good + "/model.safetensors");
    const std::string cut = dir / "cut.safetensors";
    std::ofstream(cut, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() - 100));
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(cut), cut, "exceed the");
    std::ofstream(cut, std::ios::binary).write(bytes.data(), 4);
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(cut), cut, "too short");
  }
  SUBCASE("metadata") {
    const std::pair<const char*, const char*> edits[] = {
        {"format", "qkd-int8"}, {"format_version", "2"}, {"bits", "8"}, {"group_size", "48"},
        {"symmetric", "yes"},   {"scale_type", "fp32"},  {"rope_layout", "rotate_half"},
        {"quantized_modules", "q,x"}, {"config", "{"}};
    const char* expected[] = {"'format' is 'qkd-int8', expected 'qkd-int4'",
                              "'format_version' is '2'; this qkd reads version 1",
                              "'bits' is '8', expected '4'",
                              "'group_size' is '48', expected one of 32, 64, 128, channel",
                              "'symmetric' is 'yes'",
                              "'scale_type' is 'fp32'",
                              "'rope_layout' is 'rotate_half'",
                              "unknown module 'x'",
                              "__metadata__ 'config': not valid JSON"};
    for (size_t i = 0; i < std::size(edits); ++i) {
      const std::string f = rewrite(good, dir, fmt::format("meta{}.safetensors", i),
                                    [&](Tensors&, Meta& m) { m[edits[i].first] = edits[i].second; });
      CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, expected[i]);
    }
    const std::string f = rewrite(good, dir, "noformat.safetensors", [](Tensors&, Meta& m) { m.erase("format"); });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "__metadata__ has no 'format'");
  }
  SUBCASE("group size that does not divide k") {
    const std::string f = rewrite(good, dir, "g128.safetensors", [](Tensors&, Meta& m) { m["group_size"] = "128"; });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "model.layers.0.self_attn.q_proj.qweight",
                         "k 64 is not a multiple of group_size 128");
  }
  SUBCASE("shapes against the config and the group size") {
    std::string f = rewrite(good, dir, "shape.safetensors", [](Tensors& t, Meta&) {
      find(t, "model.layers.1.mlp.gate_proj.qweight")->shape = {192, 4};  // same bytes, wrong shape
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.1.mlp.gate_proj.qweight'",
                         "shape [192, 4]", "[96, 8]");
    f = rewrite(good, dir, "scales.safetensors", [](Tensors& t, Meta&) {
      find(t, "model.layers.0.mlp.down_proj.scales")->shape = {32, 6};  // [64, 3] re-cut
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.0.mlp.down_proj.scales'", "shape [32, 6]",
                         "group_size 32", "[64, 3]");
    f = rewrite(good, dir, "config.safetensors", [](Tensors&, Meta& m) {
      qkd::ModelConfig c = qkd::parse_hf_config(m["config"], "x");
      c.ffn_dim = 128;
      m["config"] = qkd::model_config_to_hf_json(c);
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.0.mlp.gate_proj.qweight'", "[128, 8]");
    f = rewrite(good, dir, "norm.safetensors", [](Tensors& t, Meta&) {
      TensorView* n = find(t, "model.norm.weight");
      n->shape = {16, 4};
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.norm.weight'", "shape [16, 4]");
  }
  SUBCASE("dtypes") {
    std::string f = rewrite(good, dir, "qdtype.safetensors", [](Tensors& t, Meta&) {
      find(t, "model.layers.0.self_attn.k_proj.qweight")->dtype = DType::F32;
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.0.self_attn.k_proj.qweight'",
                         "dtype F32, expected I32");
    f = rewrite(good, dir, "sdtype.safetensors", [](Tensors&, Meta& m) { m["scale_type"] = "fp16"; });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.0.self_attn.q_proj.scales'",
                         "dtype BF16, expected F16");
  }
  SUBCASE("missing, unexpected and inconsistent tensors") {
    std::string f = rewrite(good, dir, "missing.safetensors", [](Tensors& t, Meta&) {
      t.erase(t.begin() + (find(t, "model.layers.1.mlp.down_proj.scales") - t.data()));
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "tensor 'model.layers.1.mlp.down_proj.scales' is missing");
    f = rewrite(good, dir, "nonorm.safetensors",
                [](Tensors& t, Meta&) { t.erase(t.begin() + (find(t, "model.norm.weight") - t.data())); });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "tensor 'model.norm.weight' is missing");
    f = rewrite(good, dir, "extra.safetensors", [](Tensors& t, Meta&) {
      TensorView e = *find(t, "model.norm.weight");
      e.name = "model.extra.weight";
      t.push_back(e);
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "unexpected tensor 'model.extra.weight'");
    f = rewrite(good, dir, "nomins.safetensors", [](Tensors&, Meta& m) { m["symmetric"] = "false"; });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "tensor 'model.layers.0.self_attn.q_proj.mins' is missing");
    f = rewrite(good, dir, "mins.safetensors", [](Tensors& t, Meta&) {
      TensorView m = *find(t, "model.layers.0.self_attn.q_proj.scales");
      m.name = "model.layers.0.self_attn.q_proj.mins";
      t.push_back(m);
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.0.self_attn.q_proj.mins' is present",
                         "'symmetric' is 'true'");
    f = rewrite(good, dir, "notq.safetensors", [](Tensors&, Meta& m) { m["quantized_modules"] = "q,k,v,o,gate,up"; });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "tensor 'model.layers.0.mlp.down_proj.weight' is missing");
  }
  SUBCASE("non-finite scale") {
    std::vector<uint16_t> bad;
    const std::string f = rewrite(good, dir, "inf.safetensors", [&](Tensors& t, Meta&) {
      TensorView* s = find(t, "model.layers.1.self_attn.v_proj.scales");  // [32, 2]
      bad.resize(s->nbytes / 2);
      std::memcpy(bad.data(), s->data, s->nbytes);
      bad[2 * 5 + 1] = 0x7F80;  // bf16 +inf at [5, 1]
      s->data = reinterpret_cast<const std::byte*>(bad.data());
    });
    CHECK_ERROR_CONTAINS(qkd::load_int4_checkpoint(f), f, "'model.layers.1.self_attn.v_proj.scales'",
                         "value inf at [5, 1]");
  }
}

TEST_CASE("the writer refuses to overwrite, replaces only checkpoints, and leaves nothing behind on failure") {
  const ModelWeights src = qkd::load_model(tiny_hf());
  const qkd::Int4Quantized a = qkd::quantize_model_int4(src, params(32, Int4Symmetry::Symmetric, ScaleType::BF16));
  const qkd::Int4Quantized b = qkd::quantize_model_int4(src, params(32, Int4Symmetry::Asymmetric, ScaleType::FP16));
  TempDir dir("write");
  const std::string out = dir / "ckpt";
  qkd::write_int4_checkpoint(out, a, {}, qkd::Overwrite::Refuse);
  CHECK_ERROR_CONTAINS(qkd::write_int4_checkpoint(out, b, {}, qkd::Overwrite::Refuse), out, "already exists");
  check_same_bits(a.weights, qkd::load_model(out));  // untouched
  qkd::write_int4_checkpoint(out, b, {}, qkd::Overwrite::Replace);
  check_same_bits(b.weights, qkd::load_model(out));

  // --force never deletes a folder that is not a checkpoint
  const std::string other = dir / "other";
  fs::create_directories(other);
  std::ofstream(other + "/notes.txt") << "mine";
  CHECK_ERROR_CONTAINS(qkd::write_int4_checkpoint(other, a, {}, qkd::Overwrite::Replace), other,
                       "not a qkd int4 checkpoint directory");
  CHECK(qkd::read_text_file(other + "/notes.txt") == "mine");
  const std::string file = dir / "file";
  std::ofstream(file) << "x";
  CHECK_ERROR_CONTAINS(qkd::write_int4_checkpoint(file, a, {}, qkd::Overwrite::Replace), file, "not a qkd int4");
  // an empty directory is no content to lose
  const std::string empty = dir / "empty";
  fs::create_directories(empty);
  qkd::write_int4_checkpoint(empty, a, {}, qkd::Overwrite::Refuse);
  CHECK(qkd::is_int4_checkpoint(empty));

  // a failure midway (a companion that cannot be copied) leaves neither the output nor a temp directory
  CHECK_ERROR_CONTAINS(qkd::write_int4_checkpoint(dir / "failed", a, {dir / "no-such-file"}, qkd::Overwrite::Refuse),
                       "no-such-file");
  CHECK_FALSE(fs::exists(dir / "failed"));
  for (const auto& e : fs::directory_iterator(dir.path))
    CHECK_MESSAGE(e.path().filename().string().find(".tmp.") == std::string::npos, e.path().string());

  // parameters that disagree with the tensors are refused
  qkd::Int4Quantized wrong = a;
  wrong.params.scale_type = ScaleType::FP16;
  CHECK_ERROR_CONTAINS(qkd::write_int4_checkpoint(dir / "wrong", wrong, {}, qkd::Overwrite::Refuse),
                       "model.layers.0.self_attn.q_proj.qweight", "differ from the checkpoint's");
  // a model whose k does not fit the group size names the tensor
  CHECK_ERROR_CONTAINS(qkd::quantize_model_int4(src, params(128, Int4Symmetry::Symmetric, ScaleType::BF16)),
                       "model.layers.0.self_attn.q_proj.weight", "k 64 is not a multiple of group_size 128");
}
