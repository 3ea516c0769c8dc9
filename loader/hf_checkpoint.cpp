#include "loader/hf_checkpoint.h"

#include <climits>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/mmap_file.h"

namespace qkd {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Typed access to config.json fields with messages that name the file, the field and the value. A JSON null
// counts as absent: transformers writes null for unset optional fields.
struct ConfigFields {
  const json& j;
  const std::string& source;

  const json* get(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }

  std::optional<int> opt_int(const char* key) const {
    const json* v = get(j, key);
    if (v == nullptr) return std::nullopt;
    QKD_CHECK(v->is_number_integer(), "{}: '{}' is {}, expected an integer", source, key, v->dump());
    const int64_t x = v->get<int64_t>();
    QKD_CHECK(x >= INT32_MIN && x <= INT32_MAX, "{}: '{}' = {} does not fit a 32-bit int", source, key, x);
    return static_cast<int>(x);
  }

  int positive_int(const char* key, std::optional<int> fallback) const {
    std::optional<int> v = opt_int(key);
    QKD_CHECK(v.has_value() || fallback.has_value(), "{}: required field '{}' is missing", source, key);
    const int x = v.value_or(fallback.value_or(0));
    QKD_CHECK(x > 0, "{}: '{}' = {} must be positive", source, key, x);
    return x;
  }

  double number(const json& obj, const char* where, const char* key, std::optional<double> fallback) const {
    const json* v = get(obj, key);
    QKD_CHECK(v != nullptr || fallback.has_value(), "{}: '{}{}' is missing", source, where, key);
    if (v == nullptr) return *fallback;
    QKD_CHECK(v->is_number(), "{}: '{}{}' is {}, expected a number", source, where, key, v->dump());
    return v->get<double>();
  }

  bool boolean(const char* key, bool fallback) const {
    const json* v = get(j, key);
    if (v == nullptr) return fallback;
    QKD_CHECK(v->is_boolean(), "{}: '{}' is {}, expected true or false", source, key, v->dump());
    return v->get<bool>();
  }
};

// rope_parameters (transformers 5) or rope_scaling (earlier): the scaling kind and its parameters.
RopeScaling parse_rope_scaling(const ConfigFields& c, const json& rp, const char* key) {
  const std::string where = std::string(key) + ".";
  QKD_CHECK(rp.is_object(), "{}: '{}' is {}, expected an object", c.source, key, rp.dump());
  for (const auto& [k, v] : rp.items()) {
    QKD_CHECK(!v.is_object(), "{}: '{}{}' is an object: per-layer-type RoPE parameters are not supported", c.source,
              where, k);
  }
  const json* type = c.get(rp, "rope_type");
  if (type == nullptr) type = c.get(rp, "type");  // the name before transformers 4.45
  RopeScaling s;
  if (type == nullptr) {
    QKD_CHECK(c.get(rp, "factor") == nullptr, "{}: '{}' has a factor but no rope_type", c.source, key);
    return s;
  }
  QKD_CHECK(type->is_string(), "{}: '{}rope_type' is {}, expected a string", c.source, where, type->dump());
  const std::string t = type->get<std::string>();
  if (t == "default") return s;
  QKD_CHECK(t == "linear" || t == "llama3",
            "{}: '{}rope_type' = \"{}\" is not supported (qkd knows default, linear, llama3)", c.source, where, t);
  s.type = t == "linear" ? RopeScalingType::Linear : RopeScalingType::Llama3;
  s.factor = static_cast<float>(c.number(rp, where.c_str(), "factor", std::nullopt));
  QKD_CHECK(s.factor > 0, "{}: '{}factor' = {} must be positive", c.source, where, s.factor);
  if (s.type == RopeScalingType::Llama3) {
    s.low_freq_factor = static_cast<float>(c.number(rp, where.c_str(), "low_freq_factor", std::nullopt));
    s.high_freq_factor = static_cast<float>(c.number(rp, where.c_str(), "high_freq_factor", std::nullopt));
    const double orig = c.number(rp, where.c_str(), "original_max_position_embeddings", std::nullopt);
    QKD_CHECK(orig >= 1 && orig <= INT32_MAX && orig == static_cast<int>(orig),
              "{}: '{}original_max_position_embeddings' = {} is not a positive integer", c.source, where, orig);
    s.original_max_position = static_cast<int>(orig);
    QKD_CHECK(s.high_freq_factor > s.low_freq_factor,
              "{}: '{}high_freq_factor' {} must exceed low_freq_factor {}", c.source, where, s.high_freq_factor,
              s.low_freq_factor);
  }
  return s;
}

std::vector<int32_t> parse_token_ids(const ConfigFields& c, const char* key, std::vector<int32_t> fallback) {
  const json* v = c.get(c.j, key);
  if (v == nullptr) return fallback;
  std::vector<int32_t> ids;
  auto add = [&](const json& x) {
    QKD_CHECK(x.is_number_integer() && x.get<int64_t>() >= 0 && x.get<int64_t>() <= INT32_MAX,
              "{}: '{}' holds {}, expected a non-negative token id", c.source, key, x.dump());
    ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
  };
  if (v->is_array()) {
    for (const auto& x : *v) add(x);
  } else {
    add(*v);
  }
  QKD_CHECK(!ids.empty(), "{}: '{}' is an empty list", c.source, key);
  return ids;
}

}  // namespace

