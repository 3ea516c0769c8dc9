// qkd-train's loop (train/trainer.h) on the CPU backend: distillation lowers the KD loss, the frozen layers keep
// their bits, a resumed run repeats the uninterrupted trajectory exactly, non-finite steps are skipped and then
// abort, and bad settings fail before any work. The qkd-train binary itself: Ctrl-C (a real SIGINT) saves a
// checkpoint that --resume continues, and --config JSON with flag overrides. The real-teacher cases use
// ../shared's teacher-25m.
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/fake_quant.h"
#include "loader/bundle.h"
#include "loader/hf_checkpoint.h"
#include "loader/int4_checkpoint.h"
#include "loader/safetensors.h"
#include "test_util.h"
#include "runtime/calibrate.h"
#include "runtime/model.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/trainer.h"

namespace {

using namespace qkd;
using namespace qkd::train;
namespace fs = std::filesystem;

// A small, fast distillation of teacher-25m: 4 sequences of 32 tokens per step.
TrainConfig small_config(const std::string& out) {
  TrainConfig c;
  c.teacher = test::shared_data() + "/models/teacher-25m";
  c.data = test::fixtures_dir() + "/hf/eval.txt";
  c.out = out;
  c.backend = "cpu";
  c.seq_len = 32;
  c.batch = 4;
  c.micro_batch = 2;
  c.lr = 5e-5f;
  c.steps = 8;
  c.eval_every = 0;
  c.eval_windows = 8;
  c.save_every = 4;
  c.progress = false;
  c.val_fraction = 0.1f;
  return c;
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

TrainHooks quiet() {
  TrainHooks h;
  h.log = [](const std::string&) {};
  return h;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// A finished run of build/bin/qkd-train.
struct BinRun {
  int code = -1;  // the exit status, or -1 when it did not exit normally
  std::string out, err;
};

// Runs build/bin/qkd-train with `args` (no shell), stdin from /dev/null, stdout and stderr captured through pipes.
// `watch` sees the process id and the stderr text so far each time more of it arrives.
BinRun run_qkd_train(const std::vector<std::string>& args,
                     const std::function<void(pid_t, const std::string&)>& watch = {}) {
  const std::string bin = test::bin_dir() + "/qkd-train";
  REQUIRE_MESSAGE(fs::exists(bin), bin, " is missing (build the qkd-train target)");
  std::vector<std::string> a = args;
  a.insert(a.begin(), bin);
  std::vector<char*> argv;
  for (std::string& x : a) argv.push_back(x.data());
  argv.push_back(nullptr);
  int out_pipe[2], err_pipe[2];
  REQUIRE(pipe(out_pipe) == 0);
  REQUIRE(pipe(err_pipe) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    for (int fd : {devnull, out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) close(fd);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  BinRun r;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* text[2] = {&r.out, &r.err};
  char buf[4096];
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    if (poll(fds, 2, -1) < 0) continue;  // EINTR
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      const ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n <= 0) {
        close(fds[i].fd);
        fds[i].fd = -1;  // poll ignores negative descriptors
        continue;
      }
      text[i]->append(buf, static_cast<size_t>(n));
      if (i == 1 && watch) watch(pid, r.err);
    }
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// The cheapest real run of teacher-25m on the CPU: one sequence of 4 tokens a step.
std::vector<std::string> tiny_run_flags(const std::string& out, int steps) {
  return {"--teacher", test::shared_data() + "/models/teacher-25m", "--data", test::fixtures_dir() + "/hf/eval.txt",
          "--backend", "cpu", "--seq-len", "4", "--batch", "1", "--steps", std::to_string(steps), "--eval-every", "0",
          "--eval-windows", "1", "--save-every", "0", "--no-progress", "--out", out};
}

TrainState load_checkpoint(const std::string& out) {
  const std::string p = checkpoint_path(out);
  return load_train_state(p, SafetensorsFile::open(p)->get("master").numel());
}

}  // namespace

TEST_CASE("bad settings fail with a clear message before any work") {
  test::TempDir tmp("train-bad");
  TrainConfig c;
  c.teacher = test::fixtures_dir() + "/train/tiny-train/teacher";
  c.data = test::fixtures_dir() + "/hf/eval.txt";
  c.out = tmp / "out";
  c.progress = false;
  auto run = [&](TrainConfig x) { return error_of([&] { run_training(x, quiet()); }); };
  {
    TrainConfig x = c;
    x.freeze = "o,x";
    CHECK(run(x).find("--freeze") != std::string::npos);
    CHECK(run(x).find("'x'") != std::string::npos);
  }
  {
    TrainConfig x = c;
    x.bits = 9;
    CHECK(run(x).find("--bits: 9 is outside 2..8") != std::string::npos);
    x.bits = 1;
    CHECK(run(x).find("--bits: 1 is outside 2..8") != std::string::npos);
  }
  {
    TrainConfig x = c;
    x.group_size = 48;
    CHECK(run(x).find("--group-size: 48") != std::string::npos);
  }
  {
    TrainConfig x = c;  // 128 does not divide the tiny model's ffn_dim 192 (down_proj's input)
    const std::string e = run(x);
    CHECK(e.find("group_size for down (input dimension 192)") != std::string::npos);
  }
  {
    TrainConfig x = c;
    x.teacher = tmp / "no-such-teacher";
    CHECK(run(x).find("no-such-teacher") != std::string::npos);
  }
  {
    TrainConfig x = c;
    x.teacher.clear();
    CHECK(run(x).find("--teacher") != std::string::npos);
  }
  {
    TrainConfig x = c;
    x.micro_batch = 3;
    CHECK(run(x).find("--micro-batch: 3 does not divide --batch 8") != std::string::npos);
  }
  {
    TrainConfig x;
    CHECK_THROWS_WITH_AS(read_config_json_text(R"({"bits": 4, "colour": 1})", "cfg.json", x),
                         doctest::Contains("cfg.json: unknown key \"colour\""), qkd::Error);
    CHECK_THROWS_WITH_AS(read_config_json_text(R"({"bits": "four"})", "cfg.json", x),
                         doctest::Contains("key \"bits\" must be an integer"), qkd::Error);
  }
  CHECK_FALSE(fs::exists(c.out));  // nothing was created by any failed run
}

TEST_CASE("--resume: a setting the checkpoint lacks (added later) counts as its default; any other change is refused") {
  TrainConfig c;
  nlohmann::json saved = nlohmann::json::parse(config_to_json(c));
  saved.erase("clip_search");  // a checkpoint written before the key existed
  CHECK_NOTHROW(check_resume_compatible(saved.dump(), config_to_json(c)));
  TrainConfig searched = c;
  searched.clip_search = true;
  try {
    check_resume_compatible(saved.dump(), config_to_json(searched));
    FAIL("a changed setting was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("clip_search is true in this run but absent") != std::string::npos);
  }
  TrainConfig other = c;
  other.lr = c.lr * 2;
  CHECK_THROWS_AS(check_resume_compatible(config_to_json(c), config_to_json(other)), Error);
}

TEST_CASE("distillation lowers the KD loss, exports a loadable int4 student, and never touches the frozen bits") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-kd");
  TrainConfig c = small_config(tmp / "out");
  // Enough text that 50 steps of 4 windows never repeat one (the small eval excerpt would be memorised).
  c.data = test::shared_data() + "/corpora/tinystories/stories_cased.txt";
  c.val_fraction = 0.01f;
  c.eval_windows = 16;
  c.steps = 50;
  c.save_every = 25;
  c.eval_every = 25;
  c.lr = 1e-5f;
  const TrainResult r = run_training(c, quiet());
  REQUIRE(r.steps_done == 50);
  const auto m = read_metrics(tmp / "out/metrics.jsonl");
  std::vector<double> val_kl, train_kl;
  for (const auto& j : m) {
    if (j["type"] == "val") val_kl.push_back(j["kl"].get<double>());
    if (j["type"] == "train") train_kl.push_back(j["kl"].get<double>());
  }
  REQUIRE(val_kl.size() == 3);  // steps 0, 25, 50
  REQUIRE(train_kl.size() == 50);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) {
    first += train_kl[static_cast<size_t>(i)];
    last += train_kl[static_cast<size_t>(45 + i)];
  }
  MESSAGE(fmt::format("KD loss: train {:.5f} (steps 1-5) -> {:.5f} (steps 46-50); validation {:.5f} -> {:.5f} -> {:.5f}",
                      first / 5, last / 5, val_kl[0], val_kl[1], val_kl[2]));
  // The held-out KD loss is the measure: each step's training windows differ, so the training curve is noisy
  // at this batch size.
  CHECK(val_kl[1] < val_kl[0]);
  CHECK(val_kl[2] < val_kl[0]);

  // ov-freeze: the exported o/v weights are bit for bit the round-to-nearest int4 of the teacher's.
  const ModelWeights teacher = load_hf_checkpoint(c.teacher);
  const ModelWeights student = load_int4_checkpoint(r.model_dir);
  int checked = 0;
  for (size_t l = 0; l < teacher.layers.size(); ++l) {
    for (const auto& [tv, sv] : {std::pair{&teacher.layers[l].wo, &student.layers[l].wo},
                                 std::pair{&teacher.layers[l].wv, &student.layers[l].wv}}) {
      const std::vector<float> w = to_f32(*tv);
      const int n = static_cast<int>(tv->shape[0]), k = static_cast<int>(tv->shape[1]);
      std::vector<float> s(static_cast<size_t>(n) * (k / 128));
      cpu::fake_quant_init_scales(w.data(), n, k, 128, 4, s.data());
      const Int4HostWeight want = cpu::fake_quant_export(w.data(), s.data(), nullptr, n, k, 128, 4);
      const Int4Weight got = sv->int4_weight();
      REQUIRE(sv->dtype == DType::I4);
      CHECK(std::memcmp(got.packed, want.packed.data(), want.packed.size() * 4) == 0);
      CHECK(std::memcmp(got.scales, want.scales.data(), want.scales.size() * 2) == 0);
      ++checked;
    }
  }
  CHECK(checked == 16);
  // and the checkpoint holds the same frozen bits
  const TrainState st = load_train_state(checkpoint_path(c.out), [&] {
    const auto f = SafetensorsFile::open(checkpoint_path(c.out));
    return f->get("master").numel();
  }());
  CHECK(st.step == 50);
  CHECK(st.frozen.size() == 16);
}

TEST_CASE("--init-scales: the frozen layers take the checkpoint's GPTQ codes bit for bit; mismatches are errors") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-gptq");
  TrainConfig c = small_config(tmp / "out");
  c.steps = 2;
  c.save_every = 0;
  const ModelBundle b = load_bundle(c.teacher);
  runtime::CalibrationOptions co;
  co.tokens = 512;  // one window: enough for a Hessian of rank > dim
  const Int4Calibration cal = runtime::collect_hessians(b.weights, tokenize_files({c.data}, *b.tokenizer), co);
  auto gptq_checkpoint = [&](const std::string& name, Int4Params p) {
    write_int4_checkpoint(tmp / name, quantize_model_int4(b.weights, p, &cal), {}, Overwrite::Refuse);
    return tmp / name;
  };
  c.init_scales = gptq_checkpoint("g128", Int4Params{});
  const TrainResult r = run_training(c, quiet());
  REQUIRE(r.steps_done == 2);

  const ModelWeights from = load_int4_checkpoint(c.init_scales);
  const ModelWeights student = load_int4_checkpoint(r.model_dir);
  CHECK(int4_checkpoint_quantizer(r.model_dir) == "qat (frozen: gptq)");
  int differs_from_rtn = 0;
  for (size_t l = 0; l < from.layers.size(); ++l) {
    for (const auto& [fv, sv, tv] : {std::tuple{&from.layers[l].wo, &student.layers[l].wo, &b.weights.layers[l].wo},
                                     std::tuple{&from.layers[l].wv, &student.layers[l].wv, &b.weights.layers[l].wv}}) {
      const Int4Weight want = fv->int4_weight(), got = sv->int4_weight();
      REQUIRE(sv->dtype == DType::I4);
      CHECK(std::memcmp(got.packed, want.packed, int4_packed_bytes(want.n, want.k)) == 0);
      CHECK(std::memcmp(got.scales, want.scales, int4_scales_bytes(want.n, want.k, want.group_size)) == 0);
      // GPTQ's codes are not round to nearest's, so the check above would notice a re-quantization
      const std::vector<float> w = to_f32(*tv);
      const Int4HostWeight rtn = int4_quantize(w.data(), want.n, want.k, 128, Int4Symmetry::Symmetric, ScaleType::BF16);
      differs_from_rtn += std::memcmp(rtn.packed.data(), want.packed, rtn.packed.size() * 4) != 0;
    }
  }
  CHECK(differs_from_rtn == 16);

  // The dense tensors export as bf16 (the compute copy the CUDA forward trained with); --export-f32 keeps fp32.
  // The same seed gives the same run, so the fp32 export rounds (nearest even) to the bf16 one exactly.
  TrainConfig f32 = c;
  f32.out = tmp / "out-f32";
  f32.export_f32 = true;
  const TrainResult r32 = run_training(f32, quiet());
  const ModelWeights student32 = load_int4_checkpoint(r32.model_dir);
  for (const auto& [bv, fv] : {std::pair{&student.tok_embeddings, &student32.tok_embeddings},
                               std::pair{&student.norm, &student32.norm},
                               std::pair{&student.layers[0].attn_norm, &student32.layers[0].attn_norm}}) {
    CAPTURE(bv->name);
    REQUIRE(bv->dtype == DType::BF16);
    REQUIRE(fv->dtype == DType::F32);
    REQUIRE(bv->numel() == fv->numel());
    std::vector<uint16_t> rounded(static_cast<size_t>(fv->numel()));
    const float* f = reinterpret_cast<const float*>(fv->data);
    for (size_t i = 0; i < rounded.size(); ++i) rounded[i] = float_to_bf16(f[i]);
    CHECK(std::memcmp(rounded.data(), bv->data, rounded.size() * 2) == 0);
  }

  // Mismatches name the checkpoint, the layer and the module (q frozen: it is checked before any other layer).
  c.freeze = "q,v";
  auto error = [&](TrainConfig x, const std::string& out) {
    x.out = tmp / out;
    return error_of([&] { run_training(x, quiet()); });
  };
  Int4Params asym;
  asym.sym = Int4Symmetry::Asymmetric;
  Int4Params g64;
  g64.group_size = 64;
  Int4Params no_q;
  no_q.modules &= ~int4_module_bit(Int4Module::Q);
  const std::string where = "--init-scales " + (tmp / "{}") + ": layer 0 q (frozen): ";
  for (const auto& [name, params, bits, want] :
       {std::tuple{"asym", asym, 4, "asymmetric, the student's frozen layers are symmetric"},
        std::tuple{"g64", g64, 4, "group size 64, the student uses 128"},
        std::tuple{"no-q", no_q, 4, "in the checkpoint, not int4"},
        std::tuple{"g128", Int4Params{}, 3, "the frozen layers are 3-bit; codes from an int4 checkpoint need --bits 4"}}) {
    CAPTURE(name);
    TrainConfig x = c;
    x.init_scales = std::string(name) == "g128" ? c.init_scales : gptq_checkpoint(name, params);
    x.bits = bits;
    const std::string e = error(x, std::string("bad-") + name);
    CHECK(e.find(fmt::format(fmt::runtime(where), name)) != std::string::npos);
    CHECK(e.find(want) != std::string::npos);
  }
}

TEST_CASE("a resumed run repeats the uninterrupted loss trajectory exactly") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-resume");
  const TrainConfig a = small_config(tmp / "a");
  run_training(a, quiet());
  TrainConfig b = small_config(tmp / "b");
  std::atomic<bool> stop{false};
  TrainHooks h = quiet();
  h.stop = &stop;
  h.loss_filter = [&](int64_t step, double loss) {
    if (step == 2) stop = true;  // stop after the third step: its checkpoint is the resume point
    return loss;
  };
  const TrainResult first = run_training(b, h);
  CHECK(first.stopped);
  CHECK(first.steps_done == 3);
  b.resume = true;
  const TrainResult second = run_training(b, quiet());
  CHECK(second.steps_done == 8);
  const auto ma = read_metrics(tmp / "a/metrics.jsonl");
  const auto mb = read_metrics(tmp / "b/metrics.jsonl");
  std::vector<double> la, lb;
  for (const auto& j : ma)
    if (j["type"] == "train") la.push_back(j["loss"].get<double>());
  for (const auto& j : mb)
    if (j["type"] == "train") lb.push_back(j["loss"].get<double>());
  REQUIRE(la.size() == 8);
  REQUIRE(lb.size() == 8);
  for (size_t i = 0; i < 8; ++i) {
    INFO("step ", i + 1, ": uninterrupted ", la[i], ", resumed ", lb[i]);
    CHECK(la[i] == lb[i]);  // bit-identical, not approximately equal
  }
  // A resume with a different setting that shapes the trajectory is refused.
  TrainConfig c = b;
  c.lr = 1e-3f;
  CHECK(error_of([&] { run_training(c, quiet()); }).find("--resume: lr is") != std::string::npos);
}

