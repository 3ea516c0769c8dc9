// A random tiny LLaMA built in memory (fp32 buffers owned by ModelWeights::storage) and an independent,
// naive double-precision forward of a whole sequence: no KV cache, an explicit causal mask, every op written out
// here. Shared by the CPU model, generation and evaluation tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "loader/model.h"

namespace qkd::test {

inline ModelConfig tiny_config() {
  ModelConfig c;
  c.dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_dim = 96;
  c.vocab_size = 50;
  c.max_seq_len = 64;
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.bos_id = 1;
  c.eos_ids = {2};
  return c;
}

// Weights ~ N(0, 1/fan_in) so activations keep unit scale through the layers, norms ~ 1 + N(0, 0.1^2) so they
// matter, and embeddings ~ N(0, 1).
inline ModelWeights make_tiny_model(const ModelConfig& c, uint32_t seed, bool tied = false) {
  ModelWeights w;
  w.config = c;
  w.config.tied_embeddings = tied;
  w.source = "tiny-model";
  w.format = "test";
  std::mt19937 rng(seed);
  auto tensor = [&](const std::string& name, std::vector<int64_t> shape, double mean, double stddev) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    auto buf = std::make_shared<std::vector<float>>(static_cast<size_t>(n));
    std::normal_distribution<double> dist(mean, stddev);
    for (float& x : *buf) x = static_cast<float>(dist(rng));
    TensorView t;
    t.name = name;
    t.dtype = DType::F32;
    t.shape = std::move(shape);
    t.data = reinterpret_cast<const std::byte*>(buf->data());
    t.nbytes = buf->size() * sizeof(float);
    w.storage.push_back(buf);
    return t;
  };
  const int64_t dim = c.dim, q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim, ffn = c.ffn_dim;
  w.tok_embeddings = tensor("tok_embeddings", {c.vocab_size, dim}, 0.0, 1.0);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerWeights L;
    L.attn_norm = tensor(p + "attn_norm", {dim}, 1.0, 0.1);
    L.wq = tensor(p + "wq", {q_dim, dim}, 0.0, 1.0 / std::sqrt(dim));
    L.wk = tensor(p + "wk", {kv_dim, dim}, 0.0, 1.0 / std::sqrt(dim));
    L.wv = tensor(p + "wv", {kv_dim, dim}, 0.0, 1.0 / std::sqrt(dim));
    L.wo = tensor(p + "wo", {dim, q_dim}, 0.0, 1.0 / std::sqrt(q_dim));
    L.ffn_norm = tensor(p + "ffn_norm", {dim}, 1.0, 0.1);
    L.w_gate = tensor(p + "w_gate", {ffn, dim}, 0.0, 1.0 / std::sqrt(dim));
    L.w_up = tensor(p + "w_up", {ffn, dim}, 0.0, 1.0 / std::sqrt(dim));
    L.w_down = tensor(p + "w_down", {dim, ffn}, 0.0, 1.0 / std::sqrt(ffn));
    w.layers.push_back(L);
  }
  w.norm = tensor("norm", {dim}, 1.0, 0.1);
  w.lm_head = tied ? w.tok_embeddings : tensor("lm_head", {c.vocab_size, dim}, 0.0, 1.0 / std::sqrt(dim));
  return w;
}

// Sees each layer's linear inputs [tokens, cols] as the reference computes them (loader/model.h's LinearInput).
using ReferenceObserver = std::function<void(int layer, LinearInput input, const std::vector<double>& x)>;

