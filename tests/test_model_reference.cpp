// Whole models against Hugging Face transformers. The fixtures in tests/fixtures/hf were written by
// tests/gen_hf_fixtures.py on the GPU machine (transformers 5.17, fp32):
//  - tiny-llama: a random LlamaForCausalLM (GQA 4:2, untied, rope_theta 50000), sharded safetensors;
//  - teacher-25m: logits of a fixed text, its greedy continuation, and the qkd-eval rule on eval.txt;
//  - stories260K: the llama2.c model converted to HF (q/k permuted for rotate-half RoPE), which checks the
//    llama2.c loader and the interleaved RoPE convention against an independent implementation.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loader/bundle.h"
#include "loader/mmap_file.h"
#include "runtime/eval.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/test_util.h"

using namespace qkd;

namespace {

std::vector<float> read_f32(const std::string& path) {
  const std::string bytes = read_text_file(path);
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

nlohmann::json read_json(const std::string& path) { return nlohmann::json::parse(read_text_file(path)); }

// ||a - b|| / ||b|| over a row, and the largest elementwise gap, for the failure report.
struct RowError {
  double rel = 0, max_abs = 0;
  int worst = -1;
};
RowError compare(const float* got, const float* ref, int n) {
  double num = 0, den = 0;
  RowError e;
  for (int i = 0; i < n; ++i) {
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
    if (std::abs(d) > e.max_abs || std::isnan(d)) {
      e.max_abs = std::abs(d);
      e.worst = i;
    }
  }
  e.rel = std::sqrt(num / den);
  return e;
}

std::unique_ptr<runtime::Model> cpu_model(const ModelWeights& w, int batch, int ctx) {
  runtime::ModelOptions o;
  o.backend = runtime::BackendKind::Cpu;
  o.max_batch = batch;
  o.ctx = ctx;
  return runtime::make_model(w, o);
}

void check_logits(runtime::Model& m, const std::vector<int32_t>& tokens, int batch, const std::vector<float>& ref,
                  double tol) {
  const int seq = static_cast<int>(tokens.size()) / batch;
  const int vocab = m.config().vocab_size;
  std::vector<float> logits(static_cast<size_t>(batch) * seq * vocab, std::nanf(""));
  std::vector<int32_t> start(batch, 0);
  m.forward(tokens, batch, seq, start, runtime::LogitsMode::All, logits.data());
  REQUIRE(ref.size() == logits.size());
  for (int r = 0; r < batch * seq; ++r) {
    const RowError e = compare(logits.data() + static_cast<size_t>(r) * vocab, ref.data() + static_cast<size_t>(r) * vocab, vocab);
    INFO("row " << r << ": relative error " << e.rel << ", max abs " << e.max_abs << " at vocab index " << e.worst);
    CHECK(e.rel < tol);
  }
}

}  // namespace

TEST_CASE("tiny HF Llama (GQA, untied, rope_theta 50000, sharded) matches transformers within 1e-4") {
  const std::string dir = test::fixtures_dir() + "/hf/tiny-llama";
  const ModelWeights w = load_model(dir);
  CHECK(w.config.rope_theta == 50000.0f);
  CHECK_FALSE(w.config.tied_embeddings);
  CHECK(w.config.n_kv_heads == 2);
  const nlohmann::json j = read_json(dir + "/tokens.json");
  std::vector<int32_t> tokens;
  for (const auto& row : j["tokens"])
    for (int t : row) tokens.push_back(t);
  const int batch = static_cast<int>(j["tokens"].size());
  auto m = cpu_model(w, batch, 64);
  check_logits(*m, tokens, batch, read_f32(dir + "/logits.f32"), 1e-4);
}

TEST_CASE("teacher-25m logits match transformers fp32 within 1e-4") {
  QKD_REQUIRE_SHARED_DATA();
  const nlohmann::json j = read_json(test::fixtures_dir() + "/hf/teacher-25m.json");
  const ModelBundle b = load_bundle(test::shared_data() + "/models/teacher-25m");
  const std::vector<int32_t> tokens = j["tokens"].get<std::vector<int32_t>>();
  // Our tokenizer gives the ids transformers' run used.
  std::vector<int32_t> ours = b.tokenizer->encode(j["text"].get<std::string>(), true);
  CHECK(ours == tokens);
  auto m = cpu_model(b.weights, 1, 256);
  const int vocab = b.weights.config.vocab_size;
  std::vector<float> logits(tokens.size() * vocab);
  std::vector<int32_t> start{0};
  m->forward(tokens, 1, static_cast<int>(tokens.size()), start, runtime::LogitsMode::All, logits.data());
  const std::vector<float> ref = read_f32(test::fixtures_dir() + "/hf/teacher-25m-logits.f32");
  const auto positions = j["positions"].get<std::vector<int>>();
  for (size_t i = 0; i < positions.size(); ++i) {
    const RowError e = compare(logits.data() + static_cast<size_t>(positions[i]) * vocab, ref.data() + i * vocab, vocab);
    INFO("position " << positions[i] << ": relative error " << e.rel << ", max abs " << e.max_abs);
    CHECK(e.rel < 1e-4);
  }
  const auto argmax = j["argmax"].get<std::vector<int32_t>>();
  for (size_t t = 0; t < tokens.size(); ++t)
    CHECK(runtime::argmax({logits.data() + t * vocab, static_cast<size_t>(vocab)}) == argmax[t]);
}

TEST_CASE("teacher-25m greedy continuation equals transformers' generate") {
  QKD_REQUIRE_SHARED_DATA();
  const nlohmann::json j = read_json(test::fixtures_dir() + "/hf/teacher-25m.json");
  const ModelBundle b = load_bundle(test::shared_data() + "/models/teacher-25m");
  auto m = cpu_model(b.weights, 1, 256);
  runtime::Sampler greedy(runtime::SamplerParams{0.0f, 0, 1.0f, 0});
  runtime::GenerateParams gp;
  gp.max_new_tokens = 32;
  const std::vector<int32_t> prompt = j["tokens"].get<std::vector<int32_t>>();
  runtime::GenerateResult r = runtime::generate(*m, greedy, prompt, 0, gp, {}, [&](int32_t id) {
    return b.tokenizer->is_end_of_generation(id);
  });
  std::vector<int32_t> got = r.tokens;
  if (r.stop == runtime::StopReason::Eos) got.push_back(r.stop_token);
  CHECK(got == j["greedy_32"].get<std::vector<int32_t>>());
  CHECK(b.tokenizer->decode(r.tokens) == j["greedy_32_text"].get<std::string>());
}

TEST_CASE("qkd-eval rule on teacher-25m matches transformers within 1e-3 nats") {
  QKD_REQUIRE_SHARED_DATA();
  const nlohmann::json j = read_json(test::fixtures_dir() + "/hf/teacher-25m-eval.json");
  const ModelBundle b = load_bundle(test::shared_data() + "/models/teacher-25m");
  const std::string text = read_text_file(test::fixtures_dir() + "/hf/eval.txt");
  const auto docs = runtime::split_documents(text);
  const std::vector<int32_t> stream = runtime::tokenize_documents(*b.tokenizer, docs);
  CHECK(static_cast<int64_t>(stream.size()) == j["stream_len"].get<int64_t>());
  const auto head = j["stream_head"].get<std::vector<int32_t>>();
  CHECK(std::vector<int32_t>(stream.begin(), stream.begin() + head.size()) == head);
  const int ctx = j["ctx"].get<int>();
  auto m = cpu_model(b.weights, 4, ctx);
  const runtime::EvalResult r = runtime::evaluate(*m, stream, ctx);
  CHECK(r.n_tokens == j["n_tokens"].get<int64_t>());
  INFO("qkd mean NLL " << r.mean_nll << " vs transformers " << j["mean_nll"].get<double>());
  CHECK(std::abs(r.mean_nll - j["mean_nll"].get<double>()) < 1e-3);
}

TEST_CASE("llama2.c stories260K matches transformers on the converted model (interleaved RoPE)") {
  QKD_REQUIRE_SHARED_DATA();
  const nlohmann::json j = read_json(test::fixtures_dir() + "/hf/stories260K.json");
  const ModelWeights w = load_model(test::shared_data() + "/models/stories260K/stories260K.bin");
  auto m = cpu_model(w, 1, 512);
  check_logits(*m, j["tokens"].get<std::vector<int32_t>>(), 1, read_f32(test::fixtures_dir() + "/hf/stories260K-logits.f32"),
               1e-4);

  // Greedy from BOS for 64 tokens, as transformers' generate did (which also stops at EOS id 2).
  runtime::Sampler greedy(runtime::SamplerParams{0.0f, 0, 1.0f, 0});
  runtime::GenerateParams gp;
  gp.max_new_tokens = 64;
  const std::vector<int32_t> bos{1};
  runtime::GenerateResult r = runtime::generate(*m, greedy, bos, 0, gp, {}, [](int32_t id) { return id == 2; });
  std::vector<int32_t> got = r.tokens;
  if (r.stop == runtime::StopReason::Eos) got.push_back(r.stop_token);
  CHECK(got == j["greedy_64_from_bos"].get<std::vector<int32_t>>());
}