TEST_CASE("a non-finite loss skips the step; too many in a row abort and keep the last good checkpoint") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-nan");
  TrainConfig c = small_config(tmp / "out");
  c.save_every = 2;
  c.max_bad_steps = 3;
  std::vector<std::string> lines;
  TrainHooks h;
  h.log = [&](const std::string& s) { lines.push_back(s); };
  h.loss_filter = [](int64_t step, double loss) {
    if (step == 1) return std::nan("");
    if (step >= 4) return std::numeric_limits<double>::infinity();
    return loss;
  };
  const std::string e = error_of([&] { run_training(c, h); });
  CHECK(e.find("3 steps in a row had a non-finite loss") != std::string::npos);
  bool warned = false;
  for (const auto& l : lines) warned = warned || l.find("warning: step 1 has a non-finite loss") != std::string::npos;
  CHECK(warned);
  const auto f = SafetensorsFile::open(checkpoint_path(c.out));
  const TrainState st = load_train_state(checkpoint_path(c.out), f->get("master").numel());
  CHECK(st.step == 4);       // saved after step 4; steps 5-7 were bad
  CHECK(st.adam_step == 3);  // step 2 (index 1) was skipped
  const auto m = read_metrics(c.out + "/metrics.jsonl");
  int skipped = 0;
  for (const auto& j : m) skipped += j.value("skipped", false) ? 1 : 0;
  CHECK(skipped == 4);
}

