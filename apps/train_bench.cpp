#include "apps/train_bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "apps/bench_util.h"
#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/gemm.h"
#include "loader/int4_checkpoint.h"
#include "runtime/cuda_layer_ops.h"
#include "runtime/device_memory.h"
#include "train/engine.h"

namespace qkd::bench {

namespace {

constexpr float kInitStd = 0.02f;  // Hugging Face's LlamaConfig.initializer_range
constexpr double kGiB = 1073741824.0;

// splitmix64 as a hash of the element index: every element's value is fixed by (seed, index), whatever thread
// fills it.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Mean 0, standard deviation 1, roughly normal: the centred sum of four 16-bit uniform draws (Irwin-Hall, variance
// 4/12) over its standard deviation. Random weights of the right scale are all a speed measurement needs.
float normalish(uint64_t bits) {
  float sum = 0.0f;
  for (int i = 0; i < 4; ++i) sum += static_cast<float>((bits >> (16 * i)) & 0xFFFFu) * (1.0f / 65536.0f);
  return (sum - 2.0f) * 1.7320508f;  // sqrt(3) = 1 / sqrt(4/12)
}

// Host bf16 weights of shape c: matrices ~ N(0, 0.02^2)-like, norm weights 1. One buffer, filled in parallel.
ModelWeights random_model(const ModelConfig& c, uint64_t seed, const std::string& label) {
  ModelWeights w;
  w.config = c;
  w.source = fmt::format("random weights ({})", label);
  w.format = "random";
  w.layers.resize(static_cast<size_t>(c.n_layers));
  struct Spec {
    TensorView* view;
    std::string name;
    std::vector<int64_t> shape;
    bool norm;
  };
  const int64_t q_rows = int64_t{c.n_heads} * c.head_dim, kv_rows = int64_t{c.n_kv_heads} * c.head_dim;
  std::vector<Spec> specs;
  specs.push_back({&w.tok_embeddings, "model.embed_tokens.weight", {c.vocab_size, c.dim}, false});
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    const std::string p = fmt::format("model.layers.{}.", i);
    specs.push_back({&l.attn_norm, p + "input_layernorm.weight", {c.dim}, true});
    specs.push_back({&l.wq, p + "self_attn.q_proj.weight", {q_rows, c.dim}, false});
    specs.push_back({&l.wk, p + "self_attn.k_proj.weight", {kv_rows, c.dim}, false});
    specs.push_back({&l.wv, p + "self_attn.v_proj.weight", {kv_rows, c.dim}, false});
    specs.push_back({&l.wo, p + "self_attn.o_proj.weight", {c.dim, q_rows}, false});
    specs.push_back({&l.ffn_norm, p + "post_attention_layernorm.weight", {c.dim}, true});
    specs.push_back({&l.w_gate, p + "mlp.gate_proj.weight", {c.ffn_dim, c.dim}, false});
    specs.push_back({&l.w_up, p + "mlp.up_proj.weight", {c.ffn_dim, c.dim}, false});
    specs.push_back({&l.w_down, p + "mlp.down_proj.weight", {c.dim, c.ffn_dim}, false});
  }
  specs.push_back({&w.norm, "model.norm.weight", {c.dim}, true});
  if (!c.tied_embeddings) specs.push_back({&w.lm_head, "lm_head.weight", {c.vocab_size, c.dim}, false});

  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (const Spec& s : specs) {
    offsets.push_back(total);
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    total += n;
  }
  std::shared_ptr<uint16_t[]> buf(new uint16_t[static_cast<size_t>(total)]);  // not zeroed: every value is written
  uint16_t* data = buf.get();
  const uint64_t key = splitmix64(seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total; ++i)
    data[i] = float_to_bf16(kInitStd * normalish(splitmix64(key ^ static_cast<uint64_t>(i))));
  const uint16_t one = float_to_bf16(1.0f);
  for (size_t j = 0; j < specs.size(); ++j) {
    const Spec& s = specs[j];
    TensorView& t = *s.view;
    t.name = s.name;
    t.dtype = DType::BF16;
    t.shape = s.shape;
    t.data = reinterpret_cast<const std::byte*>(data + offsets[j]);
    t.nbytes = static_cast<size_t>(t.numel()) * sizeof(uint16_t);
    if (s.norm) std::fill(data + offsets[j], data + offsets[j] + t.numel(), one);
  }
  if (c.tied_embeddings) w.lm_head = w.tok_embeddings;
  w.storage.push_back(buf);
  return w;
}

// cuBLASLt bf16 GEMM y[s, s] = a[s, s] . b[s, s]^T (the forward product's layout) on random operands, with its
// own stream, memory and handle.
struct SquareGemm {
  runtime::CudaStream stream;
  runtime::DeviceArena arena;
  CublasLt lt;
  GemmArgs g{};
  int s;

