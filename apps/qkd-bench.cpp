// qkd-bench: speed of the CUDA backend on one GPU, batch 1. A model shape from models/<preset>.json with random
// weights generated on the device, or a real model (-m). It reports, all timed with CUDA events except where
// noted, medians over repeated runs after warm-up:
//   - a device-to-device copy of 1 GiB (bytes read + written over time): the bandwidth ceiling of this run;
//   - prefill of --prefill tokens (512): ms and tokens/s, and the time to first token (host clock: the prompt
//     uploaded, prefilled, the first token picked on the GPU and copied back);
//   - decode at each context C (128, 512, 2048: C tokens already in the cache): the captured decode step's
//     replay (ms/token), the same step through Model::forward with fp32 logits copied to the host and through
//     forward_sample (host clock, per token), the bytes the step reads (weights + the KV cache of C + 1
//     positions) and the bandwidth that makes, also as a fraction of the copy's.
// With --train it times distillation steps of the training engine instead (apps/train_bench.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/bench_util.h"
#include "apps/cli.h"
#include "apps/train_bench.h"
#include "kernels/cuda_check.h"
#include "kernels/error.h"
#include "loader/mmap_file.h"
#include "loader/model.h"
#include "runtime/cuda_layer_ops.h"
#include "runtime/cuda_model.h"
#include "runtime/device_memory.h"

namespace {

using qkd::bench::Clock;
using qkd::bench::event_ms;
using qkd::bench::median;
using qkd::bench::ms_since;
using qkd::runtime::CudaModel;

// A model shape from models/<name>.json (or a path to such a file).
qkd::ModelConfig load_preset(const std::string& name, std::string* label) {
  std::string path = name;
  if (!std::filesystem::exists(path)) path = std::string(QKD_MODELS_DIR) + "/" + name + ".json";
  if (!std::filesystem::exists(path)) qkd::fail("--preset {}: neither a file nor {}", name, path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(qkd::read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    qkd::fail("{}: not valid JSON ({})", path, e.what());
  }
  qkd::ModelConfig c;
  auto get_int = [&](const char* key) {
    QKD_CHECK(j.contains(key) && j[key].is_number_integer(), "{}: field '{}' is missing or not an integer", path, key);
    return j[key].get<int>();
  };
  c.dim = get_int("dim");
  c.n_layers = get_int("n_layers");
  c.n_heads = get_int("n_heads");
  c.n_kv_heads = get_int("n_kv_heads");
  c.head_dim = get_int("head_dim");
  c.ffn_dim = get_int("ffn_dim");
  c.vocab_size = get_int("vocab_size");
  c.max_seq_len = get_int("max_seq_len");
  c.rope_theta = j.value("rope_theta", 10000.0f);
  c.norm_eps = j.value("norm_eps", 1e-5f);
  c.tied_embeddings = j.value("tied_embeddings", false);
  *label = j.value("name", name);
  return c;
}

std::vector<int> parse_contexts(const std::string& text) {
  std::vector<int> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    try {
      size_t used = 0;
      const int v = std::stoi(item, &used);
      if (used != item.size() || v < 1) throw std::invalid_argument(item);
      out.push_back(v);
    } catch (const std::exception&) {
      throw qkd::cli::UsageError(fmt::format("--contexts: '{}' is not a positive whole number", item));
    }
  }
  if (out.empty()) throw qkd::cli::UsageError("--contexts: no context given");
  return out;
}

// Device-to-device copy of `bytes` between two buffers of random data: GB/s counting bytes read + written.
nlohmann::json measure_copy(size_t bytes, int reps) {
  qkd::runtime::CudaStream stream;
  void *src = nullptr, *dst = nullptr;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  const cudaError_t err = cudaMalloc(&dst, bytes);
  if (err != cudaSuccess) {
    cudaFree(src);
    CUDA_CHECK(err);
  }
  std::vector<double> ms;
  try {
    qkd::runtime::fill_random_u32(static_cast<uint32_t*>(src), static_cast<int64_t>(bytes / 4), 7, stream.get());
    qkd::runtime::fill_random_u32(static_cast<uint32_t*>(dst), static_cast<int64_t>(bytes / 4), 8, stream.get());
    for (int i = 0; i < reps + 3; ++i) {
      const double t = event_ms(stream.get(), [&] {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream.get()));
      });
      if (i >= 3) ms.push_back(t);
    }
  } catch (...) {
    cudaFree(src);
    cudaFree(dst);
    throw;
  }
  cudaFree(src);
  cudaFree(dst);
  const double t = median(ms);
  return {{"bytes", bytes}, {"ms", t}, {"gbps", 2.0 * static_cast<double>(bytes) / (t * 1e-3) / 1e9}};
}

