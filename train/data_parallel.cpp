#include "train/data_parallel.h"

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#include "kernels/cuda_check.h"
#include "kernels/error.h"

#ifdef QKD_HAVE_NCCL
#include <nccl.h>
#endif

namespace qkd::train {

namespace {

// A piece of a gradient range owned by one rank's shard: summed over all ranks into that rank's buffer.
struct Piece {
  int64_t offset = 0, count = 0;
  int root = 0;
};

// One rank's end of the exchange. Every rank calls the same functions in the same order, each from its thread.
class RankLink {
 public:
  virtual ~RankLink() = default;
  // Sums every rank's grad over each piece into the piece's root (in place); the other ranks' copies of that
  // piece are left as they were. May run asynchronously (NCCL: after the work enqueued so far on the engine's
  // stream, on a stream of its own).
  virtual void reduce(float* grad, const std::vector<Piece>& pieces) = 0;
  // The engine's stream waits for every reduce() so far.
  virtual void wait_reduced() = 0;
  // buf holds count equal chunks; each rank's own chunk is copied into every other rank's buf (in place).
  virtual void all_gather(void* buf, size_t chunk_bytes) = 0;
  // The host waits for everything enqueued.
  virtual void sync() = 0;
  // Called once when any rank fails: a rank waiting on the others must not wait forever.
  virtual void abort() = 0;
};

// Shared memory between the threads of one process: a barrier, and a table where each rank posts its buffer.
class HostGroup {
 public:
  explicit HostGroup(int n) : n_(n), buffers_(static_cast<size_t>(n)) {}
  int size() const { return n_; }
  void post(int rank, void* p) { buffers_[static_cast<size_t>(rank)] = p; }
  template <typename U>
  U* buffer(int rank) const { return static_cast<U*>(buffers_[static_cast<size_t>(rank)]); }
  // Every rank arrives before any leaves (and what each posted or wrote before is visible after).
  void barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    if (aborted_) fail("data parallel: another rank failed");
    const uint64_t gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
    if (aborted_) fail("data parallel: another rank failed");
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  int n_;
  std::vector<void*> buffers_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
};

class HostLink final : public RankLink {
 public:
  HostLink(HostGroup& g, int rank) : g_(g), rank_(rank) {}
  void reduce(float* grad, const std::vector<Piece>& pieces) override {
    g_.post(rank_, grad);
    g_.barrier();
    // Roots own disjoint pieces and write only their own buffer, so no element is written while another rank
    // reads it. The sum runs in rank order: the same bits on every run.
    for (const Piece& p : pieces) {
      if (p.root != rank_) continue;
      float* dst = grad + p.offset;
      for (int64_t i = 0; i < p.count; ++i) {
        float acc = g_.buffer<float>(0)[p.offset + i];
        for (int r = 1; r < g_.size(); ++r) acc += g_.buffer<float>(r)[p.offset + i];
        dst[i] = acc;
      }
    }
    g_.barrier();  // no rank goes on to change its gradient before every root has read it
  }
  void wait_reduced() override {}
  void all_gather(void* buf, size_t chunk_bytes) override {
    g_.post(rank_, buf);
    g_.barrier();
    const size_t own = static_cast<size_t>(rank_) * chunk_bytes;
    for (int r = 0; r < g_.size(); ++r)
      if (r != rank_) std::memcpy(g_.buffer<char>(r) + own, static_cast<const char*>(buf) + own, chunk_bytes);
    g_.barrier();
  }
  void sync() override {}
  void abort() override { g_.abort(); }

