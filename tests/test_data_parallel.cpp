// Data parallelism with ZeRO-1 (train/data_parallel.h) on CPU engines that exchange through host memory: the
// same bucketing, sharding and optimizer code the NCCL path runs, here checked without GPUs against a lone engine.
// The student is the tiny fixture LLaMA as an int4 g32 QAT student (LSQ scales, clip factors, o/v frozen), the
// teacher its fixture teacher: every kind of segment and the per-layer quantizer backward take part.
#include <cmath>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "dp_test_util.h"
#include "kernels/error.h"
#include "train/data_parallel.h"

namespace {

using namespace qkd;
using namespace qkd::train;
using namespace qkd::test;

double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace

TEST_CASE("shard_layout: equal chunks of whole 64-float pieces cover the buffer once") {
  for (int64_t total : {int64_t{1}, int64_t{64}, int64_t{1000}, int64_t{123457}}) {
    for (int count : {1, 2, 3, 8}) {
      const ShardLayout s = shard_layout(total, count);
      INFO("total ", total, " count ", count);
      CHECK(s.chunk % 64 == 0);
      CHECK(s.padded == s.chunk * count);
      CHECK(s.padded >= total);
      CHECK(s.padded - total < int64_t{64} * count + s.chunk);
      CHECK(s.lo(0) == 0);
      CHECK(s.hi(count - 1) == total);
      for (int r = 0; r + 1 < count; ++r) CHECK(s.hi(r) == s.lo(r + 1));
    }
  }
  CHECK_THROWS_AS(shard_layout(10, 0), qkd::Error);
}

TEST_CASE("a sharded engine updates and keeps moments for its own shard only (ZeRO-1)") {
  DpSetup s = make_dp_setup(runtime::BackendKind::Cpu);
  const std::vector<int32_t> win = random_windows(2, 1, s.student.config.vocab_size);
  auto whole = make_engine(s.eo, s.plan, s.init, &s.teacher);
  EngineOptions half = s.eo;
  half.shard_rank = 1;
  half.shard_count = 2;
  auto second = make_engine(half, s.plan, s.init, &s.teacher);
  const ShardLayout lay = second->shard();
  const int64_t lo = lay.lo(1), hi = lay.hi(1);
  REQUIRE(lo > 0);
  REQUIRE(hi == s.plan.total);
  // no clipping: a shard alone knows only its own part of the gradient norm
  train_step(*whole, win, 2, 1, Clip::No);
  train_step(*second, win, 2, 1, Clip::No);
  std::vector<float> mw, m1, v1, mw_m, mw_v;
  whole->get_state(mw, mw_m, mw_v);
  std::vector<float> master1;
  second->get_state(master1, m1, v1);
  REQUIRE(static_cast<int64_t>(m1.size()) == hi - lo);  // the moments of the shard alone
  REQUIRE(static_cast<int64_t>(v1.size()) == hi - lo);
  int64_t same_outside = 0, moved_outside = 0, equal_inside = 0;
  for (int64_t i = 0; i < s.plan.total; ++i) {
    const auto u = static_cast<size_t>(i);
    if (i < lo) {
      (master1[u] == s.init.master[u] ? same_outside : moved_outside) += 1;
    } else {
      equal_inside += master1[u] == mw[u] && m1[u - lo] == mw_m[u] && v1[u - lo] == mw_v[u];
    }
  }
  CHECK(moved_outside == 0);  // rank 0's part is rank 0's to update
  CHECK(same_outside == lo);
  CHECK(equal_inside == hi - lo);  // AdamW is elementwise: the shard's values are the lone engine's bits
  // state of the wrong size for the shard
  CHECK_THROWS_WITH_AS(second->set_state(mw, mw_m, mw_v), doctest::Contains("m / v"), qkd::Error);
  EngineOptions bad = s.eo;
  bad.shard_rank = 2;
  bad.shard_count = 2;
  CHECK_THROWS_WITH_AS(make_engine(bad, s.plan, s.init, &s.teacher), doctest::Contains("shard 2 of 2"), qkd::Error);
}

TEST_CASE("the gradient-ready callback hands on each range once, already final, layers last to first") {
  DpSetup s = make_dp_setup(runtime::BackendKind::Cpu);
  s.eo.micro_batch = 2;
  const std::vector<int32_t> win = random_windows(4, 7, s.student.config.vocab_size);
  auto e = make_engine(s.eo, s.plan, s.init, &s.teacher);
  struct Seen {
    int64_t lo, hi;
    std::vector<float> values;  // the range's gradient when the callback ran
  };
  std::vector<Seen> seen;
  e->set_gradient_ready([&](int64_t lo, int64_t hi) {
    const float* g = e->flat().grad;  // the CPU engine's buffers are host memory
    seen.push_back({lo, hi, std::vector<float>(g + lo, g + hi)});
  });
  e->begin_step(4 * kDpSeq);
  e->accumulate(win.data(), 4);
  const double norm = e->finish_gradients();  // the quantizer's backward already ran: nothing changes
  const std::vector<float> g = e->gradients();
  const int n_layers = s.student.config.n_layers;
  REQUIRE(seen.size() == static_cast<size_t>(n_layers) + 2);  // one a layer (only the last micro-batch), then 2
  for (int i = 0; i < n_layers; ++i) {  // reverse layer order: the backward pass's
    const int l = n_layers - 1 - i;
    CHECK(seen[static_cast<size_t>(i)].lo ==
          s.plan.segments[static_cast<size_t>(s.plan.layers[static_cast<size_t>(l)].attn_norm)].offset);
  }
  std::vector<int> covered(static_cast<size_t>(s.plan.total), 0);
  for (const Seen& r : seen) {
    REQUIRE(r.lo < r.hi);
    for (int64_t i = r.lo; i < r.hi; ++i) {
      ++covered[static_cast<size_t>(i)];
      if (r.values[static_cast<size_t>(i - r.lo)] != g[static_cast<size_t>(i)]) FAIL("gradient ", i, " changed after its range was handed on");
    }
  }
  for (int64_t i = 0; i < s.plan.total; ++i)
    if (covered[static_cast<size_t>(i)] != 1) FAIL("flat index ", i, " handed on ", covered[static_cast<size_t>(i)], " times");
  // The same step without the callback gives the same gradient and norm.
  auto plain = make_engine(s.eo, s.plan, s.init, &s.teacher);
  plain->begin_step(4 * kDpSeq);
  plain->accumulate(win.data(), 4);
  CHECK(plain->finish_gradients() == norm);
  CHECK(plain->gradients() == g);
  // With a callback a step is one accumulate() call
  e->begin_step(4 * kDpSeq);
  e->accumulate(win.data(), 2);
  CHECK_THROWS_WITH_AS(e->accumulate(win.data() + 2 * (kDpSeq + 1), 2), doctest::Contains("exactly one accumulate"),
                       qkd::Error);
}

TEST_CASE("one rank through the exchange is the lone engine, bit for bit") {
  // The per-layer quantizer backward during the last backward pass, the reductions and the all-gathers with one
  // rank change no arithmetic: everything must match to the last bit.
  DpSetup s = make_dp_setup(runtime::BackendKind::Cpu);
  s.eo.micro_batch = 2;
  EngineOptions one = s.eo;
  one.gpus = 1;
  auto lone = make_engine(s.eo, s.plan, s.init, &s.teacher);
  auto dp = make_data_parallel_engine(one, s.plan, s.init, &s.teacher, Transport::Host);
  for (int64_t k = 1; k <= 3; ++k) {
    const std::vector<int32_t> win = random_windows(4, 100 + static_cast<uint32_t>(k), s.student.config.vocab_size);
    const StepResult a = train_step(*lone, win, 4, k), b = train_step(*dp, win, 4, k);
    CHECK(a.loss == b.loss);
    CHECK(a.grad_norm == b.grad_norm);
  }
  check_same_state(*lone, *dp);
}

TEST_CASE("2 and 3 ranks follow the lone engine's trajectory within fp32 rounding") {
  DpSetup s = make_dp_setup(runtime::BackendKind::Cpu);
  const int n_seqs = 6;
  std::vector<std::vector<int32_t>> batches;
  for (uint32_t k = 0; k < 5; ++k) batches.push_back(random_windows(n_seqs, 200 + k, s.student.config.vocab_size));
  auto lone = make_engine(s.eo, s.plan, s.init, &s.teacher);
  std::vector<StepResult> want;
  for (size_t k = 0; k < batches.size(); ++k) want.push_back(train_step(*lone, batches[k], n_seqs, int64_t(k) + 1));
  std::vector<float> want_master, want_m, want_v;
  lone->get_state(want_master, want_m, want_v);

  for (int ranks : {2, 3}) {
    EngineOptions eo = s.eo;
    eo.gpus = ranks;
    auto dp = make_data_parallel_engine(eo, s.plan, s.init, &s.teacher, Transport::Host);
    // The first step's gradient, before any update: the reduced shards against the lone engine's sum.
    dp->begin_step(int64_t{n_seqs} * kDpSeq);
    dp->accumulate(batches[0].data(), n_seqs);
    const double g0 = dp->finish_gradients();
    auto ref = make_engine(s.eo, s.plan, s.init, &s.teacher);
    ref->begin_step(int64_t{n_seqs} * kDpSeq);
    ref->accumulate(batches[0].data(), n_seqs);
    const double g0_want = ref->finish_gradients();
    // The ranks sum their micro-batches' gradients in another association ((g0 + g1) + (g2 + g3) against
    // ((g0 + g1) + g2) + g3) and the quantizer's backward runs before the sum instead of after it: fp32 roundings
    // of a few ulps, nothing more.
    const double gerr = rel_l2(dp->gradients(), ref->gradients());
    INFO(ranks, " ranks: gradient relative error ", gerr, ", norm ", g0, " against ", g0_want);
    CHECK(gerr < 1e-6);
    CHECK(std::abs(g0 - g0_want) <= 1e-6 * g0_want);

    dp = make_data_parallel_engine(eo, s.plan, s.init, &s.teacher, Transport::Host);
    double worst = 0.0;
    for (size_t k = 0; k < batches.size(); ++k) {
      const StepResult got = train_step(*dp, batches[k], n_seqs, int64_t(k) + 1);
      const double rel = std::abs(got.loss - want[k].loss) / want[k].loss;
      worst = std::max(worst, rel);
      INFO(ranks, " ranks, step ", k + 1, ": loss ", got.loss, " against ", want[k].loss);
      CHECK(rel < 1e-6);
    }
    std::vector<float> master, m, v;
    dp->get_state(master, m, v);
    const double em = rel_l2(master, want_master), emm = rel_l2(m, want_m), ev = rel_l2(v, want_v);
    MESSAGE(fmt::format("{} ranks, 5 steps: worst loss difference {:.2e}, master {:.2e}, m {:.2e}, v {:.2e}", ranks,
                        worst, em, emm, ev));
    // Adam divides by sqrt(v): a moment near zero turns a rounding-level gradient difference into a larger step
    // difference, so the moments and weights are compared as whole vectors, at 1e-5 (5 steps of fp32 roundings).
    CHECK(em < 1e-5);
    CHECK(emm < 1e-5);
    CHECK(ev < 1e-5);
  }
}

TEST_CASE("the state of a 2-rank run resumes it exactly, and bad input is refused before any rank runs") {
  DpSetup s = make_dp_setup(runtime::BackendKind::Cpu);
  EngineOptions eo = s.eo;
  eo.gpus = 2;
  const int vocab = s.student.config.vocab_size;
  std::vector<std::vector<int32_t>> batches;
  for (uint32_t k = 0; k < 3; ++k) batches.push_back(random_windows(4, 300 + k, vocab));
  auto a = make_data_parallel_engine(eo, s.plan, s.init, &s.teacher, Transport::Host);
  std::vector<StepResult> full;
  for (size_t k = 0; k < 3; ++k) full.push_back(train_step(*a, batches[k], 4, int64_t(k) + 1));

  auto b = make_data_parallel_engine(eo, s.plan, s.init, &s.teacher, Transport::Host);
  train_step(*b, batches[0], 4, 1);
  std::vector<float> master, m, v;
  b->get_state(master, m, v);
  REQUIRE(static_cast<int64_t>(m.size()) == s.plan.total);  // gathered from both shards
  auto c = make_data_parallel_engine(eo, s.plan, s.init, &s.teacher, Transport::Host);
  c->set_state(master, m, v);
  for (size_t k = 1; k < 3; ++k) {
    const StepResult r = train_step(*c, batches[k], 4, int64_t(k) + 1);
    CHECK(r.loss == full[k].loss);
    CHECK(r.grad_norm == full[k].grad_norm);
  }

  // An odd batch does not split over 2 ranks; a token outside the vocabulary is caught before the ranks start,
  // so the engine stays usable.
  c->begin_step(3 * kDpSeq);
  CHECK_THROWS_WITH_AS(c->accumulate(batches[0].data(), 3), doctest::Contains("do not split evenly over 2 ranks"),
                       qkd::Error);
  std::vector<int32_t> bad = batches[0];
  bad[17] = vocab + 5;
  c->begin_step(4 * kDpSeq);
  const std::string bad_token = fmt::format("token {}", vocab + 5);
  CHECK_THROWS_WITH_AS(c->accumulate(bad.data(), 4), doctest::Contains(bad_token.c_str()), qkd::Error);
  const StepResult after = train_step(*c, batches[0], 4, 4);
  CHECK(std::isfinite(after.loss));
  std::vector<float> short_m(m.begin(), m.end() - 1);
  CHECK_THROWS_WITH_AS(c->set_state(master, short_m, v), doctest::Contains("optimizer state"), qkd::Error);
  // CUDA engines cannot exchange through host memory
  eo.backend = runtime::BackendKind::Cuda;
  CHECK_THROWS_WITH_AS(make_data_parallel_engine(eo, s.plan, s.init, &s.teacher, Transport::Host),
                       doctest::Contains("CPU engines"), qkd::Error);
}