std::vector<int32_t> random_tokens(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = d(rng);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  return qkd::cli::run_app("qkd-bench", [&] {
    std::string preset, model_path, quant = "int4", contexts_text = "128,512,2048";
    int prefill_len = 512, reps = 50;
    uint64_t seed = 1;
    bool json = false;
    qkd::cli::ArgParser p("qkd-bench", "Prefill and decode speed of the CUDA backend (batch 1), with the GPU's "
                                       "copy bandwidth measured in the same run.");
    p.add("--preset", &preset, "NAME", "model shape from models/NAME.json (or a .json path), random weights");
    p.add("-m,--model", &model_path, "PATH", "a real model instead (HF directory, llama2.c .bin, GGUF, qkd int4)");
    p.add("--quant", &quant, "Q", "int4 (dense weights quantized at load, g128 symmetric) or bf16");
    p.add("--prefill", &prefill_len, "N", "prompt length of the prefill measurement");
    p.add("--contexts", &contexts_text, "LIST", "comma-separated contexts of the decode measurement");
    p.add("--reps", &reps, "N", "timed repetitions of each decode measurement (at least 20)");
    p.add("--seed", &seed, "N", "seed of the random weights and tokens");
    p.add_switch("--json", &json, "print one JSON object instead of the table");
    bool train = false;
    qkd::bench::TrainBenchOptions to;
    p.add_switch("--train", &train,
                 "time distillation steps of the training engine instead (teacher forward, int4 g128 student with o,v "
                 "frozen forward and backward, KL loss, AdamW), with MFU; needs --preset");
    p.add("--batch", &to.batch, "N", "--train: sequences per step (one micro-batch)");
    p.add("--seq-len", &to.seq_len, "N", "--train: tokens per sequence");
    p.add("--steps", &to.steps, "N", "--train: timed steps (median reported)");
    p.add("--warmup", &to.warmup, "N", "--train: untimed steps first");
    p.add("--peak-tflops", &to.peak_tflops, "X", "--train: the GPU's dense bf16 peak that MFU is a fraction of");
    if (!p.parse(argc, argv)) return 0;
    if (train) {
      if (preset.empty() || !model_path.empty()) throw qkd::cli::UsageError("--train takes --preset (and not -m)");
      if (to.batch < 1 || to.seq_len < 2 || to.steps < 1 || to.warmup < 0)
        throw qkd::cli::UsageError(fmt::format("--train: --batch {} --seq-len {} --steps {} --warmup {}: batch and "
                                               "steps must be positive, seq-len at least 2, warmup not negative",
                                               to.batch, to.seq_len, to.steps, to.warmup));
      if (!(to.peak_tflops > 0.0f))
        throw qkd::cli::UsageError(fmt::format("--peak-tflops: {} is not positive", to.peak_tflops));
      to.seed = seed;
      std::string label;
      const qkd::ModelConfig cfg = load_preset(preset, &label);
      const nlohmann::json r = qkd::bench::train_bench(cfg, label, to);
      if (json) {
        std::printf("%s\n", r.dump(2).c_str());
      } else {
        qkd::bench::print_train_bench(r);
      }
      return 0;
    }
    if (preset.empty() == model_path.empty()) throw qkd::cli::UsageError("give exactly one of --preset and -m");
    if (quant != "int4" && quant != "bf16")
      throw qkd::cli::UsageError(fmt::format("--quant: '{}' is not int4 or bf16", quant));
    if (prefill_len < 2) throw qkd::cli::UsageError(fmt::format("--prefill: {} must be at least 2", prefill_len));
    if (reps < 20) throw qkd::cli::UsageError(fmt::format("--reps: {} must be at least 20", reps));
    std::vector<int> contexts = parse_contexts(contexts_text);

    int devices = 0;
    const cudaError_t derr = cudaGetDeviceCount(&devices);
    if (derr != cudaSuccess || devices == 0)
      qkd::fail("qkd-bench needs a CUDA device: none found (cudaGetDeviceCount: {})",
                derr != cudaSuccess ? cudaGetErrorString(derr) : "0 devices");
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

    qkd::ModelConfig cfg;
    qkd::ModelWeights weights;
    std::string label;
    if (!preset.empty()) {
      cfg = load_preset(preset, &label);
    } else {
      weights = qkd::load_model(model_path);
      cfg = weights.config;
      label = model_path;
    }
    // the cache holds the prompt and the longest context plus the token decoded there
    for (int& c : contexts) {
      if (cfg.max_seq_len > 0 && c + 1 > cfg.max_seq_len) {
        std::fprintf(stderr, "qkd-bench: context %d leaves no room in the model's %d positions; using %d\n", c,
                     cfg.max_seq_len, cfg.max_seq_len - 1);
        c = cfg.max_seq_len - 1;
      }
    }
    if (cfg.max_seq_len > 0 && prefill_len > cfg.max_seq_len)
      throw qkd::cli::UsageError(fmt::format("--prefill {} exceeds the model's {} positions", prefill_len,
                                             cfg.max_seq_len));
    const int ctx = std::max(prefill_len, *std::max_element(contexts.begin(), contexts.end()) + 1);

    const nlohmann::json copy = measure_copy(size_t{1} << 30, 20);
    const double copy_gbps = copy["gbps"].get<double>();

    qkd::runtime::ModelOptions opt;
    opt.max_batch = 1;
    opt.ctx = ctx;
    opt.backend = qkd::runtime::BackendKind::Cuda;
    opt.quantize_group = quant == "int4" ? 128 : 0;
    const auto t_load = Clock::now();
    std::unique_ptr<CudaModel> model = preset.empty() ? qkd::runtime::make_cuda_model_impl(weights, opt)
                                                      : qkd::runtime::make_cuda_model_random(cfg, opt, seed);
    const double load_ms = ms_since(t_load);
    const cudaStream_t stream = model->stream();
    const int vocab = cfg.vocab_size;
    std::mt19937 rng(static_cast<uint32_t>(seed));
    std::vector<float> logits(static_cast<size_t>(vocab));
    const int32_t zero = 0;
    const std::span<const int32_t> pos0(&zero, 1);

    // prefill
    const std::vector<int32_t> prompt = random_tokens(rng, prefill_len, vocab);
    std::vector<double> prefill_ms, ttft_ms;
    for (int i = 0; i < 12; ++i) {
      const double t = event_ms(stream, [&] {
        model->forward(prompt, 1, prefill_len, pos0, qkd::runtime::LogitsMode::Last, logits.data());
      });
      if (i >= 2) prefill_ms.push_back(t);
    }
    for (int i = 0; i < 6; ++i) {
      int32_t next = -1;
      const auto t0 = Clock::now();
      model->forward_sample(prompt, 1, prefill_len, pos0, qkd::runtime::TokenPick{}, {}, &next);
      if (i >= 1) ttft_ms.push_back(ms_since(t0));
    }
    const double prefill = median(prefill_ms);

    // decode
    nlohmann::json decode = nlohmann::json::array();
    for (const int c : contexts) {
      const std::vector<int32_t> fill = random_tokens(rng, std::max(c, 1), vocab);
      model->forward(fill, 1, c, pos0, qkd::runtime::LogitsMode::Last, logits.data());
      const int32_t tok = fill.back(), pos = c;
      model->set_decode_inputs({&tok, 1}, {&pos, 1});
      for (int i = 0; i < 5; ++i) model->replay_decode(1);  // the first one captures the graph
      CUDA_CHECK(cudaStreamSynchronize(stream));
      std::vector<double> graph_ms, e2e_ms, sample_ms;
      for (int i = 0; i < reps; ++i) graph_ms.push_back(event_ms(stream, [&] { model->replay_decode(1); }));
      for (int i = 0; i < reps; ++i) {
        const auto t0 = Clock::now();
        model->forward({&tok, 1}, 1, 1, {&pos, 1}, qkd::runtime::LogitsMode::Last, logits.data());
        e2e_ms.push_back(ms_since(t0));
      }
      for (int i = 0; i < reps; ++i) {
        int32_t next = -1;
        const auto t0 = Clock::now();
        model->forward_sample({&tok, 1}, 1, 1, {&pos, 1}, qkd::runtime::TokenPick{}, {}, &next);
        sample_ms.push_back(ms_since(t0));
      }
      const double ms = median(graph_ms);
      const int64_t bytes = model->decode_bytes_read(1, c);
      const double gbps = static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
      decode.push_back({{"context", c}, {"ms", ms}, {"ms_min", *std::min_element(graph_ms.begin(), graph_ms.end())},
                        {"ms_forward", median(e2e_ms)}, {"ms_forward_sample", median(sample_ms)},
                        {"bytes", bytes}, {"gbps", gbps}, {"frac_copy", gbps / copy_gbps}, {"reps", reps}});
    }

    const qkd::runtime::CudaMemoryUse mem = model->memory_use();
    const nlohmann::json out{
        {"tool", "qkd-bench"},
        {"device", prop.name},
        {"sms", prop.multiProcessorCount},
        {"model", label},
        {"quant", quant},
        {"weight_format", model->weight_format()},
        {"shape",
         {{"dim", cfg.dim}, {"n_layers", cfg.n_layers}, {"n_heads", cfg.n_heads}, {"n_kv_heads", cfg.n_kv_heads},
          {"head_dim", cfg.head_dim}, {"ffn_dim", cfg.ffn_dim}, {"vocab_size", cfg.vocab_size}}},
        {"batch", 1},
        {"ctx", ctx},
        {"load_ms", load_ms},
        {"memory",
         {{"weights", mem.weights}, {"kv_cache", mem.kv_cache}, {"activations", mem.activations},
          {"library", mem.library}}},
        {"copy", copy},
        {"prefill",
         {{"tokens", prefill_len}, {"ms", prefill}, {"tok_per_s", prefill_len / (prefill * 1e-3)}}},
        {"ttft_ms", median(ttft_ms)},
        {"decode", decode}};
    if (json) {
      std::printf("%s\n", out.dump(2).c_str());
      return 0;
    }
    std::printf("qkd-bench: %s on %s, %s weights (%s), batch 1\n", label.c_str(), prop.name, quant.c_str(),
                model->weight_format().c_str());
    std::printf("  device memory: weights %.2f GiB, KV cache %.2f GiB (ctx %d), activations %.2f GiB\n",
                mem.weights / 1073741824.0, mem.kv_cache / 1073741824.0, ctx, mem.activations / 1073741824.0);
    std::printf("  copy (D2D, 1 GiB):  %.0f GB/s (read + write)\n", copy_gbps);
    std::printf("  prefill %d tokens:  %.2f ms, %.0f tok/s;  time to first token %.2f ms\n", prefill_len, prefill,
                prefill_len / (prefill * 1e-3), median(ttft_ms));
    std::printf("  %8s %10s %10s %10s %12s %9s %8s\n", "context", "ms/token", "forward", "fwd+pick", "bytes/step",
                "GB/s", "of copy");
    for (const auto& d : decode) {
      std::printf("  %8d %10.3f %10.3f %10.3f %12.3e %9.0f %7.1f%%\n", d["context"].get<int>(), d["ms"].get<double>(),
                  d["ms_forward"].get<double>(), d["ms_forward_sample"].get<double>(),
                  static_cast<double>(d["bytes"].get<int64_t>()), d["gbps"].get<double>(),
                  100.0 * d["frac_copy"].get<double>());
    }
    return 0;
  });
}
