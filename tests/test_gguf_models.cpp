// Whole GGUF models against an independent reference: tests/gen_gguf_model_fixtures.py dequantized each file
// with the `gguf` Python package and ran transformers' LlamaForCausalLM on the weights (fp32, on the GPU
// machine). qkd reads the same file with its own GGUF reader, dequantizes on the CPU backend and must give
//  - the logits of the fixed prompt within 1e-4 relative (norm of the difference over the norm, per position),
//  - the same 32 greedy tokens (end-of-turn ignored on both sides),
//  - the same tensor types as the gguf package saw.
// Two kinds of file:
//  - the default chat model (SmolLM2-135M-Instruct Q4_1, tools/fetch-default-model.sh), also checking that
//    qkd's BPE tokenizer and chatml template encode the fixed conversation to the reference's ids;
//  - qkd's own GGUF export (`qkd-quantize --format gguf`, Q4_0 and Q4_1), the round trip through the gguf
//    package: the export is made here again and must equal, byte for byte, the committed file the reference
//    was computed from. QKD_UPDATE_FIXTURES=1 rewrites those committed exports instead (then re-run the script).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/chat_template.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/gguf_writer.h"
#include "loader/int4_checkpoint.h"
#include "loader/mmap_file.h"
#include "loader/model.h"
#include "runtime/model.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string fixture_dir() { return qkd::test::fixtures_dir() + "/gguf-models"; }

struct Reference {
  json j;
  std::vector<float> logits;  // [positions, vocab]
};

Reference reference(const std::string& name) {
  Reference r;
  r.j = json::parse(qkd::read_text_file(fixture_dir() + "/" + name + ".json"));
  const std::string raw = qkd::read_text_file(fixture_dir() + "/" + name + ".logits.f32");
  r.logits.resize(raw.size() / sizeof(float));
  std::memcpy(r.logits.data(), raw.data(), r.logits.size() * sizeof(float));
  const size_t vocab = r.j["config"]["vocab_size"].get<size_t>();
  REQUIRE(r.logits.size() == r.j["logits_positions"].size() * vocab);
  return r;
}

// The gguf package's view of the file (tensor names and types) equals qkd's reader's.
void check_tensor_types(const qkd::GgufFile& f, const json& types) {
  REQUIRE(f.tensors().size() == types.size());
  for (const qkd::GgufTensorInfo& t : f.tensors()) {
    INFO("tensor " << t.name);
    REQUIRE(types.contains(t.name));
    CHECK(types[t.name].get<std::string>() == qkd::dtype_name(t.dtype));
  }
}

// Logits of every prompt position stored by the reference, then 32 greedy steps through the KV cache.
void check_against_reference(const qkd::ModelWeights& w, const Reference& ref) {
  const std::vector<int32_t> ids = ref.j["prompt"]["ids"].get<std::vector<int32_t>>();
  const auto greedy = ref.j["greedy_ids"].get<std::vector<int32_t>>();
  const auto margins = ref.j["greedy_margins"].get<std::vector<double>>();
  const int vocab = w.config.vocab_size;
  REQUIRE(vocab == ref.j["config"]["vocab_size"].get<int>());

  qkd::runtime::ModelOptions opt;
  opt.ctx = static_cast<int>(ids.size() + greedy.size());
  opt.backend = qkd::runtime::BackendKind::Cpu;
  auto model = qkd::runtime::make_cpu_model(w, opt);
  std::vector<float> all(ids.size() * static_cast<size_t>(vocab));
  const int32_t start = 0;
  model->forward(ids, 1, static_cast<int>(ids.size()), {&start, 1}, qkd::runtime::LogitsMode::All, all.data());

  double worst = 0.0;
  const auto positions = ref.j["logits_positions"].get<std::vector<int>>();
  for (size_t p = 0; p < positions.size(); ++p) {
    const float* ours = all.data() + static_cast<size_t>(positions[p]) * vocab;
    const float* want = ref.logits.data() + p * vocab;
    double diff = 0.0, norm = 0.0;
    for (int v = 0; v < vocab; ++v) {
      diff += (static_cast<double>(ours[v]) - want[v]) * (static_cast<double>(ours[v]) - want[v]);
      norm += static_cast<double>(want[v]) * want[v];
    }
    const double rel = std::sqrt(diff / norm);
    worst = std::max(worst, rel);
    INFO("position " << positions[p]);
    CHECK(rel <= 1e-4);
  }
  MESSAGE("worst relative logit error over " << positions.size() << " positions: " << worst);

  // Greedy: the first token from the prompt's last logits, then one decode step per token.
  std::vector<int32_t> got;
  const float* last = all.data() + (ids.size() - 1) * static_cast<size_t>(vocab);
  std::vector<float> step(vocab);
  std::copy(last, last + vocab, step.begin());
  for (size_t i = 0; i < greedy.size(); ++i) {
    const int32_t next = static_cast<int32_t>(std::max_element(step.begin(), step.end()) - step.begin());
    got.push_back(next);
    if (i + 1 == greedy.size()) break;
    const int32_t pos = static_cast<int32_t>(ids.size() + i);
    model->forward({&next, 1}, 1, 1, {&pos, 1}, qkd::runtime::LogitsMode::Last, step.data());
  }
  for (size_t i = 0; i < greedy.size(); ++i) {
    INFO("greedy step " << i << ": reference top-1 margin " << margins[i]);
    REQUIRE(got[i] == greedy[i]);
  }
}

