// Hugging Face checkpoints: config.json parsing, shards, shape/dtype checks, and the q/k row un-permutation. The
// synthetic checkpoints are built here with HF's own permutation (torch's view/transpose/reshape written as loops),
// so the loader's formula is checked against an independent construction.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "loader/hf_checkpoint.h"
#include "loader/model.h"
#include "loader/safetensors.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace qkd;
using nlohmann::json;

namespace {

using qkd::test::error_of;
using qkd::test::TempDir;

struct Spec {
  int dim = 8, n_layers = 2, n_heads = 2, n_kv_heads = 1, head_dim = 4, ffn_dim = 12, vocab = 10;
  bool tied = false;
  DType dtype = DType::F32;
  bool sharded = false;
};

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> file_values;  // as stored by HF
  std::vector<float> meta_values;  // as qkd must present them (differs from file_values for q/k only)
};

// torch: w.view(n_heads, head_dim / 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim), the permutation
// transformers' convert_llama_weights_to_hf.py applies to Meta's q/k weights.
std::vector<float> hf_permute(const std::vector<float>& meta, int n_heads, int head_dim, int dim) {
  std::vector<float> out(meta.size());
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h)
    for (int a = 0; a < 2; ++a)          // the transposed axes: out[h][a][b][c] = in[h][b][a][c]
      for (int b = 0; b < half; ++b)
        for (int c = 0; c < dim; ++c)
          out[static_cast<size_t>(((h * 2 + a) * half + b) * dim + c)] =
              meta[static_cast<size_t>(((h * half + b) * 2 + a) * dim + c)];
  return out;
}

// Small integers are exact in every dtype used here (bf16 holds integers up to 256 exactly).
std::vector<Tensor> make_tensors(const Spec& s) {
  std::vector<Tensor> ts;
  int tag = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    ++tag;
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>((tag * 37 + i) % 200 - 100);
    ts.push_back({name, std::move(shape), v, v});
  };
  auto add_rope = [&](const std::string& name, int heads, float sign) {
    const int rows = heads * s.head_dim;
    std::vector<float> meta(static_cast<size_t>(rows * s.dim));
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < s.dim; ++c) meta[static_cast<size_t>(r * s.dim + c)] = sign * static_cast<float>(r * s.dim + c + ts.size());
    ts.push_back({name, {rows, s.dim}, hf_permute(meta, heads, s.head_dim, s.dim), meta});
  };
  add("model.embed_tokens.weight", {s.vocab, s.dim});
  for (int i = 0; i < s.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", {s.dim});
    add_rope(p + "self_attn.q_proj.weight", s.n_heads, 1.0f);
    add_rope(p + "self_attn.k_proj.weight", s.n_kv_heads, -1.0f);
    add(p + "self_attn.v_proj.weight", {s.n_kv_heads * s.head_dim, s.dim});
    add(p + "self_attn.o_proj.weight", {s.dim, s.n_heads * s.head_dim});
    add(p + "post_attention_layernorm.weight", {s.dim});
    add(p + "mlp.gate_proj.weight", {s.ffn_dim, s.dim});
    add(p + "mlp.up_proj.weight", {s.ffn_dim, s.dim});
    add(p + "mlp.down_proj.weight", {s.dim, s.ffn_dim});
    add(p + "self_attn.rotary_emb.inv_freq", {s.head_dim / 2});  // older exports carry it; it must be ignored
  }
  add("model.norm.weight", {s.dim});
  if (!s.tied) add("lm_head.weight", {s.vocab, s.dim});
  return ts;
}

json make_config(const Spec& s) {
  return {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", s.dim},
          {"num_hidden_layers", s.n_layers}, {"num_attention_heads", s.n_heads},
          {"num_key_value_heads", s.n_kv_heads}, {"head_dim", s.head_dim}, {"intermediate_size", s.ffn_dim},
          {"vocab_size", s.vocab}, {"tie_word_embeddings", s.tied}, {"rms_norm_eps", 1e-5},
          {"rope_parameters", {{"rope_theta", 500000.0}, {"rope_type", "default"}}}, {"bos_token_id", 1},
          {"eos_token_id", {2, 7}}, {"max_position_embeddings", 128}, {"hidden_act", "silu"}};
}

std::vector<uint8_t> encode(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> out;
  for (float x : v) {
    if (t == DType::F32) {
      uint8_t b[4];
      std::memcpy(b, &x, 4);
      out.insert(out.end(), b, b + 4);
    } else if (t == DType::I32) {
      const int32_t i = static_cast<int32_t>(x);
      uint8_t b[4];
      std::memcpy(b, &i, 4);
      out.insert(out.end(), b, b + 4);
    } else {
      const uint16_t h = t == DType::BF16 ? float_to_bf16(x) : float_to_fp16(x);
      out.push_back(static_cast<uint8_t>(h & 0xff));
      out.push_back(static_cast<uint8_t>(h >> 8));
    }
  }
  return out;
}

