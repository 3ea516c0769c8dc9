// The training engine over one backend (train/engine.h), written once for CpuOps and CudaOps (train/ops.h).
#include "train/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <cstdio>
#include <type_traits>

#include <cuda_runtime.h>

#include "kernels/error.h"
#include "train/data_parallel.h"
#include "train/ops.h"
#include "train/transformer.h"

namespace qkd::train {

namespace {

// Rows of logits materialised at a time: the loss head never holds more than one such block of logits (and of
// their gradients, written in place). On the GPU 64 Mi elements (128 MiB of bf16: 2097 rows of a 32000-token
// vocabulary), so the LM head's GEMMs are large enough to run at the matrix rate (rounding the rows to 2048 was
// measured and changed nothing: docs/training.md); on the CPU 8 Mi (32 MiB of
// fp32), where the block size does not change the speed.
template <typename T>
constexpr int64_t kLossBlockElements = std::is_same_v<T, float> ? int64_t{8} << 20 : int64_t{64} << 20;

template <class Ops>
class EngineImpl final : public Engine {
 public:
  using T = typename Ops::T;

  EngineImpl(const EngineOptions& opt, const Plan& plan, const HostInit& init, const ModelWeights* teacher)
      : opt_(opt), plan_(plan) {
    const ModelConfig& c = plan_.config;
    QKD_CHECK(opt.micro_batch > 0 && opt.seq_len > 1, "micro_batch {} and seq_len {} must be positive (seq_len > 1)",
              opt.micro_batch, opt.seq_len);
    QKD_CHECK(static_cast<int64_t>(init.master.size()) == plan_.total, "initial parameters hold {} values, plan {}",
              init.master.size(), plan_.total);
    QKD_CHECK(opt.shard_count >= 1 && opt.shard_rank >= 0 && opt.shard_rank < opt.shard_count,
              "optimizer shard {} of {} does not exist", opt.shard_rank, opt.shard_count);
    const int64_t total = plan_.total;
    layout_ = shard_layout(total, opt.shard_count);
    lo_ = layout_.lo(opt.shard_rank);
    hi_ = layout_.hi(opt.shard_rank);
    const int64_t padded = layout_.padded;
    // ops_.alloc zeroes, so the padding past total is zero and stays so: the collectives move whole chunks.
    master_ = ops_.template alloc<float>(padded);
    grad_ = ops_.template alloc<float>(padded);
    m_ = ops_.template alloc<float>(hi_ - lo_);
    v_ = ops_.template alloc<float>(hi_ - lo_);
    ops_.upload(master_, init.master.data(), total);
    if constexpr (std::is_same_v<T, float>) {
      compute_ = master_;  // fp32 backend: the master weights are the compute weights
    } else {
      compute_ = ops_.template alloc<T>(padded);
      for (const Segment& s : plan_.segments)
        if (s.compute_copy) ops_.to_compute(compute_ + s.offset, init.master.data() + s.offset, s.numel);
    }
    for (const Int4HostWeight& f : init.frozen) frozen_.push_back(ops_.upload_int4(f));

    WeightsT<T> w;
    auto cw = [&](int seg) { return compute_ + plan_.segments[static_cast<size_t>(seg)].offset; };
    auto gw = [&](int seg) { return grad_ + plan_.segments[static_cast<size_t>(seg)].offset; };
    auto mw = [&](int seg) { return master_ + plan_.segments[static_cast<size_t>(seg)].offset; };
    w.embed = cw(plan_.embed);
    w.d_embed = gw(plan_.embed);
    w.norm = cw(plan_.norm);
    w.d_norm = gw(plan_.norm);
    w.head = cw(plan_.lm_head);
    w.d_head = gw(plan_.lm_head);
    for (const LayerPlan& lp : plan_.layers) {
      LayerWeightsT<T> lw;
      lw.attn_norm = cw(lp.attn_norm);
      lw.ffn_norm = cw(lp.ffn_norm);
      lw.d_attn_norm = gw(lp.attn_norm);
      lw.d_ffn_norm = gw(lp.ffn_norm);
      for (int j = 0; j < 7; ++j) {
        const LinearPlan& p = *lp.linears()[j];
        LinearWeights<T>& l = lw.lin[j];
        l.kind = p.kind;
        l.n = p.n;
        l.k = p.k;
        if (p.kind == LinearKind::Frozen) {
          l.q = frozen_[static_cast<size_t>(p.frozen)];
        } else if (p.kind == LinearKind::Dense) {
          l.w = cw(p.w);
          l.dw = gw(p.w);
        } else {
          l.wq = ops_.template alloc<T>(int64_t{p.n} * p.k);
          l.w = l.wq;
          l.dw = gw(p.w);
          l.master = mw(p.w);
          l.scale = mw(p.scale);
          l.dscale = gw(p.scale);
          if (p.clip >= 0) {
            l.clip = mw(p.clip);
            l.dclip = gw(p.clip);
          }
          l.group_size = plan_.group_size(p);
          l.bits = plan_.quant.bits;
        }
      }
      w.layers.push_back(lw);
    }
    student_ = std::make_unique<Transformer<Ops>>(ops_, c, std::move(w), opt.micro_batch, opt.seq_len, Save::Yes);

    if (teacher != nullptr) build_teacher(*teacher);

    const int n = opt.micro_batch * opt.seq_len;
    block_rows_ = static_cast<int>(std::clamp<int64_t>(kLossBlockElements<T> / c.vocab_size, 1, n));
    logits_ = ops_.template alloc<T>(int64_t{block_rows_} * c.vocab_size);
    if (teacher_) tlogits_ = ops_.template alloc<T>(int64_t{block_rows_} * c.vocab_size);
    ce_ = ops_.template alloc<acc_t<T>>(n);
    kl_ = ops_.template alloc<acc_t<T>>(n);
    targets_ = ops_.template alloc<int32_t>(n);
    dxf_ = ops_.template alloc<T>(int64_t{n} * c.dim);
    if (opt.loss.contrastive_weight > 0.0f) {
      QKD_CHECK(teacher_ != nullptr, "the contrastive loss needs a teacher");
      const int s = opt.seq_len;
      zs_ = ops_.template alloc<T>(int64_t{s} * c.dim);
      zt_ = ops_.template alloc<T>(int64_t{s} * c.dim);
      dzs_ = ops_.template alloc<T>(int64_t{s} * c.dim);
      ns_ = ops_.template alloc<float>(s);
      nt_ = ops_.template alloc<float>(s);
      sim_ = ops_.template alloc<T>(int64_t{s} * s);
      ctr_ = ops_.template alloc<acc_t<T>>(n);
      arange_ = ops_.template alloc<int32_t>(s);
      std::vector<int32_t> ar(static_cast<size_t>(s));
      for (int i = 0; i < s; ++i) ar[static_cast<size_t>(i)] = i;
      ops_.upload(arange_, ar.data(), s);
    }
    ops_.sync();
  }

