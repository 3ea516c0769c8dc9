#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/bundle.h"
#include "loader/int4_checkpoint.h"
#include "runtime/model.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/engine.h"
#include "train/plan.h"

namespace qkd::train {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t / 60) % 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step.
float lr_at(const TrainConfig& c, int64_t step, float base) {
  if (step < c.warmup) return base * static_cast<float>(step + 1) / static_cast<float>(c.warmup);
  const double span = std::max<int64_t>(1, c.steps - c.warmup);
  const double t = std::min(1.0, static_cast<double>(step - c.warmup) / span);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * t));
  return static_cast<float>(base * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine));
}

// Keeps the metrics lines of steps <= `step` (a resumed run redoes the later ones).
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in.good()) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.value("step", int64_t{0}) <= step) kept += line + "\n";
    } catch (...) {
      // a torn last line from a killed run is dropped
    }
  }
  in.close();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept;
    QKD_CHECK(out.good(), "{}: cannot write", tmp);
  }
  fs::rename(tmp, path);
}

class Metrics {
 public:
  explicit Metrics(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "a")) {
    QKD_CHECK(f_ != nullptr, "--metrics {}: cannot open for writing", path);
  }
  ~Metrics() {
    if (f_ != nullptr) std::fclose(f_);
  }
  void write(const nlohmann::json& j) {
    const std::string s = j.dump() + "\n";
    QKD_CHECK(std::fwrite(s.data(), 1, s.size(), f_) == s.size() && std::fflush(f_) == 0,
              "{}: write failed (disk full?)", path_);
  }

 private:
  std::string path_;
  std::FILE* f_;
};

std::vector<int32_t> gather(const Windows& w, const std::vector<int64_t>& idx) {
  std::vector<int32_t> out;
  out.reserve(idx.size() * static_cast<size_t>(w.seq_len + 1));
  for (int64_t i : idx) out.insert(out.end(), w.window(i), w.window(i) + w.seq_len + 1);
  return out;
}

// The student's starting model with its tokenizer, loaded once. When that fails, the errors keep their order:
// the weights' own (found by loading them alone), then the quantization settings against their shape (a group
// size that does not divide a layer), and only then the bundle's (no tokenizer beside the weights, say).
ModelBundle load_student_init(const std::string& path, const QuantSpec& qs) {
  try {
    return load_bundle(path);
  } catch (const Error&) {
    make_plan(load_model(path).config, qs);
    throw;
  }
}

}  // namespace

