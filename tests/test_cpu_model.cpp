// The CPU backend (runtime/cpu_model.cpp) against the naive double-precision forward of tests/tiny_model.h, and
// against Hugging Face transformers' fp32 logits for the committed tiny-llama fixture.
// Bound: fp32 through two layers of dot products of length <= 96 stays within ~1e-6 of double relative to the
// logits' scale; 1e-5 of the row's largest |logit| (at least 1) leaves room for the accumulation.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/model.h"
#include "runtime/model.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace {

using qkd::runtime::LogitsMode;
using qkd::runtime::Model;
using qkd::runtime::ModelOptions;

constexpr double kTol = 1e-5;

// rows of got [rows, vocab] against ref rows [ref_row0 .., vocab]
void expect_logits(const std::string& what, const float* got, const std::vector<double>& ref, int ref_row0, int rows,
                   int vocab, double tol = kTol) {
  double max_err = 0.0, worst_bound = 0.0;
  int bad = 0;
  std::string first;
  for (int r = 0; r < rows; ++r) {
    const double* want = ref.data() + static_cast<size_t>(ref_row0 + r) * vocab;
    double scale = 1.0;
    for (int v = 0; v < vocab; ++v) scale = std::max(scale, std::fabs(want[v]));
    for (int v = 0; v < vocab; ++v) {
      const double err = std::fabs(got[static_cast<size_t>(r) * vocab + v] - want[v]);
      if (err > max_err) {
        max_err = err;
        worst_bound = tol * scale;
      }
      if (!(err <= tol * scale)) {
        if (bad < 5) first += fmt::format("  row {} token {}: got {} want {}\n", r, v, got[r * vocab + v], want[v]);
        ++bad;
      }
    }
  }
  INFO(what << ": max abs err " << max_err << " (bound there " << worst_bound << "), " << bad
            << " logits outside the bound\n"
            << first);
  CHECK(bad == 0);
}

std::vector<int32_t> random_tokens(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

std::unique_ptr<Model> cpu_model(const qkd::ModelWeights& w, int max_batch, int ctx) {
  ModelOptions opt;
  opt.max_batch = max_batch;
  opt.ctx = ctx;
  opt.backend = qkd::runtime::BackendKind::Cpu;
  return qkd::runtime::make_cpu_model(w, opt);
}

TEST_CASE("cpu model: a full-sequence forward matches the double-precision reference") {
  for (bool tied : {false, true}) {
    const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 11, tied);
    std::mt19937 rng(1);
    const int n = 21, vocab = w.config.vocab_size;
    const auto tokens = random_tokens(rng, n, vocab);
    const auto ref = qkd::test::reference_logits(w, tokens);
    auto model = cpu_model(w, 1, 32);
    const int32_t sp = 0;
    std::vector<float> all(static_cast<size_t>(n) * vocab), last(vocab);
    model->forward(tokens, 1, n, {&sp, 1}, LogitsMode::All, all.data());
    expect_logits(fmt::format("All, tied {}", tied), all.data(), ref, 0, n, vocab);
    model->forward(tokens, 1, n, {&sp, 1}, LogitsMode::Last, last.data());
    expect_logits(fmt::format("Last, tied {}", tied), last.data(), ref, n - 1, 1, vocab);
  }
}

TEST_CASE("cpu model: prefill then decoding one token at a time equals the full forward") {
  const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 12);
  std::mt19937 rng(2);
  const int n = 30, n_prompt = 7, vocab = w.config.vocab_size;
  const auto tokens = random_tokens(rng, n, vocab);
  const auto ref = qkd::test::reference_logits(w, tokens);
  auto model = cpu_model(w, 1, 40);
  std::vector<float> logits(vocab);
  const int32_t sp0 = 0;
  model->forward(std::span(tokens).first(n_prompt), 1, n_prompt, {&sp0, 1}, LogitsMode::Last, logits.data());
  expect_logits("prefill", logits.data(), ref, n_prompt - 1, 1, vocab);
  for (int t = n_prompt; t < n; ++t) {
    const int32_t pos = t;
    model->forward(std::span(tokens).subspan(t, 1), 1, 1, {&pos, 1}, LogitsMode::Last, logits.data());
    expect_logits(fmt::format("decode at {}", t), logits.data(), ref, t, 1, vocab);
  }
}

TEST_CASE("cpu model: a prefill longer than one step runs in chunks") {
  // max_batch 100 makes each step 512 / 100 = 5 tokens per sequence, so 23 tokens take 5 chunks
  const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 13);
  std::mt19937 rng(3);
  const int n = 23, vocab = w.config.vocab_size;
  const auto tokens = random_tokens(rng, n, vocab);
  const auto ref = qkd::test::reference_logits(w, tokens);
  auto model = cpu_model(w, 100, 32);
  std::vector<float> all(static_cast<size_t>(n) * vocab), last(vocab);
  const int32_t sp = 0;
  model->forward(tokens, 1, n, {&sp, 1}, LogitsMode::All, all.data());
  expect_logits("chunked All", all.data(), ref, 0, n, vocab);
  model->forward(tokens, 1, n, {&sp, 1}, LogitsMode::Last, last.data());
  expect_logits("chunked Last", last.data(), ref, n - 1, 1, vocab);
}

