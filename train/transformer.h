// The LLaMA forward and backward pass for training, written once over a backend (train/ops.h: CpuOps, CudaOps).
//
// Forward over tokens [batch, seq] (n = batch * seq rows), with the residual stream kept per layer:
//   res[0] = embed(tokens)
//   layer l:  h1 = rmsnorm(res[l]);  q, k, v = h1 Wq^T, h1 Wk^T, h1 Wv^T;  rope(q, k);  att = attention(q, k, v)
//             mid[l] = res[l] + att Wo^T;  h2 = rmsnorm(mid[l]);  act = silu(h2 Wg^T) * (h2 Wu^T)
//             res[l+1] = mid[l] + act Wd^T
//   xf = rmsnorm(res[L])                       (the final hidden state; the engine applies the LM head in chunks)
// Backward from dxf, the reverse of the same sequence; weight gradients ACCUMULATE into the fp32 gradient buffers
// (several micro-batches add into one step), activation gradients are scratch. A linear layer's weight W is:
//   Frozen     packed int4: y = int4_linear(x, W), dx = int4_linear_dgrad(dy, W), no dW (the backend picks the fused
//              int4 GEMM or, from kDequantMinRows rows, cuBLASLt on a dequantized bf16 copy: train/ops.cpp)
//   Quantized  wq = fake_quant(W, scales) computed by quantize(); dW (= d wq) accumulates, and
//              quantize_backward() turns it into the STE weight gradient and the LSQ scale gradients
//   Dense      the compute copy of W; dW accumulates
// With Save::No (the teacher, validation) nothing is kept for a backward pass and one layer's buffers are reused.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/error.h"
#include "loader/model.h"
#include "runtime/model.h"
#include "train/plan.h"

namespace qkd::train {

enum class Save { No, Yes };

template <typename T>
struct LinearWeights {
  LinearKind kind = LinearKind::Dense;
  int n = 0, k = 0;
  const T* w = nullptr;          // [n, k] compute weight (Dense), or wq (Quantized)
  Int4Weight q;                  // Frozen
  float* dw = nullptr;           // [n, k] gradient (accumulates), or nullptr when not trained
  // Quantized only
  T* wq = nullptr;               // [n, k] fake-quantized weight, written by quantize()
  const float* master = nullptr; // [n, k]
  const float* scale = nullptr;  // [n, k / group]
  float* dscale = nullptr;
  const float* clip = nullptr;   // [1] or nullptr
  float* dclip = nullptr;
  int group_size = 0, bits = 0;
};

template <typename T>
struct LayerWeightsT {
  const T* attn_norm = nullptr;
  const T* ffn_norm = nullptr;
  float* d_attn_norm = nullptr;
  float* d_ffn_norm = nullptr;
  LinearWeights<T> lin[7];  // q, k, v, o, gate, up, down (LayerPlan::linears order)
};

template <typename T>
struct WeightsT {
  const T* embed = nullptr;  // [vocab, dim]
  float* d_embed = nullptr;
  const T* norm = nullptr;   // [dim]
  float* d_norm = nullptr;
  const T* head = nullptr;   // [vocab, dim] (== embed when tied)
  float* d_head = nullptr;
  std::vector<LayerWeightsT<T>> layers;
};

template <class Ops>
class Transformer {
 public:
  using T = typename Ops::T;
  enum { Q, K, V, O, Gate, Up, Down };

