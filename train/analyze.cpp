#include "train/analyze.h"

#include <algorithm>
#include <cmath>

#include "kernels/error.h"
#include "kernels/fake_quant.h"
#include "kernels/int4_gemm.h"
#include "train/engine.h"
#include "train/plan.h"

namespace qkd::train {

namespace {

double rel_l2(const std::vector<float>& got, const std::vector<float>& want, size_t off = 0, size_t n = SIZE_MAX) {
  n = std::min(n, want.size() - off);
  double num = 0.0, den = 0.0;
  for (size_t i = off; i < off + n; ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

constexpr Int4Module kModules[7] = {Int4Module::Q,    Int4Module::K,  Int4Module::V,   Int4Module::O,
                                    Int4Module::Gate, Int4Module::Up, Int4Module::Down};

}  // namespace

AnalyzeResult analyze_projections(const ModelWeights& model, const std::vector<int32_t>& windows,
                                  const AnalyzeOptions& opt) {
  QKD_CHECK(opt.bits >= 2 && opt.bits <= 4, "--bits: {} is outside 2..4 (the frozen layers are stored as int4)",
            opt.bits);
  QKD_CHECK(static_cast<int64_t>(windows.size()) == int64_t{opt.batch} * (opt.seq_len + 1),
            "analyze: {} tokens given for {} windows of {} + 1", windows.size(), opt.batch, opt.seq_len);
  EngineOptions eo;
  eo.backend = opt.backend;
  eo.micro_batch = opt.batch;
  eo.seq_len = opt.seq_len;
  eo.loss = {1.0f, 0.0f, 1.0f, 0.0f, 0.1f};  // cross-entropy on the data

  auto run = [&](Int4ModuleSet frozen, std::string* backend, std::vector<Int4HostWeight>* frozen_out,
                 HostInit* init_out) {
    QuantSpec q;
    q.bits = kDenseBits;
    q.group_size = opt.group_size;
    q.frozen = frozen;
    q.frozen_bits = opt.bits;
    const Plan plan = make_plan(model.config, q);
    HostInit init = init_parameters(plan, model, nullptr);
    auto engine = make_engine(eo, plan, init, nullptr);
    if (backend != nullptr) *backend = engine->backend_name();
    Engine::Probe p = engine->probe(windows.data());
    if (frozen_out != nullptr) *frozen_out = init.frozen;
    if (init_out != nullptr) *init_out = std::move(init);
    return std::make_pair(std::move(p), plan);
  };

  AnalyzeResult result;
  HostInit base_init;
  auto [base, base_plan] = run(0, &result.backend, nullptr, &base_init);
  for (Int4Module m : kModules) {
    std::vector<Int4HostWeight> frozen;
    auto [p, plan] = run(int4_module_bit(m), nullptr, &frozen, nullptr);
    ProjectionDamage d;
    d.module = m;
    d.logits_rel = rel_l2(p.logits, base.logits);
    for (size_t l = 0; l < p.layer_out.size(); ++l) d.layer_rel.push_back(rel_l2(p.layer_out[l], base.layer_out[l]));
    // Gradients of every tensor the two plans share (the quantized module has none), matched by name.
    int count = 0;
    double sum = 0.0;
    for (const Segment& s : plan.segments) {
      const auto it = std::find_if(base_plan.segments.begin(), base_plan.segments.end(),
                                   [&](const Segment& b) { return b.name == s.name; });
      if (it == base_plan.segments.end()) continue;
      std::vector<float> got(p.grad.begin() + s.offset, p.grad.begin() + s.offset + s.numel);
      std::vector<float> want(base.grad.begin() + it->offset, base.grad.begin() + it->offset + it->numel);
      const double e = rel_l2(got, want);
      sum += e;
      d.grad_rel_max = std::max(d.grad_rel_max, e);
      ++count;
    }
    d.grad_rel_mean = count > 0 ? sum / count : 0.0;
    // The weights' own quantization error, over all layers.
    double num = 0.0, den = 0.0;
    int fi = 0;
    for (size_t l = 0; l < base_plan.layers.size(); ++l) {
      for (const LinearPlan* lin : base_plan.layers[l].linears()) {
        if (lin->module != m) continue;
        const Segment& s = base_plan.segments[static_cast<size_t>(lin->w)];
        const Int4HostWeight& f = frozen[static_cast<size_t>(fi++)];
        std::vector<float> deq(static_cast<size_t>(s.numel));
        cpu::dequantize_int4(f.view(), deq.data());
        for (int64_t i = 0; i < s.numel; ++i) {
          const double w = base_init.master[static_cast<size_t>(s.offset + i)];
          num += (deq[static_cast<size_t>(i)] - w) * (deq[static_cast<size_t>(i)] - w);
          den += w * w;
        }
      }
    }
    d.weight_rel = std::sqrt(num / std::max(den, 1e-300));
    result.ranked.push_back(std::move(d));
  }
  std::stable_sort(result.ranked.begin(), result.ranked.end(),
                   [](const ProjectionDamage& a, const ProjectionDamage& b) { return a.logits_rel > b.logits_rel; });
  result.suggested_freeze = int4_module_bit(result.ranked[0].module) | int4_module_bit(result.ranked[1].module);
  return result;
}

}  // namespace qkd::train