  const Plan& plan() const override { return plan_; }
  const char* backend_name() const override { return Ops::kName; }
  bool has_teacher() const override { return teacher_ != nullptr; }

  void begin_step(int64_t step_tokens) override {
    QKD_CHECK(step_tokens > 0, "begin_step: {} tokens", step_tokens);
    step_tokens_ = step_tokens;
    accumulated_ = false;
    quantizer_done_ = false;
    mark(nullptr);
    ops_.zero(grad_, plan_.total);
    student_->quantize();
    mark("fake quant forward");
  }

  std::map<std::string, double> phase_ms() const override { return phase_ms_; }

  LossSums accumulate(const int32_t* windows, int n_seqs) override {
    QKD_CHECK(!(ready_ && accumulated_), "accumulate: a step with a gradient-ready callback (data parallelism) "
              "takes exactly one accumulate() call");
    accumulated_ = true;
    return run(windows, n_seqs, true);
  }
  LossSums evaluate(const int32_t* windows, int n_seqs) override {
    student_->quantize();
    return run(windows, n_seqs, false);
  }

  void quantizer_backward() override {
    if (quantizer_done_) return;  // done layer by layer during the backward pass
    mark(nullptr);
    student_->quantize_backward();
    quantizer_done_ = true;
    mark("fake quant backward");
  }
  double shard_sum_squares() override { return hi_ > lo_ ? ops_.sum_squares(grad_ + lo_, hi_ - lo_) : 0.0; }
  void set_gradient_ready(GradientReady f) override { ready_ = std::move(f); }
  Flat flat() override { return Flat{master_, grad_, compute_, sizeof(T)}; }
  ShardLayout shard() const override { return layout_; }
  cudaStream_t cuda_stream() override {
    if constexpr (std::is_same_v<Ops, CudaOps>) return ops_.stream();
    return nullptr;
  }

