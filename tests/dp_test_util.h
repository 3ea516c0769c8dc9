// Shared by the data-parallel tests (test_data_parallel on CPU engines, test_gpu_data_parallel through NCCL):
// the tiny fixture LLaMA as an int4 g32 QAT student (LSQ scales, clip factors, o/v frozen) with its fixture
// teacher, random token windows, and one optimizer step as qkd-train runs it.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "loader/hf_checkpoint.h"
#include "test_util.h"
#include "train/engine.h"
#include "train/plan.h"

namespace qkd::test {

constexpr int kDpSeq = 12;  // tokens a window (plus one target)

struct DpSetup {
  ModelWeights student, teacher;
  train::Plan plan;
  train::HostInit init;
  train::EngineOptions eo;  // micro-batch 1, KL at temperature 2 plus 0.5 CE
};

inline DpSetup make_dp_setup(runtime::BackendKind backend) {
  const std::string dir = fixtures_dir() + "/train/tiny-train";
  DpSetup s{load_hf_checkpoint(dir + "/student"), load_hf_checkpoint(dir + "/teacher"), {}, {}, {}};
  train::QuantSpec q;
  q.bits = 4;
  q.group_size = 32;
  q.clip = true;
  s.plan = train::make_plan(s.student.config, q);
  s.init = train::init_parameters(s.plan, s.student, nullptr);
  s.eo.backend = backend;
  s.eo.micro_batch = 1;
  s.eo.seq_len = kDpSeq;
  s.eo.loss.kd_weight = 1.0f;
  s.eo.loss.ce_weight = 0.5f;
  s.eo.loss.temperature = 2.0f;
  return s;
}

inline std::vector<int32_t> random_windows(int n_seqs, uint32_t seed, int vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::vector<int32_t> w(static_cast<size_t>(n_seqs) * (kDpSeq + 1));
  for (auto& t : w) t = tok(rng);
  return w;
}

struct StepResult {
  double loss = 0.0, grad_norm = 0.0;
};

// One optimizer step as qkd-train runs it (train/trainer.cpp): clipping at 1.0, AdamW with weight decay.
enum class Clip : uint8_t { No, Yes };
inline StepResult train_step(train::Engine& e, const std::vector<int32_t>& windows, int n_seqs, int64_t adam_step,
                             Clip clip = Clip::Yes) {
  e.begin_step(int64_t{n_seqs} * kDpSeq);
  const train::LossSums s = e.accumulate(windows.data(), n_seqs);
  StepResult r;
  r.grad_norm = e.finish_gradients();
  r.loss = (0.5 * s.ce + s.kl) / static_cast<double>(s.rows);
  train::AdamWStep a;
  a.lr = 3e-3f;
  a.scale_lr = 1e-3f;
  a.weight_decay = 0.1f;
  a.grad_scale = clip == Clip::Yes && r.grad_norm > 1.0 ? static_cast<float>(1.0 / r.grad_norm) : 1.0f;
  a.step = adam_step;
  e.apply(a);
  return r;
}

// The master weights and both moments of two engines are the same bits.
inline void check_same_state(train::Engine& a, train::Engine& b) {
  std::vector<float> ma, ra, va, mb, rb, vb;
  a.get_state(ma, ra, va);
  b.get_state(mb, rb, vb);
  CHECK(ma == mb);
  CHECK(ra == rb);
  CHECK(va == vb);
}

}  // namespace qkd::test
