// qkd-train's loop (train/trainer.h) on the CUDA backend with teacher-25m: a run stopped at step k (the stop hook
// that SIGINT sets) and resumed repeats the uninterrupted loss trajectory bit for bit and ends in the same
// optimizer state, and the exported o/v layers are bit for bit the initial round to nearest of the teacher's.
// Every CUDA reduction of the engine has a fixed order, so the equality is exact, not approximate. Needs a GPU
// (label gpu) and ../shared's teacher-25m; skips otherwise.
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <fstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "kernels/fake_quant.h"
#include "kernels/int4_dequant.h"
#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"
#include "loader/hf_checkpoint.h"
#include "loader/int4_checkpoint.h"
#include "loader/safetensors.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/ops.h"
#include "train/trainer.h"

namespace {

using namespace qkd;
using namespace qkd::train;

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// 12 steps of 8 sequences of 128 tokens (micro-batches of 4), checkpoints every 5 steps: seconds on an H200.
TrainConfig cuda_config(const std::string& out) {
  TrainConfig c;
  c.teacher = test::shared_data() + "/models/teacher-25m";
  c.data = test::shared_data() + "/corpora/tinystories/stories_cased.txt";
  c.out = out;
  c.backend = "cuda";
  c.seq_len = 128;
  c.batch = 8;
  c.micro_batch = 4;
  c.lr = 5e-5f;
  c.warmup = 2;
  c.steps = 12;
  c.eval_every = 6;
  c.eval_windows = 8;
  c.save_every = 5;
  c.val_fraction = 0.01f;
  c.progress = false;
  return c;
}

TrainHooks quiet() {
  TrainHooks h;
  h.log = [](const std::string&) {};
  return h;
}

// The metrics lines of one type, in file order.
std::vector<nlohmann::json> metrics_of(const std::string& out, const std::string& type) {
  std::vector<nlohmann::json> v;
  std::ifstream in(out + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["type"] == type) v.push_back(std::move(j));
  }
  return v;
}

TrainState final_state(const std::string& out) {
  const std::string p = checkpoint_path(out);
  return load_train_state(p, SafetensorsFile::open(p)->get("master").numel());
}

}  // namespace

