// Chat templates against what transformers' apply_chat_template renders for the real templates
// (tests/gen_bpe_fixtures.py wrote tests/fixtures/bpe/chat_templates.json).
#include <algorithm>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/chat_template.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/mmap_file.h"
#include "tests/test_util.h"

using namespace qkd;

namespace {

nlohmann::json templates() {
  return nlohmann::json::parse(read_text_file(test::fixtures_dir() + "/bpe/chat_templates.json"))["templates"];
}

std::vector<ChatMessage> messages_of(const nlohmann::json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) out.push_back({m["role"], m["content"]});
  return out;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("real templates are recognised and format exactly as transformers renders them") {
  size_t formatted = 0;
  for (const auto& t : templates()) {
    const std::string source = t["source"];
    CAPTURE(source);
    std::string message;
    ChatTemplate tmpl = detect_chat_template(t["template"].get<std::string>(), &message);
    CHECK(std::string(chat_template_name(tmpl.kind)) == t["kind"].get<std::string>());
    CHECK(message.empty() == (t["kind"] != "none"));
    // The template's bos_token / eos_token are the tokenizer's; a caller sets them from its vocabulary.
    tmpl.bos_token = t["bos_token"];
    tmpl.eos_token = t["eos_token"];
    for (const auto& c : t["cases"]) {
      const std::vector<ChatMessage> messages = messages_of(c["messages"]);
      CAPTURE(c["messages"].dump());
      CAPTURE(c["add_generation_prompt"].get<bool>());
      CHECK(format_chat(tmpl, messages, c["add_generation_prompt"]) == c["expected"].get<std::string>());
      ++formatted;
    }
  }
  CHECK(formatted == 36);
}

TEST_CASE("chatml's built-in system message is read from the template") {
  const nlohmann::json t = templates();
  CHECK(detect_chat_template(t[0]["template"].get<std::string>()).default_system ==
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  CHECK(detect_chat_template(t[1]["template"].get<std::string>()).default_system == "You are a helpful assistant.");
  CHECK(detect_chat_template(t[2]["template"].get<std::string>()).default_system.empty());
  // The escaped spelling of the newline (a Jinja string escape) reads the same.
  const std::string escaped = "{{ '<|im_start|>system\\nBe brief, it\\'s late.<|im_end|>\\n' }}<|im_end|>";
  CHECK(detect_chat_template(escaped).default_system == "Be brief, it's late.");
}

TEST_CASE("unknown, empty and approximate templates say so; names and markers") {
  std::string message;
  ChatTemplate t = detect_chat_template("", &message);
  CHECK(t.kind == ChatTemplateKind::None);
  CHECK(has(message, "the model has no chat template: using 'none'"));
  t = detect_chat_template("{{ messages }}", &message);
  CHECK(t.kind == ChatTemplateKind::None);
  CHECK(has(message, "not one qkd knows (llama2, llama3, chatml, zephyr): using 'none'"));
  t = detect_chat_template("<|start_header_id|> Cutting Knowledge Date: December 2023 <|eot_id|>", &message);
  CHECK(t.kind == ChatTemplateKind::Llama3);
  CHECK(has(message, "Llama 3.1-style"));

  for (const char* name : {"llama2", "llama3", "chatml", "zephyr", "none"})
    CHECK(std::string(chat_template_name(chat_template_from_name(name).kind)) == name);
  try {
    chat_template_from_name("vicuna");
    FAIL("an unknown name was accepted");
  } catch (const Error& e) {
    CHECK(has(e.what(), "unknown chat template 'vicuna' (known: llama2, llama3, chatml, zephyr, none)"));
  }
  CHECK(chat_end_of_turn(chat_template_from_name("chatml")) == "<|im_end|>");
  CHECK(chat_end_of_turn(chat_template_from_name("llama3")) == "<|eot_id|>");
  CHECK(chat_end_of_turn(chat_template_from_name("llama2")) == "</s>");
  CHECK(chat_end_of_turn(chat_template_from_name("zephyr")) == "</s>");
  CHECK(chat_end_of_turn(chat_template_from_name("none")).empty());
  CHECK(chat_template_adds_bos(chat_template_from_name("llama2")));
  CHECK(chat_template_adds_bos(chat_template_from_name("llama3")));
  CHECK(!chat_template_adds_bos(chat_template_from_name("chatml")));
  const std::vector<ChatMessage> two = {{"user", "a"}, {"assistant", "b"}};
  CHECK(format_chat(chat_template_from_name("none"), two, true) == "a\nb");
}

TEST_CASE("llama2 refuses a conversation whose roles do not alternate, as its template does") {
  const ChatTemplate t = chat_template_from_name("llama2");
  const std::vector<ChatMessage> bad = {{"system", "s"}, {"user", "a"}, {"user", "b"}};
  try {
    format_chat(t, bad, true);
    FAIL("non-alternating roles were accepted");
  } catch (const Error& e) {
    CHECK(has(e.what(), "llama2 chat template: after an optional system message, roles must alternate "
                        "user/assistant (message 2 is 'user')"));
  }
}

TEST_CASE("SmolLM2: its GGUF template formats a prompt whose turn ends at an end-of-generation token") {
  const GgufFile f = GgufFile::open(test::fixtures_dir() + "/bpe/smollm2-vocab.gguf");
  const ChatTemplate t = detect_chat_template(f.get_string("tokenizer.chat_template"));
  REQUIRE(t.kind == ChatTemplateKind::ChatML);
  const auto tok = load_gguf_tokenizer(f);
  const int32_t end = tok->piece_to_id(chat_end_of_turn(t));
  CHECK(end == 2);
  CHECK(tok->is_end_of_generation(end));
  const std::vector<ChatMessage> chat = {{"user", "Hi"}};
  const std::vector<int32_t> ids = tok->encode(format_chat(t, chat, true), !chat_template_adds_bos(t), false, true);
  REQUIRE(ids.size() > 4);
  CHECK(ids.front() == tok->piece_to_id("<|im_start|>"));
  CHECK(std::count(ids.begin(), ids.end(), end) == 2);  // after the default system message and after "Hi"
}
