#include "loader/chat_template.h"

#include <cstdint>

#include "kernels/error.h"

namespace qkd {

namespace {

bool contains(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

// Python's str.isspace() set (what str.strip() and Jinja's trim remove), for code points a template may meet.
bool is_py_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// The code point of the UTF-8 sequence s[at, at+n); n from the lead byte. Ill-formed input gives U+FFFD, which
// is not a space, so strip() stops there.
uint32_t code_point_at(std::string_view s, size_t at, size_t* n) {
  const auto b0 = static_cast<uint8_t>(s[at]);
  *n = b0 < 0x80 ? 1 : b0 < 0xE0 ? 2 : b0 < 0xF0 ? 3 : 4;
  if (at + *n > s.size()) {
    *n = 1;
    return 0xFFFD;
  }
  uint32_t cp = *n == 1 ? b0 : *n == 2 ? b0 & 0x1Fu : *n == 3 ? b0 & 0x0Fu : b0 & 0x07u;
  for (size_t k = 1; k < *n; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[at + k]) & 0x3Fu);
  return cp;
}

// Python's str.strip(): templates strip message contents with .strip() or | trim.
std::string strip(std::string_view s) {
  size_t begin = 0, n = 0;
  while (begin < s.size() && is_py_space(code_point_at(s, begin, &n))) begin += n;
  size_t end = s.size();
  while (end > begin) {
    size_t lead = end - 1;
    while (lead > begin && (static_cast<uint8_t>(s[lead]) & 0xC0) == 0x80) --lead;
    if (!is_py_space(code_point_at(s, lead, &n))) break;
    end = lead;
  }
  return std::string(s.substr(begin, end - begin));
}

// A chatml template's built-in system message: the text between "<|im_start|>system" + newline and
// "<|im_end|>" inside one Jinja string literal. The newline may be a real one (the template text holds it) or
// the escape \n inside the literal; escapes are undone as Jinja would.
std::string chatml_default_system(std::string_view t) {
  constexpr std::string_view kOpen = "<|im_start|>system";
  for (size_t at = t.find(kOpen); at != std::string_view::npos; at = t.find(kOpen, at + 1)) {
    std::string_view rest = t.substr(at + kOpen.size());
    if (rest.starts_with("\\n")) rest.remove_prefix(2);
    else if (rest.starts_with("\n")) rest.remove_prefix(1);
    else continue;
    const size_t close = rest.find("<|im_end|>");
    if (close == std::string_view::npos || close == 0) continue;
    const std::string_view raw = rest.substr(0, close);
    // Inside one literal: no unescaped quote and no Jinja tag.
    bool literal = !contains(raw, "{{") && !contains(raw, "{%") && !contains(raw, "}}") && !contains(raw, "%}");
    std::string text;
    for (size_t k = 0; literal && k < raw.size(); ++k) {
      const char ch = raw[k];
      if (ch == '\'' || ch == '"') {
        literal = false;
      } else if (ch == '\\' && k + 1 < raw.size()) {
        const char e = raw[++k];
        text += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      } else {
        text += ch;
      }
    }
    if (literal) return text;
  }
  return "";
}

std::string chat_role_error(std::string_view name) {
  return std::string(name) + " chat template: after an optional system message, roles must alternate user/assistant";
}

}  // namespace

const char* chat_template_name(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::None: return "none";
    case ChatTemplateKind::Llama2: return "llama2";
    case ChatTemplateKind::Llama3: return "llama3";
    case ChatTemplateKind::ChatML: return "chatml";
    case ChatTemplateKind::Zephyr: return "zephyr";
  }
  return "none";
}

ChatTemplate chat_template_from_name(std::string_view name) {
  ChatTemplate t;
  if (name == "none") {
    t.kind = ChatTemplateKind::None;
  } else if (name == "llama2") {
    t = {ChatTemplateKind::Llama2, "", "<s>", "</s>"};
  } else if (name == "llama3") {
    t = {ChatTemplateKind::Llama3, "", "<|begin_of_text|>", "<|eot_id|>"};
  } else if (name == "chatml") {
    t = {ChatTemplateKind::ChatML, "", "", "<|im_end|>"};
  } else if (name == "zephyr") {
    t = {ChatTemplateKind::Zephyr, "", "<s>", "</s>"};
  } else {
    fail("unknown chat template '{}' (known: llama2, llama3, chatml, zephyr, none)", name);
  }
  return t;
}