  void apply(const AdamWStep& s) override {
    mark(nullptr);
    for (const Segment& seg : plan_.segments) {
      // the part of the segment in this engine's shard (all of it when alone)
      const int64_t b = std::max(seg.offset, lo_), e = std::min(seg.offset + seg.numel, hi_);
      if (b >= e) continue;
      const bool is_scale = seg.name.ends_with(".scales") || seg.name.ends_with(".clip");
      AdamWArgs a{};
      a.param = master_ + b;
      a.param_bf16 = nullptr;
      if constexpr (!std::is_same_v<T, float>) {
        if (seg.compute_copy) a.param_bf16 = compute_ + b;
      }
      a.m = m_ + (b - lo_);
      a.v = v_ + (b - lo_);
      a.grad = grad_ + b;
      a.n = e - b;
      a.lr = is_scale ? s.scale_lr : s.lr;
      a.beta1 = s.beta1;
      a.beta2 = s.beta2;
      a.eps = s.eps;
      a.weight_decay = seg.decay ? s.weight_decay : 0.0f;
      a.grad_scale = s.grad_scale;
      a.step = s.step;
      ops_.adamw(a);
    }
    ops_.sync();
    mark("adamw");
  }

  void get_master(std::vector<float>& master) override {
    master.resize(static_cast<size_t>(plan_.total));
    ops_.download(master.data(), master_, plan_.total);
  }
  void get_moments(std::vector<float>& m, std::vector<float>& v) override {
    const int64_t n = hi_ - lo_;
    m.resize(static_cast<size_t>(n));
    v.resize(static_cast<size_t>(n));
    ops_.download(m.data(), m_, n);
    ops_.download(v.data(), v_, n);
  }

  void set_state(const std::vector<float>& master, const std::vector<float>& m,
                 const std::vector<float>& v) override {
    const int64_t total = plan_.total;
    const auto shard = static_cast<size_t>(hi_ - lo_);
    QKD_CHECK(static_cast<int64_t>(master.size()) == total && m.size() == shard && v.size() == shard,
              "optimizer state holds {} / {} / {} values (master / m / v), the student needs {} / {} / {}",
              master.size(), m.size(), v.size(), total, shard, shard);
    ops_.upload(master_, master.data(), total);
    ops_.upload(m_, m.data(), static_cast<int64_t>(shard));
    ops_.upload(v_, v.data(), static_cast<int64_t>(shard));
    if constexpr (!std::is_same_v<T, float>) {
      for (const Segment& s : plan_.segments)
        if (s.compute_copy) ops_.to_compute(compute_ + s.offset, master.data() + s.offset, s.numel);
    }
    ops_.sync();
  }

  std::vector<Int4HostWeight> frozen_weights() override {
    std::vector<Int4HostWeight> out;
    for (const Int4Weight& f : frozen_) {
      Int4HostWeight h;
      h.n = f.n;
      h.k = f.k;
      h.group_size = f.group_size;
      h.sym = f.sym;
      h.scale_type = f.scale_type;
      h.packed.resize(static_cast<size_t>(f.n) * (f.k / 8));
      h.scales.resize(static_cast<size_t>(f.n) * (f.k / f.group_size));
      ops_.download(h.packed.data(), f.packed, static_cast<int64_t>(h.packed.size()));
      ops_.download(h.scales.data(), f.scales, static_cast<int64_t>(h.scales.size()));
      out.push_back(std::move(h));
    }
    return out;
  }

  std::vector<float> gradients() override {
    std::vector<float> g(static_cast<size_t>(plan_.total));
    ops_.download(g.data(), grad_, plan_.total);
    return g;
  }

  Probe probe(const int32_t* windows) override {
    const ModelConfig& c = plan_.config;
    const int mb = opt_.micro_batch, n = mb * opt_.seq_len;
    begin_step(n);
    Probe p;
    GradientReady ready = std::move(ready_);  // a probe's gradients stay local
    ready_ = nullptr;
    p.loss = run(windows, mb, true);
    ready_ = std::move(ready);
    p.grad = gradients();
    for (int l = 0; l < c.n_layers; ++l) p.layer_out.push_back(to_host(student_->layer_output(l), int64_t{n} * c.dim));
    p.logits.resize(static_cast<size_t>(n) * c.vocab_size);
    for (int r0 = 0; r0 < n; r0 += block_rows_) {
      const int rows = std::min(block_rows_, n - r0);
      ops_.linear(logits_, student_->xf() + int64_t{r0} * c.dim, student_->weights().head, rows, c.vocab_size, c.dim,
                  Accumulate::Overwrite);
      const std::vector<float> h = to_host(logits_, int64_t{rows} * c.vocab_size);
      std::copy(h.begin(), h.end(), p.logits.begin() + int64_t{r0} * c.vocab_size);
    }
    return p;
  }

