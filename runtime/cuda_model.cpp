// The CUDA backend: the forward pass of runtime/cpu_model.cpp on the GPU, bf16 activations and KV cache, bf16
// or int4 linear weights (runtime/cuda_weights.h), every buffer in one arena sized and checked against the
// GPU's free memory before it is allocated (runtime/device_memory.h), so forward() never allocates.
//
// A step runs tokens [batch, len] batch-major. The residual stream x goes through each layer as
//   h = rmsnorm(x) -> qkv = h W_qkv^T -> RoPE(q), RoPE(k) -> cache <- k, v -> attention -> x += attn W_o^T
//   h = rmsnorm(x) -> gu = h W_gate_up^T -> act = silu(gate) * up -> x += act W_down^T
// with the q/k/v and gate/up projections fused into one product each (one weight read, one launch), and the
// residual adds done by the products themselves (Accumulate::Add): the same function as the CPU backend's
// "x += delta; rmsnorm" pairs, with one bf16 rounding of x per add.
//
// Prefill runs in chunks of at most 512 tokens across the batch (prefill attention, cuBLASLt or the int4 GEMM).
// A decode step (seq_len 1) reads its token ids and positions from device buffers that a cudaMemcpyAsync
// fills before each step, so the step is captured once per batch size as a CUDA graph and replayed.
#include "runtime/cuda_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.h"
#include "kernels/embedding.h"
#include "kernels/error.h"
#include "kernels/gemm.h"
#include "kernels/int4_dequant.h"
#include "kernels/int4_gemm.h"
#include "kernels/rmsnorm.h"
#include "kernels/sampling.h"
#include "kernels/swiglu.h"
#include "runtime/cuda_layer_ops.h"
#include "runtime/cuda_weights.h"
#include "runtime/device_memory.h"

namespace qkd::runtime {
namespace {

using bf16 = __nv_bfloat16;

// Tokens per prefill step across the batch, as in the CPU backend: the largest activation, [512, ffn_dim]
// bf16, is 11 MiB for a 7B model, and 512 rows keep the GEMMs on the tensor cores' efficient shapes.
constexpr int kStepTokens = 512;
// fp32 logits buffer: LogitsMode::All runs the LM head in pieces of at most this many bytes of output.
constexpr int64_t kLogitsBytes = int64_t{64} << 20;
// Device memory the model does not allocate itself but needs free: cuBLASLt's handle and kernels, the CUDA
// graphs' executables and lazily loaded kernel modules. An estimate with room to spare.
constexpr int64_t kRuntimeReserve = int64_t{256} << 20;
// Graphs kept (one per batch size and pick); older ones are dropped first.
constexpr size_t kMaxGraphs = 16;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

void require_device() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky query error
    fail("--backend cuda: no CUDA device found (cudaGetDeviceCount: {})",
         err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
  }
}

struct Layer {
  DeviceLinear attn_norm, ffn_norm;  // [1, dim] bf16
  DeviceLinear qkv;                  // [q_dim + 2 kv_dim, dim]: wq, wk, wv stacked
  DeviceLinear wo;                   // [dim, q_dim]
  DeviceLinear gate_up;              // [2 ffn_pad, dim]: w_gate rows at 0, w_up rows at ffn_pad
  DeviceLinear down;                 // [dim, ffn_pad]
  size_t off_k = 0, off_v = 0;
  bf16* k_cache = nullptr;           // [max_batch, n_kv_heads, ctx, head_dim]
  bf16* v_cache = nullptr;
};

struct CapturedStep {
  int batch;
  bool sample;
  TokenPick pick;
  GraphExec exec;
  bool matches(int b, bool s, const TokenPick& p) const {
    return batch == b && sample == s &&
           (!s || (pick.temperature == p.temperature && pick.top_k == p.top_k && pick.top_p == p.top_p));
  }
};

// A checkpoint tensor's shape against the config (the CPU backend's message).
void expect_shape(const ModelWeights& w, const TensorView& t, std::vector<int64_t> expected) {
  QKD_CHECK(t.shape == expected, "{}: tensor '{}': shape {} disagrees with the config, which needs [{}]", w.source,
            t.name, t.shape_str(), fmt::join(expected, ", "));
}

class CudaModelImpl final : public CudaModel {
 public:
  CudaModelImpl(const ModelConfig& c, const ModelWeights* w, const ModelOptions& opt, uint64_t seed);

  const ModelConfig& config() const override { return cfg_; }
  BackendKind backend() const override { return BackendKind::Cuda; }
  int max_batch() const override { return max_batch_; }
  int ctx() const override { return ctx_; }
  void forward(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
               LogitsMode mode, float* logits) override;
  void forward_sample(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
                      const TokenPick& pick, std::span<const float> uniform, int32_t* next) override;

  cudaStream_t stream() const override { return stream_.get(); }
  void set_decode_inputs(std::span<const int32_t> tokens, std::span<const int32_t> start_pos) override;
  void replay_decode(int batch) override;
  CudaMemoryUse memory_use() const override { return mem_; }
  int64_t decode_bytes_read(int batch, int context) const override;
  std::string weight_format() const override;