  Transformer(Ops& ops, const ModelConfig& c, WeightsT<T> w, int batch, int seq, Save save)
      : ops_(ops), c_(c), w_(std::move(w)), batch_(batch), seq_(seq), n_(batch * seq), save_(save) {
    QKD_CHECK(batch > 0 && seq > 0, "Transformer: batch {} and seq {} must be positive", batch, seq);
    const int n = n_, dim = c.dim, qd = c.n_heads * c.head_dim, kvd = c.n_kv_heads * c.head_dim, ffn = c.ffn_dim;
    const int n_sets = save == Save::Yes ? c.n_layers : 1;
    // Without a backward pass one residual buffer serves every layer, updated in place (forward()).
    res_.resize(static_cast<size_t>(c.n_layers + 1));
    for (auto& r : res_) r = save == Save::Yes || &r == &res_.front() ? ops.template alloc<T>(int64_t{n} * dim) : res_.front();
    acts_.resize(static_cast<size_t>(n_sets));
    for (auto& a : acts_) {
      a.h1 = ops.template alloc<T>(int64_t{n} * dim);
      a.rstd1 = ops.template alloc<float>(n);
      a.q = ops.template alloc<T>(int64_t{n} * qd);
      a.k = ops.template alloc<T>(int64_t{n} * kvd);
      a.v = ops.template alloc<T>(int64_t{n} * kvd);
      a.att = ops.template alloc<T>(int64_t{n} * qd);
      a.lse = ops.template alloc<float>(int64_t{batch} * c.n_heads * seq);
      if (save == Save::Yes) a.mid = ops.template alloc<T>(int64_t{n} * dim);  // else the residual buffer is it
      a.h2 = ops.template alloc<T>(int64_t{n} * dim);
      a.rstd2 = ops.template alloc<float>(n);
      a.gate = ops.template alloc<T>(int64_t{n} * ffn);
      a.up = ops.template alloc<T>(int64_t{n} * ffn);
      a.act = ops.template alloc<T>(int64_t{n} * ffn);
    }
    xf_ = ops.template alloc<T>(int64_t{n} * dim);
    rstdf_ = ops.template alloc<float>(n);
    tokens_ = ops.template alloc<int32_t>(n);
    positions_ = ops.template alloc<int32_t>(n);
    start_pos_ = ops.template alloc<int32_t>(batch);
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) pos[static_cast<size_t>(i)] = i % seq;
    ops.upload(positions_, pos.data(), n);
    const std::vector<float> inv_freq = runtime::rope_inv_freq(c);
    inv_freq_ = ops.template alloc<float>(static_cast<int64_t>(inv_freq.size()));
    ops.upload(inv_freq_, inv_freq.data(), static_cast<int64_t>(inv_freq.size()));
    if (save == Save::Yes) {
      dres_ = ops.template alloc<T>(int64_t{n} * dim);
      dh_ = ops.template alloc<T>(int64_t{n} * dim);
      dq_ = ops.template alloc<T>(int64_t{n} * qd);
      dk_ = ops.template alloc<T>(int64_t{n} * kvd);
      dv_ = ops.template alloc<T>(int64_t{n} * kvd);
      datt_ = ops.template alloc<T>(int64_t{n} * qd);
      dgate_ = ops.template alloc<T>(int64_t{n} * ffn);
      dup_ = ops.template alloc<T>(int64_t{n} * ffn);
      dact_ = ops.template alloc<T>(int64_t{n} * ffn);
      const int64_t scratch =
          std::max<int64_t>({ops.rmsnorm_scratch(n, dim),
                             ops.attention_scratch(batch, seq, c.n_heads, c.n_kv_heads, c.head_dim), int64_t{1}});
      scratch_ = ops.template alloc<float>(scratch);
      int64_t rows = 1;
      for (const auto& l : w_.layers)
        for (const auto& lin : l.lin) rows = std::max<int64_t>(rows, lin.n);
      clip_scratch_ = ops.template alloc<float>(rows);
    }
  }

  int rows() const { return n_; }
  // The residual stream after layer l (valid after forward(); with Save::No only for the last layer).
  const T* layer_output(int l) const { return res_[static_cast<size_t>(l + 1)]; }
  const T* xf() const { return xf_; }
  const WeightsT<T>& weights() const { return w_; }

  // wq = fake_quant(W) for every Quantized linear layer: once per optimizer step, before the forward passes.
  void quantize() {
    for (auto& l : w_.layers)
      for (auto& lin : l.lin)
        if (lin.kind == LinearKind::Quantized)
          ops_.fake_quant(FakeQuantArgs<T>{lin.wq, lin.master, lin.scale, lin.clip, lin.n, lin.k, lin.group_size,
                                           lin.bits});
  }

  // d wq (accumulated in dw over the step's micro-batches) -> the STE weight gradient (in place), and the scale
  // and clip gradients. Once per optimizer step, after the last backward pass: for every layer at the end, or
  // layer by layer as the last backward pass leaves each one (data parallelism, train/data_parallel.h).
  void quantize_backward() {
    for (int l = 0; l < c_.n_layers; ++l) quantize_backward(l);
  }
  void quantize_backward(int layer) {
    for (auto& lin : w_.layers[static_cast<size_t>(layer)].lin)
      if (lin.kind == LinearKind::Quantized && lin.dw != nullptr) {
        FakeQuantBackwardArgs a{lin.dw, lin.dscale, lin.dclip, lin.dw,  lin.master,     lin.scale,
                                lin.clip, lin.n,   lin.k,     lin.group_size, lin.bits, clip_scratch_};
        ops_.fake_quant_backward(a);
      }
  }

