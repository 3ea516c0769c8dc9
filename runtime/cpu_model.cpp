// The CPU backend: the model's forward pass as a sequence of kernels/cpu ops, fp32 throughout, with an fp32 KV
// cache [n_layers][max_batch, n_kv_heads, ctx, head_dim]. It is the reference the CUDA backend is checked
// against and a usable engine for small models.
//
// One forward step handles a chunk of each sequence, [batch, chunk_len] tokens laid out batch-major, so the
// activations are preallocated once for max_batch * chunk_len tokens and a long prefill never allocates.
// The residual stream x goes through each layer as
//   h = rmsnorm(x) -> q, k, v -> RoPE(q, k) -> cache <- k, v -> attention -> o-proj -> delta
//   x += delta; h = rmsnorm(x) -> gate, up -> swiglu -> down -> delta
// and every "x += delta; rmsnorm" pair is one fused rmsnorm call (kernels/rmsnorm.h). An optional hook sees the
// inputs of the linear modules (h, attention, h, swiglu) as they are made, for calibration (runtime/calibrate.h).
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "kernels/attention.h"
#include "kernels/embedding.h"
#include "kernels/error.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/model.h"

namespace qkd::runtime {
namespace {

// Tokens per forward step across the batch: bounds the activations (the largest, [tokens, ffn_dim], is ~20 MiB
// for a 7B model) while keeping each matmul wide enough to use the blocked GEMM well.
constexpr int kStepTokens = 512;

// A weight converted to fp32 once, after its shape is checked against the config.
std::vector<float> load_f32(const ModelWeights& w, const TensorView& t, std::vector<int64_t> expected) {
  QKD_CHECK(t.shape == expected, "{}: tensor '{}': shape {} disagrees with the config, which needs [{}]", w.source,
            t.name, t.shape_str(), fmt::join(expected, ", "));
  return to_f32(t);
}

struct CpuLayer {
  std::vector<float> attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
  std::unique_ptr<float[]> k_cache, v_cache;  // [max_batch, n_kv_heads, ctx, head_dim], uninitialized until written
};

class CpuModel final : public Model {
 public:
  CpuModel(const ModelWeights& w, const ModelOptions& opt, LinearInputHook linear_inputs);

  const ModelConfig& config() const override { return cfg_; }
  BackendKind backend() const override { return BackendKind::Cpu; }
  int max_batch() const override { return max_batch_; }
  int ctx() const override { return ctx_; }

  void forward(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
               LogitsMode mode, float* logits) override;

 private:
  // Runs tokens [batch, len] of the chunk starting at offset s0 of each sequence, leaving the final-normed
  // hidden states in h_.
  void forward_chunk(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
                     int s0, int len);

  // rows [n, cols] of one of layer l's linear inputs, to the hook when there is one
  void observe(int l, LinearInput in, const std::vector<float>& x, int n, int cols) const {
    if (linear_inputs_) linear_inputs_(l, in, x.data(), n, cols);
  }

  ModelConfig cfg_;
  LinearInputHook linear_inputs_;
  int max_batch_, ctx_, chunk_len_;
  int q_dim_, kv_dim_;
  std::vector<float> tok_embeddings_, norm_, lm_head_storage_;
  const float* lm_head_;  // lm_head_storage_, or tok_embeddings_ when tied
  std::vector<CpuLayer> layers_;
  std::vector<float> inv_freq_;