  explicit SquareGemm(int size) : s(size) {
    const int64_t n = int64_t{s} * s;
    const size_t bytes = static_cast<size_t>(n) * sizeof(__nv_bfloat16);
    const size_t oa = arena.reserve(bytes), ob = arena.reserve(bytes), oy = arena.reserve(bytes);
    arena.allocate();
    auto* a = arena.at<__nv_bfloat16>(oa);
    auto* b = arena.at<__nv_bfloat16>(ob);
    auto* y = arena.at<__nv_bfloat16>(oy);
    runtime::fill_uniform_bf16(a, n, -1.0f, 1.0f, 11, stream.get());
    runtime::fill_uniform_bf16(b, n, -1.0f, 1.0f, 12, stream.get());
    runtime::fill_uniform_bf16(y, n, -1.0f, 1.0f, 13, stream.get());
    g.y = y;
    g.a = a;
    g.b = b;
    g.m = g.n = g.k = s;
    g.trans_a = Transpose::No;
    g.trans_b = Transpose::Yes;
    g.out = GemmOut::BF16;
    g.mode = Accumulate::Overwrite;
  }
  void run() { cuda::gemm(lt, g, stream.get()); }
  double tflops(double ms) const { return 2.0 * static_cast<double>(s) * s * s / (ms * 1e-3) / 1e12; }
};

// The best and the median rate of `reps` calls after warm-up, each timed alone, in TFLOP/s.
nlohmann::json measure_gemm(int s, int reps) {
  SquareGemm gemm(s);
  std::vector<double> ms;
  for (int i = 0; i < reps + 3; ++i) {
    const double t = event_ms(gemm.stream.get(), [&] { gemm.run(); });
    if (i >= 3) ms.push_back(t);
  }
  const double best = *std::min_element(ms.begin(), ms.end());
  return {{"m", s}, {"n", s}, {"k", s}, {"reps", reps}, {"ms_min", best}, {"ms_median", median(ms)},
          {"tflops", gemm.tflops(best)}, {"tflops_median", gemm.tflops(median(ms))}};
}

// The same product back to back for about `seconds` (events between calls, no host wait until the end), as a
// training step keeps the chip busy: the median rate over the second half tells whether the clock sags under
// sustained load, which a burst of 10 calls does not show.
nlohmann::json measure_gemm_sustained(int s, double seconds) {
  SquareGemm gemm(s);
  const double one = event_ms(gemm.stream.get(), [&] { gemm.run(); });
  const int reps = std::clamp(static_cast<int>(seconds * 1e3 / std::max(one, 1e-3)), 20, 20000);
  std::vector<runtime::CudaEvent> ev(static_cast<size_t>(reps) + 1);
  CUDA_CHECK(cudaEventRecord(ev[0].get(), gemm.stream.get()));
  for (int i = 0; i < reps; ++i) {
    gemm.run();
    CUDA_CHECK(cudaEventRecord(ev[static_cast<size_t>(i) + 1].get(), gemm.stream.get()));
  }
  CUDA_CHECK(cudaStreamSynchronize(gemm.stream.get()));
  std::vector<double> first, last;  // the first 10 calls, the second half
  for (int i = 0; i < reps; ++i) {
    float t = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&t, ev[static_cast<size_t>(i)].get(), ev[static_cast<size_t>(i) + 1].get()));
    if (i < 10) first.push_back(t);
    if (i >= reps / 2) last.push_back(t);
  }
  return {{"m", s}, {"reps", reps}, {"seconds", seconds}, {"tflops_first10", gemm.tflops(median(first))},
          {"tflops_second_half", gemm.tflops(median(last))}};
}