 private:
  void check_config(const std::string& source) const;
  void check_shapes(const ModelWeights& w) const;
  void plan(const ModelWeights* w, int quantize_group);
  void upload(const ModelWeights& w);
  void randomize(uint64_t seed);

  // y = x . W^T (+ y); `dense`, when given, is a bf16 copy of an int4 W to run through cuBLASLt instead.
  void linear(const DeviceLinear& w, const bf16* dense, const bf16* x, bf16* y, int m, Accumulate mode);
  void enqueue_layers(int batch, int len, const int32_t* tok, const int32_t* pos, const int32_t* start);
  // On dq_stream_: layer l's int4 weights into scratch slot l % 2 (see kDequantMinRows).
  void stage_dequant(int l);
  void lm_head(const bf16* h, int m);  // logits_[m, vocab] = h[m, dim] . lm_head^T, fp32
  void write_decode_inputs(std::span<const int32_t> tokens, std::span<const int32_t> start_pos,
                           std::span<const float> uniform, int batch);
  void enqueue_decode(int batch, bool sample, const TokenPick& pick);
  void run_decode(int batch, bool sample, const TokenPick& pick);
  // Runs tokens [batch, seq_len] in chunks; LogitsMode::All copies every row's logits to `logits`, Last leaves
  // each sequence's last row's logits in logits_ (rows 0..batch-1).
  void prefill(std::span<const int32_t> tokens, int batch, int seq_len, std::span<const int32_t> start_pos,
               LogitsMode mode, float* logits);
  void sync() { CUDA_CHECK(cudaStreamSynchronize(stream_.get())); }

  ModelConfig cfg_;
  int max_batch_ = 1, ctx_ = 0, chunk_len_ = 1, step_rows_ = 1, logits_rows_ = 1;
  int q_dim_ = 0, kv_dim_ = 0, ffn_pad_ = 0;
  bool use_graph_ = true;
  CudaStream stream_;
  DeviceArena arena_;
  std::unique_ptr<CublasLt> lt_;
  CudaMemoryUse mem_;

  DeviceLinear embed_, lm_head_own_, norm_;
  const DeviceLinear* lm_head_ = nullptr;  // lm_head_own_, or embed_ when tied
  std::vector<Layer> layers_;
  std::vector<std::string> layer_formats_;

  // Dequantized prefill (steps of kDequantMinRows rows or more, kernels/int4_dequant.h): cuBLASLt on bf16 copies made
  // one layer ahead on a second stream, overlapping the previous layer's GEMMs. Two slots, each with room for one
  // layer's qkv, wo, gate_up and down (808 MiB for a 7B model).
  bool dequant_prefill_ = false;
  size_t off_slot_[2] = {0, 0};
  size_t slot_qkv_ = 0, slot_wo_ = 0, slot_gate_up_ = 0, slot_down_ = 0;  // element offsets within a slot
  bf16* slot_[2] = {nullptr, nullptr};
  CudaStream dq_stream_;
  CudaEvent dq_start_, slot_ready_[2], slot_free_[2];

  DecodeAttentionPlan plan_one_, plan_all_;  // decode attention for batch 1 and for max_batch
  bool fast_attention_ = false;              // head_dim 64/128: kernels/attention.h; else the narrow-head kernel

  // activations and step inputs (arena offsets, then pointers)
  struct Offsets {
    size_t x, h, qkv, q, attn, gu, act, last, logits, inv_freq, step_in, dec_in, next, attn_ws;
  } off_{};
  bf16 *x_ = nullptr, *h_ = nullptr, *qkv_ = nullptr, *q_ = nullptr, *attn_ = nullptr, *gu_ = nullptr,
       *act_ = nullptr, *last_ = nullptr;
  float* logits_ = nullptr;    // [logits_rows_, vocab]
  float* inv_freq_ = nullptr;  // [head_dim / 2]
  int32_t* step_in_ = nullptr;  // prefill step: tokens [step_rows_], positions [step_rows_], chunk starts [max_batch]
  int32_t* dec_in_ = nullptr;   // decode step: tokens [max_batch], positions [max_batch], uniform draws [max_batch]
  int32_t* next_ = nullptr;     // [max_batch] sampled tokens
  void* attn_ws_ = nullptr;

