// The perplexity rule (runtime/eval.h): document splitting on tricky inputs, tokenization into one stream, and
// the window rule on the tiny model against a naive computation from the double-precision reference forward;
// then teacher-25m on the committed excerpt against the same rule computed with transformers (fixture).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/model.h"
#include "loader/tokenizer.h"
#include "runtime/eval.h"
#include "runtime/model.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace {

using namespace qkd::runtime;
using Docs = std::vector<std::string_view>;

TEST_CASE("split_documents: blank and whitespace-only lines separate documents") {
  CHECK(split_documents("") == Docs{});
  CHECK(split_documents("\n\n  \n\t\n") == Docs{});
  CHECK(split_documents("one") == Docs{"one"});
  CHECK(split_documents("one\n") == Docs{"one"});
  CHECK(split_documents("a\nb\n\nc") == Docs{"a\nb", "c"});
  CHECK(split_documents("\n\n\na\n\n\n\nb\n\n") == Docs{"a", "b"});
  CHECK(split_documents("a\n   \nb\n\t \v\f\nc") == Docs{"a", "b", "c"});
  // only newline characters are stripped: indentation and trailing spaces stay
  CHECK(split_documents("  indented\nline  \n\nnext") == Docs{"  indented\nline  ", "next"});
  // CRLF: a line holding only "\r" is blank; a document's final "\r" is stripped, inner ones are kept
  CHECK(split_documents("l1\r\nl2\r\n\r\nl3\r\n") == Docs{"l1\r\nl2", "l3"});
  CHECK(split_documents("\r\n\r\nx\r") == Docs{"x"});
}

// One id per byte (3 + byte % 40) with BOS 1 / EOS 2: enough to see the stream's layout.
class ByteTokenizer final : public qkd::Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool add_eos, bool) const override {
    std::vector<int32_t> ids;
    if (add_bos) ids.push_back(1);
    for (unsigned char c : text) ids.push_back(3 + c % 40);
    if (add_eos) ids.push_back(2);
    return ids;
  }
  std::string decode_token(int32_t, int32_t) const override { return {}; }
  int vocab_size() const override { return 43; }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t piece_to_id(std::string_view) const override { return -1; }
  std::string id_to_piece(int32_t) const override { return {}; }
};

TEST_CASE("tokenize_documents: BOS + pieces + EOS per document, concatenated") {
  ByteTokenizer tok;
  const std::string text = "ab\n\n\nc\n";
  const auto docs = split_documents(text);
  const std::vector<int32_t> want = {1, 3 + 'a' % 40, 3 + 'b' % 40, 2, 1, 3 + 'c' % 40, 2};
  CHECK(tokenize_documents(tok, docs) == want);
}

std::unique_ptr<Model> cpu_model(const qkd::ModelWeights& w, int max_batch, int ctx) {
  ModelOptions opt;
  opt.max_batch = max_batch;
  opt.ctx = ctx;
  opt.backend = BackendKind::Cpu;
  return make_cpu_model(w, opt);
}

// The rule written out: windows stream[i : i + ctx + 1], each from position 0, log-softmax in double.
EvalResult naive_eval(const qkd::ModelWeights& w, const std::vector<int32_t>& stream, int ctx) {
  const int vocab = w.config.vocab_size;
  EvalResult r;
  double nll = 0.0;
  for (size_t i = 0; i + 1 < stream.size(); i += ctx) {
    const size_t end = std::min(stream.size(), i + ctx + 1);
    const std::vector<int32_t> x(stream.begin() + i, stream.begin() + end);
    const auto logits = qkd::test::reference_logits(w, std::span(x).first(x.size() - 1));
    for (size_t t = 0; t + 1 < x.size(); ++t) {
      const double* row = logits.data() + t * vocab;
      double z = 0.0;
      for (int v = 0; v < vocab; ++v) z += std::exp(row[v]);
      nll += std::log(z) - row[x[t + 1]];
      ++r.n_tokens;
    }
    ++r.n_windows;
  }
  r.mean_nll = nll / r.n_tokens;
  r.perplexity = std::exp(r.mean_nll);
  return r;
}

