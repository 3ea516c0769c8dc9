#include "train/data_parallel.h"

#include <cstdlib>
#include <functional>
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

#ifndef QKD_HAVE_NCCL

std::unique_ptr<Engine> make_data_parallel_engine(const EngineOptions& opt, const Plan&, const HostInit&,
                                                  const ModelWeights*) {
  fail("--gpus {}: this build of qkd has no NCCL (CMake did not find nccl.h and libnccl; set NCCL_ROOT and "
       "rebuild), so it trains on one GPU only",
       opt.gpus);
}

#else

namespace {

#define NCCL_CHECK(expr)                                                                              \
  do {                                                                                                \
    const ncclResult_t r_ = (expr);                                                                   \
    if (r_ != ncclSuccess) ::qkd::fail("{} failed at {}:{}: {}", #expr, __FILE__, __LINE__, ncclGetErrorString(r_)); \
  } while (0)

class DataParallelEngine final : public Engine {
 public:
  DataParallelEngine(const EngineOptions& opt, const Plan& plan, const HostInit& init, const ModelWeights* teacher)
      : n_(opt.gpus) {
    int devices = 0;
    CUDA_CHECK(cudaGetDeviceCount(&devices));
    QKD_CHECK(n_ <= devices, "--gpus {}: only {} CUDA devices are present", n_, devices);
    setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast stays off (the GPU machines' rule)
    engines_.resize(static_cast<size_t>(n_));
    EngineOptions one = opt;
    one.gpus = 1;
    one.backend = runtime::BackendKind::Cuda;
    parallel([&](int r) { engines_[static_cast<size_t>(r)] = make_engine(one, plan, init, teacher); });
    comms_.resize(static_cast<size_t>(n_));
    std::vector<int> devs(static_cast<size_t>(n_));
    for (int r = 0; r < n_; ++r) devs[static_cast<size_t>(r)] = r;
    NCCL_CHECK(ncclCommInitAll(comms_.data(), n_, devs.data()));
  }
  ~DataParallelEngine() override {
    for (ncclComm_t c : comms_)
      if (c != nullptr) ncclCommDestroy(c);
  }

  const Plan& plan() const override { return engines_[0]->plan(); }
  const char* backend_name() const override { return name_.c_str(); }
  bool has_teacher() const override { return engines_[0]->has_teacher(); }

  void begin_step(int64_t step_tokens) override {
    parallel([&](int r) { engines_[static_cast<size_t>(r)]->begin_step(step_tokens); });
  }

  LossSums accumulate(const int32_t* windows, int n_seqs) override {
    QKD_CHECK(n_seqs % n_ == 0, "{} sequences do not split evenly over {} GPUs", n_seqs, n_);
    const int per = n_seqs / n_;
    std::vector<LossSums> part(static_cast<size_t>(n_));
    const int64_t wlen = window_len_;
    parallel([&](int r) {
      part[static_cast<size_t>(r)] =
          engines_[static_cast<size_t>(r)]->accumulate(windows + static_cast<int64_t>(r) * per * wlen, per);
    });
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
    parallel([&](int r) { engines_[static_cast<size_t>(r)]->quantizer_backward(); });
    // One all-reduce of each replica's whole gradient buffer, issued for all GPUs in one group from this thread.
    const size_t count = static_cast<size_t>(plan().total);
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < n_; ++r) {
      Engine& e = *engines_[static_cast<size_t>(r)];
      NCCL_CHECK(ncclAllReduce(e.device_gradients(), e.device_gradients(), count, ncclFloat, ncclSum,
                               comms_[static_cast<size_t>(r)], e.cuda_stream()));
    }
    NCCL_CHECK(ncclGroupEnd());
    parallel([&](int r) { CUDA_CHECK(cudaStreamSynchronize(engines_[static_cast<size_t>(r)]->cuda_stream())); });
  }
  // After the all-reduce every replica holds the same gradient.
  double gradient_norm() override {
    double g = 0.0;
    parallel([&](int r) {
      if (r == 0) g = engines_[0]->gradient_norm();
    });
    return g;
  }

  void apply(const AdamWStep& s) override {
    parallel([&](int r) { engines_[static_cast<size_t>(r)]->apply(s); });
  }

  LossSums evaluate(const int32_t* windows, int n_seqs) override {
    LossSums s;
    parallel([&](int r) {
      if (r == 0) s = engines_[0]->evaluate(windows, n_seqs);
    });
    return s;
  }

  void get_state(std::vector<float>& master, std::vector<float>& m, std::vector<float>& v) override {
    parallel([&](int r) {
      if (r == 0) engines_[0]->get_state(master, m, v);
    });
  }
  void set_state(const std::vector<float>& master, const std::vector<float>& m, const std::vector<float>& v) override {
    parallel([&](int r) { engines_[static_cast<size_t>(r)]->set_state(master, m, v); });
  }
  std::vector<Int4HostWeight> frozen_weights() override {
    std::vector<Int4HostWeight> out;
    parallel([&](int r) {
      if (r == 0) out = engines_[0]->frozen_weights();
    });
    return out;
  }
  std::vector<float> gradients() override {
    std::vector<float> out;
    parallel([&](int r) {
      if (r == 0) out = engines_[0]->gradients();
    });
    return out;
  }
  Probe probe(const int32_t* windows) override {
    Probe p;
    parallel([&](int r) {
      if (r == 0) p = engines_[0]->probe(windows);
    });
    return p;
  }

  void set_window_len(int64_t w) { window_len_ = w; }

 private:
  // Runs f(rank) on one thread per GPU, each with its GPU current; rethrows the first error.
  void parallel(const std::function<void(int)>& f) {
    std::vector<std::thread> threads;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(n_));
    for (int r = 0; r < n_; ++r) {
      threads.emplace_back([&, r] {
        try {
          CUDA_CHECK(cudaSetDevice(r));
          f(r);
        } catch (...) {
          errors[static_cast<size_t>(r)] = std::current_exception();
        }
      });
    }
    for (auto& t : threads) t.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }

  int n_;
  int64_t window_len_ = 0;
  std::string name_ = "cuda (data parallel)";
  std::vector<std::unique_ptr<Engine>> engines_;
  std::vector<ncclComm_t> comms_;
};

}  // namespace

std::unique_ptr<Engine> make_data_parallel_engine(const EngineOptions& opt, const Plan& plan, const HostInit& init,
                                                  const ModelWeights* teacher) {
  auto e = std::make_unique<DataParallelEngine>(opt, plan, init, teacher);
  e->set_window_len(opt.seq_len + 1);
  return e;
}

#endif

}  // namespace qkd::train