  // tokens: host [batch, seq]. Leaves the final hidden state in xf().
  void forward(const int32_t* host_tokens) {
    const ModelConfig& c = c_;
    const int n = n_, dim = c.dim, ffn = c.ffn_dim;
    for (int i = 0; i < n; ++i)
      QKD_CHECK(host_tokens[i] >= 0 && host_tokens[i] < c.vocab_size,
                "token {} at index {} is outside the vocabulary [0, {})", host_tokens[i], i, c.vocab_size);
    ops_.upload(tokens_, host_tokens, n);
    ops_.embedding({res_[0], w_.embed, tokens_, n, dim, c.vocab_size});
    for (int l = 0; l < c.n_layers; ++l) {
      const LayerWeightsT<T>& lw = w_.layers[static_cast<size_t>(l)];
      Acts& a = acts(l);
      T* res = res_[static_cast<size_t>(l)];
      T* next = res_[static_cast<size_t>(l + 1)];
      ops_.rmsnorm({a.h1, res, nullptr, lw.attn_norm, a.rstd1, n, dim, c.norm_eps});
      linear(a.q, a.h1, lw.lin[Q], n, Accumulate::Overwrite);
      linear(a.k, a.h1, lw.lin[K], n, Accumulate::Overwrite);
      linear(a.v, a.h1, lw.lin[V], n, Accumulate::Overwrite);
      ops_.rope({a.q, positions_, inv_freq_, n, c.n_heads, c.head_dim});
      ops_.rope({a.k, positions_, inv_freq_, n, c.n_kv_heads, c.head_dim});
      ops_.attention(attention_args(a));
      // With a backward pass the layer's input, its midpoint and its output are all kept (the norms' backward
      // reads them); without one the residual stream is updated in place: res, mid and next are one buffer.
      T* mid = save_ == Save::Yes ? a.mid : res;
      if (mid != res) ops_.copy(mid, res, int64_t{n} * dim);
      linear(mid, a.att, lw.lin[O], n, Accumulate::Add);
      ops_.rmsnorm({a.h2, mid, nullptr, lw.ffn_norm, a.rstd2, n, dim, c.norm_eps});
      linear(a.gate, a.h2, lw.lin[Gate], n, Accumulate::Overwrite);
      linear(a.up, a.h2, lw.lin[Up], n, Accumulate::Overwrite);
      ops_.swiglu({a.act, a.gate, a.up, n, ffn, ffn});
      if (next != mid) ops_.copy(next, mid, int64_t{n} * dim);
      linear(next, a.act, lw.lin[Down], n, Accumulate::Add);
    }
    ops_.rmsnorm({xf_, res_.back(), nullptr, w_.norm, rstdf_, n, dim, c.norm_eps});
  }