// The pinned sha256 in tools/fetch-default-model.sh: the cached file was checked against it when fetched.
std::string pinned_default_sha256() {
  const std::string script = qkd::read_text_file(qkd::test::source_dir() + "/tools/fetch-default-model.sh");
  std::smatch m;
  REQUIRE(std::regex_search(script, m, std::regex("GGUF_SHA256=([0-9a-f]{64})")));
  return m[1];
}

// Exports `src` with `params` into a temporary file and checks it against the committed export `name`.gguf.
void check_export(const std::string& src, const qkd::Int4Params& params, const std::string& name) {
  qkd::test::TempDir dir;
  const fs::path out = dir.path / (name + ".gguf");
  qkd::export_gguf(out.string(), qkd::quantize_model_int4(qkd::load_model(src), params), qkd::Overwrite::Refuse);
  const std::string committed = fixture_dir() + "/" + name + ".gguf";
  const char* update = std::getenv("QKD_UPDATE_FIXTURES");
  if (update != nullptr && std::string(update) == "1") {
    fs::copy_file(out, committed, fs::copy_options::overwrite_existing);
    MESSAGE("wrote " << committed << "; now run tests/gen_gguf_model_fixtures.py on it");
    return;
  }
  INFO("the export of " << src << " changed since " << committed
                        << " was made: if that is intended, rewrite it (QKD_UPDATE_FIXTURES=1) and the reference");
  REQUIRE(qkd::read_text_file(out.string()) == qkd::read_text_file(committed));
  const Reference ref = reference(name);
  const qkd::GgufFile f = qkd::GgufFile::open(out.string());
  check_tensor_types(f, ref.j["tensor_types"]);
  if (ref.j["prompt"].contains("text")) {
    // the reference encoded its chat prompt with the vocabulary and merges the gguf package read from the export
    CHECK(qkd::load_gguf_tokenizer(f)->encode(ref.j["prompt"]["text"].get<std::string>(), false, false, true) ==
          ref.j["prompt"]["ids"].get<std::vector<int32_t>>());
  }
  check_against_reference(qkd::load_model(out.string()), ref);
}

}  // namespace

TEST_CASE("the default model against transformers on the gguf package's dequantized weights") {
  const std::string path = qkd::default_model_path();
  if (path.empty() || !fs::exists(path)) {
    MESSAGE("skipped: " << path << " is absent (tools/fetch-default-model.sh puts it there)");
    return;
  }
  const Reference ref = reference("smollm2");
  REQUIRE(ref.j["sha256"].get<std::string>() == pinned_default_sha256());
  REQUIRE(static_cast<uintmax_t>(ref.j["bytes"].get<int64_t>()) == fs::file_size(path));

  const qkd::GgufFile f = qkd::GgufFile::open(path);
  check_tensor_types(f, ref.j["tensor_types"]);

  // qkd's tokenizer and chat template give the reference's prompt ids for the same conversation
  const auto tok = qkd::load_gguf_tokenizer(f);
  std::string why;
  const qkd::ChatTemplate tmpl = qkd::detect_chat_template(std::string(f.get_string("tokenizer.chat_template", "")), &why);
  REQUIRE_MESSAGE(tmpl.kind == qkd::ChatTemplateKind::ChatML, why);
  std::vector<qkd::ChatMessage> messages;
  for (const json& m : ref.j["prompt"]["messages"]) messages.push_back({m["role"], m["content"]});
  const std::string text = qkd::format_chat(tmpl, messages, true);
  CHECK(text == ref.j["prompt"]["text"].get<std::string>());
  CHECK(tok->encode(text, false, false, true) == ref.j["prompt"]["ids"].get<std::vector<int32_t>>());

  check_against_reference(qkd::load_model(path), ref);
  CHECK(tok->decode(ref.j["greedy_ids"].get<std::vector<int32_t>>()) == ref.j["greedy_text"].get<std::string>());
}

TEST_CASE("qkd's GGUF export read back by the gguf package and transformers: Q4_0 and Q4_1") {
  const std::string tiny = qkd::test::fixtures_dir() + "/gguf/tiny-llama.gguf";
  SUBCASE("tiny model, Q4_0") { check_export(tiny, qkd::gguf_q4_params(qkd::Int4Symmetry::Symmetric), "tiny-q4_0"); }
  SUBCASE("tiny model, Q4_1") { check_export(tiny, qkd::gguf_q4_params(qkd::Int4Symmetry::Asymmetric), "tiny-q4_1"); }
  SUBCASE("stories260K (a trained llama2.c model), Q4_1 attention") {
    QKD_REQUIRE_SHARED_DATA();
    check_export(qkd::test::shared_data() + "/models/stories260K/stories260K.bin",
                 qkd::gguf_q4_params(qkd::Int4Symmetry::Asymmetric, qkd::parse_int4_modules("q,k,v,o", "test")),
                 "stories260k-q4_1");
  }
}
