// The generation loop (runtime/generate.h) on the tiny in-memory model: greedy decoding with the KV cache must
// give the tokens that a full re-run of the sequence + argmax gives at every step; the stop conditions (EOS,
// max tokens, cancel, callback, full context) and the cache contract for chat turns. Then teacher-25m's greedy
// continuation against transformers' generate() (fixture).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/model.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace {

using namespace qkd::runtime;

std::unique_ptr<Model> cpu_model(const qkd::ModelWeights& w, int ctx) {
  ModelOptions opt;
  opt.ctx = ctx;
  opt.backend = BackendKind::Cpu;
  return make_cpu_model(w, opt);
}

SamplerParams greedy() {
  SamplerParams p;
  p.temperature = 0.0f;
  return p;
}

GenerateParams max_tokens(int n, const std::atomic<bool>* cancel = nullptr) {
  GenerateParams g;
  g.max_new_tokens = n;
  g.cancel = cancel;
  return g;
}

const std::vector<int32_t> kPrompt = {1, 17, 4, 33, 8};

struct Fixture {
  qkd::ModelWeights w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 21);
  std::unique_ptr<Model> model = cpu_model(w, 48);
  Sampler sampler{greedy()};
};

TEST_CASE("greedy generation equals re-running the whole sequence and taking the argmax") {
  Fixture f;
  const int n_new = 20;
  const GenerateResult r = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(n_new), {}, {});
  REQUIRE(r.tokens.size() == static_cast<size_t>(n_new));
  CHECK(r.stop == StopReason::MaxTokens);
  CHECK(r.n_prompt == static_cast<int>(kPrompt.size()));
  CHECK(r.n_decoded == n_new - 1);  // the last sampled token is never run
  CHECK(r.n_past == static_cast<int>(kPrompt.size()) + n_new - 1);

  auto fresh = cpu_model(f.w, 48);
  std::vector<int32_t> seq = kPrompt;
  std::vector<float> logits(f.w.config.vocab_size);
  for (int i = 0; i < n_new; ++i) {
    const int32_t sp = 0;
    fresh->forward(seq, 1, static_cast<int>(seq.size()), {&sp, 1}, LogitsMode::Last, logits.data());
    const int32_t want = argmax(logits);
    REQUIRE_MESSAGE(r.tokens[i] == want, "token " << i);
    seq.push_back(want);
  }
}

TEST_CASE("stop conditions") {
  Fixture f;
  const GenerateResult all = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(12), {}, {});
  REQUIRE(all.tokens.size() == 12);

  SUBCASE("a stop token ends generation and is reported apart") {
    const int32_t stop = all.tokens[6];
    size_t first = 0;
    while (all.tokens[first] != stop) ++first;
    const GenerateResult r = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(12), {},
                                      [&](int32_t t) { return t == stop; });
    CHECK(r.stop == StopReason::Eos);
    CHECK(r.stop_token == stop);
    CHECK(r.tokens == std::vector<int32_t>(all.tokens.begin(), all.tokens.begin() + first));
  }
  SUBCASE("on_token sees every token and can stop") {
    std::vector<int32_t> seen;
    const GenerateResult r = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(12),
                                      [&](int32_t t) {
                                        seen.push_back(t);
                                        return seen.size() < 4;
                                      },
                                      {});
    CHECK(r.stop == StopReason::Callback);
    CHECK(seen == r.tokens);
    CHECK(r.tokens == std::vector<int32_t>(all.tokens.begin(), all.tokens.begin() + 4));
  }
  SUBCASE("the cancel flag is checked every token") {
    std::atomic<bool> cancel{false};
    int n = 0;
    const GenerateResult r = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(12, &cancel),
                                      [&](int32_t) {
                                        if (++n == 3) cancel = true;
                                        return true;
                                      },
                                      {});
    CHECK(r.stop == StopReason::Cancelled);
    CHECK(r.tokens.size() == 3);
    const GenerateResult before = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(12, &cancel), {}, {});
    CHECK(before.stop == StopReason::Cancelled);
    CHECK(before.tokens.empty());
  }
  SUBCASE("generation stops when the context is full") {
    auto small = cpu_model(f.w, 9);
    const GenerateResult r = generate(*small, f.sampler, kPrompt, 0, max_tokens(-1), {}, {});
    CHECK(r.stop == StopReason::CtxFull);
    CHECK(r.n_past == 9);
    CHECK(r.tokens.size() == 5);  // positions 5..8 are filled by 4 decode steps, and one more token is sampled
    CHECK(r.tokens == std::vector<int32_t>(all.tokens.begin(), all.tokens.begin() + 5));
  }
  SUBCASE("max_new_tokens = 0 only prefills") {
    const GenerateResult r = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(0), {}, {});
    CHECK(r.tokens.empty());
    CHECK(r.n_past == static_cast<int>(kPrompt.size()));
  }
}