TEST_CASE("evaluate: the window rule on the tiny model") {
  const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 31);
  std::mt19937 rng(6);
  std::uniform_int_distribution<int32_t> d(0, w.config.vocab_size - 1);
  const int ctx = 8;
  // 17 tokens: windows at 0 and 8 (the one at 16 would hold a single token); 18: a third window of 2 tokens;
  // 23: a short third window; 25: all full
  for (int n : {2, 17, 18, 23, 25}) {
    std::vector<int32_t> stream(n);
    for (auto& t : stream) t = d(rng);
    const EvalResult want = naive_eval(w, stream, ctx);
    for (int max_batch : {1, 2}) {
      auto model = cpu_model(w, max_batch, 16);
      int64_t last_done = 0, total = 0;
      const EvalResult got = evaluate(*model, stream, ctx, [&](int64_t done, int64_t all) {
        CHECK(done > last_done);
        last_done = done;
        total = all;
      });
      INFO("stream " << n << ", max_batch " << max_batch);
      CHECK(got.n_tokens == n - 1);
      CHECK(got.n_tokens == want.n_tokens);
      CHECK(got.n_windows == want.n_windows);
      CHECK(last_done == total);
      CHECK(total == want.n_windows);
      // per-token NLL errors of fp32 logits (<= 1e-5 of their scale) average out; 1e-5 relative bounds the mean
      CHECK(got.mean_nll == doctest::Approx(want.mean_nll).epsilon(1e-5));
      CHECK(got.perplexity == doctest::Approx(std::exp(got.mean_nll)).epsilon(1e-12));
    }
  }
}

TEST_CASE("evaluate: bad inputs are errors") {
  const auto w = qkd::test::make_tiny_model(qkd::test::tiny_config(), 32);
  auto model = cpu_model(w, 1, 16);
  CHECK_THROWS_WITH_AS(evaluate(*model, std::vector<int32_t>{5}, 8), doctest::Contains("has 1 tokens"), qkd::Error);
  CHECK_THROWS_WITH_AS(evaluate(*model, std::vector<int32_t>{5, 6}, 17), doctest::Contains("(-c) 17"), qkd::Error);
  CHECK_THROWS_WITH_AS(evaluate(*model, std::vector<int32_t>{5, 6, 50}, 8), doctest::Contains("token 50 at stream index 2"),
                       qkd::Error);
}

TEST_CASE("teacher-25m: the eval rule matches transformers on the committed excerpt (fixture)") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string fx_dir = qkd::test::fixtures_dir() + "/hf";
  const auto fx = nlohmann::json::parse(std::ifstream(fx_dir + "/teacher-25m-eval.json"));
  std::ifstream in(fx_dir + "/eval.txt", std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  const std::string corpus = text.str();
  const std::string dir = qkd::test::shared_data() + "/models/teacher-25m";
  const auto tok = qkd::load_tokenizer(dir + "/tokenizer.model");
  const auto stream = tokenize_documents(*tok, split_documents(corpus));
  REQUIRE(static_cast<int64_t>(stream.size()) == fx["stream_len"].get<int64_t>());
  const auto head = fx["stream_head"].get<std::vector<int32_t>>();
  CHECK(std::vector<int32_t>(stream.begin(), stream.begin() + head.size()) == head);

  const int ctx = fx["ctx"].get<int>();
  const auto w = qkd::load_model(dir);
  auto model = cpu_model(w, 4, ctx);
  const EvalResult r = evaluate(*model, stream, ctx);
  CHECK(r.n_tokens == fx["n_tokens"].get<int64_t>());
  // two fp32 forwards of the same weights (the bf16 checkpoint widens exactly): the fp32-vs-double bound
  CHECK(r.mean_nll == doctest::Approx(fx["mean_nll"].get<double>()).epsilon(1e-5));
}

}  // namespace