TrainResult run_training(const TrainConfig& cfg_in, const TrainHooks& hooks) {
  TrainConfig cfg = cfg_in;
  validate(cfg);
  if (cfg.micro_batch == 0) cfg.micro_batch = cfg.batch / cfg.gpus;
  if (cfg.scale_lr == 0.0f) cfg.scale_lr = cfg.lr;
  if (cfg.metrics.empty()) cfg.metrics = (fs::path(cfg.out) / "metrics.jsonl").string();
  const bool distill = cfg.mode == "distill";
  auto log = [&](const std::string& s) {
    if (hooks.log) {
      hooks.log(s);
    } else {
      std::fprintf(stderr, "%s\n", s.c_str());
    }
  };

  // Models, each loaded once (the teacher doubles as the student's start unless --init names another model).
  const std::string init_path = cfg.init.empty() ? cfg.teacher : cfg.init;
  const bool init_is_teacher = distill && init_path == cfg.teacher;
  const QuantSpec qs = quant_spec(cfg);
  const ModelBundle init = load_student_init(init_path, qs);
  const Plan plan = make_plan(init.weights.config, qs);
  ModelBundle teacher_bundle;
  if (distill && !init_is_teacher) teacher_bundle = load_bundle(cfg.teacher);
  const ModelBundle& teacher = init_is_teacher ? init : teacher_bundle;
  ModelWeights scales_from;
  if (!cfg.init_scales.empty()) {
    QKD_CHECK(is_int4_checkpoint(cfg.init_scales), "--init-scales {}: not a qkd int4 checkpoint", cfg.init_scales);
    scales_from = load_int4_checkpoint(cfg.init_scales);
  }
  QKD_CHECK(cfg.seq_len <= init.weights.config.max_seq_len || init.weights.config.max_seq_len == 0,
            "--seq-len {} is longer than the model's context ({})", cfg.seq_len, init.weights.config.max_seq_len);
  const Tokenizer& tok = distill ? *teacher.tokenizer : *init.tokenizer;

  std::error_code ec;
  fs::create_directories(cfg.out, ec);
  QKD_CHECK(!ec, "--out {}: cannot create the directory ({})", cfg.out, ec.message());
  const std::string ckpt = checkpoint_path(cfg.out);
  QKD_CHECK(cfg.resume || !fs::exists(ckpt),
            "--out {}: holds a checkpoint already ({}); pass --resume to continue it, or choose another --out",
            cfg.out, ckpt);

  // Data
  Windows train_w, val_w;
  const runtime::BackendKind backend = runtime::parse_backend(cfg.backend);
  if (cfg.teacher_data > 0) {
    log(fmt::format("qkd-train: sampling {} sequences of {} tokens from the teacher", cfg.teacher_data, cfg.seq_len));
    runtime::ModelOptions mo;
    mo.backend = backend;
    mo.ctx = cfg.seq_len + 1;
    mo.max_batch = std::clamp(cfg.teacher_data, 1, 64);  // sequences sampled together (train/data.h)
    auto tm = runtime::make_model(teacher.weights, mo);
    train_w = sample_from_teacher(*tm, tok.bos_id(), cfg.teacher_data, cfg.seq_len, cfg.seed);
  } else {
    train_w = make_windows(tokenize_files(split_list(cfg.data), tok), cfg.seq_len);
  }
  if (!cfg.val_data.empty()) {
    val_w = make_windows(tokenize_files(split_list(cfg.val_data), tok), cfg.seq_len);
  } else {
    val_w = split_off_tail(train_w, cfg.val_fraction);
  }
  QKD_CHECK(train_w.count() > 0, "--data: no training window of {} tokens (the text is too short)", cfg.seq_len + 1);
  StepOrder order(train_w.count(), cfg.seed);

  // Engine and state
  EngineOptions eo;
  eo.backend = backend;
  eo.micro_batch = cfg.micro_batch;
  eo.gpus = cfg.gpus;
  eo.seq_len = cfg.seq_len;
  if (distill) {
    eo.loss = {cfg.ce_weight, cfg.kd_weight, cfg.temperature, cfg.contrastive_weight, cfg.contrastive_temperature};
  } else {
    eo.loss = {1.0f, 0.0f, 1.0f, 0.0f, cfg.contrastive_temperature};
  }
  const std::string cfg_json = config_to_json(cfg);
  TrainState state;
  HostInit hi;
  if (cfg.resume) {
    state = load_train_state(ckpt, plan.total);
    check_resume_compatible(state.config_json, cfg_json);
    QKD_CHECK(static_cast<int>(state.frozen.size()) == plan.n_frozen, "{}: holds {} frozen layers, the plan has {}",
              ckpt, state.frozen.size(), plan.n_frozen);
    hi.master = state.master;
    hi.frozen = state.frozen;
  } else {
    hi = init_parameters(plan, init.weights, cfg.init_scales.empty() ? nullptr : &scales_from);
  }
  auto engine = make_engine(eo, plan, hi, distill ? &teacher.weights : nullptr);
  if (cfg.resume) {
    engine->set_state(state.master, state.m, state.v);
    truncate_metrics(cfg.metrics, state.step);
    log(fmt::format("qkd-train: resuming {} at step {}", ckpt, state.step));
  }
  state.config_json = cfg_json;
  log(fmt::format("qkd-train: {} on {}: {} training windows, {} validation windows of {} tokens; {} parameters "
                  "trained, {} frozen int4 layers; bits {} group {}",
                  cfg.mode, engine->backend_name(), train_w.count(), val_w.count(), cfg.seq_len, plan.total,
                  plan.n_frozen, cfg.bits, cfg.group_size == 0 ? "channel" : std::to_string(cfg.group_size)));

  Metrics metrics(cfg.metrics);
  const bool bar = cfg.progress && isatty(STDERR_FILENO) && !hooks.log;
  TrainResult result;

  auto save = [&](int64_t step) {
    engine->get_state(state.master, state.m, state.v);
    state.frozen = engine->frozen_weights();
    state.step = step;
    save_train_state(ckpt, state);
  };
  auto validate_now = [&](int64_t step) {
    if (val_w.count() == 0) return;
    // every window up to --eval-windows, also when fewer than a micro-batch (the engine pads the last one)
    const int64_t nw = std::min<int64_t>(val_w.count(), cfg.eval_windows);
    std::vector<int64_t> idx(static_cast<size_t>(nw));
    for (int64_t i = 0; i < nw; ++i) idx[static_cast<size_t>(i)] = i;
    const std::vector<int32_t> win = gather(val_w, idx);
    const LossSums s = engine->evaluate(win.data(), static_cast<int>(nw));
    const double ce = s.ce / static_cast<double>(s.rows);
    nlohmann::json j{{"type", "val"}, {"step", step}, {"ce", ce}, {"ppl", std::exp(ce)}, {"tokens", s.rows}};
    if (engine->has_teacher()) j["kl"] = s.kl / static_cast<double>(s.rows);
    metrics.write(j);
    result.val_ppl = std::exp(ce);
    log(fmt::format("{}qkd-train: step {} validation: ce {:.4f} ppl {:.3f}{}", bar ? "\n" : "", step, ce,
                    std::exp(ce),
                    engine->has_teacher() ? fmt::format(" kl {:.5f}", s.kl / static_cast<double>(s.rows)) : ""));
  };

  const auto t0 = Clock::now();
  const int64_t start = state.step;
  if (start == 0 && cfg.eval_every > 0) validate_now(0);  // the starting point of the validation curve
  int64_t tokens_done = 0;
  for (int64_t step = start; step < cfg.steps; ++step) {
    const std::vector<int32_t> win = gather(train_w, order.step_windows(step, cfg.batch));
    const auto ts = Clock::now();
    engine->begin_step(int64_t{cfg.batch} * cfg.seq_len);
    const LossSums s = engine->accumulate(win.data(), cfg.batch);
    const double gnorm = engine->finish_gradients();
    const double rows = static_cast<double>(s.rows);
    double loss = (eo.loss.ce_weight * s.ce + eo.loss.kd_weight * s.kl + eo.loss.contrastive_weight * s.contrastive) /
                  rows;
    if (hooks.loss_filter) loss = hooks.loss_filter(step, loss);
    const bool bad = !std::isfinite(loss) || !std::isfinite(gnorm);
    const float lr = lr_at(cfg, step, cfg.lr);
    if (bad) {
      ++state.bad_streak;
      log(fmt::format("{}qkd-train: warning: step {} has a non-finite loss ({}) or gradient norm ({}); skipped "
                      "({} in a row, at most {})",
                      bar ? "\n" : "", step, loss, gnorm, state.bad_streak, cfg.max_bad_steps));
      metrics.write({{"type", "train"}, {"step", step + 1}, {"skipped", true}});
      if (state.bad_streak >= cfg.max_bad_steps)
        fail("training stopped: {} steps in a row had a non-finite loss or gradient; the last good checkpoint is "
             "{} (step {})",
             state.bad_streak, fs::exists(ckpt) ? ckpt : "(none saved yet)", start);
    } else {
      state.bad_streak = 0;
      AdamWStep a;
      a.lr = lr;
      a.scale_lr = lr_at(cfg, step, cfg.scale_lr);
      a.beta1 = cfg.beta1;
      a.beta2 = cfg.beta2;
      a.eps = cfg.eps;
      a.weight_decay = cfg.weight_decay;
      a.grad_scale = cfg.grad_clip > 0.0f && gnorm > cfg.grad_clip ? static_cast<float>(cfg.grad_clip / gnorm) : 1.0f;
      a.step = ++state.adam_step;
      engine->apply(a);
    }
    const double dt = seconds_since(ts);
    tokens_done += int64_t{cfg.batch} * cfg.seq_len;
    const double elapsed = seconds_since(t0);
    const double tps = static_cast<double>(tokens_done) / std::max(elapsed, 1e-9);
    if (!bad) {
      nlohmann::json j{{"type", "train"}, {"step", step + 1},      {"loss", loss},
                       {"ce", s.ce / rows}, {"grad_norm", gnorm}, {"lr", lr},
                       {"tokens_per_s", static_cast<double>(cfg.batch) * cfg.seq_len / dt},
                       {"elapsed_s", elapsed}};
      if (engine->has_teacher()) j["kl"] = s.kl / rows;
      if (eo.loss.contrastive_weight > 0) j["contrastive"] = s.contrastive / rows;
      metrics.write(j);
      result.last_loss = loss;
    }
    const int64_t done = step + 1;
    if (bar) {
      const int width = 24;
      const int filled = static_cast<int>(width * done / cfg.steps);
      const double eta = elapsed / static_cast<double>(done - start) * static_cast<double>(cfg.steps - done);
      std::fprintf(stderr, "\rstep %lld/%d [%s%s] loss %.4f | %.0f tok/s | ETA %s   ", static_cast<long long>(done),
                   cfg.steps, std::string(static_cast<size_t>(filled), '#').c_str(),
                   std::string(static_cast<size_t>(width - filled), '.').c_str(), loss, tps, fmt_duration(eta).c_str());
    } else if (done == cfg.steps || done % std::max(1, cfg.steps / 20) == 0) {
      log(fmt::format("qkd-train: step {}/{} loss {:.4f} | {:.0f} tok/s | {}", done, cfg.steps, loss, tps,
                      fmt_duration(elapsed)));
    }
    if (cfg.eval_every > 0 && done % cfg.eval_every == 0 && done != cfg.steps) validate_now(done);
    const bool stop = hooks.stop != nullptr && hooks.stop->load();
    if (!bad && ((cfg.save_every > 0 && done % cfg.save_every == 0) || done == cfg.steps || stop)) save(done);
    result.steps_done = done;
    if (stop && done != cfg.steps) {
      result.stopped = true;
      log(fmt::format("{}qkd-train: stopped at step {}; the checkpoint is {}; continue with --resume", bar ? "\n" : "",
                      done, ckpt));
      return result;
    }
  }
  if (bar) std::fprintf(stderr, "\n");
  validate_now(cfg.steps);

  // Export the student as a qkd int4 checkpoint.
  std::vector<float> master, m, v;
  engine->get_state(master, m, v);
  Int4Quantized q = export_student(plan, master, engine->frozen_weights(), init_path, cfg.export_f32);
  // The frozen layers' codes came from the --init-scales checkpoint: say how that one chose them.
  if (!cfg.init_scales.empty() && plan.n_frozen > 0) {
    const std::string from = int4_checkpoint_quantizer(cfg.init_scales);
    q.quantizer = fmt::format("qat (frozen: {})", from.empty() ? "checkpoint" : from);
  }
  const std::string model_dir = (fs::path(cfg.out) / "model").string();
  write_int4_checkpoint(model_dir, q, int4_companion_files(distill ? teacher.weights : init.weights),
                        Overwrite::Replace);
  log(fmt::format("qkd-train: wrote the int4 student to {} (qkd-run -m {})", model_dir, model_dir));
  result.model_dir = model_dir;
  return result;
}

}  // namespace qkd::train
