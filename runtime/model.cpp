#include "runtime/model.h"

#include <cmath>
#include <cstdio>
#include <numbers>

#include <cuda_runtime.h>
#include <fmt/core.h>

#include "kernels/error.h"
#include "kernels/sampling.h"

namespace qkd::runtime {

BackendKind parse_backend(const std::string& name) {
  if (name == "auto") return BackendKind::Auto;
  if (name == "cpu") return BackendKind::Cpu;
  if (name == "cuda") return BackendKind::Cuda;
  fail("--backend: unknown backend '{}' (expected auto, cpu or cuda)", name);
}

const char* backend_name(BackendKind k) {
  switch (k) {
    case BackendKind::Auto: return "auto";
    case BackendKind::Cpu: return "cpu";
    case BackendKind::Cuda: return "cuda";
  }
  return "?";
}

std::unique_ptr<Model> make_model(const ModelWeights& w, const ModelOptions& opt) {
  switch (opt.backend) {
    case BackendKind::Cpu: return make_cpu_model(w, opt);
    case BackendKind::Cuda: return make_cuda_model(w, opt);
    case BackendKind::Auto: break;
  }
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    cudaGetLastError();  // a failed device query leaves its error behind; later checks must not see it
    std::fprintf(stderr, "qkd: no CUDA device found (%s); using the CPU\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return make_cpu_model(w, opt);
  }
  try {
    return make_cuda_model(w, opt);
  } catch (const Error& e) {  // e.g. a shape the CUDA kernels do not take, or too little GPU memory
    std::fprintf(stderr, "qkd: the CUDA backend cannot take this model (%s); using the CPU\n", e.what());
    return make_cpu_model(w, opt);
  }
}

void Model::forward_sample(std::span<const int32_t> tokens, int batch, int seq_len,
                           std::span<const int32_t> start_pos, const TokenPick& pick, std::span<const float> uniform,
                           int32_t* next) {
  const bool greedy = pick.temperature <= 0.0f || pick.top_k == 1;
  QKD_CHECK(greedy || uniform.size() >= static_cast<size_t>(batch),
            "forward_sample: {} uniform draws given for batch {}", uniform.size(), batch);
  const int vocab = config().vocab_size;
  std::vector<float> logits(static_cast<size_t>(batch) * vocab);
  forward(tokens, batch, seq_len, start_pos, LogitsMode::Last, logits.data());
  cpu::sampling_forward({next, logits.data(), greedy ? nullptr : uniform.data(), batch, vocab, vocab,
                         pick.temperature, pick.top_k, pick.top_p});
}

void check_forward_inputs(const Model& m, std::span<const int32_t> tokens, int batch, int seq_len,
                          std::span<const int32_t> start_pos) {
  QKD_CHECK(batch >= 1 && batch <= m.max_batch(), "forward: batch {} must be in [1, {}] (max_batch)", batch,
            m.max_batch());
  QKD_CHECK(seq_len >= 1, "forward: seq_len {} must be at least 1", seq_len);
  QKD_CHECK(tokens.size() == static_cast<size_t>(batch) * seq_len,
            "forward: {} tokens given for batch {} x seq_len {}", tokens.size(), batch, seq_len);
  QKD_CHECK(start_pos.size() == static_cast<size_t>(batch), "forward: {} start positions given for batch {}",
            start_pos.size(), batch);
  for (int b = 0; b < batch; ++b) {
    QKD_CHECK(start_pos[b] >= 0 && static_cast<int64_t>(start_pos[b]) + seq_len <= m.ctx(),
              "forward: sequence {} needs positions {}..{} but the context (-c) is {}", b, start_pos[b],
              static_cast<int64_t>(start_pos[b]) + seq_len - 1, m.ctx());
  }
  const int vocab = m.config().vocab_size;
  for (size_t i = 0; i < tokens.size(); ++i) {
    QKD_CHECK(tokens[i] >= 0 && tokens[i] < vocab,
              "forward: token id {} (sequence {}, index {}) is outside the vocabulary (vocab_size {})", tokens[i],
              i / seq_len, i % seq_len, vocab);
  }
}

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  QKD_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "rope: head_dim {} must be even and positive", c.head_dim);
  const int half = c.head_dim / 2;
  std::vector<float> f(half);
  for (int i = 0; i < half; ++i) {
    // computed in double so the CPU reference matches PyTorch's fp32 arange/pow to the last bit or two
    double inv = 1.0 / std::pow(static_cast<double>(c.rope_theta), (2.0 * i) / c.head_dim);
    const RopeScaling& s = c.rope_scaling;
    if (s.type == RopeScalingType::Linear) {
      inv /= s.factor;
    } else if (s.type == RopeScalingType::Llama3) {
      // Llama 3.1's frequency-dependent scaling: long wavelengths are divided by factor, short ones kept, and
      // the band between is interpolated smoothly.
      const double low_wavelen = s.original_max_position / s.low_freq_factor;
      const double high_wavelen = s.original_max_position / s.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / inv;
      if (wavelen > low_wavelen) {
        inv /= s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        inv = (1.0 - smooth) * inv / s.factor + smooth * inv;
      }
    }
    f[i] = static_cast<float>(inv);
  }
  return f;
}

}  // namespace qkd::runtime