  // activations for one step of at most max_batch * chunk_len_ tokens
  std::vector<float> x_, h_, q_, k_, v_, attn_, delta_, gate_, up_, act_, last_;
  std::vector<int32_t> tok_, pos_, chunk_start_;
};

CpuModel::CpuModel(const ModelWeights& w, const ModelOptions& opt, LinearInputHook linear_inputs)
    : cfg_(w.config), linear_inputs_(std::move(linear_inputs)) {
  const ModelConfig& c = cfg_;
  QKD_CHECK(c.dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 && c.ffn_dim > 0 &&
                c.vocab_size > 0,
            "{}: config has a non-positive size (dim {}, n_layers {}, n_heads {}, n_kv_heads {}, head_dim {}, "
            "ffn_dim {}, vocab_size {})",
            w.source, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size);
  QKD_CHECK(c.n_heads % c.n_kv_heads == 0, "{}: n_heads {} is not a multiple of n_kv_heads {}", w.source, c.n_heads,
            c.n_kv_heads);
  QKD_CHECK(static_cast<int>(w.layers.size()) == c.n_layers, "{}: {} layers of weights but the config says {}",
            w.source, w.layers.size(), c.n_layers);
  QKD_CHECK(opt.max_batch >= 1, "max_batch {} must be at least 1", opt.max_batch);
  max_batch_ = opt.max_batch;
  ctx_ = opt.ctx > 0 ? opt.ctx : c.max_seq_len;
  QKD_CHECK(ctx_ > 0, "{}: no context length: -c is {} and the config's max_seq_len is {}", w.source, opt.ctx,
            c.max_seq_len);
  chunk_len_ = std::clamp(kStepTokens / max_batch_, 1, ctx_);
  q_dim_ = c.n_heads * c.head_dim;
  kv_dim_ = c.n_kv_heads * c.head_dim;
  const int64_t dim = c.dim, q_dim = q_dim_, kv_dim = kv_dim_, ffn = c.ffn_dim, vocab = c.vocab_size;

  tok_embeddings_ = load_f32(w, w.tok_embeddings, {vocab, dim});
  norm_ = load_f32(w, w.norm, {dim});
  if (w.lm_head.data == w.tok_embeddings.data && w.lm_head.dtype == w.tok_embeddings.dtype) {
    QKD_CHECK(w.lm_head.shape == w.tok_embeddings.shape, "{}: tied lm_head has shape {} but the embeddings {}",
              w.source, w.lm_head.shape_str(), w.tok_embeddings.shape_str());
    lm_head_ = tok_embeddings_.data();
  } else {
    lm_head_storage_ = load_f32(w, w.lm_head, {vocab, dim});
    lm_head_ = lm_head_storage_.data();
  }
  const size_t cache_elems = static_cast<size_t>(max_batch_) * kv_dim * ctx_;
  layers_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    CpuLayer& L = layers_[l];
    L.attn_norm = load_f32(w, lw.attn_norm, {dim});
    L.wq = load_f32(w, lw.wq, {q_dim, dim});
    L.wk = load_f32(w, lw.wk, {kv_dim, dim});
    L.wv = load_f32(w, lw.wv, {kv_dim, dim});
    L.wo = load_f32(w, lw.wo, {dim, q_dim});
    L.ffn_norm = load_f32(w, lw.ffn_norm, {dim});
    L.w_gate = load_f32(w, lw.w_gate, {ffn, dim});
    L.w_up = load_f32(w, lw.w_up, {ffn, dim});
    L.w_down = load_f32(w, lw.w_down, {dim, ffn});
    // zeroed: a cache position is only ever read after it was written, but zeros keep a misuse deterministic
    L.k_cache.reset(new float[cache_elems]());
    L.v_cache.reset(new float[cache_elems]());
  }
  inv_freq_ = rope_inv_freq(c);