// Logits [tokens.size(), vocab] of the sequence tokens at positions 0.., in double.
inline std::vector<double> reference_logits(const ModelWeights& w, std::span<const int32_t> tokens,
                                            const ReferenceObserver& observe = {}) {
  auto seen = [&](int layer, LinearInput in, const std::vector<double>& x) {
    if (observe) observe(layer, in, x);
  };
  const ModelConfig& c = w.config;
  const int n = static_cast<int>(tokens.size()), dim = c.dim, hd = c.head_dim;
  const int q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd, ffn = c.ffn_dim;
  auto f64 = [](const TensorView& t) {
    const float* p = reinterpret_cast<const float*>(t.data);
    return std::vector<double>(p, p + t.nbytes / sizeof(float));
  };
  // y[r, o] = sum_i x[r, i] * W[o, i]
  auto linear = [](const std::vector<double>& x, const std::vector<double>& W, int rows, int in, int out) {
    std::vector<double> y(static_cast<size_t>(rows) * out, 0.0);
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o)
        for (int i = 0; i < in; ++i) y[r * out + o] += x[r * in + i] * W[static_cast<size_t>(o) * in + i];
    return y;
  };
  auto rmsnorm = [&](const std::vector<double>& x, const std::vector<double>& weight) {
    std::vector<double> y(x.size());
    for (int r = 0; r < n; ++r) {
      double ss = 0.0;
      for (int i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
      const double s = 1.0 / std::sqrt(ss / dim + c.norm_eps);
      for (int i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * s * weight[i];
    }
    return y;
  };
  // interleaved pairs (2i, 2i+1) of every head, angle pos * theta^(-2i/head_dim)
  auto rope = [&](std::vector<double>& x, int heads) {
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < hd / 2; ++i) {
          const double a = t * std::pow(static_cast<double>(c.rope_theta), -2.0 * i / hd);
          double* p = &x[(static_cast<size_t>(t) * heads + h) * hd + 2 * i];
          const double x0 = p[0], x1 = p[1];
          p[0] = x0 * std::cos(a) - x1 * std::sin(a);
          p[1] = x0 * std::sin(a) + x1 * std::cos(a);
        }
  };

  const std::vector<double> emb = f64(w.tok_embeddings);
  std::vector<double> x(static_cast<size_t>(n) * dim);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < dim; ++i) x[t * dim + i] = emb[static_cast<size_t>(tokens[t]) * dim + i];

  const int group = c.n_heads / c.n_kv_heads;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[static_cast<size_t>(l)];
    std::vector<double> h = rmsnorm(x, f64(L.attn_norm));
    seen(l, LinearInput::AttnNorm, h);
    std::vector<double> q = linear(h, f64(L.wq), n, dim, q_dim);
    std::vector<double> k = linear(h, f64(L.wk), n, dim, kv_dim);
    const std::vector<double> v = linear(h, f64(L.wv), n, dim, kv_dim);
    rope(q, c.n_heads);
    rope(k, c.n_kv_heads);
    std::vector<double> att(static_cast<size_t>(n) * q_dim, 0.0);
    for (int hh = 0; hh < c.n_heads; ++hh) {
      const int g = hh / group;
      for (int t = 0; t < n; ++t) {
        std::vector<double> s(n);
        double mx = -INFINITY;
        for (int j = 0; j < n; ++j) {
          if (j > t) {
            s[j] = -INFINITY;  // the causal mask
            continue;
          }
          double d = 0.0;
          for (int e = 0; e < hd; ++e) d += q[(t * c.n_heads + hh) * hd + e] * k[(j * c.n_kv_heads + g) * hd + e];
          s[j] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double z = 0.0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (int j = 0; j < n; ++j)
          for (int e = 0; e < hd; ++e) att[(t * c.n_heads + hh) * hd + e] += s[j] / z * v[(j * c.n_kv_heads + g) * hd + e];
      }
    }
    seen(l, LinearInput::Attention, att);
    const std::vector<double> o = linear(att, f64(L.wo), n, q_dim, dim);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = rmsnorm(x, f64(L.ffn_norm));
    seen(l, LinearInput::FfnNorm, h);
    const std::vector<double> gate = linear(h, f64(L.w_gate), n, dim, ffn);
    const std::vector<double> up = linear(h, f64(L.w_up), n, dim, ffn);
    std::vector<double> act(gate.size());
    for (size_t i = 0; i < act.size(); ++i) act[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
    seen(l, LinearInput::Swiglu, act);
    const std::vector<double> down = linear(act, f64(L.w_down), n, ffn, dim);
    for (size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  return linear(rmsnorm(x, f64(w.norm)), f64(w.lm_head), n, dim, c.vocab_size);
}

}  // namespace qkd::test