TEST_CASE("sample_from_teacher: BOS then seq_len tokens per window, deterministic, batched") {
  // the tiny fixture teacher (no shared data needed): 5 sequences of 12 tokens, 2 at a time
  const ModelWeights w = load_hf_checkpoint(test::fixtures_dir() + "/train/tiny-train/teacher");
  runtime::ModelOptions mo;
  mo.backend = runtime::BackendKind::Cpu;
  mo.ctx = 13;
  mo.max_batch = 2;
  auto m = runtime::make_model(w, mo);
  const Windows a = sample_from_teacher(*m, 1, 5, 12, 42);
  REQUIRE(a.count() == 5);
  CHECK(a.seq_len == 12);
  for (int64_t i = 0; i < a.count(); ++i) {
    CHECK(a.tokens[static_cast<size_t>(i) * 13] == 1);
    for (int t = 0; t < 13; ++t) {
      const int32_t id = a.tokens[static_cast<size_t>(i) * 13 + t];
      CHECK((id >= 0 && id < w.config.vocab_size));
    }
  }
  CHECK(sample_from_teacher(*m, 1, 5, 12, 42).tokens == a.tokens);  // the same seed, the same windows
  CHECK(sample_from_teacher(*m, 1, 5, 12, 43).tokens != a.tokens);
  // window i depends on seed + i alone: the windows from seed 43 are those from seed 42 shifted by one, as long as
  // the batched products give the same logits for a row whatever the other rows (the CPU backend does)
  const Windows b = sample_from_teacher(*m, 1, 4, 12, 43);
  CHECK(std::vector<int32_t>(a.tokens.begin() + 13, a.tokens.end()) == b.tokens);
  mo.ctx = 12;
  auto short_ctx = runtime::make_model(w, mo);
  CHECK(error_of([&] { sample_from_teacher(*short_ctx, 1, 2, 12, 1); }).find("do not fit the teacher's context 12") !=
        std::string::npos);
}