 private:
  // Phase timing (QKD_TRAIN_PHASES): mark(nullptr) starts a phase, mark(name) ends it.
  void mark(const char* name) {
    if (!phases_) return;
    ops_.sync();
    const auto now = std::chrono::steady_clock::now();
    if (name != nullptr) phase_ms_[name] += std::chrono::duration<double, std::milli>(now - phase_t0_).count();
    phase_t0_ = now;
  }

  std::vector<float> to_host(const T* p, int64_t n) {
    std::vector<float> out(static_cast<size_t>(n));
    if constexpr (std::is_same_v<T, float>) {
      ops_.download(out.data(), p, n);
    } else {
      std::vector<T> h(static_cast<size_t>(n));
      ops_.download(h.data(), p, n);
      for (size_t i = 0; i < h.size(); ++i) out[i] = __bfloat162float(h[i]);
    }
    return out;
  }

  void build_teacher(const ModelWeights& t) {
    const ModelConfig& tc = t.config;
    const ModelConfig& c = plan_.config;
    QKD_CHECK(tc.vocab_size == c.vocab_size, "{}: the teacher's vocabulary ({}) differs from the student's ({})",
              t.source, tc.vocab_size, c.vocab_size);
    QuantSpec dense;
    dense.bits = kDenseBits;
    dense.frozen = 0;
    teacher_plan_ = make_plan(tc, dense);
    const HostInit h = init_parameters(teacher_plan_, t, nullptr);
    T* tw = ops_.template alloc<T>(teacher_plan_.total);
    ops_.to_compute(tw, h.master.data(), teacher_plan_.total);
    auto cw = [&](int seg) { return tw + teacher_plan_.segments[static_cast<size_t>(seg)].offset; };
    WeightsT<T> w;
    w.embed = cw(teacher_plan_.embed);
    w.norm = cw(teacher_plan_.norm);
    w.head = cw(teacher_plan_.lm_head);
    for (const LayerPlan& lp : teacher_plan_.layers) {
      LayerWeightsT<T> lw;
      lw.attn_norm = cw(lp.attn_norm);
      lw.ffn_norm = cw(lp.ffn_norm);
      for (int j = 0; j < 7; ++j) {
        const LinearPlan& p = *lp.linears()[j];
        lw.lin[j].kind = LinearKind::Dense;
        lw.lin[j].n = p.n;
        lw.lin[j].k = p.k;
        lw.lin[j].w = cw(p.w);
      }
      w.layers.push_back(lw);
    }
    teacher_ = std::make_unique<Transformer<Ops>>(ops_, tc, std::move(w), opt_.micro_batch, opt_.seq_len, Save::No);
    teacher_dim_ = tc.dim;
  }

