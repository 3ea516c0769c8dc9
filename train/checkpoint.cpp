#include "train/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <map>

#include <fmt/format.h>

#include "kernels/error.h"
#include "loader/safetensors.h"

namespace qkd::train {

namespace fs = std::filesystem;

std::string checkpoint_path(const std::string& out_dir) {
  return (fs::path(out_dir) / "checkpoint" / "train-state.safetensors").string();
}

namespace {
TensorView view(std::string name, DType t, std::vector<int64_t> shape, const void* data, size_t bytes) {
  TensorView v;
  v.name = std::move(name);
  v.dtype = t;
  v.shape = std::move(shape);
  v.data = static_cast<const std::byte*>(data);
  v.nbytes = bytes;
  return v;
}

int64_t meta_int(const std::map<std::string, std::string>& m, const std::string& key, const std::string& path) {
  const auto it = m.find(key);
  QKD_CHECK(it != m.end(), "{}: metadata \"{}\" is missing", path, key);
  try {
    size_t pos = 0;
    const long long v = std::stoll(it->second, &pos);
    QKD_CHECK(pos == it->second.size() && v >= 0, "bad");
    return v;
  } catch (...) {
    fail("{}: metadata \"{}\" is '{}', not a non-negative integer", path, key, it->second);
  }
}
}  // namespace

void save_train_state(const std::string& path, const TrainState& s) {
  QKD_CHECK(s.m.size() == s.master.size() && s.v.size() == s.master.size(), "save_train_state: buffer sizes differ");
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  QKD_CHECK(!ec, "{}: cannot create the checkpoint directory ({})", fs::path(path).parent_path().string(),
            ec.message());
  const int64_t total = static_cast<int64_t>(s.master.size());
  std::vector<TensorView> t;
  t.push_back(view("master", DType::F32, {total}, s.master.data(), s.master.size() * 4));
  t.push_back(view("adam_m", DType::F32, {total}, s.m.data(), s.m.size() * 4));
  t.push_back(view("adam_v", DType::F32, {total}, s.v.data(), s.v.size() * 4));
  for (size_t i = 0; i < s.frozen.size(); ++i) {
    const Int4HostWeight& f = s.frozen[i];
    QKD_CHECK(f.scale_type == ScaleType::BF16 && f.sym == Int4Symmetry::Symmetric,
              "save_train_state: frozen layer {} is not symmetric with bf16 scales", i);
    t.push_back(view(fmt::format("frozen.{}.qweight", i), DType::I32, {f.n, f.k / 8}, f.packed.data(),
                     f.packed.size() * 4));
    t.push_back(view(fmt::format("frozen.{}.scales", i), DType::BF16, {f.n, f.k / f.group_size}, f.scales.data(),
                     f.scales.size() * 2));
  }
  std::map<std::string, std::string> meta{{"format", kTrainStateFormat},
                                          {"format_version", std::to_string(kTrainStateVersion)},
                                          {"step", std::to_string(s.step)},
                                          {"adam_step", std::to_string(s.adam_step)},
                                          {"bad_streak", std::to_string(s.bad_streak)},
                                          {"plan_total", std::to_string(total)},
                                          {"config", s.config_json}};
  write_safetensors(path, t, meta);
}

TrainState load_train_state(const std::string& path, int64_t plan_total) {
  QKD_CHECK(fs::exists(path), "--resume: {} does not exist (no checkpoint was saved in this --out directory)", path);
  const auto f = SafetensorsFile::open(path);
  const auto& m = f->metadata();
  const auto fmt_it = m.find("format");
  QKD_CHECK(fmt_it != m.end() && fmt_it->second == kTrainStateFormat, "{}: metadata \"format\" is '{}', not '{}'",
            path, fmt_it == m.end() ? "" : fmt_it->second, kTrainStateFormat);
  const int64_t version = meta_int(m, "format_version", path);
  QKD_CHECK(version == kTrainStateVersion, "{}: format_version {} is not supported (this build reads {})", path,
            version, kTrainStateVersion);
  QKD_CHECK(meta_int(m, "plan_total", path) == plan_total,
            "{}: holds {} parameters, the student being trained has {} (a different model or quantization)", path,
            meta_int(m, "plan_total", path), plan_total);
  TrainState s;
  s.step = meta_int(m, "step", path);
  s.adam_step = meta_int(m, "adam_step", path);
  s.bad_streak = static_cast<int>(meta_int(m, "bad_streak", path));
  const auto cfg = m.find("config");
  QKD_CHECK(cfg != m.end(), "{}: metadata \"config\" is missing", path);
  s.config_json = cfg->second;
  auto f32 = [&](const char* name, std::vector<float>& out) {
    const TensorView& t = f->get(name);
    QKD_CHECK(t.dtype == DType::F32 && t.numel() == plan_total, "{}: tensor {} is {} {}, expected F32 [{}]", path,
              name, dtype_name(t.dtype), t.shape_str(), plan_total);
    out.resize(static_cast<size_t>(plan_total));
    std::memcpy(out.data(), t.data, t.nbytes);
  };
  f32("master", s.master);
  f32("adam_m", s.m);
  f32("adam_v", s.v);
  for (int i = 0;; ++i) {
    const TensorView* q = f->find(fmt::format("frozen.{}.qweight", i));
    if (q == nullptr) break;
    const TensorView& sc = f->get(fmt::format("frozen.{}.scales", i));
    QKD_CHECK(q->dtype == DType::I32 && q->shape.size() == 2 && sc.dtype == DType::BF16 && sc.shape.size() == 2 &&
                  sc.shape[0] == q->shape[0] && sc.shape[1] > 0 && (q->shape[1] * 8) % sc.shape[1] == 0,
              "{}: frozen layer {} has tensors {} {} and {} {}", path, i, dtype_name(q->dtype), q->shape_str(),
              dtype_name(sc.dtype), sc.shape_str());
    Int4HostWeight w;
    w.n = static_cast<int>(q->shape[0]);
    w.k = static_cast<int>(q->shape[1] * 8);
    w.group_size = static_cast<int>(w.k / sc.shape[1]);
    w.packed.resize(static_cast<size_t>(q->numel()));
    std::memcpy(w.packed.data(), q->data, q->nbytes);
    w.scales.resize(static_cast<size_t>(sc.numel()));
    std::memcpy(w.scales.data(), sc.data, sc.nbytes);
    s.frozen.push_back(std::move(w));
  }
  return s;
}

}  // namespace qkd::train