TEST_CASE("--teacher-data: distillation on sequences sampled from the teacher") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-tdata");
  TrainConfig c = small_config(tmp / "out");
  c.data.clear();
  c.teacher_data = 8;
  c.val_fraction = 0.25f;
  c.steps = 2;
  c.eval_every = 1;
  std::vector<std::string> lines;
  TrainHooks h;
  h.log = [&](const std::string& s) { lines.push_back(s); };
  const TrainResult r = run_training(c, h);
  CHECK(r.steps_done == 2);
  bool sampled = false, windows = false;
  for (const auto& l : lines) {
    sampled = sampled || l.find("sampling 8 sequences of 32 tokens from the teacher") != std::string::npos;
    windows = windows || l.find("6 training windows, 2 validation windows") != std::string::npos;
  }
  CHECK(sampled);
  CHECK(windows);
  CHECK(std::isfinite(r.val_ppl));
  CHECK(r.val_ppl > 1.0);
}

TEST_CASE("qkd-train: Ctrl-C (a real SIGINT) saves a checkpoint, exits 130, and --resume continues from it") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-sigint");
  const std::string out = tmp / "out";
  const std::string ckpt = checkpoint_path(out);
  std::vector<std::string> flags = tiny_run_flags(out, 4);  // a progress line after every step
  bool sent = false;
  const BinRun a = run_qkd_train(flags, [&](pid_t pid, const std::string& err) {
    if (!sent && err.find("qkd-train: step 1/4 ") != std::string::npos) {
      REQUIRE(kill(pid, SIGINT) == 0);  // mid-run: step 2 has begun
      sent = true;
    }
  });
  INFO("stderr of the interrupted run:\n", a.err);
  REQUIRE(sent);
  CHECK(a.code == 130);
  CHECK(a.out.empty());  // no model path: nothing was exported
  CHECK_FALSE(fs::exists(out + "/model"));
  const std::string said = "qkd-train: stopped at step ";
  const size_t at = a.err.find(said);
  REQUIRE(at != std::string::npos);
  const int k = std::atoi(a.err.c_str() + at + said.size());
  CHECK(k >= 1);
  CHECK(k < 4);
  CHECK(a.err.find(fmt::format("stopped at step {}; the checkpoint is {}; continue with --resume", k, ckpt)) !=
        std::string::npos);
  const TrainState st = load_checkpoint(out);
  CHECK(st.step == k);
  CHECK(st.adam_step == k);
  CHECK(read_metrics(out + "/metrics.jsonl").size() == static_cast<size_t>(k));

  flags.push_back("--resume");
  const BinRun b = run_qkd_train(flags);
  INFO("stderr of the resumed run:\n", b.err);
  CHECK(b.code == 0);
  CHECK(b.err.find(fmt::format("qkd-train: resuming {} at step {}", ckpt, k)) != std::string::npos);
  CHECK(b.err.find(fmt::format("qkd-train: step {}/4 ", k)) == std::string::npos);  // the done steps are not redone
  CHECK(b.err.find(fmt::format("qkd-train: step {}/4 ", k + 1)) != std::string::npos);
  CHECK(b.out == out + "/model\n");
  CHECK(is_int4_checkpoint(out + "/model"));
  CHECK(load_checkpoint(out).step == 4);
  std::vector<int64_t> steps;
  for (const auto& j : read_metrics(out + "/metrics.jsonl"))
    if (j["type"] == "train") steps.push_back(j["step"].get<int64_t>());
  CHECK(steps == std::vector<int64_t>{1, 2, 3, 4});  // each step once, the interrupted run's and the resumed run's
}

