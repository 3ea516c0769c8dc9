// qkd-train's loop (train/trainer.h) on the CPU backend: distillation lowers the KD loss, the frozen layers keep
// their bits, a resumed run repeats the uninterrupted trajectory exactly, non-finite steps are skipped and then
// abort, and bad settings fail before any work. The real-teacher cases use ../shared's teacher-25m.
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "kernels/fake_quant.h"
#include "loader/hf_checkpoint.h"
#include "loader/int4_checkpoint.h"
#include "loader/safetensors.h"
#include "test_util.h"
#include "train/checkpoint.h"
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