ChatTemplate detect_chat_template(std::string_view jinja, std::string* message) {
  std::string note;
  ChatTemplate t;
  if (jinja.empty()) {
    note = "the model has no chat template: using 'none' (choose one with --chat-template)";
  } else if (contains(jinja, "<|im_start|>") && contains(jinja, "<|im_end|>")) {
    t = chat_template_from_name("chatml");
    t.default_system = chatml_default_system(jinja);
  } else if (contains(jinja, "<|start_header_id|>") && contains(jinja, "<|eot_id|>")) {
    t = chat_template_from_name("llama3");
    if (contains(jinja, "Cutting Knowledge Date"))
      note = "the model's chat template is Llama 3.1-style: formatted as llama3, without its date header";
  } else if (contains(jinja, "[INST]") && contains(jinja, "<<SYS>>")) {
    t = chat_template_from_name("llama2");
  } else if (contains(jinja, "<|user|>") && contains(jinja, "<|assistant|>") && !contains(jinja, "<|end|>")) {
    t = chat_template_from_name("zephyr");
  } else {
    note = "the model's chat template is not one qkd knows (llama2, llama3, chatml, zephyr): using 'none' "
           "(choose one with --chat-template)";
  }
  if (message != nullptr) *message = note;
  return t;
}

std::string format_chat(const ChatTemplate& tmpl, std::span<const ChatMessage> messages, bool add_generation_prompt) {
  std::string out;
  switch (tmpl.kind) {
    case ChatTemplateKind::None:
      for (size_t k = 0; k < messages.size(); ++k) out += (k ? "\n" : "") + messages[k].content;
      break;
    case ChatTemplateKind::ChatML:
      if (!messages.empty() && messages[0].role != "system" && !tmpl.default_system.empty())
        out += "<|im_start|>system\n" + tmpl.default_system + "<|im_end|>\n";
      for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    case ChatTemplateKind::Llama3:
      for (size_t k = 0; k < messages.size(); ++k) {
        if (k == 0) out += tmpl.bos_token;
        out += "<|start_header_id|>" + messages[k].role + "<|end_header_id|>\n\n" + strip(messages[k].content) +
               "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatTemplateKind::Llama2: {
      // Llama-2-chat has no generation prompt: a prompt ends with the user's [/INST].
      const bool has_system = !messages.empty() && messages[0].role == "system";
      const auto turns = messages.subspan(has_system ? 1 : 0);
      for (size_t k = 0; k < turns.size(); ++k) {
        const ChatMessage& m = turns[k];
        QKD_CHECK((m.role == "user") == (k % 2 == 0), "{} (message {} is '{}')", chat_role_error("llama2"),
                  k + (has_system ? 1 : 0), m.role);
        const std::string content =
            k == 0 && has_system ? "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + m.content : m.content;
        if (m.role == "user") out += tmpl.bos_token + "[INST] " + strip(content) + " [/INST]";
        else if (m.role == "assistant") out += " " + strip(content) + " " + tmpl.eos_token;
      }
      break;
    }
    case ChatTemplateKind::Zephyr:
      for (size_t k = 0; k < messages.size(); ++k) {
        const ChatMessage& m = messages[k];
        if (m.role == "user" || m.role == "system" || m.role == "assistant")
          out += "<|" + m.role + "|>\n" + m.content + tmpl.eos_token + "\n";
        if (k + 1 == messages.size() && add_generation_prompt) out += "<|assistant|>\n";
      }
      break;
  }
  return out;
}

std::string chat_end_of_turn(const ChatTemplate& tmpl) {
  switch (tmpl.kind) {
    case ChatTemplateKind::None: return "";
    case ChatTemplateKind::ChatML: return "<|im_end|>";
    case ChatTemplateKind::Llama3: return "<|eot_id|>";
    case ChatTemplateKind::Llama2:
    case ChatTemplateKind::Zephyr: return tmpl.eos_token;
  }
  return "";
}

bool chat_template_adds_bos(const ChatTemplate& tmpl) {
  return tmpl.kind == ChatTemplateKind::Llama2 || tmpl.kind == ChatTemplateKind::Llama3;
}

}  // namespace qkd