ModelConfig parse_hf_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", source, e.what());
  }
  QKD_CHECK(j.is_object(), "{}: top level is a JSON {}, expected an object", source, j.type_name());
  const ConfigFields c{j, source};

  const json* model_type = c.get(j, "model_type");
  QKD_CHECK(model_type != nullptr, "{}: required field 'model_type' is missing", source);
  QKD_CHECK(model_type->is_string() && model_type->get<std::string>() == "llama",
            "{}: model_type {} is not supported (qkd loads \"llama\")", source, model_type->dump());
  QKD_CHECK(!c.boolean("attention_bias", false), "{}: attention_bias = true is not supported", source);
  QKD_CHECK(!c.boolean("mlp_bias", false), "{}: mlp_bias = true is not supported", source);
  if (const json* act = c.get(j, "hidden_act"); act != nullptr) {
    QKD_CHECK(*act == "silu", "{}: hidden_act {} is not supported (qkd's MLP is SwiGLU with silu)", source,
              act->dump());
  }
  QKD_CHECK(c.get(j, "quantization_config") == nullptr,
            "{}: quantization_config is present: pre-quantized HF checkpoints are not supported", source);

  ModelConfig cfg;
  cfg.arch = "llama";
  cfg.dim = c.positive_int("hidden_size", std::nullopt);
  cfg.n_layers = c.positive_int("num_hidden_layers", std::nullopt);
  cfg.n_heads = c.positive_int("num_attention_heads", std::nullopt);
  cfg.ffn_dim = c.positive_int("intermediate_size", std::nullopt);
  cfg.vocab_size = c.positive_int("vocab_size", std::nullopt);
  cfg.n_kv_heads = c.positive_int("num_key_value_heads", cfg.n_heads);
  if (c.opt_int("head_dim").has_value()) {
    cfg.head_dim = c.positive_int("head_dim", std::nullopt);
  } else {
    QKD_CHECK(cfg.dim % cfg.n_heads == 0,
              "{}: no head_dim, and hidden_size {} is not a multiple of num_attention_heads {}", source, cfg.dim,
              cfg.n_heads);
    cfg.head_dim = cfg.dim / cfg.n_heads;
  }
  QKD_CHECK(cfg.n_heads % cfg.n_kv_heads == 0,
            "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source, cfg.n_heads,
            cfg.n_kv_heads);
  QKD_CHECK(cfg.head_dim % 2 == 0, "{}: head_dim {} is odd; RoPE rotates pairs", source, cfg.head_dim);
  cfg.max_seq_len = c.positive_int("max_position_embeddings", 2048);
  cfg.norm_eps = static_cast<float>(c.number(j, "", "rms_norm_eps", 1e-6));
  QKD_CHECK(cfg.norm_eps > 0, "{}: rms_norm_eps {} must be positive", source, cfg.norm_eps);
  cfg.tied_embeddings = c.boolean("tie_word_embeddings", false);

  const json* rope_params = c.get(j, "rope_parameters");
  double theta = c.number(j, "", "rope_theta", 10000.0);
  if (rope_params != nullptr) {
    cfg.rope_scaling = parse_rope_scaling(c, *rope_params, "rope_parameters");
    theta = c.number(*rope_params, "rope_parameters.", "rope_theta", theta);
  } else if (const json* rs = c.get(j, "rope_scaling"); rs != nullptr) {
    cfg.rope_scaling = parse_rope_scaling(c, *rs, "rope_scaling");
  }
  QKD_CHECK(theta > 0, "{}: rope_theta {} must be positive", source, theta);
  cfg.rope_theta = static_cast<float>(theta);

  const json* bos = c.get(j, "bos_token_id");
  QKD_CHECK(bos == nullptr || !bos->is_array(), "{}: bos_token_id is {}, expected a single id", source, bos->dump());
  cfg.bos_id = parse_token_ids(c, "bos_token_id", {1}).front();
  cfg.eos_ids = parse_token_ids(c, "eos_token_id", {2});
  return cfg;
}