// Writes config.json and the tensors, as model.safetensors or as two shards with an index.
void write_checkpoint(const fs::path& dir, const json& config, const std::vector<Tensor>& ts, DType dtype,
                      bool sharded) {
  std::ofstream(dir / "config.json") << config.dump(2);
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<TensorView> views[2];
  json weight_map = json::object();
  for (size_t i = 0; i < ts.size(); ++i) {
    bufs.push_back(encode(ts[i].file_values, dtype));
    TensorView v;
    v.name = ts[i].name;
    v.dtype = dtype;
    v.shape = ts[i].shape;
    v.data = reinterpret_cast<const std::byte*>(bufs.back().data());
    v.nbytes = bufs.back().size();
    const int shard = sharded && i >= ts.size() / 2 ? 1 : 0;
    views[shard].push_back(v);
    weight_map[v.name] = "model-0000" + std::to_string(shard + 1) + "-of-00002.safetensors";
  }
  if (!sharded) {
    write_safetensors((dir / "model.safetensors").string(), views[0], {{"format", "pt"}});
    return;
  }
  for (int s = 0; s < 2; ++s) {
    write_safetensors((dir / ("model-0000" + std::to_string(s + 1) + "-of-00002.safetensors")).string(), views[s],
                      {{"format", "pt"}});
  }
  std::ofstream(dir / "model.safetensors.index.json") << json{{"metadata", {{"total_size", 0}}},
                                                              {"weight_map", weight_map}}.dump(2);
}

// Every view the loader returned, checked value by value against what qkd's convention says it must hold.
void check_weights(const ModelWeights& w, const std::vector<Tensor>& ts, const Spec& s) {
  auto want = [&](const std::string& name) -> const Tensor& {
    for (const auto& t : ts)
      if (t.name == name) return t;
    FAIL("no tensor " << name);
    return ts[0];
  };
  auto check = [&](const TensorView& v, const std::string& name) {
    CAPTURE(name);
    const Tensor& t = want(name);
    CHECK(v.dtype == s.dtype);
    CHECK(v.shape == t.shape);
    const std::vector<float> got = to_f32(v);
    int bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i] != t.meta_values[i] && bad++ < 5) MESSAGE("index " << i << ": got " << got[i] << " want " << t.meta_values[i]);
    }
    CHECK(bad == 0);
  };
  check(w.tok_embeddings, "model.embed_tokens.weight");
  check(w.norm, "model.norm.weight");
  check(w.lm_head, s.tied ? "model.embed_tokens.weight" : "lm_head.weight");
  if (s.tied) CHECK(w.lm_head.data == w.tok_embeddings.data);
  REQUIRE(w.layers.size() == static_cast<size_t>(s.n_layers));
  for (int i = 0; i < s.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const LayerWeights& l = w.layers[static_cast<size_t>(i)];
    check(l.attn_norm, p + "input_layernorm.weight");
    check(l.wq, p + "self_attn.q_proj.weight");
    check(l.wk, p + "self_attn.k_proj.weight");
    check(l.wv, p + "self_attn.v_proj.weight");
    check(l.wo, p + "self_attn.o_proj.weight");
    check(l.ffn_norm, p + "post_attention_layernorm.weight");
    check(l.w_gate, p + "mlp.gate_proj.weight");
    check(l.w_up, p + "mlp.up_proj.weight");
    check(l.w_down, p + "mlp.down_proj.weight");
  }
}

}  // namespace

TEST_CASE("HF checkpoint: synthetic fp32 model, wiring, config and RoPE row order") {
  TempDir dir;
  Spec s;
  const auto ts = make_tensors(s);
  write_checkpoint(dir.path, make_config(s), ts, s.dtype, false);
  const ModelWeights w = load_model(dir.str());
  CHECK(w.format == "hf");
  CHECK(w.source == dir.str());
  const ModelConfig& c = w.config;
  CHECK(c.dim == 8);
  CHECK(c.n_layers == 2);
  CHECK(c.n_heads == 2);
  CHECK(c.n_kv_heads == 1);
  CHECK(c.head_dim == 4);
  CHECK(c.ffn_dim == 12);
  CHECK(c.vocab_size == 10);
  CHECK(c.max_seq_len == 128);
  CHECK(c.rope_theta == 500000.0f);
  CHECK(c.norm_eps == 1e-5f);
  CHECK_FALSE(c.tied_embeddings);
  CHECK(c.bos_id == 1);
  CHECK(c.eos_ids == std::vector<int32_t>{2, 7});
  check_weights(w, ts, s);

  // One row by hand: head 1, pair 1, first element is Meta row 4 + 2*1 + 0 = 6 and HF row 4 + 0*2 + 1 = 5.
  const std::vector<float> q = to_f32(w.layers[0].wq);
  const Tensor& q0 = ts[2];
  REQUIRE(q0.name == "model.layers.0.self_attn.q_proj.weight");
  for (int c = 0; c < 8; ++c) CHECK(q[6 * 8 + c] == q0.file_values[5 * 8 + c]);
}