  const size_t t = static_cast<size_t>(max_batch_) * chunk_len_;
  x_.resize(t * dim);
  h_.resize(t * dim);
  q_.resize(t * q_dim);
  k_.resize(t * kv_dim);
  v_.resize(t * kv_dim);
  attn_.resize(t * q_dim);
  delta_.resize(t * dim);
  gate_.resize(t * ffn);
  up_.resize(t * ffn);
  act_.resize(t * ffn);
  last_.resize(static_cast<size_t>(max_batch_) * dim);
  tok_.resize(t);
  pos_.resize(t);
  chunk_start_.resize(max_batch_);
}

void CpuModel::forward_chunk(std::span<const int32_t> tokens, int batch, int seq_len,
                             std::span<const int32_t> start_pos, int s0, int len) {
  const ModelConfig& c = cfg_;
  const int n = batch * len;  // rows of this step, batch-major
  for (int b = 0; b < batch; ++b) {
    chunk_start_[b] = start_pos[b] + s0;
    for (int i = 0; i < len; ++i) {
      tok_[b * len + i] = tokens[static_cast<size_t>(b) * seq_len + s0 + i];
      pos_[b * len + i] = chunk_start_[b] + i;
    }
  }
  cpu::embedding_forward({x_.data(), tok_embeddings_.data(), tok_.data(), n, c.dim, c.vocab_size});

  const int64_t kv_head_stride = static_cast<int64_t>(ctx_) * c.head_dim;
  const int64_t kv_batch_stride = c.n_kv_heads * kv_head_stride;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  for (int l = 0; l < c.n_layers; ++l) {
    CpuLayer& L = layers_[l];
    // The first layer normalizes the embeddings; later ones first add the previous MLP's output.
    cpu::rmsnorm_forward({h_.data(), x_.data(), l == 0 ? nullptr : delta_.data(), L.attn_norm.data(), nullptr, n,
                          c.dim, c.norm_eps});
    observe(l, LinearInput::AttnNorm, h_, n, c.dim);
    cpu::matmul_forward({q_.data(), h_.data(), L.wq.data(), n, q_dim_, c.dim});
    cpu::matmul_forward({k_.data(), h_.data(), L.wk.data(), n, kv_dim_, c.dim});
    cpu::matmul_forward({v_.data(), h_.data(), L.wv.data(), n, kv_dim_, c.dim});
    cpu::rope_forward({q_.data(), pos_.data(), inv_freq_.data(), n, c.n_heads, c.head_dim});
    cpu::rope_forward({k_.data(), pos_.data(), inv_freq_.data(), n, c.n_kv_heads, c.head_dim});
    for (int r = 0; r < n; ++r) {
      const int b = r / len;
      for (int g = 0; g < c.n_kv_heads; ++g) {
        const int64_t dst = b * kv_batch_stride + g * kv_head_stride + static_cast<int64_t>(pos_[r]) * c.head_dim;
        const int64_t src = static_cast<int64_t>(r) * kv_dim_ + g * c.head_dim;
        std::copy_n(k_.data() + src, c.head_dim, L.k_cache.get() + dst);
        std::copy_n(v_.data() + src, c.head_dim, L.v_cache.get() + dst);
      }
    }
    cpu::attention_forward({attn_.data(), q_.data(), L.k_cache.get(), L.v_cache.get(), nullptr, chunk_start_.data(),
                            batch, len, c.n_heads, c.n_kv_heads, c.head_dim, kv_batch_stride, kv_head_stride,
                            c.head_dim, scale});
    observe(l, LinearInput::Attention, attn_, n, q_dim_);
    cpu::matmul_forward({delta_.data(), attn_.data(), L.wo.data(), n, c.dim, q_dim_});

    cpu::rmsnorm_forward({h_.data(), x_.data(), delta_.data(), L.ffn_norm.data(), nullptr, n, c.dim, c.norm_eps});
    observe(l, LinearInput::FfnNorm, h_, n, c.dim);
    cpu::matmul_forward({gate_.data(), h_.data(), L.w_gate.data(), n, c.ffn_dim, c.dim});
    cpu::matmul_forward({up_.data(), h_.data(), L.w_up.data(), n, c.ffn_dim, c.dim});
    cpu::swiglu_forward({act_.data(), gate_.data(), up_.data(), n, c.ffn_dim, c.ffn_dim});
    observe(l, LinearInput::Swiglu, act_, n, c.ffn_dim);
    cpu::matmul_forward({delta_.data(), act_.data(), L.w_down.data(), n, c.dim, c.ffn_dim});
  }
  cpu::rmsnorm_forward({h_.data(), x_.data(), delta_.data(), norm_.data(), nullptr, n, c.dim, c.norm_eps});
}

void CpuModel::forward(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
                       LogitsMode mode, float* logits) {
  check_forward_inputs(*this, tokens, batch, seq_len, start_pos);
  const int dim = cfg_.dim, vocab = cfg_.vocab_size;
  // Prefill in chunks: each chunk's keys/values are in the cache before the next chunk attends to them.
  for (int s0 = 0; s0 < seq_len; s0 += chunk_len_) {
    const int len = std::min(chunk_len_, seq_len - s0);
    forward_chunk(tokens, batch, seq_len, start_pos, s0, len);
    if (mode == LogitsMode::All) {
      for (int b = 0; b < batch; ++b) {
        float* out = logits + (static_cast<int64_t>(b) * seq_len + s0) * vocab;
        cpu::matmul_forward({out, h_.data() + static_cast<int64_t>(b) * len * dim, lm_head_, len, vocab, dim});
      }
    } else if (s0 + len == seq_len) {
      // only each sequence's last row goes through the (vocab-wide) lm_head
      for (int b = 0; b < batch; ++b) {
        std::copy_n(h_.data() + (static_cast<int64_t>(b) * len + len - 1) * dim, dim,
                    last_.data() + static_cast<int64_t>(b) * dim);
      }
      cpu::matmul_forward({logits, last_.data(), lm_head_, batch, vocab, dim});
    }
  }
}

}  // namespace

std::unique_ptr<Model> make_cpu_model(const ModelWeights& w, const ModelOptions& opt, LinearInputHook linear_inputs) {
  return std::make_unique<CpuModel>(w, opt, std::move(linear_inputs));
}

}  // namespace qkd::runtime
