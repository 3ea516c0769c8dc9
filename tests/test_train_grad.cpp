// Whole-model training gradients against PyTorch autograd (tests/gen_train_fixtures.py): the loss and the
// gradient of every trainable tensor of a tiny LLaMA, for a dense student (CE + KL + contrastive) and for a QAT
// student (int4 g32 fake quantization with LSQ scales and clip factors, o/v frozen as int4).
// Built twice: test_train_grad on the CPU backend (fp32: relative error per tensor within 1e-4) and
// test_gpu_train_grad on CUDA (bf16 activations and compute weights: within 5e-2, see kGpuTol).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/int4_format.h"
#include "kernels/fake_quant.h"
#include "loader/hf_checkpoint.h"
#include "loader/safetensors.h"
#include "test_util.h"
#include "train/engine.h"
#include "train/plan.h"

namespace {

using namespace qkd;
using namespace qkd::train;

#ifdef QKD_TEST_CUDA
constexpr runtime::BackendKind kBackend = runtime::BackendKind::Cuda;
// bf16 activations and weights: each op rounds to 8 significant bits (relative 2^-9 = 2e-3); the gradient passes
// some 30 such roundings from the loss to the embedding, which compounds to about 1e-2 in the worst tensors.
constexpr double kTol = 5e-2;
#else
constexpr runtime::BackendKind kBackend = runtime::BackendKind::Cpu;
// fp32 throughout; the reference sums in another order: a few ulps per op over ~30 ops and 48-token reductions.
constexpr double kTol = 1e-4;
#endif

std::string fixture_dir() { return test::fixtures_dir() + "/train/tiny-train"; }

struct Fixture {
  nlohmann::json meta;
  std::vector<int32_t> windows;
  int batch = 0, seq = 0;
};

Fixture load_fixture() {
  Fixture f;
  std::ifstream in(fixture_dir() + "/windows.json");
  REQUIRE_MESSAGE(in.good(), "missing fixture: run tests/gen_train_fixtures.py on the GPU machine");
  f.meta = nlohmann::json::parse(in);
  for (const auto& row : f.meta["windows"]) {
    for (const auto& t : row) f.windows.push_back(t.get<int32_t>());
    f.seq = static_cast<int>(row.size()) - 1;
    ++f.batch;
  }
  return f;
}

std::vector<float> tensor(const SafetensorsFile& f, const std::string& name) { return to_f32(f.get(name)); }

// Relative L2 error of `got` against `want`.
double rel_err(const float* got, const std::vector<float>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

void compare_case(const std::string& case_name, const QuantSpec& q) {
  const Fixture fx = load_fixture();
  const ModelWeights student = load_hf_checkpoint(fixture_dir() + "/student");
  const ModelWeights teacher = load_hf_checkpoint(fixture_dir() + "/teacher");
  const auto ref = SafetensorsFile::open(fixture_dir() + "/" + case_name + ".safetensors");
  const Plan plan = make_plan(student.config, q);
  HostInit init = init_parameters(plan, student, nullptr);
  if (q.bits != kDenseBits) {
    // The fixture's step sizes and clip factors, and the frozen layers quantized with the fixture's scales.
    for (size_t l = 0; l < plan.layers.size(); ++l) {
      for (const LinearPlan* lin : plan.layers[l].linears()) {
        const std::string mod = linear_module_name(static_cast<int>(l), lin->module);
        if (lin->kind == LinearKind::Frozen) {
          const std::vector<float> s = tensor(*ref, "init." + mod + ".frozen_scales");
          const TensorView& wv = lin->module == Int4Module::O ? student.layers[l].wo : student.layers[l].wv;
          const std::vector<float> w = to_f32(wv);
          init.frozen[static_cast<size_t>(lin->frozen)] =
              cpu::fake_quant_export(w.data(), s.data(), nullptr, lin->n, lin->k, q.group_size, q.bits);
          continue;
        }
        const std::vector<float> s = tensor(*ref, "init." + mod + ".scales");
        const Segment& ss = plan.segments[static_cast<size_t>(lin->scale)];
        REQUIRE(static_cast<int64_t>(s.size()) == ss.numel);
        std::copy(s.begin(), s.end(), init.master.begin() + ss.offset);
        const std::vector<float> c = tensor(*ref, "init." + mod + ".clip");
        init.master[static_cast<size_t>(plan.segments[static_cast<size_t>(lin->clip)].offset)] = c[0];
      }
    }
  }
  EngineOptions eo;
  eo.backend = kBackend;
  eo.micro_batch = fx.batch;
  eo.seq_len = fx.seq;
  eo.loss.ce_weight = fx.meta["ce_weight"].get<float>();
  eo.loss.kd_weight = fx.meta["kd_weight"].get<float>();
  eo.loss.temperature = fx.meta["temperature"].get<float>();
  eo.loss.contrastive_weight = case_name == "dense" ? fx.meta["contrastive_weight"].get<float>() : 0.0f;
  eo.loss.contrastive_temperature = fx.meta["contrastive_temperature"].get<float>();
  auto engine = make_engine(eo, plan, init, &teacher);
  engine->begin_step(int64_t{fx.batch} * fx.seq);
  const LossSums s = engine->accumulate(fx.windows.data(), fx.batch);
  engine->finish_gradients();
  const std::vector<float> g = engine->gradients();

  const std::vector<float> want_loss = tensor(*ref, "loss");
  const double rows = static_cast<double>(s.rows);
  const double loss = (eo.loss.ce_weight * s.ce + eo.loss.kd_weight * s.kl + eo.loss.contrastive_weight * s.contrastive) / rows;
  INFO(fmt::format("{}: loss {} (ce {} kl {} ctr {}), PyTorch {} (ce {} kl {} ctr {})", case_name, loss, s.ce / rows,
                   s.kl / rows, s.contrastive / rows, want_loss[0], want_loss[1], want_loss[2], want_loss[3]));
  CHECK(std::abs(loss - want_loss[0]) <= kTol * std::abs(want_loss[0]));

  int compared = 0;
  double worst = 0.0;
  std::string worst_name;
  for (const Segment& seg : plan.segments) {
    const std::vector<float> want = tensor(*ref, "grad." + seg.name);
    REQUIRE_MESSAGE(static_cast<int64_t>(want.size()) == seg.numel, seg.name);
    double e = rel_err(g.data() + seg.offset, want);
    if (seg.name.ends_with(".clip")) {
      // A clip factor's gradient is one number, dclip = sum_g s_g dL/ds_e_g, a sum of signed terms that cancel:
      // its error is bounded through its terms, not its value. By Cauchy-Schwarz,
      // |error| <= ||s|| * ||error of dL/ds_e|| <= ||s|| * kTol * ||dL/ds_e||, with dL/ds_e = dscale / (gamma lsq).
      const std::string mod = seg.name.substr(0, seg.name.size() - 5);
      const std::vector<float> s0 = tensor(*ref, "init." + mod + ".scales");
      const std::vector<float> ds = tensor(*ref, "grad." + mod + ".scales");
      const double gamma = tensor(*ref, "init." + mod + ".clip")[0];
      const double lsq = 1.0 / std::sqrt(static_cast<double>(q.group_size) * ((1 << (q.bits - 1)) - 1));
      double ns = 0.0, nds = 0.0;
      for (size_t i = 0; i < s0.size(); ++i) {
        ns += static_cast<double>(s0[i]) * s0[i];
        nds += static_cast<double>(ds[i]) * ds[i];
      }
      const double bound = std::sqrt(ns) * std::sqrt(nds) / (gamma * lsq);
      e = std::abs(static_cast<double>(g[static_cast<size_t>(seg.offset)]) - want[0]) / std::max(bound, 1e-30);
    }
    INFO(fmt::format("{}: {} relative error {:.3e}", case_name, seg.name, e));
    CHECK(e <= kTol);
    if (e > worst) {
      worst = e;
      worst_name = seg.name;
    }
    ++compared;
  }
  MESSAGE(fmt::format("{} on {}: {} gradient tensors, worst relative error {:.3e} ({}); loss {:.6f} vs {:.6f}",
                      case_name, engine->backend_name(), compared, worst, worst_name, loss, want_loss[0]));
}

}  // namespace

TEST_CASE("dense student: loss and every gradient match PyTorch autograd (CE + KL + contrastive)") {
  QuantSpec q;
  q.bits = kDenseBits;
  q.frozen = 0;
  compare_case("dense", q);
}

TEST_CASE("QAT student: int4 g32 LSQ scales, clip factors, frozen o/v: gradients match PyTorch autograd") {
  QuantSpec q;
  q.bits = 4;
  q.group_size = 32;
  q.clip = true;
  q.frozen = int4_module_bit(Int4Module::O) | int4_module_bit(Int4Module::V);
  compare_case("qat", q);
}

#ifndef QKD_TEST_CUDA  // host-side set-up only: once, in the CPU build of this file
TEST_CASE("init_parameters with a clip search: frozen layers and step sizes are int4_quantize's ClipMse, bit for bit") {
  // The fixture's student at int4 g32 (its dims are multiples of 32): with QuantSpec::scale_search = ClipMse the
  // frozen o/v equal int4_quantize(w, ClipMse) and each trainable layer's initial step sizes are its scales; the
  // clip search differs from the full range somewhere (else this would test nothing).
  const ModelWeights student = load_hf_checkpoint(fixture_dir() + "/student");
  QuantSpec q;
  q.bits = 4;
  q.group_size = 32;
  q.frozen = int4_module_bit(Int4Module::O) | int4_module_bit(Int4Module::V);
  q.scale_search = Int4ScaleSearch::ClipMse;
  const Plan plan = make_plan(student.config, q);
  const HostInit init = init_parameters(plan, student, nullptr);
  QuantSpec q_plain = q;
  q_plain.scale_search = Int4ScaleSearch::None;
  const HostInit plain = init_parameters(make_plan(student.config, q_plain), student, nullptr);
  int frozen = 0, trainable = 0, differ = 0;
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    for (const LinearPlan* lin : plan.layers[l].linears()) {
      const LayerWeights& lw = student.layers[l];
      const TensorView& tv = lin->module == Int4Module::Q      ? lw.wq
                             : lin->module == Int4Module::K    ? lw.wk
                             : lin->module == Int4Module::V    ? lw.wv
                             : lin->module == Int4Module::O    ? lw.wo
                             : lin->module == Int4Module::Gate ? lw.w_gate
                             : lin->module == Int4Module::Up   ? lw.w_up
                                                               : lw.w_down;
      const std::vector<float> w = to_f32(tv);
      const Int4HostWeight want =
          int4_quantize(w.data(), lin->n, lin->k, 32, Int4Symmetry::Symmetric, ScaleType::BF16, Int4ScaleSearch::ClipMse);
      if (lin->kind == LinearKind::Frozen) {
        const Int4HostWeight& got = init.frozen[static_cast<size_t>(lin->frozen)];
        CHECK(got.packed == want.packed);
        CHECK(got.scales == want.scales);
        differ += got.scales != plain.frozen[static_cast<size_t>(lin->frozen)].scales;
        ++frozen;
        continue;
      }
      const Segment& ss = plan.segments[static_cast<size_t>(lin->scale)];
      REQUIRE(static_cast<size_t>(ss.numel) == want.scales.size());
      for (int64_t j = 0; j < ss.numel; ++j) {
        CHECK(float_to_bf16(init.master[static_cast<size_t>(ss.offset + j)]) == want.scales[static_cast<size_t>(j)]);
      }
      differ += !std::equal(init.master.begin() + ss.offset, init.master.begin() + ss.offset + ss.numel,
                            plain.master.begin() + ss.offset);
      ++trainable;
    }
  }
  CHECK(frozen == 2 * static_cast<int>(plan.layers.size()));
  CHECK(trainable == 5 * static_cast<int>(plan.layers.size()));
  CHECK(differ > 0);
}
#endif