  // Forward (and, when train, backward) over n_seqs windows, micro_batch at a time.
  LossSums run(const int32_t* windows, int n_seqs, bool train) {
    const ModelConfig& c = plan_.config;
    const int mb = opt_.micro_batch, s = opt_.seq_len, n = mb * s, vocab = c.vocab_size;
    // Training steps come in whole micro-batches; evaluation takes any count and pads its last micro-batch with
    // copies of its last window, whose rows are left out of the sums.
    QKD_CHECK(n_seqs > 0 && (!train || n_seqs % mb == 0), "{} sequences are not a positive multiple of the "
              "micro-batch {}", n_seqs, mb);
    const LossOptions& L = opt_.loss;
    const bool kd = teacher_ != nullptr && (L.kd_weight > 0.0f || !train);
    const bool ctr = teacher_ != nullptr && L.contrastive_weight > 0.0f;
    const float grad_scale = train ? static_cast<float>(1.0 / static_cast<double>(step_tokens_)) : 0.0f;
    LossSums sums;
    std::vector<int32_t> inputs(static_cast<size_t>(n)), targets(static_cast<size_t>(n));
    std::vector<acc_t<T>> ce(static_cast<size_t>(n)), kl(static_cast<size_t>(n)), cl(static_cast<size_t>(n));
    for (int b0 = 0; b0 < n_seqs; b0 += mb) {
      const int real = std::min(mb, n_seqs - b0);
      for (int b = 0; b < mb; ++b) {
        const int32_t* w = windows + static_cast<int64_t>(b0 + std::min(b, real - 1)) * (s + 1);
        std::copy(w, w + s, inputs.begin() + int64_t{b} * s);
        std::copy(w + 1, w + s + 1, targets.begin() + int64_t{b} * s);
      }
      ops_.upload(targets_, targets.data(), n);
      mark(nullptr);
      if (teacher_ && (kd || ctr)) teacher_->forward(inputs.data());
      mark("teacher forward");
      student_->forward(inputs.data());
      mark("student forward");
      const T* xf = student_->xf();
      for (int r0 = 0; r0 < n; r0 += block_rows_) {
        const int rows = std::min(block_rows_, n - r0);
        const T* xs = xf + int64_t{r0} * c.dim;
        ops_.linear(logits_, xs, student_->weights().head, rows, vocab, c.dim, Accumulate::Overwrite);
        if (kd)
          ops_.linear(tlogits_, teacher_->xf() + int64_t{r0} * teacher_dim_, teacher_->weights().head, rows, vocab,
                      teacher_dim_, Accumulate::Overwrite);
        SoftmaxLossArgs<T> la{};
        la.logits = logits_;
        la.teacher = kd ? tlogits_ : nullptr;
        la.targets = targets_ + r0;
        la.ce = ce_ + r0;
        la.kl = kl_ + r0;
        la.rows = rows;
        la.vocab = vocab;
        la.ld = vocab;
        la.temperature = L.temperature;
        la.ce_weight = L.ce_weight;
        la.kl_weight = kd ? L.kd_weight : 0.0f;
        la.grad_scale = grad_scale;
        la.grad = train ? LossGrad::Write : LossGrad::None;
        ops_.softmax_loss(la);
        if (!train) continue;
        ops_.linear_dgrad(dxf_ + int64_t{r0} * c.dim, logits_, student_->weights().head, rows, vocab, c.dim,
                          Accumulate::Overwrite);
        ops_.linear_wgrad(student_->weights().d_head, logits_, xs, rows, vocab, c.dim);
      }
      mark("lm head and losses");
      if (ctr) contrastive(xf, train, grad_scale);
      mark("contrastive");
      if (train) {
        if (ready_ && b0 + mb >= n_seqs) {
          backward_last();
        } else {
          student_->backward(dxf_);
        }
      }
      mark("student backward");
      ops_.download(ce.data(), ce_, n);
      if (kd) ops_.download(kl.data(), kl_, n);
      if (ctr) ops_.download(cl.data(), ctr_, n);
      const int valid = real * s;  // the padding rows of a last evaluation micro-batch count for nothing
      for (int i = 0; i < valid; ++i) {
        if (targets[static_cast<size_t>(i)] >= 0) sums.ce += ce[static_cast<size_t>(i)];
        if (kd) sums.kl += kl[static_cast<size_t>(i)];
        if (ctr) sums.contrastive += cl[static_cast<size_t>(i)];
      }
      sums.rows += valid;
    }
    return sums;
  }

  // The step's last backward pass with a gradient-ready callback: each layer's quantizer backward runs as soon as
  // the pass leaves the layer, and its range of the flat buffer is handed on (the layer's segments are contiguous:
  // make_plan adds them layer by layer), so the reduction of layer l overlaps the backward of layers < l.
  void backward_last() {
    const int n_layers = plan_.config.n_layers;
    auto first = [&](int l) {  // flat offset where layer l's segments begin (the norms are always first)
      return plan_.segments[static_cast<size_t>(plan_.layers[static_cast<size_t>(l)].attn_norm)].offset;
    };
    const int64_t layers_end = plan_.segments[static_cast<size_t>(plan_.norm)].offset;
    student_->backward(dxf_, [&](int l) {
      student_->quantize_backward(l);
      ready_(first(l), l + 1 < n_layers ? first(l + 1) : layers_end);
    });
    quantizer_done_ = true;
    ready_(0, first(0));                   // the embedding (and a tied LM head)
    ready_(layers_end, plan_.total);       // the final norm and an untied LM head
  }