  PinnedBuffer step_in_host_, dec_in_host_, next_host_;
  std::vector<CapturedStep> graphs_;
};

CudaModelImpl::CudaModelImpl(const ModelConfig& c, const ModelWeights* w, const ModelOptions& opt, uint64_t seed)
    : cfg_(c) {
  const std::string source = w != nullptr ? w->source : std::string("random ") + c.arch + " model";
  check_config(source);
  if (w != nullptr) {
    QKD_CHECK(static_cast<int>(w->layers.size()) == c.n_layers, "{}: {} layers of weights but the config says {}",
              source, w->layers.size(), c.n_layers);
    check_shapes(*w);
  }
  QKD_CHECK(opt.max_batch >= 1, "max_batch {} must be at least 1", opt.max_batch);
  QKD_CHECK(opt.quantize_group == 0 || opt.quantize_group == 32 || opt.quantize_group == 64 ||
                opt.quantize_group == 128,
            "quantize_group {} must be 0 (off), 32, 64 or 128", opt.quantize_group);
  max_batch_ = opt.max_batch;
  ctx_ = opt.ctx > 0 ? opt.ctx : c.max_seq_len;
  QKD_CHECK(ctx_ > 0, "{}: no context length: -c is {} and the config's max_seq_len is {}", source, opt.ctx,
            c.max_seq_len);
  use_graph_ = opt.cuda_graph;
  chunk_len_ = std::clamp(kStepTokens / max_batch_, 1, ctx_);
  step_rows_ = max_batch_ * chunk_len_;
  q_dim_ = c.n_heads * c.head_dim;
  kv_dim_ = c.n_kv_heads * c.head_dim;
  ffn_pad_ = (c.ffn_dim + 7) / 8 * 8;  // swiglu and the GEMMs read 16-byte rows; the padding is zero weights
  logits_rows_ = static_cast<int>(std::clamp<int64_t>(kLogitsBytes / (int64_t{4} * c.vocab_size), max_batch_,
                                                      std::max(step_rows_, max_batch_)));
  fast_attention_ = c.head_dim == 64 || c.head_dim == 128;
  if (fast_attention_) {
    plan_one_ = cuda::decode_attention_plan(1, 1, c.n_heads, c.n_kv_heads, c.head_dim, ctx_);
    plan_all_ = cuda::decode_attention_plan(max_batch_, 1, c.n_heads, c.n_kv_heads, c.head_dim, ctx_);
  }

  plan(w, opt.quantize_group);
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (mem_.total() > static_cast<int64_t>(free_bytes)) {
    fail("{}: model needs {:.2f} GiB on the GPU but only {:.2f} GiB are free ({} bytes needed: {} weights, {} KV "
         "cache for max_batch {} x ctx {}, {} activations, {} library; {} bytes free of {})",
         source, mem_.total() / kGiB, free_bytes / kGiB, mem_.total(), mem_.weights, mem_.kv_cache, max_batch_, ctx_,
         mem_.activations, mem_.library, free_bytes, total_bytes);
  }
  arena_.allocate();
  // Zero first: padding rows/columns of the weights must be exact zeros, and nothing may read garbage.
  CUDA_CHECK(cudaMemsetAsync(arena_.at<std::byte>(0), 0, arena_.size(), stream_.get()));
  for (DeviceLinear* d : {&embed_, &lm_head_own_, &norm_}) d->bind(arena_);
  for (Layer& L : layers_) {
    for (DeviceLinear* d : {&L.attn_norm, &L.ffn_norm, &L.qkv, &L.wo, &L.gate_up, &L.down}) d->bind(arena_);
    L.k_cache = arena_.at<bf16>(L.off_k);
    L.v_cache = arena_.at<bf16>(L.off_v);
  }
  x_ = arena_.at<bf16>(off_.x);
  h_ = arena_.at<bf16>(off_.h);
  qkv_ = arena_.at<bf16>(off_.qkv);
  q_ = arena_.at<bf16>(off_.q);
  attn_ = arena_.at<bf16>(off_.attn);
  gu_ = arena_.at<bf16>(off_.gu);
  act_ = arena_.at<bf16>(off_.act);
  last_ = arena_.at<bf16>(off_.last);
  logits_ = arena_.at<float>(off_.logits);
  inv_freq_ = arena_.at<float>(off_.inv_freq);
  step_in_ = arena_.at<int32_t>(off_.step_in);
  dec_in_ = arena_.at<int32_t>(off_.dec_in);
  next_ = arena_.at<int32_t>(off_.next);
  attn_ws_ = arena_.at<void>(off_.attn_ws);
  if (dequant_prefill_) {
    for (int i = 0; i < 2; ++i) slot_[i] = arena_.at<bf16>(off_slot_[i]);
  }
  sync();
  lt_ = std::make_unique<CublasLt>();

  const std::vector<float> inv_freq = rope_inv_freq(c);
  CUDA_CHECK(cudaMemcpy(inv_freq_, inv_freq.data(), inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
  if (w != nullptr) {
    upload(*w);
  } else {
    randomize(seed);
  }
  step_in_host_ = PinnedBuffer((2 * static_cast<size_t>(step_rows_) + max_batch_) * sizeof(int32_t));
  dec_in_host_ = PinnedBuffer(3 * static_cast<size_t>(max_batch_) * sizeof(int32_t));
  next_host_ = PinnedBuffer(static_cast<size_t>(max_batch_) * sizeof(int32_t));
  sync();
}

void CudaModelImpl::check_config(const std::string& source) const {
  const ModelConfig& c = cfg_;
  QKD_CHECK(c.dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 && c.ffn_dim > 0 &&
                c.vocab_size > 0,
            "{}: config has a non-positive size (dim {}, n_layers {}, n_heads {}, n_kv_heads {}, head_dim {}, "
            "ffn_dim {}, vocab_size {})",
            source, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size);
  QKD_CHECK(c.n_heads % c.n_kv_heads == 0, "{}: n_heads {} is not a multiple of n_kv_heads {}", source, c.n_heads,
            c.n_kv_heads);
  QKD_CHECK(c.dim % 8 == 0, "{}: dim {} is not a multiple of 8, which the CUDA backend's kernels need", source, c.dim);
  QKD_CHECK(c.head_dim == 8 || c.head_dim == 16 || c.head_dim == 32 || c.head_dim == 64 || c.head_dim == 128,
            "{}: head_dim {} is not supported by the CUDA backend (8, 16, 32, 64 or 128)", source, c.head_dim);
}

void CudaModelImpl::check_shapes(const ModelWeights& w) const {
  const ModelConfig& c = cfg_;
  const int64_t dim = c.dim, q_dim = int64_t{c.n_heads} * c.head_dim, kv_dim = int64_t{c.n_kv_heads} * c.head_dim;
  const int64_t ffn = c.ffn_dim, vocab = c.vocab_size;
  expect_shape(w, w.tok_embeddings, {vocab, dim});
  expect_shape(w, w.norm, {dim});
  expect_shape(w, w.lm_head, {vocab, dim});
  for (const LayerWeights& lw : w.layers) {
    expect_shape(w, lw.attn_norm, {dim});
    expect_shape(w, lw.wq, {q_dim, dim});
    expect_shape(w, lw.wk, {kv_dim, dim});
    expect_shape(w, lw.wv, {kv_dim, dim});
    expect_shape(w, lw.wo, {dim, q_dim});
    expect_shape(w, lw.ffn_norm, {dim});
    expect_shape(w, lw.w_gate, {ffn, dim});
    expect_shape(w, lw.w_up, {ffn, dim});
    expect_shape(w, lw.w_down, {dim, ffn});
  }
}

// Decides every weight's format and reserves every region; fills mem_.
void CudaModelImpl::plan(const ModelWeights* w, int quantize_group) {
  const ModelConfig& c = cfg_;
  // A dense stand-in: random weights get the format a dense checkpoint tensor would.
  TensorView dense;
  dense.dtype = DType::BF16;
  auto format = [&](std::initializer_list<const TensorView*> parts, int k) {
    if (w == nullptr) return tensor_format(dense, k, quantize_group);
    const std::vector<const TensorView*> v(parts);
    return stacked_format(v, k, quantize_group);
  };
  auto set = [](DeviceLinear& d, int n, int k, LinearFormat f) {
    d.n = n;
    d.k = k;
    d.fmt = f;
  };
  set(embed_, c.vocab_size, c.dim, {});
  set(norm_, 1, c.dim, {});
  const bool tied = w != nullptr ? (w->lm_head.data == w->tok_embeddings.data &&
                                    w->lm_head.dtype == w->tok_embeddings.dtype)
                                 : c.tied_embeddings;
  embed_.plan(arena_);
  norm_.plan(arena_);
  if (tied) {
    lm_head_ = &embed_;
  } else {
    set(lm_head_own_, c.vocab_size, c.dim, {});
    lm_head_own_.plan(arena_);
    lm_head_ = &lm_head_own_;
  }
  layers_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    Layer& L = layers_[l];
    const LayerWeights* lw = w != nullptr ? &w->layers[l] : nullptr;
    set(L.attn_norm, 1, c.dim, {});
    set(L.ffn_norm, 1, c.dim, {});
    set(L.qkv, q_dim_ + 2 * kv_dim_, c.dim, format({lw ? &lw->wq : nullptr, lw ? &lw->wk : nullptr,
                                                     lw ? &lw->wv : nullptr}, c.dim));
    set(L.wo, c.dim, q_dim_, format({lw ? &lw->wo : nullptr}, q_dim_));
    set(L.gate_up, 2 * ffn_pad_, c.dim, format({lw ? &lw->w_gate : nullptr, lw ? &lw->w_up : nullptr}, c.dim));
    set(L.down, c.dim, ffn_pad_, format({lw ? &lw->w_down : nullptr}, ffn_pad_));
    for (DeviceLinear* d : {&L.attn_norm, &L.ffn_norm, &L.qkv, &L.wo, &L.gate_up, &L.down}) d->plan(arena_);
  }
  mem_.weights = static_cast<int64_t>(arena_.size());

  const size_t cache_bytes = static_cast<size_t>(max_batch_) * kv_dim_ * ctx_ * sizeof(bf16);
  for (Layer& L : layers_) {
    L.off_k = arena_.reserve(cache_bytes);
    L.off_v = arena_.reserve(cache_bytes);
  }
  mem_.kv_cache = static_cast<int64_t>(arena_.size()) - mem_.weights;

  const size_t t = static_cast<size_t>(step_rows_), e = sizeof(bf16);
  off_.x = arena_.reserve(t * c.dim * e);
  off_.h = arena_.reserve(t * c.dim * e);
  off_.qkv = arena_.reserve(t * (q_dim_ + 2 * kv_dim_) * e);
  off_.q = arena_.reserve(t * q_dim_ * e);
  off_.attn = arena_.reserve(t * q_dim_ * e);
  off_.gu = arena_.reserve(t * 2 * ffn_pad_ * e);
  off_.act = arena_.reserve(t * ffn_pad_ * e);
  off_.last = arena_.reserve(static_cast<size_t>(max_batch_) * c.dim * e);
  off_.logits = arena_.reserve(static_cast<size_t>(logits_rows_) * c.vocab_size * sizeof(float));
  off_.inv_freq = arena_.reserve(static_cast<size_t>(c.head_dim / 2) * sizeof(float));
  off_.step_in = arena_.reserve((2 * t + max_batch_) * sizeof(int32_t));
  off_.dec_in = arena_.reserve(3 * static_cast<size_t>(max_batch_) * sizeof(int32_t));
  off_.next = arena_.reserve(static_cast<size_t>(max_batch_) * sizeof(int32_t));
  off_.attn_ws = arena_.reserve(std::max(plan_one_.workspace_bytes, plan_all_.workspace_bytes));
  bool any_int4 = false;
  for (const Layer& L : layers_) {
    for (const DeviceLinear* d : {&L.qkv, &L.wo, &L.gate_up, &L.down}) any_int4 = any_int4 || d->fmt.int4;
  }
  dequant_prefill_ = any_int4 && step_rows_ >= kDequantMinRows;
  if (dequant_prefill_) {
    const Layer& L = layers_[0];  // every layer has the same shapes
    slot_qkv_ = 0;
    slot_wo_ = slot_qkv_ + static_cast<size_t>(L.qkv.n) * L.qkv.k;
    slot_gate_up_ = slot_wo_ + static_cast<size_t>(L.wo.n) * L.wo.k;
    slot_down_ = slot_gate_up_ + static_cast<size_t>(L.gate_up.n) * L.gate_up.k;
    const size_t slot_elems = slot_down_ + static_cast<size_t>(L.down.n) * L.down.k;
    for (size_t& off : off_slot_) off = arena_.reserve(slot_elems * e);
  }
  mem_.activations = static_cast<int64_t>(arena_.size()) - mem_.weights - mem_.kv_cache;
  mem_.library = static_cast<int64_t>(CublasLt::kDefaultWorkspace) + kRuntimeReserve;

  for (const Layer& L : layers_) {
    for (const DeviceLinear* d : {&L.qkv, &L.wo, &L.gate_up, &L.down}) layer_formats_.push_back(d->fmt.str());
  }
}

void CudaModelImpl::upload(const ModelWeights& w) {
  upload_rows(embed_, 0, w.tok_embeddings);
  upload_rows(norm_, 0, w.norm);
  if (lm_head_ == &lm_head_own_) upload_rows(lm_head_own_, 0, w.lm_head);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    Layer& L = layers_[l];
    upload_rows(L.attn_norm, 0, lw.attn_norm);
    upload_rows(L.ffn_norm, 0, lw.ffn_norm);
    upload_rows(L.qkv, 0, lw.wq);
    upload_rows(L.qkv, q_dim_, lw.wk);
    upload_rows(L.qkv, q_dim_ + kv_dim_, lw.wv);
    upload_rows(L.wo, 0, lw.wo);
    upload_rows(L.gate_up, 0, lw.w_gate);
    upload_rows(L.gate_up, ffn_pad_, lw.w_up);
    upload_rows(L.down, 0, lw.w_down);
  }
}

void CudaModelImpl::randomize(uint64_t seed) {
  const cudaStream_t s = stream_.get();
  uint64_t stream_id = 0;
  // Each tensor gets its own seed; scales keep activations O(1) through the layers (1/sqrt(fan-in) per product).
  auto fill = [&](const DeviceLinear& d, int row0, int n, float scale) {
    fill_random_rows(d, row0, n, scale, seed * 0x9E3779B97F4A7C15ull + ++stream_id, s);
  };
  fill(embed_, 0, embed_.n, 0.02f);
  if (lm_head_ == &lm_head_own_) fill(lm_head_own_, 0, lm_head_own_.n, 0.02f);
  auto fill_norm = [&](const DeviceLinear& d) {
    fill_uniform_bf16(d.w, d.k, 0.9f, 1.1f, seed + ++stream_id, s);
  };
  fill_norm(norm_);
  for (Layer& L : layers_) {
    fill_norm(L.attn_norm);
    fill_norm(L.ffn_norm);
    fill(L.qkv, 0, L.qkv.n, 1.0f / std::sqrt(static_cast<float>(cfg_.dim)));
    fill(L.wo, 0, L.wo.n, 1.0f / std::sqrt(static_cast<float>(q_dim_)));
    // only the real rows: the padding rows of gate/up must stay zero (their swiglu output is then exactly 0)
    fill(L.gate_up, 0, cfg_.ffn_dim, 1.0f / std::sqrt(static_cast<float>(cfg_.dim)));
    fill(L.gate_up, ffn_pad_, cfg_.ffn_dim, 1.0f / std::sqrt(static_cast<float>(cfg_.dim)));
    fill(L.down, 0, L.down.n, 1.0f / std::sqrt(static_cast<float>(cfg_.ffn_dim)));
  }
}

void CudaModelImpl::linear(const DeviceLinear& w, const bf16* dense, const bf16* x, bf16* y, int m,
                           Accumulate mode) {
  if (dense != nullptr) {
    cuda::gemm(*lt_, {y, x, dense, m, w.n, w.k, Transpose::No, Transpose::Yes, GemmOut::BF16, mode}, stream_.get());
  } else if (w.fmt.int4) {
    cuda::int4_gemm_forward({y, x, w.q, m, mode}, stream_.get());
  } else {
    cuda::gemm(*lt_, {y, x, w.w, m, w.n, w.k, Transpose::No, Transpose::Yes, GemmOut::BF16, mode}, stream_.get());
  }
}

void CudaModelImpl::enqueue_layers(int batch, int len, const int32_t* tok, const int32_t* pos,
                                   const int32_t* start) {
  const ModelConfig& c = cfg_;
  const cudaStream_t s = stream_.get();
  const int n = batch * len;
  cuda::embedding_forward({x_, embed_.w, tok, n, c.dim, c.vocab_size}, s);
  const int64_t kv_head_stride = static_cast<int64_t>(ctx_) * c.head_dim;
  const int64_t kv_batch_stride = c.n_kv_heads * kv_head_stride;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  // Decode steps (len 1, also those captured in a graph) never take the dequantized path.
  const bool dq = dequant_prefill_ && len > 1 && n >= kDequantMinRows;
  if (dq) {  // the slots are free once everything enqueued before this step has run
    CUDA_CHECK(cudaEventRecord(dq_start_.get(), s));
    CUDA_CHECK(cudaStreamWaitEvent(dq_stream_.get(), dq_start_.get()));
    stage_dequant(0);
  }
  for (int l = 0; l < c.n_layers; ++l) {
    Layer& L = layers_[l];
    const bf16* slot = nullptr;
    if (dq) {
      if (l + 1 < c.n_layers) stage_dequant(l + 1);  // overlaps this layer's work
      CUDA_CHECK(cudaStreamWaitEvent(s, slot_ready_[l % 2].get()));
      slot = slot_[l % 2];
    }
    auto dense = [&](const DeviceLinear& d, size_t off) { return slot != nullptr && d.fmt.int4 ? slot + off : nullptr; };
    cuda::rmsnorm_forward({h_, x_, nullptr, L.attn_norm.w, nullptr, n, c.dim, c.norm_eps}, s);
    linear(L.qkv, dense(L.qkv, slot_qkv_), h_, qkv_, n, Accumulate::Overwrite);
    qkv_rope_cache_forward({q_, L.k_cache, L.v_cache, qkv_, pos, inv_freq_, n, len, c.n_heads, c.n_kv_heads,
                            c.head_dim, ctx_},
                           s);
    const AttentionArgs<bf16> a{attn_,     q_,        L.k_cache,   L.v_cache,       nullptr,         start, batch,
                                len,       c.n_heads, c.n_kv_heads, c.head_dim,     kv_batch_stride, kv_head_stride,
                                c.head_dim, scale};
    if (!fast_attention_) {
      small_head_attention_forward(a, s);
    } else if (len == 1) {
      cuda::decode_attention_forward(a, batch == 1 ? plan_one_ : plan_all_, attn_ws_, s);
    } else {
      cuda::attention_forward(a, s);
    }
    linear(L.wo, dense(L.wo, slot_wo_), attn_, x_, n, Accumulate::Add);
    cuda::rmsnorm_forward({h_, x_, nullptr, L.ffn_norm.w, nullptr, n, c.dim, c.norm_eps}, s);
    linear(L.gate_up, dense(L.gate_up, slot_gate_up_), h_, gu_, n, Accumulate::Overwrite);
    cuda::swiglu_forward({act_, gu_, gu_ + ffn_pad_, n, ffn_pad_, 2 * static_cast<int64_t>(ffn_pad_)}, s);
    linear(L.down, dense(L.down, slot_down_), act_, x_, n, Accumulate::Add);
    if (dq) CUDA_CHECK(cudaEventRecord(slot_free_[l % 2].get(), s));
  }
  cuda::rmsnorm_forward({h_, x_, nullptr, norm_.w, nullptr, n, c.dim, c.norm_eps}, s);
}

void CudaModelImpl::stage_dequant(int l) {
  const cudaStream_t d = dq_stream_.get();
  const int slot = l % 2;
  // layer l - 2 read this slot; the wait is on its last record (layers 0 and 1: dq_start_ covered it)
  if (l >= 2) CUDA_CHECK(cudaStreamWaitEvent(d, slot_free_[slot].get()));
  const Layer& L = layers_[l];
  const std::pair<const DeviceLinear*, size_t> parts[] = {
      {&L.qkv, slot_qkv_}, {&L.wo, slot_wo_}, {&L.gate_up, slot_gate_up_}, {&L.down, slot_down_}};
  for (const auto& [w, off] : parts) {
    if (w->fmt.int4) cuda::int4_dequantize({slot_[slot] + off, w->q}, d);
  }
  CUDA_CHECK(cudaEventRecord(slot_ready_[slot].get(), d));
}

void CudaModelImpl::lm_head(const bf16* h, int m) {
  cuda::gemm(*lt_,
             {logits_, h, lm_head_->w, m, cfg_.vocab_size, cfg_.dim, Transpose::No, Transpose::Yes, GemmOut::F32,
              Accumulate::Overwrite},
             stream_.get());
}

void CudaModelImpl::write_decode_inputs(std::span<const int32_t> tokens, std::span<const int32_t> start_pos,
                                        std::span<const float> uniform, int batch) {
  int32_t* in = dec_in_host_.as<int32_t>();
  std::copy_n(tokens.data(), batch, in);
  std::copy_n(start_pos.data(), batch, in + max_batch_);
  if (!uniform.empty()) std::memcpy(in + 2 * max_batch_, uniform.data(), static_cast<size_t>(batch) * sizeof(float));
  CUDA_CHECK(cudaMemcpyAsync(dec_in_, in, 3 * static_cast<size_t>(max_batch_) * sizeof(int32_t),
                             cudaMemcpyHostToDevice, stream_.get()));
}

void CudaModelImpl::enqueue_decode(int batch, bool sample, const TokenPick& pick) {
  // one token per sequence: its position is also the sequence's start position
  enqueue_layers(batch, 1, dec_in_, dec_in_ + max_batch_, dec_in_ + max_batch_);
  lm_head(h_, batch);
  if (sample) {
    const auto* uniform = reinterpret_cast<const float*>(dec_in_ + 2 * max_batch_);
    cuda::sampling_forward(SamplingArgs<float>{next_, logits_, uniform, batch, cfg_.vocab_size, cfg_.vocab_size,
                                               pick.temperature, pick.top_k, pick.top_p},
                           stream_.get());
  }
}

void CudaModelImpl::run_decode(int batch, bool sample, const TokenPick& pick) {
  if (!use_graph_) {
    enqueue_decode(batch, sample, pick);
    return;
  }
  for (const CapturedStep& g : graphs_) {
    if (g.matches(batch, sample, pick)) {
      g.exec.launch(stream_.get());
      return;
    }
  }
  // The first step of its kind runs directly (loading every kernel module and choosing every cuBLASLt
  // algorithm outside the capture); it is then captured for the steps after it.
  enqueue_decode(batch, sample, pick);
  sync();
  const cudaStream_t s = stream_.get();
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  try {
    enqueue_decode(batch, sample, pick);
  } catch (...) {
    cudaGraph_t broken = nullptr;
    cudaStreamEndCapture(s, &broken);
    if (broken != nullptr) cudaGraphDestroy(broken);
    throw;
  }
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  if (graphs_.size() >= kMaxGraphs) graphs_.erase(graphs_.begin());
  graphs_.push_back({batch, sample, pick, GraphExec(graph)});
}

void CudaModelImpl::prefill(std::span<const int32_t> tokens, int batch, int seq_len,
                            std::span<const int32_t> start_pos, LogitsMode mode, float* logits) {
  const int dim = cfg_.dim, vocab = cfg_.vocab_size;
  const cudaStream_t s = stream_.get();
  int32_t* in = step_in_host_.as<int32_t>();
  for (int s0 = 0; s0 < seq_len; s0 += chunk_len_) {
    const int len = std::min(chunk_len_, seq_len - s0);
    const int n = batch * len;
    for (int b = 0; b < batch; ++b) {
      in[2 * step_rows_ + b] = start_pos[b] + s0;
      for (int i = 0; i < len; ++i) {
        in[b * len + i] = tokens[static_cast<size_t>(b) * seq_len + s0 + i];
        in[step_rows_ + b * len + i] = start_pos[b] + s0 + i;
      }
    }
    CUDA_CHECK(cudaMemcpyAsync(step_in_, in, (2 * static_cast<size_t>(step_rows_) + max_batch_) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, s));
    enqueue_layers(batch, len, step_in_, step_in_ + step_rows_, step_in_ + 2 * step_rows_);
    if (mode == LogitsMode::All) {
      // the LM head in pieces of logits_rows_ rows; row r of the step is token r % len of sequence r / len
      for (int r0 = 0; r0 < n; r0 += logits_rows_) {
        const int m = std::min(logits_rows_, n - r0);
        lm_head(h_ + static_cast<int64_t>(r0) * dim, m);
        for (int r = r0; r < r0 + m;) {
          const int b = r / len, i = r % len;
          const int count = std::min(len - i, r0 + m - r);
          CUDA_CHECK(cudaMemcpyAsync(logits + (static_cast<int64_t>(b) * seq_len + s0 + i) * vocab,
                                     logits_ + static_cast<int64_t>(r - r0) * vocab,
                                     static_cast<size_t>(count) * vocab * sizeof(float), cudaMemcpyDeviceToHost, s));
          r += count;
        }
      }
    } else if (s0 + len == seq_len) {
      const bf16* rows = h_;
      if (len > 1) {  // each sequence's last row
        CUDA_CHECK(cudaMemcpy2DAsync(last_, dim * sizeof(bf16), h_ + static_cast<int64_t>(len - 1) * dim,
                                     static_cast<size_t>(len) * dim * sizeof(bf16), dim * sizeof(bf16), batch,
                                     cudaMemcpyDeviceToDevice, s));
        rows = last_;
      }
      lm_head(rows, batch);
    }
    sync();  // the pinned step inputs are rewritten for the next chunk
  }
}

void CudaModelImpl::forward(std::span<const int32_t> tokens, int batch, int seq_len,
                            std::span<const int32_t> start_pos, LogitsMode mode, float* logits) {
  check_forward_inputs(*this, tokens, batch, seq_len, start_pos);
  if (seq_len == 1) {  // [batch, 1, vocab] and [batch, vocab] are the same layout
    write_decode_inputs(tokens, start_pos, {}, batch);
    run_decode(batch, false, {});
  } else {
    prefill(tokens, batch, seq_len, start_pos, mode, logits);
    if (mode == LogitsMode::All) return;
  }
  CUDA_CHECK(cudaMemcpyAsync(logits, logits_, static_cast<size_t>(batch) * cfg_.vocab_size * sizeof(float),
                             cudaMemcpyDeviceToHost, stream_.get()));
  sync();
}

void CudaModelImpl::forward_sample(std::span<const int32_t> tokens, int batch, int seq_len,
                                   std::span<const int32_t> start_pos, const TokenPick& pick,
                                   std::span<const float> uniform, int32_t* next) {
  check_forward_inputs(*this, tokens, batch, seq_len, start_pos);
  const bool greedy = pick.temperature <= 0.0f || pick.top_k == 1;
  QKD_CHECK(greedy || uniform.size() >= static_cast<size_t>(batch),
            "forward_sample: {} uniform draws given for batch {}", uniform.size(), batch);
  const std::span<const float> draws = greedy ? std::span<const float>() : uniform;
  if (seq_len == 1) {
    write_decode_inputs(tokens, start_pos, draws, batch);
    run_decode(batch, true, pick);
  } else {
    prefill(tokens, batch, seq_len, start_pos, LogitsMode::Last, nullptr);
    if (!draws.empty()) {
      float* host = dec_in_host_.as<float>() + 2 * max_batch_;
      std::copy_n(draws.data(), batch, host);
      CUDA_CHECK(cudaMemcpyAsync(dec_in_ + 2 * max_batch_, host, static_cast<size_t>(batch) * sizeof(float),
                                 cudaMemcpyHostToDevice, stream_.get()));
    }
    const auto* u = reinterpret_cast<const float*>(dec_in_ + 2 * max_batch_);
    cuda::sampling_forward(SamplingArgs<float>{next_, logits_, u, batch, cfg_.vocab_size, cfg_.vocab_size,
                                               pick.temperature, pick.top_k, pick.top_p},
                           stream_.get());
  }
  int32_t* host = next_host_.as<int32_t>();
  CUDA_CHECK(cudaMemcpyAsync(host, next_, static_cast<size_t>(batch) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                             stream_.get()));
  sync();
  std::copy_n(host, batch, next);
}

void CudaModelImpl::set_decode_inputs(std::span<const int32_t> tokens, std::span<const int32_t> start_pos) {
  const int batch = static_cast<int>(tokens.size());
  check_forward_inputs(*this, tokens, batch, 1, start_pos);
  write_decode_inputs(tokens, start_pos, {}, batch);
  sync();
}

void CudaModelImpl::replay_decode(int batch) {
  QKD_CHECK(batch >= 1 && batch <= max_batch_, "replay_decode: batch {} must be in [1, {}]", batch, max_batch_);
  run_decode(batch, true, TokenPick{});
}

int64_t CudaModelImpl::decode_bytes_read(int batch, int context) const {
  const ModelConfig& c = cfg_;
  int64_t weights = norm_.bytes() + lm_head_->bytes() + static_cast<int64_t>(batch) * c.dim * 2;
  for (const Layer& L : layers_) {
    weights += L.attn_norm.bytes() + L.ffn_norm.bytes() + L.qkv.bytes() + L.wo.bytes() + L.gate_up.bytes() +
               L.down.bytes();
  }
  const int64_t kv = int64_t{c.n_layers} * 2 * batch * kv_dim_ * (static_cast<int64_t>(context) + 1) * 2;
  return weights + kv;
}

std::string CudaModelImpl::weight_format() const {
  std::vector<std::string> kinds;
  for (const std::string& f : layer_formats_) {
    if (std::find(kinds.begin(), kinds.end(), f) == kinds.end()) kinds.push_back(f);
  }
  if (kinds.size() == 1) return kinds[0];
  std::string out = "mixed:";
  for (const std::string& k : kinds) {
    out += fmt::format(" {} x {}", std::count(layer_formats_.begin(), layer_formats_.end(), k), k);
  }
  return out;
}

}  // namespace

std::unique_ptr<CudaModel> make_cuda_model_impl(const ModelWeights& w, const ModelOptions& opt) {
  require_device();
  return std::make_unique<CudaModelImpl>(w.config, &w, opt, 0);
}

std::unique_ptr<CudaModel> make_cuda_model_random(const ModelConfig& c, const ModelOptions& opt, uint64_t seed) {
  require_device();
  return std::make_unique<CudaModelImpl>(c, nullptr, opt, seed);
}

std::unique_ptr<Model> make_cuda_model(const ModelWeights& w, const ModelOptions& opt) {
  return make_cuda_model_impl(w, opt);
}

}  // namespace qkd::runtime