 private:
  HostGroup& g_;
  int rank_;
};

#ifdef QKD_HAVE_NCCL

#define NCCL_CHECK(expr)                                                                                            \
  do {                                                                                                              \
    const ncclResult_t r_ = (expr);                                                                                 \
    if (r_ != ncclSuccess) ::qkd::fail("{} failed at {}:{}: {}", #expr, __FILE__, __LINE__, ncclGetErrorString(r_)); \
  } while (0)

class NcclLink final : public RankLink {
 public:
  NcclLink(ncclComm_t comm, cudaStream_t compute) : comm_(comm), compute_(compute) {
    // The reductions get their own stream so they run while the backward pass goes on to the earlier layers.
    CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&reduced_, cudaEventDisableTiming));
  }
  ~NcclLink() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    cudaEventDestroy(reduced_);
    cudaEventDestroy(ready_);
    cudaStreamDestroy(comm_stream_);
  }
  void reduce(float* grad, const std::vector<Piece>& pieces) override {
    CUDA_CHECK(cudaEventRecord(ready_, compute_));  // the range's last gradient kernels are enqueued before this
    CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready_));
    NCCL_CHECK(ncclGroupStart());
    for (const Piece& p : pieces)
      NCCL_CHECK(ncclReduce(grad + p.offset, grad + p.offset, static_cast<size_t>(p.count), ncclFloat, ncclSum,
                            p.root, comm_, comm_stream_));
    NCCL_CHECK(ncclGroupEnd());
  }
  void wait_reduced() override {
    CUDA_CHECK(cudaEventRecord(reduced_, comm_stream_));
    CUDA_CHECK(cudaStreamWaitEvent(compute_, reduced_));
  }
  void all_gather(void* buf, size_t chunk_bytes) override {
    int rank = 0;
    NCCL_CHECK(ncclCommUserRank(comm_, &rank));
    char* b = static_cast<char*>(buf);
    NCCL_CHECK(ncclAllGather(b + static_cast<size_t>(rank) * chunk_bytes, b, chunk_bytes, ncclChar, comm_, compute_));
  }
  void sync() override { CUDA_CHECK(cudaStreamSynchronize(compute_)); }
  // Makes the other ranks' pending NCCL kernels return instead of waiting for this one.
  void abort() override {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

 private:
  ncclComm_t comm_;
  cudaStream_t compute_;
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, reduced_ = nullptr;
};

#endif