TEST_CASE("qkd-train --config: the run uses the JSON's settings and a flag overrides one; bad keys fail first") {
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("train-config");
  const std::string out = tmp / "out";
  const nlohmann::json cfg = {
      {"teacher", test::shared_data() + "/models/teacher-25m"},
      {"data", nlohmann::json::array({test::fixtures_dir() + "/hf/eval.txt"})},  // a list may be a JSON array
      {"backend", "cpu"},
      {"out", out},
      {"seq_len", 5},
      {"batch", 1},
      {"steps", 3},
      {"lr", 3e-5},
      {"seed", 7},
      {"val_fraction", 0.2},
      {"eval_every", 0},
      {"eval_windows", 1},
      {"save_every", 0},
      {"progress", false},
  };
  const std::string path = tmp.write("settings.json", cfg.dump(2));
  // The flag comes before --config and still wins: the file is read first, wherever --config appears.
  const BinRun r = run_qkd_train({"--steps", "1", "--config", path});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("validation windows of 5 tokens") != std::string::npos);
  std::vector<nlohmann::json> train;
  for (const auto& j : read_metrics(out + "/metrics.jsonl"))
    if (j["type"] == "train") train.push_back(j);
  CHECK(train.size() == 1);  // --steps 1, not the file's 3
  const auto used = nlohmann::json::parse(load_checkpoint(out).config_json);
  CHECK(used["steps"] == 1);
  CHECK(used["seq_len"] == 5);
  CHECK(used["batch"] == 1);
  CHECK(used["seed"] == 7);
  CHECK(used["lr"].get<float>() == 3e-5f);
  CHECK(used["val_fraction"].get<float>() == 0.2f);
  CHECK(used["data"] == test::fixtures_dir() + "/hf/eval.txt");

  // An unknown key and a value of the wrong type: exit 1, one line naming the file and the key, and no output
  // directory (the file's own "out").
  const std::string bad_out = tmp / "never";
  for (const auto& [name, extra, want] :
       {std::tuple{"unknown.json", nlohmann::json{{"colour", "red"}}, std::string("unknown key \"colour\"")},
        std::tuple{"type.json", nlohmann::json{{"batch", "two"}},
                   std::string("key \"batch\" must be an integer, got \"two\"")}}) {
    nlohmann::json j = cfg;
    j["out"] = bad_out;
    j.update(extra);
    const std::string bad = tmp.write(name, j.dump());
    const BinRun e = run_qkd_train({"--config", bad});
    INFO(e.err);
    CHECK(e.code == 1);
    CHECK(e.err == fmt::format("qkd-train: error: {}: {}\n", bad, want));
    CHECK(e.out.empty());
    CHECK_FALSE(fs::exists(bad_out));
  }
}