ModelConfig load_hf_config(const std::string& config_path) {
  return parse_hf_config(read_text_file(config_path), config_path);
}

HfSafetensors HfSafetensors::open(const std::string& dir) {
  HfSafetensors h;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  if (!fs::exists(index_path)) {
    QKD_CHECK(fs::exists(single_path), "{}: neither model.safetensors nor model.safetensors.index.json exists",
              dir);
    h.listing_ = single_path.string();
    h.files_.push_back(SafetensorsFile::open(h.listing_));
    for (const TensorView& t : h.files_[0]->tensors()) h.tensors_.emplace(t.name, Located{&t, h.files_[0].get()});
    return h;
  }

  h.listing_ = index_path.string();
  json index;
  try {
    index = json::parse(read_text_file(h.listing_));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", h.listing_, e.what());
  }
  auto wm = index.is_object() ? index.find("weight_map") : index.end();
  QKD_CHECK(wm != index.end() && wm->is_object(), "{}: no 'weight_map' object", h.listing_);
  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& [name, shard_json] : wm->items()) {
    QKD_CHECK(shard_json.is_string(), "{}: weight_map['{}'] is {}, expected a file name", h.listing_, name,
              shard_json.dump());
    const std::string shard = shard_json.get<std::string>();
    // A shard is a file beside the index; a path could reach outside the checkpoint directory.
    QKD_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..",
              "{}: weight_map['{}'] = \"{}\" is not a plain file name", h.listing_, name, shard);
    auto it = shards.find(shard);
    if (it == shards.end()) {
      const fs::path shard_path = fs::path(dir) / shard;
      QKD_CHECK(fs::exists(shard_path), "{}: shard {} is missing (listed in {} for tensor '{}')",
                shard_path.string(), shard, h.listing_, name);
      h.files_.push_back(SafetensorsFile::open(shard_path.string()));
      it = shards.emplace(shard, h.files_.back().get()).first;
    }
    const TensorView* t = it->second->find(name);
    QKD_CHECK(t != nullptr, "{}: no tensor '{}', which {} places in this shard", it->second->path(), name,
              h.listing_);
    h.tensors_.emplace(name, Located{t, it->second});
  }
  return h;
}

const HfSafetensors::Located* HfSafetensors::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

void hf_rope_rows_to_interleaved(const std::byte* src, std::byte* dst, int n_heads, int head_dim, size_t row_bytes) {
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    for (int s = 0; s < 2; ++s) {
      for (int p = 0; p < half; ++p) {
        const size_t from = static_cast<size_t>(h) * head_dim + static_cast<size_t>(s) * half + p;
        const size_t to = static_cast<size_t>(h) * head_dim + 2 * static_cast<size_t>(p) + s;
        std::memcpy(dst + to * row_bytes, src + from * row_bytes, row_bytes);
      }
    }
  }
}

