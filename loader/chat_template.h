// Chat templates: a conversation of {role, content} messages to the prompt text a chat model was trained on.
// qkd does not run Jinja. It recognises which known template a model's Jinja text is (GGUF
// tokenizer.chat_template, or tokenizer_config.json's "chat_template") by its distinctive markers and formats
// in C++ exactly as transformers' apply_chat_template renders that template:
//   llama2  Llama-2-chat:  <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...
//           (contents stripped; roles must alternate user/assistant after an optional system message)
//   llama3  Llama-3-Instruct: <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
//           (contents stripped)
//   chatml  SmolLM2, Qwen, OpenHermes: <|im_start|>{role}\n{content}<|im_end|>\n, with the template's own
//           default system message when the conversation has none
//   zephyr  Zephyr, TinyLlama-chat: <|{role}|>\n{content}</s>\n (only system, user and assistant roles)
//   none    the contents joined by newlines, no markers
// The formatted text holds special tokens as text; encode it with parse_special = true, and with add_bos = false
// when chat_template_adds_bos() (the template writes the BOS itself).
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qkd {

enum class ChatTemplateKind { None, Llama2, Llama3, ChatML, Zephyr };

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

struct ChatTemplate {
  ChatTemplateKind kind = ChatTemplateKind::None;
  std::string default_system;  // chatml: written as the system message when the conversation has none
  std::string bos_token;       // the texts the template writes for bos_token / eos_token (defaults per kind)
  std::string eos_token;
};

const char* chat_template_name(ChatTemplateKind kind);  // "llama2", "llama3", "chatml", "zephyr", "none"

// A template by name, for --chat-template; throws qkd::Error listing the names for an unknown one.
ChatTemplate chat_template_from_name(std::string_view name);

// Recognises a Jinja chat template by its markers. An empty text, or one that matches no known template, gives
// none and, in *message, one line saying so (for stderr); so does a known family formatted only approximately
// (Llama 3.1's date header). *message is "" otherwise.
ChatTemplate detect_chat_template(std::string_view jinja, std::string* message = nullptr);

// The prompt text for a conversation; add_generation_prompt appends the opening of an assistant turn.
// Throws qkd::Error when the conversation breaks the template's rules (llama2: roles must alternate).
std::string format_chat(const ChatTemplate& tmpl, std::span<const ChatMessage> messages, bool add_generation_prompt);

// The text that ends a turn ("<|im_end|>", "<|eot_id|>", "</s>"; "" for none): generation stops at its token.
std::string chat_end_of_turn(const ChatTemplate& tmpl);

// True when format_chat writes the BOS token itself (llama2, llama3).
bool chat_template_adds_bos(const ChatTemplate& tmpl);

}  // namespace qkd