  // dxf: [n, dim], the loss's gradient with respect to xf (consumed). Accumulates every weight gradient.
  // after_layer(l), when given, runs once layer l's weight gradients are all enqueued (layers in reverse order).
  void backward(const T* dxf, const std::function<void(int)>& after_layer = {}) {
    QKD_CHECK(save_ == Save::Yes, "Transformer::backward on a model built without saved activations");
    const ModelConfig& c = c_;
    const int n = n_, dim = c.dim, ffn = c.ffn_dim;
    ops_.zero(dres_, int64_t{n} * dim);
    ops_.rmsnorm_backward({dres_, w_.d_norm, dxf, res_.back(), w_.norm, rstdf_, n, dim, scratch_});
    for (int l = c.n_layers - 1; l >= 0; --l) {
      const LayerWeightsT<T>& lw = w_.layers[static_cast<size_t>(l)];
      Acts& a = acts(l);
      T* res = res_[static_cast<size_t>(l)];
      // feed-forward block: dres is dL/d res[l+1]
      linear_dgrad(dact_, dres_, lw.lin[Down], n, Accumulate::Overwrite);
      linear_wgrad(lw.lin[Down], dres_, a.act, n);
      ops_.swiglu_backward({dgate_, dup_, dact_, a.gate, a.up, n, ffn, ffn});
      linear_dgrad(dh_, dgate_, lw.lin[Gate], n, Accumulate::Overwrite);
      linear_dgrad(dh_, dup_, lw.lin[Up], n, Accumulate::Add);
      linear_wgrad(lw.lin[Gate], dgate_, a.h2, n);
      linear_wgrad(lw.lin[Up], dup_, a.h2, n);
      ops_.rmsnorm_backward({dres_, lw.d_ffn_norm, dh_, a.mid, lw.ffn_norm, a.rstd2, n, dim, scratch_});
      // attention block: dres is now dL/d mid[l]
      linear_dgrad(datt_, dres_, lw.lin[O], n, Accumulate::Overwrite);
      linear_wgrad(lw.lin[O], dres_, a.att, n);
      AttentionBackwardArgs<T> ab{dq_, dk_, dv_, datt_, a.q, a.k, a.v, a.att, a.lse,
                                  batch_, seq_, c.n_heads, c.n_kv_heads, c.head_dim, attention_scale(), scratch_};
      ops_.attention_backward(ab);
      ops_.rope_backward({dq_, positions_, inv_freq_, n, c.n_heads, c.head_dim});
      ops_.rope_backward({dk_, positions_, inv_freq_, n, c.n_kv_heads, c.head_dim});
      linear_dgrad(dh_, dq_, lw.lin[Q], n, Accumulate::Overwrite);
      linear_dgrad(dh_, dk_, lw.lin[K], n, Accumulate::Add);
      linear_dgrad(dh_, dv_, lw.lin[V], n, Accumulate::Add);
      linear_wgrad(lw.lin[Q], dq_, a.h1, n);
      linear_wgrad(lw.lin[K], dk_, a.h1, n);
      linear_wgrad(lw.lin[V], dv_, a.h1, n);
      ops_.rmsnorm_backward({dres_, lw.d_attn_norm, dh_, res, lw.attn_norm, a.rstd1, n, dim, scratch_});
      if (after_layer) after_layer(l);
    }
    if (w_.d_embed != nullptr) ops_.embedding_backward({w_.d_embed, dres_, tokens_, n, dim, c.vocab_size});
  }

 private:
  struct Acts {
    T *h1, *q, *k, *v, *att, *mid, *h2, *gate, *up, *act;
    float *rstd1, *lse, *rstd2;
  };
  Acts& acts(int l) { return acts_[save_ == Save::Yes ? static_cast<size_t>(l) : 0]; }
  float attention_scale() const { return 1.0f / std::sqrt(static_cast<float>(c_.head_dim)); }

  AttentionArgs<T> attention_args(Acts& a) const {
    const int64_t kvd = int64_t{c_.n_kv_heads} * c_.head_dim;
    return AttentionArgs<T>{a.att,       a.q,        a.k,          a.v,           a.lse,
                            start_pos_,  batch_,     seq_,         c_.n_heads,    c_.n_kv_heads,
                            c_.head_dim, seq_ * kvd, c_.head_dim,  kvd,           attention_scale()};
  }

  void linear(T* y, const T* x, const LinearWeights<T>& w, int m, Accumulate mode) {
    if (w.kind == LinearKind::Frozen) return ops_.int4_linear(y, x, w.q, m, mode);
    ops_.linear(y, x, w.kind == LinearKind::Quantized ? w.wq : w.w, m, w.n, w.k, mode);
  }
  void linear_dgrad(T* dx, const T* dy, const LinearWeights<T>& w, int m, Accumulate mode) {
    if (w.kind == LinearKind::Frozen) return ops_.int4_linear_dgrad(dx, dy, w.q, m, mode);
    ops_.linear_dgrad(dx, dy, w.kind == LinearKind::Quantized ? w.wq : w.w, m, w.n, w.k, mode);
  }
  void linear_wgrad(const LinearWeights<T>& w, const T* dy, const T* x, int m) {
    if (w.dw != nullptr) ops_.linear_wgrad(w.dw, dy, x, m, w.n, w.k);
  }

  Ops& ops_;
  ModelConfig c_;
  WeightsT<T> w_;
  int batch_, seq_, n_;
  Save save_;
  std::vector<T*> res_;
  std::vector<Acts> acts_;
  T* xf_ = nullptr;
  float* rstdf_ = nullptr;
  int32_t* tokens_ = nullptr;
  int32_t* positions_ = nullptr;
  int32_t* start_pos_ = nullptr;
  float* inv_freq_ = nullptr;
  T *dres_ = nullptr, *dh_ = nullptr, *dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr, *datt_ = nullptr;
  T *dgate_ = nullptr, *dup_ = nullptr, *dact_ = nullptr;
  float* scratch_ = nullptr;
  float* clip_scratch_ = nullptr;
};

}  // namespace qkd::train