class DataParallelEngine final : public Engine {
 public:
  DataParallelEngine(const EngineOptions& opt, const Plan& plan, const HostInit& init, const ModelWeights* teacher,
                     Transport transport)
      : n_(opt.gpus), transport_(transport), window_len_(opt.seq_len + 1), layout_(shard_layout(plan.total, opt.gpus)) {
    QKD_CHECK(n_ >= 1, "--gpus {}: needs at least 1", n_);
    engines_.resize(static_cast<size_t>(n_));
    links_.resize(static_cast<size_t>(n_));
    EngineOptions one = opt;
    one.gpus = 1;
    one.shard_count = n_;
    if (transport_ == Transport::Host) {
      QKD_CHECK(opt.backend != runtime::BackendKind::Cuda, "data parallelism through host memory runs CPU engines");
      one.backend = runtime::BackendKind::Cpu;
      group_ = std::make_unique<HostGroup>(n_);
      for (int r = 0; r < n_; ++r) links_[static_cast<size_t>(r)] = std::make_unique<HostLink>(*group_, r);
      parallel([&](int r) {
        EngineOptions mine = one;
        mine.shard_rank = r;
        engines_[static_cast<size_t>(r)] = make_engine(mine, plan, init, teacher);
      });
    } else {
#ifdef QKD_HAVE_NCCL
      int devices = 0;
      CUDA_CHECK(cudaGetDeviceCount(&devices));
      QKD_CHECK(n_ <= devices, "--gpus {}: only {} CUDA devices are present", n_, devices);
      setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast stays off (the GPU machines' rule)
      one.backend = runtime::BackendKind::Cuda;
      parallel([&](int r) {
        EngineOptions mine = one;
        mine.shard_rank = r;
        engines_[static_cast<size_t>(r)] = make_engine(mine, plan, init, teacher);
      });
      std::vector<ncclComm_t> comms(static_cast<size_t>(n_));
      std::vector<int> devs(static_cast<size_t>(n_));
      for (int r = 0; r < n_; ++r) devs[static_cast<size_t>(r)] = r;
      NCCL_CHECK(ncclCommInitAll(comms.data(), n_, devs.data()));
      parallel([&](int r) {
        links_[static_cast<size_t>(r)] =
            std::make_unique<NcclLink>(comms[static_cast<size_t>(r)], engines_[static_cast<size_t>(r)]->cuda_stream());
      });
#else
      fail("--gpus {}: this build of qkd has no NCCL (CMake did not find nccl.h and libnccl; set NCCL_ROOT and "
           "rebuild), so it trains on one GPU only",
           n_);
#endif
    }
    for (int r = 0; r < n_; ++r)
      engines_[static_cast<size_t>(r)]->set_gradient_ready(
          [this, r](int64_t lo, int64_t hi) { reduce_range(r, lo, hi); });
  }

  ~DataParallelEngine() override {
    // The links (NCCL communicators, streams) go before the engines whose streams they use.
    links_.clear();
  }

  const Plan& plan() const override { return engines_[0]->plan(); }
  const char* backend_name() const override {
    return transport_ == Transport::Nccl ? "cuda (data parallel, NCCL)" : "cpu (data parallel, host)";
  }
  bool has_teacher() const override { return engines_[0]->has_teacher(); }

  void begin_step(int64_t step_tokens) override {
    parallel([&](int r) { engines_[static_cast<size_t>(r)]->begin_step(step_tokens); });
  }

  LossSums accumulate(const int32_t* windows, int n_seqs) override {
    QKD_CHECK(n_seqs > 0 && n_seqs % n_ == 0, "{} sequences do not split evenly over {} ranks", n_seqs, n_);
    // A rank that failed on a bad token would leave the others waiting in the exchange: check every token first,
    // as the engines would (inputs in [0, vocab); a target may also be negative, which the losses skip).
    const int vocab = plan().config.vocab_size;
    const int64_t count = static_cast<int64_t>(n_seqs) * window_len_;
    for (int64_t i = 0; i < count; ++i) {
      const bool input = i % window_len_ != window_len_ - 1, target = i % window_len_ != 0;
      QKD_CHECK(windows[i] < vocab && (windows[i] >= 0 || (target && !input)),
                "token {} at index {} is outside the vocabulary [0, {})", windows[i], i, vocab);
    }
    const int per = n_seqs / n_;
    std::vector<LossSums> part(static_cast<size_t>(n_));
    parallel([&](int r) {
      part[static_cast<size_t>(r)] =
          engines_[static_cast<size_t>(r)]->accumulate(windows + static_cast<int64_t>(r) * per * window_len_, per);
    }, Exchange::Yes);
    LossSums s;
    for (const LossSums& p : part) {  // rank order: the same sum on every run
      s.ce += p.ce;
      s.kl += p.kl;
      s.contrastive += p.contrastive;
      s.rows += p.rows;
    }
    return s;
  }

  void quantizer_backward() override {
    parallel([&](int r) {
      engines_[static_cast<size_t>(r)]->quantizer_backward();  // nothing left: it ran during the backward pass
      links_[static_cast<size_t>(r)]->wait_reduced();
    }, Exchange::Yes);
  }
  // Each rank's shard holds the reduced gradient of its range; their squares add up in rank order.
  double shard_sum_squares() override {
    std::vector<double> part(static_cast<size_t>(n_));
    parallel([&](int r) { part[static_cast<size_t>(r)] = engines_[static_cast<size_t>(r)]->shard_sum_squares(); });
    double s = 0.0;
    for (double p : part) s += p;
    return s;
  }

  void apply(const AdamWStep& s) override {
    parallel([&](int r) {
      Engine& e = *engines_[static_cast<size_t>(r)];
      RankLink& link = *links_[static_cast<size_t>(r)];
      e.apply(s);
      const Flat f = e.flat();
      const auto chunk = static_cast<size_t>(layout_.chunk);
      link.all_gather(f.master, chunk * sizeof(float));
      if (f.compute != static_cast<void*>(f.master)) link.all_gather(f.compute, chunk * f.compute_bytes);
      link.sync();
    }, Exchange::Yes);
  }

  LossSums evaluate(const int32_t* windows, int n_seqs) override {
    LossSums s;
    on_rank0([&] { s = engines_[0]->evaluate(windows, n_seqs); });
    return s;
  }

  void get_master(std::vector<float>& master) override {
    on_rank0([&] { engines_[0]->get_master(master); });
  }
  // The whole moments, gathered from the shards.
  void get_moments(std::vector<float>& m, std::vector<float>& v) override {
    m.assign(static_cast<size_t>(layout_.total), 0.0f);
    v.assign(static_cast<size_t>(layout_.total), 0.0f);
    parallel([&](int r) {
      std::vector<float> mr, vr;
      engines_[static_cast<size_t>(r)]->get_moments(mr, vr);
      std::copy(mr.begin(), mr.end(), m.begin() + layout_.lo(r));
      std::copy(vr.begin(), vr.end(), v.begin() + layout_.lo(r));
    });
  }
  void set_state(const std::vector<float>& master, const std::vector<float>& m, const std::vector<float>& v) override {
    const auto total = static_cast<size_t>(layout_.total);
    QKD_CHECK(master.size() == total && m.size() == total && v.size() == total,
              "optimizer state holds {} / {} / {} values (master / m / v), the student has {}", master.size(),
              m.size(), v.size(), total);
    parallel([&](int r) {
      const auto lo = static_cast<size_t>(layout_.lo(r)), hi = static_cast<size_t>(layout_.hi(r));
      const std::vector<float> mr(m.begin() + lo, m.begin() + hi), vr(v.begin() + lo, v.begin() + hi);
      engines_[static_cast<size_t>(r)]->set_state(master, mr, vr);
    });
  }
  std::vector<Int4HostWeight> frozen_weights() override {
    std::vector<Int4HostWeight> out;
    on_rank0([&] { out = engines_[0]->frozen_weights(); });
    return out;
  }
  // The reduced gradient: each rank's own shard of it.
  std::vector<float> gradients() override {
    std::vector<float> out(static_cast<size_t>(layout_.total));
    for (int r = 0; r < n_; ++r) {
      std::vector<float> g;
      run_on(r, [&] { g = engines_[static_cast<size_t>(r)]->gradients(); });
      std::copy(g.begin() + layout_.lo(r), g.begin() + layout_.hi(r), out.begin() + layout_.lo(r));
    }
    return out;
  }
  Probe probe(const int32_t* windows) override {
    Probe p;
    on_rank0([&] { p = engines_[0]->probe(windows); });
    return p;
  }

  void set_gradient_ready(GradientReady) override { fail("a data-parallel engine cannot be nested in another"); }
  Flat flat() override { return {}; }
  // As a whole it holds the whole optimizer state (get_moments, set_state).
  ShardLayout shard() const override { return shard_layout(layout_.total, 1); }

 private:
  // Called by rank r's engine during its last backward pass: [lo, hi) of its gradient is final.
  void reduce_range(int r, int64_t lo, int64_t hi) {
    std::vector<Piece> pieces;
    for (int q = 0; q < n_; ++q) {
      const int64_t b = std::max(lo, layout_.lo(q)), e = std::min(hi, layout_.hi(q));
      if (b < e) pieces.push_back({b, e - b, q});
    }
    if (!pieces.empty()) links_[static_cast<size_t>(r)]->reduce(engines_[static_cast<size_t>(r)]->flat().grad, pieces);
  }

  // Runs f(rank) on one thread per rank (CUDA: with its GPU current) and rethrows the first failure. When f
  // exchanges data, a failure aborts the exchange, so that the other ranks return instead of waiting for the one
  // that failed (the engine is then unusable, as training stops on any error).
  enum class Exchange : uint8_t { No, Yes };
  void parallel(const std::function<void(int)>& f, Exchange exchange = Exchange::No) {
    std::vector<std::thread> threads;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(n_));
    std::once_flag aborted;
    for (int r = 0; r < n_; ++r) {
      threads.emplace_back([&, r] {
        try {
          if (transport_ == Transport::Nccl) CUDA_CHECK(cudaSetDevice(r));
          f(r);
        } catch (...) {
          errors[static_cast<size_t>(r)] = std::current_exception();
          if (exchange == Exchange::Yes) std::call_once(aborted, [&] {
            for (auto& l : links_)
              if (l) l->abort();
          });
        }
      });
    }
    for (auto& t : threads) t.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }
  void run_on(int r, const std::function<void()>& f) {
    parallel([&](int q) {
      if (q == r) f();
    });
  }
  void on_rank0(const std::function<void()>& f) { run_on(0, f); }

  int n_;
  Transport transport_;
  int64_t window_len_;
  ShardLayout layout_;
  std::vector<std::unique_ptr<Engine>> engines_;
  std::unique_ptr<HostGroup> group_;
  std::vector<std::unique_ptr<RankLink>> links_;
};

}  // namespace

bool nccl_built() {
#ifdef QKD_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Engine> make_data_parallel_engine(const EngineOptions& opt, const Plan& plan, const HostInit& init,
                                                  const ModelWeights* teacher, Transport transport) {
  return std::make_unique<DataParallelEngine>(opt, plan, init, teacher, transport);
}

}  // namespace qkd::train