TEST_CASE("cpu model: a batch with different start positions equals running the sequences one by one") {
  const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 14);
  const int vocab = w.config.vocab_size, n_prefix = 9, n_new = 4;
  std::mt19937 rng(4);
  const std::vector<int32_t> start = {9, 0, 5};  // each sequence keeps start[b] tokens of its prefix
  std::vector<std::vector<int32_t>> prefix, fresh;
  for (int b = 0; b < 3; ++b) {
    prefix.push_back(random_tokens(rng, n_prefix, vocab));
    fresh.push_back(random_tokens(rng, n_new, vocab));
  }

  auto batched = cpu_model(w, 3, 32);
  std::vector<int32_t> tokens;
  for (const auto& p : prefix) tokens.insert(tokens.end(), p.begin(), p.end());
  const std::vector<int32_t> zeros(3, 0);
  std::vector<float> scratch(static_cast<size_t>(3) * vocab);
  batched->forward(tokens, 3, n_prefix, zeros, LogitsMode::Last, scratch.data());
  // the new tokens overwrite each cache from start[b] on; attention must see only positions < start[b] + i + 1
  tokens.clear();
  for (const auto& f : fresh) tokens.insert(tokens.end(), f.begin(), f.end());
  std::vector<float> all(static_cast<size_t>(3) * n_new * vocab);
  batched->forward(tokens, 3, n_new, start, LogitsMode::All, all.data());

  auto single = cpu_model(w, 1, 32);
  for (int b = 0; b < 3; ++b) {
    std::vector<int32_t> seq(prefix[b].begin(), prefix[b].begin() + start[b]);
    seq.insert(seq.end(), fresh[b].begin(), fresh[b].end());
    const auto ref = qkd::test::reference_logits(w, seq);
    std::vector<float> one(static_cast<size_t>(n_new) * vocab);
    const int32_t sp0 = 0, spb = start[b];
    if (start[b] > 0) single->forward(std::span(seq).first(start[b]), 1, start[b], {&sp0, 1}, LogitsMode::Last,
                                      scratch.data());
    single->forward(fresh[b], 1, n_new, {&spb, 1}, LogitsMode::All, one.data());
    const float* got = all.data() + static_cast<size_t>(b) * n_new * vocab;
    expect_logits(fmt::format("sequence {} in the batch", b), got, ref, start[b], n_new, vocab);
    // Rows are computed independently of the batch (matmul sums each row in a fixed order), so the bits agree.
    CHECK_MESSAGE(std::equal(one.begin(), one.end(), got), "sequence " << b << ": batched and single logits differ");
  }
}

TEST_CASE("cpu model: bad inputs are errors naming the values") {
  const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 15);
  auto model = cpu_model(w, 2, 16);
  std::vector<float> logits(static_cast<size_t>(2) * 16 * w.config.vocab_size);
  const std::vector<int32_t> tok = {3, 50}, sp1 = {0}, sp2 = {0, 0};
  CHECK_THROWS_WITH_AS(model->forward(tok, 1, 2, sp1, LogitsMode::Last, logits.data()),
                       doctest::Contains("token id 50"), qkd::Error);
  const std::vector<int32_t> ok = {3, 4}, late = {15};
  CHECK_THROWS_WITH_AS(model->forward(ok, 1, 2, late, LogitsMode::Last, logits.data()),
                       doctest::Contains("positions 15..16 but the context (-c) is 16"), qkd::Error);
  const std::vector<int32_t> six(6, 3), sp3 = {0, 0, 0};
  CHECK_THROWS_WITH_AS(model->forward(six, 3, 2, sp3, LogitsMode::Last, logits.data()), doctest::Contains("batch 3"),
                       qkd::Error);

  auto bad = qkd::test::make_tiny_model(qkd::test::tiny_config(), 16);
  bad.layers[1].w_up.shape = {95, 64};
  CHECK_THROWS_WITH_AS(cpu_model(bad, 1, 16), doctest::Contains("'layers.1.w_up': shape [95, 64]"), qkd::Error);

  // Without a GPU, --backend cuda is a clear error and auto falls back to the CPU (on a GPU machine the CUDA
  // backend's own tests cover these choices).
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    ModelOptions opt;
    opt.backend = qkd::runtime::BackendKind::Cuda;
    CHECK_THROWS_WITH_AS(qkd::runtime::make_model(w, opt), doctest::Contains("--backend cuda"), qkd::Error);
    opt.backend = qkd::runtime::BackendKind::Auto;
    CHECK(qkd::runtime::make_model(w, opt)->backend() == qkd::runtime::BackendKind::Cpu);
  }
}

std::vector<float> read_f32(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path);
  std::vector<float> v(static_cast<size_t>(f.tellg()) / sizeof(float));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  return v;
}

TEST_CASE("cpu model: Hugging Face tiny-llama logits (committed fixture)") {
  // transformers' fp32 forward of a random LlamaForCausalLM (GQA 4:2, untied, rope_theta 50000), loaded here
  // through the HF loader: checks the whole path, including the q/k un-permutation, against PyTorch.
  const std::string dir = qkd::test::fixtures_dir() + "/hf/tiny-llama";
  const auto w = qkd::load_model(dir);
  const auto meta = nlohmann::json::parse(std::ifstream(dir + "/tokens.json"));
  const auto tokens = meta["tokens"].get<std::vector<std::vector<int32_t>>>();
  const auto want = read_f32(dir + "/logits.f32");
  const int batch = static_cast<int>(tokens.size()), n = static_cast<int>(tokens[0].size());
  const int vocab = w.config.vocab_size;
  REQUIRE(want.size() == static_cast<size_t>(batch) * n * vocab);
  auto model = cpu_model(w, batch, n);
  std::vector<int32_t> flat;
  for (const auto& t : tokens) flat.insert(flat.end(), t.begin(), t.end());
  std::vector<float> got(want.size());
  const std::vector<int32_t> sp(batch, 0);
  model->forward(flat, batch, n, sp, LogitsMode::All, got.data());
  // both sides are fp32: the bound is twice the fp32-vs-double one
  const std::vector<double> ref(want.begin(), want.end());
  expect_logits("tiny-llama vs transformers", got.data(), ref, 0, batch * n, vocab, 2 * kTol);
}

}  // namespace