double device_memory_used() {
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<double>(total_b - free_b);
}

}  // namespace

StepFlops distill_step_flops(const train::Plan& plan, int batch, int seq_len) {
  const ModelConfig& c = plan.config;
  double params = 0.0, frozen = 0.0;
  for (const train::LayerPlan& l : plan.layers)
    for (const train::LinearPlan* lin : l.linears()) {
      const double p = static_cast<double>(lin->n) * lin->k;
      params += p;
      if (lin->kind == train::LinearKind::Frozen) frozen += p;
    }
  params += static_cast<double>(c.vocab_size) * c.dim;  // LM head
  const double tokens = static_cast<double>(batch) * seq_len;
  // one causal attention forward over all layers: QK^T and PV, 2 T seq a each, half of the positions masked
  const double attn_fwd = static_cast<double>(c.n_layers) * 2.0 * tokens * seq_len * c.n_heads * c.head_dim;
  StepFlops f;
  f.student_linear = 6.0 * params * tokens;
  f.teacher_linear = 2.0 * params * tokens;
  f.student_attention = 3.0 * attn_fwd;
  f.teacher_attention = attn_fwd;
  f.frozen_wgrad = 2.0 * frozen * tokens;
  return f;
}

nlohmann::json train_bench(const ModelConfig& c, const std::string& label, const TrainBenchOptions& o) {
  QKD_CHECK(o.batch > 0 && o.seq_len > 1 && o.steps > 0 && o.warmup >= 0,
            "train bench: batch {} seq_len {} steps {} warmup {} (batch, steps > 0, seq_len > 1, warmup >= 0)",
            o.batch, o.seq_len, o.steps, o.warmup);
  QKD_CHECK(c.max_seq_len == 0 || o.seq_len <= c.max_seq_len, "--seq-len {} is longer than {}'s context ({})",
            o.seq_len, label, c.max_seq_len);
  int devices = 0;
  const cudaError_t derr = cudaGetDeviceCount(&devices);
  if (derr != cudaSuccess || devices == 0)
    fail("qkd-bench --train needs a CUDA device: none found (cudaGetDeviceCount: {})",
         derr != cudaSuccess ? cudaGetErrorString(derr) : "0 devices");
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  // The GEMM ceiling before the engine takes the memory, and again after it is gone: the better of the two is
  // the rate MFU(gemm) is a fraction of (a clock that sagged during the run would lower it, not raise it).
  const nlohmann::json gemm_before = measure_gemm(o.gemm_size, 10);

  const train::QuantSpec quant;  // bits 4, group 128, o and v frozen
  const train::Plan plan = train::make_plan(c, quant);
  auto t0 = Clock::now();
  const ModelWeights weights = random_model(c, o.seed, label);
  const double random_ms = ms_since(t0);
  t0 = Clock::now();
  nlohmann::json steps_json;
  std::vector<double> step_ms;
  double kl_first = 0.0, kl_last = 0.0, gnorm_first = 0.0, gnorm_last = 0.0, memory_used = 0.0, engine_ms = 0.0;
  bool finite = true;
  nlohmann::json phases = nlohmann::json::object();
  {
    std::unique_ptr<train::Engine> engine;
    {
      const train::HostInit init = train::init_parameters(plan, weights, nullptr);
      train::EngineOptions eo;
      eo.backend = runtime::BackendKind::Cuda;
      eo.micro_batch = o.batch;
      eo.seq_len = o.seq_len;
      eo.loss.ce_weight = 0.0f;
      eo.loss.kd_weight = 1.0f;
      eo.loss.temperature = 1.0f;
      eo.loss.contrastive_weight = 0.0f;
      engine = train::make_engine(eo, plan, init, &weights);
    }
    engine_ms = ms_since(t0);
    memory_used = device_memory_used();

    std::mt19937_64 rng(o.seed);
    std::uniform_int_distribution<int32_t> token(0, c.vocab_size - 1);
    std::vector<int32_t> windows(static_cast<size_t>(o.batch) * (o.seq_len + 1));
    const int64_t step_tokens = int64_t{o.batch} * o.seq_len;
    for (int i = 0; i < o.warmup + o.steps; ++i) {
      for (int32_t& t : windows) t = token(rng);
      const auto ts = Clock::now();
      engine->begin_step(step_tokens);
      const train::LossSums s = engine->accumulate(windows.data(), o.batch);
      const double gnorm = engine->finish_gradients();
      train::AdamWStep a;  // qkd-train's defaults: lr 1e-5, clip the global norm at 1
      a.lr = 1e-5f;
      a.scale_lr = 1e-5f;
      a.grad_scale = std::isfinite(gnorm) && gnorm > 1.0 ? static_cast<float>(1.0 / gnorm) : 1.0f;
      a.step = i + 1;
      engine->apply(a);  // synchronises: the host clock now covers the whole step's device work
      const double ms = ms_since(ts);
      const double kl = s.kl / static_cast<double>(std::max<int64_t>(s.rows, 1));
      finite = finite && std::isfinite(kl) && std::isfinite(gnorm);
      if (i < o.warmup) continue;
      if (step_ms.empty()) {
        kl_first = kl;
        gnorm_first = gnorm;
      }
      kl_last = kl;
      gnorm_last = gnorm;
      step_ms.push_back(ms);
    }
    // QKD_TRAIN_PHASES: ms per step of each phase, over all steps (warm-up included)
    for (const auto& [name, ms] : engine->phase_ms()) phases[name] = ms / static_cast<double>(o.warmup + o.steps);
  }
  if (!finite) std::fprintf(stderr, "qkd-bench --train: warning: a step had a non-finite loss or gradient norm\n");

  const nlohmann::json gemm_after = measure_gemm(o.gemm_size, 10);
  const double gemm_tflops = std::max(gemm_before["tflops"].get<double>(), gemm_after["tflops"].get<double>());
  const nlohmann::json gemm_sustained = measure_gemm_sustained(o.gemm_size, 3.0);

  const StepFlops f = distill_step_flops(plan, o.batch, o.seq_len);
  const double ms = median(step_ms);
  const double tokens = static_cast<double>(o.batch) * o.seq_len;
  const double tflops = f.total() / (ms * 1e-3) / 1e12;
  // the flag's float as the decimal it was written as (989.4, not 989.4000244)
  const double peak = std::stod(fmt::format("{}", o.peak_tflops));
  double mean = 0.0;
  for (double t : step_ms) mean += t / static_cast<double>(step_ms.size());

  return {{"tool", "qkd-bench"},
          {"mode", "train"},
          {"phase_ms_per_step", phases},
          {"device", prop.name},
          {"sms", prop.multiProcessorCount},
          {"model", label},
          {"shape",
           {{"dim", c.dim}, {"n_layers", c.n_layers}, {"n_heads", c.n_heads}, {"n_kv_heads", c.n_kv_heads},
            {"head_dim", c.head_dim}, {"ffn_dim", c.ffn_dim}, {"vocab_size", c.vocab_size}}},
          {"batch", o.batch},
          {"micro_batch", o.batch},
          {"seq_len", o.seq_len},
          {"tokens_per_step", tokens},
          {"quant",
           {{"bits", quant.bits}, {"group_size", quant.group_size}, {"frozen", format_int4_modules(quant.frozen)}}},
          {"loss", {{"kd_weight", 1.0}, {"temperature", 1.0}, {"ce_weight", 0.0}}},
          {"precision", "fp32 master weights and AdamW state, bf16 compute"},
          {"setup_ms", {{"random_weights", random_ms}, {"engine", engine_ms}}},
          {"device_memory_used", memory_used},
          {"warmup", o.warmup},
          {"steps", o.steps},
          {"step_ms",
           {{"median", ms}, {"mean", mean}, {"min", *std::min_element(step_ms.begin(), step_ms.end())},
            {"max", *std::max_element(step_ms.begin(), step_ms.end())}, {"all", step_ms}}},
          {"tokens_per_s", tokens / (ms * 1e-3)},
          {"flops",
           {{"student_linear", f.student_linear}, {"teacher_linear", f.teacher_linear},
            {"student_attention", f.student_attention}, {"teacher_attention", f.teacher_attention},
            {"total", f.total()}, {"frozen_wgrad", f.frozen_wgrad}}},
          {"tflops", tflops},
          {"peak_tflops", peak},
          {"gemm",
           {{"before", gemm_before}, {"after", gemm_after}, {"tflops", gemm_tflops}, {"sustained", gemm_sustained}}},
          {"mfu_peak", tflops / peak},
          {"mfu_gemm", tflops / gemm_tflops},
          {"kl", {{"first", kl_first}, {"last", kl_last}}},
          {"grad_norm", {{"first", gnorm_first}, {"last", gnorm_last}}},
          {"finite", finite}};
}