namespace {

// Finds one weight, checks its dtype and shape against the config; `why` names the config fields of each dim.
const TensorView& expect_tensor(const HfSafetensors& st, const std::string& name, std::vector<int64_t> shape,
                                const std::string& why) {
  const HfSafetensors::Located* loc = st.find(name);
  QKD_CHECK(loc != nullptr, "{}: tensor '{}' is missing", st.listing(), name);
  const TensorView& t = *loc->view;
  QKD_CHECK(t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16,
            "{}: tensor '{}': dtype {} is not a weight dtype (F32, F16, BF16)", loc->file->path(), name,
            dtype_name(t.dtype));
  QKD_CHECK(t.shape == shape, "{}: tensor '{}': shape {} disagrees with config {} = [{}]", loc->file->path(), name,
            t.shape_str(), why, fmt::join(shape, ", "));
  return t;
}

// An owned copy of a q/k projection with its rows in interleaved RoPE order, kept alive by w.storage.
TensorView interleave_rope_rows(const TensorView& t, int n_heads, int head_dim, ModelWeights& w) {
  auto buf = std::make_shared<std::vector<std::byte>>(t.nbytes);
  hf_rope_rows_to_interleaved(t.data, buf->data(), n_heads, head_dim, t.nbytes / t.shape[0]);
  TensorView out = t;
  out.data = buf->data();
  w.storage.push_back(std::move(buf));
  return out;
}

}  // namespace

ModelWeights load_hf_checkpoint(const std::string& dir) {
  ModelWeights w;
  w.config = load_hf_config((fs::path(dir) / "config.json").string());
  w.source = dir;
  w.format = "hf";
  const ModelConfig& c = w.config;
  const HfSafetensors st = HfSafetensors::open(dir);
  for (const auto& f : st.files()) w.storage.push_back(f);

  const int64_t dim = c.dim, q_rows = int64_t{c.n_heads} * c.head_dim, kv_rows = int64_t{c.n_kv_heads} * c.head_dim;
  const std::string q_why = fmt::format("[num_attention_heads {} * head_dim {}, hidden_size {}]", c.n_heads,
                                        c.head_dim, c.dim);
  const std::string kv_why = fmt::format("[num_key_value_heads {} * head_dim {}, hidden_size {}]", c.n_kv_heads,
                                         c.head_dim, c.dim);
  const std::string o_why = fmt::format("[hidden_size {}, num_attention_heads {} * head_dim {}]", c.dim, c.n_heads,
                                        c.head_dim);
  const std::string up_why = fmt::format("[intermediate_size {}, hidden_size {}]", c.ffn_dim, c.dim);
  const std::string down_why = fmt::format("[hidden_size {}, intermediate_size {}]", c.dim, c.ffn_dim);
  const std::string norm_why = fmt::format("[hidden_size {}]", c.dim);
  const std::string emb_why = fmt::format("[vocab_size {}, hidden_size {}]", c.vocab_size, c.dim);

  w.tok_embeddings = expect_tensor(st, "model.embed_tokens.weight", {c.vocab_size, dim}, emb_why);
  w.norm = expect_tensor(st, "model.norm.weight", {dim}, norm_why);
  if (c.tied_embeddings) {
    w.lm_head = w.tok_embeddings;
  } else {
    QKD_CHECK(st.find("lm_head.weight") != nullptr,
              "{}: tensor 'lm_head.weight' is missing and config tie_word_embeddings is false", st.listing());
    w.lm_head = expect_tensor(st, "lm_head.weight", {c.vocab_size, dim}, emb_why);
  }

  w.layers.resize(static_cast<size_t>(c.n_layers));
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    l.attn_norm = expect_tensor(st, p + "input_layernorm.weight", {dim}, norm_why);
    l.wq = interleave_rope_rows(expect_tensor(st, p + "self_attn.q_proj.weight", {q_rows, dim}, q_why), c.n_heads,
                                c.head_dim, w);
    l.wk = interleave_rope_rows(expect_tensor(st, p + "self_attn.k_proj.weight", {kv_rows, dim}, kv_why),
                                c.n_kv_heads, c.head_dim, w);
    l.wv = expect_tensor(st, p + "self_attn.v_proj.weight", {kv_rows, dim}, kv_why);
    l.wo = expect_tensor(st, p + "self_attn.o_proj.weight", {dim, q_rows}, o_why);
    l.ffn_norm = expect_tensor(st, p + "post_attention_layernorm.weight", {dim}, norm_why);
    l.w_gate = expect_tensor(st, p + "mlp.gate_proj.weight", {c.ffn_dim, dim}, up_why);
    l.w_up = expect_tensor(st, p + "mlp.up_proj.weight", {c.ffn_dim, dim}, up_why);
    l.w_down = expect_tensor(st, p + "mlp.down_proj.weight", {dim, c.ffn_dim}, down_why);
  }
  return w;
}

}  // namespace qkd