TEST_CASE("HF checkpoint: sharded bf16 and fp16 with tied embeddings") {
  for (DType dt : {DType::BF16, DType::F16}) {
    CAPTURE(dtype_name(dt));
    TempDir dir;
    Spec s;
    s.tied = true;
    s.sharded = true;
    s.dtype = dt;
    s.n_heads = 4;
    s.n_kv_heads = 2;  // n_heads * head_dim = 16 != dim 8: an explicit head_dim decouples them
    const auto ts = make_tensors(s);
    write_checkpoint(dir.path, make_config(s), ts, dt, true);
    const ModelWeights w = load_hf_checkpoint(dir.str());
    CHECK(w.config.tied_embeddings);
    check_weights(w, ts, s);
  }
}

TEST_CASE("HF checkpoint: missing or misplaced shards") {
  TempDir dir;
  Spec s;
  s.sharded = true;
  const auto ts = make_tensors(s);
  write_checkpoint(dir.path, make_config(s), ts, s.dtype, true);
  const std::string index = (dir.path / "model.safetensors.index.json").string();

  json idx = json::parse(std::ifstream(index));
  idx["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors";  // it lies in shard 2
  std::ofstream(index) << idx.dump();
  std::string msg = error_of([&] { load_hf_checkpoint(dir.str()); });
  CAPTURE(msg);
  CHECK(msg.find("model-00001-of-00002.safetensors: no tensor 'model.norm.weight'") != std::string::npos);
  CHECK(msg.find(index) != std::string::npos);

  idx["weight_map"]["model.norm.weight"] = "../escape.safetensors";
  std::ofstream(index) << idx.dump();
  msg = error_of([&] { load_hf_checkpoint(dir.str()); });
  CHECK(msg.find("\"../escape.safetensors\" is not a plain file name") != std::string::npos);

  idx["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors";
  std::ofstream(index) << idx.dump();
  fs::remove(dir.path / "model-00002-of-00002.safetensors");
  msg = error_of([&] { load_hf_checkpoint(dir.str()); });
  CAPTURE(msg);
  CHECK(msg.find("shard model-00002-of-00002.safetensors is missing") != std::string::npos);
  CHECK(msg.find(index) != std::string::npos);

  fs::remove(index);
  msg = error_of([&] { load_hf_checkpoint(dir.str()); });
  CHECK(msg.find("neither model.safetensors nor model.safetensors.index.json") != std::string::npos);
}

TEST_CASE("HF checkpoint: tensors that disagree with the config") {
  Spec s;
  const auto good = make_tensors(s);
  struct Case {
    const char* what;
    std::function<void(std::vector<Tensor>&)> edit;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"norm shape",
       [](std::vector<Tensor>& ts) {
         for (auto& t : ts)
           if (t.name == "model.norm.weight") {
             t.shape = {7};
             t.file_values.resize(7);
           }
       },
       {"model.safetensors: tensor 'model.norm.weight': shape [7] disagrees with config [hidden_size 8]"}},
      {"q rows",
       [](std::vector<Tensor>& ts) {
         for (auto& t : ts)
           if (t.name == "model.layers.1.self_attn.q_proj.weight") {
             t.shape = {4, 8};
             t.file_values.resize(32);
           }
       },
       {"tensor 'model.layers.1.self_attn.q_proj.weight': shape [4, 8]", "num_attention_heads 2 * head_dim 4"}},
      {"missing v",
       [](std::vector<Tensor>& ts) {
         std::erase_if(ts, [](const Tensor& t) { return t.name == "model.layers.1.self_attn.v_proj.weight"; });
       },
       {"model.safetensors: tensor 'model.layers.1.self_attn.v_proj.weight' is missing"}},
      {"missing lm_head",
       [](std::vector<Tensor>& ts) { std::erase_if(ts, [](const Tensor& t) { return t.name == "lm_head.weight"; }); },
       {"tensor 'lm_head.weight' is missing", "tie_word_embeddings is false"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    TempDir dir;
    auto ts = good;
    c.edit(ts);
    write_checkpoint(dir.path, make_config(s), ts, s.dtype, false);
    const std::string msg = error_of([&] { load_hf_checkpoint(dir.str()); });
    CAPTURE(msg);
    CHECK(msg.find(dir.str()) != std::string::npos);
    for (const auto& e : c.expect) CHECK(msg.find(e) != std::string::npos);
  }

  TempDir dir;
  write_checkpoint(dir.path, make_config(s), good, DType::I32, false);
  const std::string msg = error_of([&] { load_hf_checkpoint(dir.str()); });
  CHECK(msg.find("tensor 'model.embed_tokens.weight': dtype I32 is not a weight dtype") != std::string::npos);
}

TEST_CASE("HF config.json: required fields, defaults, RoPE parameters") {
  const std::string src = "/x/config.json";
  const json minimal = {{"model_type", "llama"}, {"hidden_size", 64}, {"num_hidden_layers", 2},
                        {"num_attention_heads", 4}, {"intermediate_size", 96}, {"vocab_size", 100}};
  const ModelConfig d = parse_hf_config(minimal.dump(), src);
  CHECK(d.head_dim == 16);
  CHECK(d.n_kv_heads == 4);
  CHECK(d.norm_eps == 1e-6f);
  CHECK(d.max_seq_len == 2048);
  CHECK(d.rope_theta == 10000.0f);
  CHECK(d.rope_scaling.type == RopeScalingType::None);
  CHECK_FALSE(d.tied_embeddings);
  CHECK(d.bos_id == 1);
  CHECK(d.eos_ids == std::vector<int32_t>{2});

  for (const char* field : {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                            "vocab_size", "model_type"}) {
    json j = minimal;
    j.erase(field);
    CHECK_THROWS_WITH_AS(parse_hf_config(j.dump(), src),
                         doctest::Contains((src + ": required field '" + field + "' is missing").c_str()), Error);
  }

  auto with = [&](const json& extra) {
    json j = minimal;
    j.update(extra);
    return j.dump();
  };
  auto fails = [&](const json& extra, const std::string& msg) {
    CAPTURE(extra.dump());
    CHECK_THROWS_WITH_AS(parse_hf_config(with(extra), src), doctest::Contains((src + ": " + msg).c_str()), Error);
  };

  CHECK(parse_hf_config(with({{"rope_theta", 500000.0}}), src).rope_theta == 500000.0f);
  CHECK(parse_hf_config(with({{"rope_parameters", {{"rope_theta", 1e6}, {"rope_type", "default"}}}}), src)
            .rope_theta == 1e6f);
  const ModelConfig l3 = parse_hf_config(
      with({{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 32.0}, {"low_freq_factor", 1.0},
                              {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}}}}),
      src);
  CHECK(l3.rope_scaling.type == RopeScalingType::Llama3);
  CHECK(l3.rope_scaling.factor == 32.0f);
  CHECK(l3.rope_scaling.low_freq_factor == 1.0f);
  CHECK(l3.rope_scaling.high_freq_factor == 4.0f);
  CHECK(l3.rope_scaling.original_max_position == 8192);
  const ModelConfig lin =
      parse_hf_config(with({{"rope_parameters", {{"rope_theta", 1e4}, {"rope_type", "linear"}, {"factor", 2}}}}), src);
  CHECK(lin.rope_scaling.type == RopeScalingType::Linear);
  CHECK(lin.rope_scaling.factor == 2.0f);
  CHECK(parse_hf_config(with({{"rope_scaling", nullptr}, {"head_dim", nullptr}}), src).head_dim == 16);
  CHECK(parse_hf_config(with({{"eos_token_id", {128001, 128009}}}), src).eos_ids ==
        std::vector<int32_t>{128001, 128009});
  CHECK(parse_hf_config(with({{"num_key_value_heads", 2}, {"head_dim", 32}}), src).head_dim == 32);

  fails({{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}, "'rope_scaling.rope_type' = \"yarn\" is not supported");
  fails({{"rope_scaling", {{"type", "linear"}}}}, "'rope_scaling.factor' is missing");
  fails({{"rope_parameters", {{"rope_type", "llama3"}, {"factor", 8.0}}}}, "'rope_parameters.low_freq_factor' is missing");
  fails({{"model_type", "mistral"}}, "model_type \"mistral\" is not supported");
  fails({{"attention_bias", true}}, "attention_bias = true is not supported");
  fails({{"mlp_bias", true}}, "mlp_bias = true is not supported");
  fails({{"num_key_value_heads", 3}}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3");
  fails({{"hidden_size", 0}}, "'hidden_size' = 0 must be positive");
  fails({{"hidden_size", 66}}, "no head_dim, and hidden_size 66 is not a multiple of num_attention_heads 4");
  fails({{"vocab_size", "100"}}, "'vocab_size' is \"100\", expected an integer");
  fails({{"head_dim", 15}}, "head_dim 15 is odd");
  fails({{"hidden_act", "gelu"}}, "hidden_act \"gelu\" is not supported");
  fails({{"tie_word_embeddings", 1}}, "'tie_word_embeddings' is 1, expected true or false");
  CHECK_THROWS_WITH_AS(parse_hf_config("{\"model_type\": ", src), doctest::Contains((src + ": not valid JSON").c_str()), Error);
}

TEST_CASE("HF checkpoint: a config.json without a required field names the file") {
  TempDir dir;
  Spec s;
  json cfg = make_config(s);
  cfg.erase("intermediate_size");
  write_checkpoint(dir.path, cfg, make_tensors(s), s.dtype, false);
  CHECK_THROWS_WITH_AS(load_model(dir.str()),
                       doctest::Contains(((dir.path / "config.json").string() + ": required field 'intermediate_size'").c_str()),
                       Error);
  fs::remove(dir.path / "config.json");
  CHECK_THROWS_WITH_AS(load_model(dir.str()), doctest::Contains("without config.json"), Error);
}

TEST_CASE("HF checkpoint: transformers' own sharded fixture (tests/fixtures/hf/tiny-llama)") {
  const std::string dir = test::fixtures_dir() + "/hf/tiny-llama";
  if (!fs::exists(dir + "/config.json")) {
    MESSAGE("skipped: fixture absent");
    return;
  }
  const ModelWeights w = load_model(dir);
  CHECK(w.config.dim == 64);
  CHECK(w.config.n_heads == 4);
  CHECK(w.config.n_kv_heads == 2);
  CHECK(w.config.head_dim == 16);
  CHECK(w.config.rope_theta == 50000.0f);
  CHECK_FALSE(w.config.tied_embeddings);
  CHECK(w.lm_head.data != w.tok_embeddings.data);
  CHECK(w.layers[1].wk.shape == std::vector<int64_t>{32, 64});
}

TEST_CASE("HF checkpoint: teacher-25m") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string dir = test::shared_data() + "/models/teacher-25m";
  const ModelWeights w = load_model(dir);
  const ModelConfig& c = w.config;
  CHECK(w.format == "hf");
  CHECK(c.dim == 384);
  CHECK(c.n_layers == 8);
  CHECK(c.n_heads == 6);
  CHECK(c.n_kv_heads == 2);
  CHECK(c.head_dim == 64);
  CHECK(c.ffn_dim == 1024);
  CHECK(c.vocab_size == 32000);
  CHECK(c.max_seq_len == 1024);
  CHECK(c.tied_embeddings);
  CHECK(c.rope_theta == 10000.0f);
  CHECK(c.norm_eps == 1e-5f);
  CHECK(w.lm_head.data == w.tok_embeddings.data);
  CHECK(w.tok_embeddings.shape == std::vector<int64_t>{32000, 384});
  REQUIRE(w.layers.size() == 8);
  for (const LayerWeights& l : w.layers) {
    CHECK(l.wq.dtype == DType::BF16);
    CHECK(l.wq.shape == std::vector<int64_t>{384, 384});
    CHECK(l.wk.shape == std::vector<int64_t>{128, 384});
    CHECK(l.wv.shape == std::vector<int64_t>{128, 384});
    CHECK(l.wo.shape == std::vector<int64_t>{384, 384});
    CHECK(l.w_gate.shape == std::vector<int64_t>{1024, 384});
    CHECK(l.w_up.shape == std::vector<int64_t>{1024, 384});
    CHECK(l.w_down.shape == std::vector<int64_t>{384, 1024});
    CHECK(l.attn_norm.shape == std::vector<int64_t>{384});
  }

  // Undo HF's permutation on the raw file with the torch-style index map and compare with the loader's rows.
  const HfSafetensors st = HfSafetensors::open(dir);
  const HfSafetensors::Located* raw = st.find("model.layers.0.self_attn.k_proj.weight");
  REQUIRE(raw != nullptr);
  const std::vector<float> file = to_f32(*raw->view), got = to_f32(w.layers[0].wk);
  const std::vector<float> back_to_hf = hf_permute(got, 2, 64, 384);
  CHECK(back_to_hf == file);
  CHECK(got != file);
}