TEST_CASE("CUDA: a run stopped at step 4 and resumed repeats the uninterrupted trajectory bit for bit") {
  if (!have_gpu()) {
    MESSAGE("skipped: no CUDA device");
    return;
  }
  QKD_REQUIRE_SHARED_DATA();
  test::TempDir tmp("gpu-train-resume");
  const TrainConfig a = cuda_config(tmp / "a");
  const TrainResult ra = run_training(a, quiet());
  REQUIRE(ra.steps_done == 12);

  TrainConfig b = cuda_config(tmp / "b");
  std::atomic<bool> stop{false};
  TrainHooks h = quiet();
  h.stop = &stop;
  h.loss_filter = [&](int64_t step, double loss) {
    if (step == 3) stop = true;  // the fourth step ends the run with a checkpoint (not a save_every multiple)
    return loss;
  };
  const TrainResult first = run_training(b, h);
  CHECK(first.stopped);
  CHECK(first.steps_done == 4);
  CHECK(final_state(b.out).step == 4);
  b.resume = true;
  const TrainResult second = run_training(b, quiet());
  CHECK(second.steps_done == 12);

  const auto ta = metrics_of(a.out, "train"), tb = metrics_of(b.out, "train");
  REQUIRE(ta.size() == 12);
  REQUIRE(tb.size() == 12);
  for (size_t i = 0; i < 12; ++i) {
    INFO("step ", i + 1, ": uninterrupted ", ta[i].dump(), ", resumed ", tb[i].dump());
    CHECK(tb[i]["step"] == ta[i]["step"]);
    // bit-identical, not approximately equal (JSON keeps a double's 17 significant digits)
    CHECK(tb[i]["loss"].get<double>() == ta[i]["loss"].get<double>());
    CHECK(tb[i]["kl"].get<double>() == ta[i]["kl"].get<double>());
    CHECK(tb[i]["grad_norm"].get<double>() == ta[i]["grad_norm"].get<double>());
  }
  const auto va = metrics_of(a.out, "val"), vb = metrics_of(b.out, "val");
  REQUIRE(va.size() == 3);  // steps 0, 6, 12
  REQUIRE(vb.size() == 3);
  for (size_t i = 0; i < 3; ++i) CHECK(vb[i]["ce"].get<double>() == va[i]["ce"].get<double>());

  // The end states agree to the bit: master weights, both moments, the frozen layers.
  const TrainState sa = final_state(a.out), sb = final_state(b.out);
  CHECK(sa.step == 12);
  CHECK(sb.step == 12);
  CHECK(sa.adam_step == sb.adam_step);
  REQUIRE(sa.master.size() == sb.master.size());
  CHECK(std::memcmp(sa.master.data(), sb.master.data(), sa.master.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(sa.m.data(), sb.m.data(), sa.m.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(sa.v.data(), sb.v.data(), sa.v.size() * sizeof(float)) == 0);
  MESSAGE(fmt::format("12 CUDA steps, loss {:.6f} -> {:.6f}; resumed at step 4: identical to the bit",
                      ta.front()["loss"].get<double>(), ta.back()["loss"].get<double>()));

  // ov-freeze on CUDA: the exported o/v weights (and the checkpoint's frozen layers) are bit for bit the
  // round-to-nearest int4 g128 of the teacher's, computed here on the host.
  const ModelWeights teacher = load_hf_checkpoint(a.teacher);
  const ModelWeights student = load_int4_checkpoint(ra.model_dir);
  REQUIRE(sa.frozen.size() == 2 * teacher.layers.size());
  int checked = 0;
  for (size_t l = 0; l < teacher.layers.size(); ++l) {
    for (const auto& [tv, sv] : {std::pair{&teacher.layers[l].wo, &student.layers[l].wo},
                                 std::pair{&teacher.layers[l].wv, &student.layers[l].wv}}) {
      INFO("layer ", l, " ", tv->name);
      const std::vector<float> w = to_f32(*tv);
      const int n = static_cast<int>(tv->shape[0]), k = static_cast<int>(tv->shape[1]);
      std::vector<float> s(static_cast<size_t>(n) * (k / 128));
      cpu::fake_quant_init_scales(w.data(), n, k, 128, 4, s.data());
      const Int4HostWeight want = cpu::fake_quant_export(w.data(), s.data(), nullptr, n, k, 128, 4);
      REQUIRE(sv->dtype == DType::I4);
      const Int4Weight got = sv->int4_weight();
      CHECK(std::memcmp(got.packed, want.packed.data(), want.packed.size() * 4) == 0);
      CHECK(std::memcmp(got.scales, want.scales.data(), want.scales.size() * 2) == 0);
      // and the checkpoint holds these bits among its frozen layers
      bool in_ckpt = false;
      for (const Int4HostWeight& f : sa.frozen)
        in_ckpt = in_ckpt || (f.packed == want.packed && f.scales == want.scales);
      CHECK(in_ckpt);
      ++checked;
    }
  }
  CHECK(checked == 16);
}

// The frozen layers' products through train::CudaOps: below kDequantMinRows rows the fused int4 GEMM, from there on
// cuBLASLt on a dequantized bf16 copy in one scratch shared by every weight. Both against the CPU twin
// (cpu::int4_gemm_forward/backward, exact fp32 weights) within the bound test_gpu_int4_gemm uses (1e-2 of the
// norm: bf16 operands and output, each weight rounded to bf16 on the GPU). Two weights of different shapes
// alternate through the scratch, so a product that read the other weight's copy would fail; every product runs
// twice and must give the same bits (resume relies on it); = outputs are NaN-poisoned, += ones start random.
TEST_CASE("CudaOps int4 products: fused below kDequantMinRows, dequantized copy + cuBLASLt above; forward and dgrad") {
  if (!have_gpu()) {
    MESSAGE("skipped: no CUDA device");
    return;
  }
  using T = CudaOps::T;
  std::mt19937 rng(20261205);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto normal = [&](size_t count, float sd, float mean) {
    std::vector<float> v(count);
    for (float& x : v) x = mean + sd * nd(rng);
    return v;
  };
  auto bf16_values = [](std::vector<float>& v) {  // v rounded to bf16 in place; returns the bits
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      b[i] = float_to_bf16(v[i]);
      v[i] = bf16_to_float(b[i]);
    }
    return b;
  };
  struct W {
    int n, k, group_size;
    Int4Symmetry sym;
    ScaleType st;
  };
  // o_proj-like (square, g128 symmetric) and v_proj-like (fewer rows, per-channel asymmetric fp16 scales)
  const W shapes[] = {{384, 384, 128, Int4Symmetry::Symmetric, ScaleType::BF16},
                      {136, 384, 384, Int4Symmetry::Asymmetric, ScaleType::FP16}};
  CudaOps ops;
  std::vector<Int4HostWeight> host;
  std::vector<Int4Weight> dev;
  for (const W& s : shapes) {
    std::vector<float> w = normal(static_cast<size_t>(s.n) * s.k, 0.05f, s.sym == Int4Symmetry::Asymmetric ? 0.01f : 0.0f);
    host.push_back(int4_quantize(w.data(), s.n, s.k, s.group_size, s.sym, s.st));
    dev.push_back(ops.upload_int4(host.back()));
  }
  int index = 0;
  for (int m : {3, kDequantMinRows - 1, kDequantMinRows, 517}) {
    for (bool dgrad : {false, true}) {
      for (size_t wi : {size_t{0}, size_t{1}, size_t{0}}) {
        const Accumulate mode = index++ % 2 == 0 ? Accumulate::Overwrite : Accumulate::Add;
        const Int4HostWeight& q = host[wi];
        CAPTURE(m);
        CAPTURE(dgrad);
        CAPTURE(q.n);
        CAPTURE(mode == Accumulate::Add);
        const int in_cols = dgrad ? q.n : q.k, out_cols = dgrad ? q.k : q.n;
        const size_t in_count = static_cast<size_t>(m) * in_cols, out_count = static_cast<size_t>(m) * out_cols;
        std::vector<float> x = normal(in_count, 1.0f, 0.0f), y0 = normal(out_count, 1.0f, 0.0f);
        const std::vector<uint16_t> xb = bf16_values(x);
        std::vector<uint16_t> y0b = bf16_values(y0);
        if (mode == Accumulate::Overwrite) y0b.assign(out_count, 0xFFFF);  // NaN
        T* dx = ops.alloc<T>(static_cast<int64_t>(in_count));
        T* dy = ops.alloc<T>(static_cast<int64_t>(out_count));
        ops.upload(reinterpret_cast<uint16_t*>(dx), xb.data(), static_cast<int64_t>(in_count));
        std::vector<uint16_t> got[2];
        for (auto& g : got) {
          ops.upload(reinterpret_cast<uint16_t*>(dy), y0b.data(), static_cast<int64_t>(out_count));
          if (dgrad) {
            ops.int4_linear_dgrad(dy, dx, dev[wi], m, mode);
          } else {
            ops.int4_linear(dy, dx, dev[wi], m, mode);
          }
          g.resize(out_count);
          ops.download(g.data(), reinterpret_cast<const uint16_t*>(dy), static_cast<int64_t>(out_count));
        }
        CHECK(got[0] == got[1]);
        std::vector<float> ref(mode == Accumulate::Add ? y0 : std::vector<float>(out_count, 0.0f));
        if (dgrad) {
          cpu::int4_gemm_backward({ref.data(), x.data(), q.view(), m, mode});
        } else {
          cpu::int4_gemm_forward({ref.data(), x.data(), q.view(), m, mode});
        }
        double err2 = 0.0, ref2 = 0.0;
        size_t non_finite = 0;
        for (size_t i = 0; i < out_count; ++i) {
          const double g = bf16_to_float(got[0][i]);
          if (!std::isfinite(g)) {
            ++non_finite;
            continue;
          }
          err2 += (g - ref[i]) * (g - ref[i]);
          ref2 += static_cast<double>(ref[i]) * ref[i];
        }
        CHECK(non_finite == 0);
        CHECK(std::sqrt(err2 / ref2) <= 1e-2);
      }
    }
  }
}
