#include "train/config.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <variant>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "kernels/fake_quant.h"
#include "loader/int4_checkpoint.h"

namespace qkd::train {

namespace {

using Ref = std::variant<std::string*, int*, float*, uint64_t*, bool*>;
struct Key {
  const char* name;
  Ref ref;
  bool trajectory;  // changes the loss trajectory (must match on resume)
};

std::vector<Key> keys(TrainConfig& c) {
  return {
      {"mode", &c.mode, true},
      {"teacher", &c.teacher, false},
      {"init", &c.init, false},
      {"init_scales", &c.init_scales, false},
      {"out", &c.out, false},
      {"backend", &c.backend, false},
      {"gpus", &c.gpus, false},
      {"bits", &c.bits, true},
      {"group_size", &c.group_size, true},
      {"freeze", &c.freeze, true},
      {"clip", &c.clip, true},
      {"clip_search", &c.clip_search, true},
      {"data", &c.data, false},
      {"val_data", &c.val_data, false},
      {"val_fraction", &c.val_fraction, true},
      {"teacher_data", &c.teacher_data, true},
      {"seq_len", &c.seq_len, true},
      {"batch", &c.batch, true},
      {"micro_batch", &c.micro_batch, false},
      {"kd_weight", &c.kd_weight, true},
      {"ce_weight", &c.ce_weight, true},
      {"temperature", &c.temperature, true},
      {"contrastive_weight", &c.contrastive_weight, true},
      {"contrastive_temperature", &c.contrastive_temperature, true},
      {"steps", &c.steps, true},
      {"lr", &c.lr, true},
      {"scale_lr", &c.scale_lr, true},
      {"warmup", &c.warmup, true},
      {"min_lr_ratio", &c.min_lr_ratio, true},
      {"weight_decay", &c.weight_decay, true},
      {"beta1", &c.beta1, true},
      {"beta2", &c.beta2, true},
      {"eps", &c.eps, true},
      {"grad_clip", &c.grad_clip, true},
      {"seed", &c.seed, true},
      {"eval_every", &c.eval_every, false},
      {"eval_windows", &c.eval_windows, false},
      {"save_every", &c.save_every, false},
      {"max_bad_steps", &c.max_bad_steps, false},
      {"resume", &c.resume, false},
      {"progress", &c.progress, false},
      {"export_f32", &c.export_f32, false},
      {"metrics", &c.metrics, false},
  };
}

void from_json(const nlohmann::json& v, const Key& k, const std::string& source) {
  auto bad = [&](const char* want) {
    fail("{}: key \"{}\" must be {}, got {}", source, k.name, want, v.dump());
  };
  std::visit(
      [&](auto* p) {
        using P = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<P, std::string>) {
          if (v.is_string()) {
            *p = v.get<std::string>();
          } else if (v.is_array()) {  // lists (data, freeze) may be given as JSON arrays
            std::string s;
            for (const auto& e : v) {
              if (!e.is_string()) bad("a string or an array of strings");
              s += (s.empty() ? "" : ",") + e.get<std::string>();
            }
            *p = s;
          } else {
            bad("a string");
          }
        } else if constexpr (std::is_same_v<P, bool>) {
          if (!v.is_boolean()) bad("true or false");
          *p = v.get<bool>();
        } else if constexpr (std::is_same_v<P, float>) {
          if (!v.is_number()) bad("a number");
          *p = v.get<float>();
        } else {
          if (!v.is_number_integer()) bad("an integer");
          if constexpr (std::is_same_v<P, uint64_t>) {
            if (v.is_number_unsigned() || v.get<int64_t>() >= 0) {
              *p = v.get<uint64_t>();
            } else {
              bad("a non-negative integer");
            }
          } else {
            const int64_t x = v.get<int64_t>();
            if (x < INT32_MIN || x > INT32_MAX) bad("a 32-bit integer");
            *p = static_cast<int>(x);
          }
        }
      },
      k.ref);
}

nlohmann::json to_json(const Key& k) {
  return std::visit([](auto* p) { return nlohmann::json(*p); }, k.ref);
}

}  // namespace

void read_config_json_text(const std::string& text, const std::string& source, TrainConfig& c) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON ({})", source, e.what());
  }
  QKD_CHECK(j.is_object(), "{}: the config must be a JSON object, got {}", source, j.type_name());
  const std::vector<Key> ks = keys(c);
  for (const auto& [name, value] : j.items()) {
    const Key* k = nullptr;
    for (const Key& x : ks)
      if (name == x.name) k = &x;
    QKD_CHECK(k != nullptr, "{}: unknown key \"{}\"", source, name);
    from_json(value, *k, source);
  }
}