  // Token-level contrastive distillation, one sequence at a time (its negatives are its own other tokens).
  void contrastive(const T* xf, bool train, float grad_scale) {
    const ModelConfig& c = plan_.config;
    const int s = opt_.seq_len, dim = c.dim;
    const float inv_tau = 1.0f / opt_.loss.contrastive_temperature;
    for (int b = 0; b < opt_.micro_batch; ++b) {
      const T* hs = xf + int64_t{b} * s * dim;
      const T* ht = teacher_->xf() + int64_t{b} * s * dim;
      ops_.l2norm({zs_, ns_, hs, s, dim});
      ops_.l2norm({zt_, nt_, ht, s, dim});
      ops_.linear(sim_, zs_, zt_, s, s, dim, Accumulate::Overwrite, inv_tau);
      SoftmaxLossArgs<T> la{};
      la.logits = sim_;
      la.targets = arange_;
      la.ce = ctr_ + int64_t{b} * s;
      la.rows = s;
      la.vocab = s;
      la.ld = s;
      la.ce_weight = 1.0f;
      la.kl_weight = 0.0f;
      la.grad_scale = grad_scale * opt_.loss.contrastive_weight;
      la.grad = train ? LossGrad::Write : LossGrad::None;
      ops_.softmax_loss(la);
      if (!train) continue;
      ops_.linear_dgrad(dzs_, sim_, zt_, s, s, dim, Accumulate::Overwrite, inv_tau);
      ops_.l2norm_backward({dxf_ + int64_t{b} * s * dim, dzs_, zs_, ns_, hs, s, dim});
    }
  }

  Ops ops_;
  EngineOptions opt_;
  Plan plan_;
  Plan teacher_plan_;
  float *master_ = nullptr, *grad_ = nullptr, *m_ = nullptr, *v_ = nullptr;  // m_, v_: [hi_ - lo_]
  ShardLayout layout_;
  int64_t lo_ = 0, hi_ = 0;  // this engine's optimizer shard
  GradientReady ready_;
  bool accumulated_ = false;     // accumulate() ran in this step
  bool quantizer_done_ = false;  // the quantizer's backward ran in this step
  T* compute_ = nullptr;
  std::vector<Int4Weight> frozen_;
  std::unique_ptr<Transformer<Ops>> student_;
  std::unique_ptr<Transformer<Ops>> teacher_;
  int teacher_dim_ = 0;
  int block_rows_ = 1;
  int64_t step_tokens_ = 1;
  T* logits_ = nullptr;
  T* tlogits_ = nullptr;
  acc_t<T>* ce_ = nullptr;
  acc_t<T>* kl_ = nullptr;
  int32_t* targets_ = nullptr;
  T* dxf_ = nullptr;
  T *zs_ = nullptr, *zt_ = nullptr, *dzs_ = nullptr, *sim_ = nullptr;
  float *ns_ = nullptr, *nt_ = nullptr;
  acc_t<T>* ctr_ = nullptr;
  int32_t* arange_ = nullptr;
  bool phases_ = std::getenv("QKD_TRAIN_PHASES") != nullptr;
  std::chrono::steady_clock::time_point phase_t0_;
  std::map<std::string, double> phase_ms_;
};

bool cuda_present() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) cudaGetLastError();
  return err == cudaSuccess && n > 0;
}

}  // namespace

ShardLayout shard_layout(int64_t total, int count) {
  QKD_CHECK(count >= 1 && total >= 0, "shard_layout: {} floats over {} shards", total, count);
  ShardLayout s;
  s.total = total;
  s.count = count;
  s.chunk = ((total + count - 1) / count + 63) / 64 * 64;  // 256-byte pieces, like the plan's segments
  s.padded = s.chunk * count;
  return s;
}

std::unique_ptr<Engine> make_engine(const EngineOptions& opt, const Plan& plan, const HostInit& init,
                                    const ModelWeights* teacher) {
  if (opt.gpus > 1) {
    QKD_CHECK(opt.backend != runtime::BackendKind::Cpu, "--gpus {}: data parallelism runs on CUDA, not --backend cpu",
              opt.gpus);
    return make_data_parallel_engine(opt, plan, init, teacher);
  }
  runtime::BackendKind b = opt.backend;
  if (b == runtime::BackendKind::Auto) {
    b = cuda_present() ? runtime::BackendKind::Cuda : runtime::BackendKind::Cpu;
    if (b == runtime::BackendKind::Cpu) std::fprintf(stderr, "qkd-train: no CUDA device found; training on the CPU\n");
  }
  if (b == runtime::BackendKind::Cuda) return std::make_unique<EngineImpl<CudaOps>>(opt, plan, init, teacher);
  return std::make_unique<EngineImpl<CpuOps>>(opt, plan, init, teacher);
}

}  // namespace qkd::train