TEST_CASE("a prompt that does not fit the context is an error") {
  Fixture f;
  auto small = cpu_model(f.w, 4);
  CHECK_THROWS_WITH_AS(generate(*small, f.sampler, kPrompt, 0, max_tokens(3), {}, {}),
                       doctest::Contains("prompt has 5 tokens but the context (-c) is 4"), qkd::Error);
  CHECK_THROWS_WITH_AS(generate(*f.model, f.sampler, kPrompt, 45, max_tokens(3), {}, {}),
                       doctest::Contains("prompt has 5 tokens after the 45 already in the cache"), qkd::Error);
  CHECK_THROWS_AS(generate(*f.model, f.sampler, std::vector<int32_t>{}, 0, max_tokens(3), {}, {}), qkd::Error);
}

TEST_CASE("a chat turn continues the cache of the previous one") {
  Fixture f;
  const GenerateResult t1 = generate(*f.model, f.sampler, kPrompt, 0, max_tokens(6), {}, {});
  // the next prompt starts with the last generated token, which the cache does not hold yet
  const std::vector<int32_t> user = {t1.tokens.back(), 9, 10, 11};
  const GenerateResult t2 = generate(*f.model, f.sampler, user, t1.n_past, max_tokens(6), {}, {});

  std::vector<int32_t> whole = kPrompt;
  whole.insert(whole.end(), t1.tokens.begin(), t1.tokens.end() - 1);
  whole.insert(whole.end(), user.begin(), user.end());
  auto fresh = cpu_model(f.w, 48);
  const GenerateResult once = generate(*fresh, f.sampler, whole, 0, max_tokens(6), {}, {});
  CHECK(t2.tokens == once.tokens);
  CHECK(t2.n_past == once.n_past);
}

TEST_CASE("sampled generation is reproducible from the seed") {
  Fixture f;
  SamplerParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.seed = 77;
  Sampler a(p), b(p);
  const auto ra = generate(*f.model, a, kPrompt, 0, max_tokens(15), {}, {});
  const auto rb = generate(*f.model, b, kPrompt, 0, max_tokens(15), {}, {});
  CHECK(ra.tokens == rb.tokens);
}

TEST_CASE("teacher-25m: greedy continuation equals transformers' generate (fixture)") {
  QKD_REQUIRE_SHARED_DATA();
  const auto fx = nlohmann::json::parse(std::ifstream(qkd::test::fixtures_dir() + "/hf/teacher-25m.json"));
  const auto prompt = fx["tokens"].get<std::vector<int32_t>>();
  const auto want = fx["greedy_32"].get<std::vector<int32_t>>();
  const auto w = qkd::load_model(qkd::test::shared_data() + "/models/teacher-25m");
  auto model = cpu_model(w, 128);
  Sampler s(greedy());
  // transformers stops after emitting EOS and includes it; generate() reports it as the stop token
  auto is_eos = [&](int32_t t) {
    return std::find(w.config.eos_ids.begin(), w.config.eos_ids.end(), t) != w.config.eos_ids.end();
  };
  const GenerateResult r = generate(*model, s, prompt, 0, max_tokens(32), {}, is_eos);
  std::vector<int32_t> got = r.tokens;
  if (r.stop == StopReason::Eos) got.push_back(r.stop_token);
  CHECK(got == want);
}

}  // namespace