void print_train_bench(const nlohmann::json& r) {
  const auto& sm = r["step_ms"];
  const auto& f = r["flops"];
  std::printf("qkd-bench --train: %s on %s, batch %d x seq %d (%.0f tokens/step), int%d g%d, %s frozen, KD T=1\n",
              r["model"].get<std::string>().c_str(), r["device"].get<std::string>().c_str(), r["batch"].get<int>(),
              r["seq_len"].get<int>(), r["tokens_per_step"].get<double>(), r["quant"]["bits"].get<int>(),
              r["quant"]["group_size"].get<int>(), r["quant"]["frozen"].get<std::string>().c_str());
  std::printf("  setup: random weights %.1f s, engine %.1f s; device memory in use %.1f GiB\n",
              r["setup_ms"]["random_weights"].get<double>() / 1e3, r["setup_ms"]["engine"].get<double>() / 1e3,
              r["device_memory_used"].get<double>() / kGiB);
  std::printf("  step: %.1f ms median (mean %.1f, min %.1f, max %.1f; %d steps after %d warm-up) -> %.0f tokens/s\n",
              sm["median"].get<double>(), sm["mean"].get<double>(), sm["min"].get<double>(), sm["max"].get<double>(),
              r["steps"].get<int>(), r["warmup"].get<int>(), r["tokens_per_s"].get<double>());
  std::printf("  model FLOPs/step: %.1f TFLOP (student 6PT %.1f, teacher 2PT %.1f, attention %.1f + %.1f; frozen "
              "wgrad not done %.1f) -> %.0f TFLOP/s\n",
              f["total"].get<double>() / 1e12, f["student_linear"].get<double>() / 1e12,
              f["teacher_linear"].get<double>() / 1e12, f["student_attention"].get<double>() / 1e12,
              f["teacher_attention"].get<double>() / 1e12, f["frozen_wgrad"].get<double>() / 1e12,
              r["tflops"].get<double>());
  std::printf("  MFU: %.1f%% of the %.1f TFLOP/s bf16 dense peak; %.1f%% of the %.0f TFLOP/s cuBLASLt bf16 GEMM "
              "(%d^3) measured in this run (before %.0f, after %.0f)\n",
              100.0 * r["mfu_peak"].get<double>(), r["peak_tflops"].get<double>(), 100.0 * r["mfu_gemm"].get<double>(),
              r["gemm"]["tflops"].get<double>(), r["gemm"]["before"]["m"].get<int>(),
              r["gemm"]["before"]["tflops"].get<double>(), r["gemm"]["after"]["tflops"].get<double>());
  const auto& gs = r["gemm"]["sustained"];
  std::printf("  the same GEMM back to back for %.0f s (%d calls): %.0f TFLOP/s over the first 10, %.0f over the "
              "second half\n",
              gs["seconds"].get<double>(), gs["reps"].get<int>(), gs["tflops_first10"].get<double>(),
              gs["tflops_second_half"].get<double>());
  std::printf("  KL per token: first %.5f, last %.5f; gradient norm first %.4f, last %.4f\n",
              r["kl"]["first"].get<double>(), r["kl"]["last"].get<double>(), r["grad_norm"]["first"].get<double>(),
              r["grad_norm"]["last"].get<double>());
}

}  // namespace qkd::bench