TEST_CASE("evaluate: a count that is not a multiple of the micro-batch pads inside and counts only real rows") {
  // the dense student of the fixture, micro-batch = the fixture's batch; one window evaluated alone must give,
  // per row, what the same window gives when it fills the whole micro-batch
  const Fixture fx = load_fixture();
  REQUIRE(fx.batch >= 2);
  const ModelWeights student = load_hf_checkpoint(fixture_dir() + "/student");
  const ModelWeights teacher = load_hf_checkpoint(fixture_dir() + "/teacher");
  QuantSpec q;
  q.bits = kDenseBits;
  q.frozen = 0;
  const Plan plan = make_plan(student.config, q);
  EngineOptions eo;
  eo.backend = kBackend;
  eo.micro_batch = fx.batch;
  eo.seq_len = fx.seq;
  eo.loss.ce_weight = 1.0f;
  eo.loss.kd_weight = 1.0f;
  auto engine = make_engine(eo, plan, init_parameters(plan, student, nullptr), &teacher);
  const size_t w = static_cast<size_t>(fx.seq) + 1;
  const std::vector<int32_t> one(fx.windows.begin() + static_cast<std::ptrdiff_t>(w),
                                 fx.windows.begin() + static_cast<std::ptrdiff_t>(2 * w));  // window 1
  std::vector<int32_t> filled;
  for (int b = 0; b < fx.batch; ++b) filled.insert(filled.end(), one.begin(), one.end());
  const LossSums alone = engine->evaluate(one.data(), 1);
  const LossSums full = engine->evaluate(filled.data(), fx.batch);
  CHECK(alone.rows == fx.seq);
  CHECK(full.rows == int64_t{fx.batch} * fx.seq);
  CHECK(alone.ce / alone.rows == doctest::Approx(full.ce / full.rows).epsilon(1e-5));
  CHECK(alone.kl / alone.rows == doctest::Approx(full.kl / full.rows).epsilon(1e-4));
  // batch + 1 windows: one whole micro-batch and a padded one, equal to the sum of their parts
  std::vector<int32_t> more(fx.windows.begin(), fx.windows.end());
  more.insert(more.end(), one.begin(), one.end());
  const LossSums both = engine->evaluate(more.data(), fx.batch + 1);
  const LossSums first = engine->evaluate(fx.windows.data(), fx.batch);
  CHECK(both.rows == first.rows + alone.rows);
  CHECK(both.ce == doctest::Approx(first.ce + alone.ce).epsilon(1e-5));
  engine->begin_step(fx.seq);
  CHECK_THROWS_AS(engine->accumulate(one.data(), 1), qkd::Error);  // training keeps whole micro-batches
}