void read_config_json(const std::string& path, TrainConfig& c) {
  std::ifstream f(path);
  QKD_CHECK(f.good(), "--config {}: cannot open the file", path);
  std::stringstream ss;
  ss << f.rdbuf();
  read_config_json_text(ss.str(), path, c);
}

std::string config_to_json(const TrainConfig& cc) {
  TrainConfig c = cc;
  nlohmann::json j = nlohmann::json::object();
  for (const Key& k : keys(c)) j[k.name] = to_json(k);
  return j.dump();
}

std::vector<std::string> trajectory_keys() {
  TrainConfig c;
  std::vector<std::string> out;
  for (const Key& k : keys(c))
    if (k.trajectory) out.emplace_back(k.name);
  return out;
}

void check_resume_compatible(const std::string& saved_json, const std::string& current_json) {
  const auto saved = nlohmann::json::parse(saved_json);
  const auto cur = nlohmann::json::parse(current_json);
  // A key added after the checkpoint was written is absent from it: the run that wrote it had the key's default.
  TrainConfig defaults;
  std::map<std::string, nlohmann::json> default_of;
  for (const Key& k : keys(defaults)) default_of[k.name] = to_json(k);
  for (const std::string& k : trajectory_keys()) {
    const bool in_saved = saved.contains(k);
    const nlohmann::json was = in_saved ? saved[k] : default_of[k];
    QKD_CHECK(was == cur[k],
              "--resume: {} is {} in this run but {} in the checkpoint; a resumed run must use the settings it was "
              "started with",
              k, cur[k].dump(), in_saved ? saved[k].dump() : "absent (written before the key existed: " + was.dump() + ")");
  }
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

void validate(const TrainConfig& c) {
  auto finite_pos = [](float x) { return std::isfinite(x) && x > 0.0f; };
  QKD_CHECK(c.mode == "distill" || c.mode == "pretrain", "--mode: '{}' is not distill or pretrain", c.mode);
  QKD_CHECK(!c.out.empty(), "--out: an output directory is required");
  if (c.mode == "distill") {
    QKD_CHECK(!c.teacher.empty(), "--teacher: distillation needs a teacher model (or use --mode pretrain)");
  } else {
    QKD_CHECK(!c.init.empty() || !c.teacher.empty(), "--init: pretraining needs the student's starting weights");
    QKD_CHECK(c.teacher_data == 0, "--teacher-data: pretraining has no teacher to sample from");
    QKD_CHECK(c.contrastive_weight == 0.0f, "--contrastive-weight: pretraining has no teacher");
  }
  QKD_CHECK(c.backend == "auto" || c.backend == "cpu" || c.backend == "cuda",
            "--backend: '{}' is not auto, cpu or cuda", c.backend);
  QKD_CHECK(c.gpus >= 1, "--gpus: {} must be at least 1", c.gpus);
  QKD_CHECK(c.gpus == 1 || c.backend != "cpu", "--gpus {}: data parallelism needs --backend cuda", c.gpus);
  QKD_CHECK(c.gpus == 1 || c.batch % (c.gpus * std::max(c.micro_batch, 1)) == 0,
            "--batch {} does not split into {} GPUs of micro-batches of {}", c.batch, c.gpus,
            c.micro_batch == 0 ? c.batch / c.gpus : c.micro_batch);
  QKD_CHECK(c.bits == kDenseBits || (c.bits >= kFakeQuantMinBits && c.bits <= kFakeQuantMaxBits),
            "--bits: {} is outside 2..8 (or 16 for no quantization)", c.bits);
  QKD_CHECK(c.group_size == 0 || c.group_size == 32 || c.group_size == 64 || c.group_size == 128,
            "--group-size: {} is not 32, 64, 128 or 0 (per-channel)", c.group_size);
  if (c.freeze != "none") {
    const Int4ModuleSet s = parse_int4_modules(c.freeze, "--freeze");
    QKD_CHECK((s & ~kInt4LinearModules) == 0, "--freeze: '{}' names a module that is not one of q,k,v,o,gate,up,down",
              c.freeze);
    QKD_CHECK(s == 0 || c.bits <= 4, "--freeze: frozen layers are stored as int4, so --bits must be at most 4 (is {})",
              c.bits);
  }
  QKD_CHECK(c.teacher_data >= 0, "--teacher-data: {} is negative", c.teacher_data);
  QKD_CHECK(c.teacher_data > 0 || !c.data.empty(), "--data: training text files are required (or --teacher-data N)");
  QKD_CHECK(c.val_fraction >= 0.0f && c.val_fraction < 1.0f, "--val-fraction: {} is outside [0, 1)", c.val_fraction);
  QKD_CHECK(c.seq_len >= 2 && c.seq_len <= (1 << 20), "--seq-len: {} is outside 2..1048576", c.seq_len);
  QKD_CHECK(c.batch >= 1, "--batch: {} must be at least 1", c.batch);
  QKD_CHECK(c.micro_batch >= 0 && (c.micro_batch == 0 || c.batch % c.micro_batch == 0),
            "--micro-batch: {} does not divide --batch {}", c.micro_batch, c.batch);
  QKD_CHECK(std::isfinite(c.kd_weight) && c.kd_weight >= 0, "--kd-weight: {} must be >= 0", c.kd_weight);
  QKD_CHECK(std::isfinite(c.ce_weight) && c.ce_weight >= 0, "--ce-weight: {} must be >= 0", c.ce_weight);
  QKD_CHECK(std::isfinite(c.contrastive_weight) && c.contrastive_weight >= 0, "--contrastive-weight: {} must be >= 0",
            c.contrastive_weight);
  QKD_CHECK(c.mode == "pretrain" || c.kd_weight + c.ce_weight + c.contrastive_weight > 0.0f,
            "--kd-weight, --ce-weight, --contrastive-weight: every loss weight is 0");
  QKD_CHECK(finite_pos(c.temperature), "--temperature: {} must be positive", c.temperature);
  QKD_CHECK(finite_pos(c.contrastive_temperature), "--contrastive-temperature: {} must be positive",
            c.contrastive_temperature);
  QKD_CHECK(c.steps >= 1, "--steps: {} must be at least 1", c.steps);
  QKD_CHECK(finite_pos(c.lr), "--lr: {} must be positive", c.lr);
  QKD_CHECK(std::isfinite(c.scale_lr) && c.scale_lr >= 0, "--scale-lr: {} must be >= 0 (0 = --lr)", c.scale_lr);
  QKD_CHECK(c.warmup >= 0, "--warmup: {} is negative", c.warmup);
  QKD_CHECK(c.min_lr_ratio >= 0 && c.min_lr_ratio <= 1, "--min-lr-ratio: {} is outside [0, 1]", c.min_lr_ratio);
  QKD_CHECK(std::isfinite(c.weight_decay) && c.weight_decay >= 0, "--weight-decay: {} is negative", c.weight_decay);
  QKD_CHECK(c.beta1 >= 0 && c.beta1 < 1, "--beta1: {} is outside [0, 1)", c.beta1);
  QKD_CHECK(c.beta2 >= 0 && c.beta2 < 1, "--beta2: {} is outside [0, 1)", c.beta2);
  QKD_CHECK(finite_pos(c.eps), "--eps: {} must be positive", c.eps);
  QKD_CHECK(std::isfinite(c.grad_clip) && c.grad_clip >= 0, "--grad-clip: {} is negative", c.grad_clip);
  QKD_CHECK(c.eval_every >= 0, "--eval-every: {} is negative", c.eval_every);
  QKD_CHECK(c.eval_windows >= 1, "--eval-windows: {} must be at least 1", c.eval_windows);
  QKD_CHECK(c.save_every >= 0, "--save-every: {} is negative", c.save_every);
  QKD_CHECK(c.max_bad_steps >= 1, "--max-bad-steps: {} must be at least 1", c.max_bad_steps);
}

QuantSpec quant_spec(const TrainConfig& c) {
  QuantSpec q;
  q.bits = c.bits;
  q.group_size = c.group_size == 0 ? kInt4PerChannel : c.group_size;
  q.clip = c.clip;
  q.scale_search = c.clip_search ? Int4ScaleSearch::ClipMse : Int4ScaleSearch::None;
  q.frozen = c.freeze == "none" ? 0 : parse_int4_modules(c.freeze, "--freeze");
  return q;
}

}  // namespace qkd::train
