// A model and the tokenizer that goes with it, resolved from the user's -m / --tokenizer flags:
//  - a GGUF file carries its own tokenizer and chat template;
//  - an HF directory holds tokenizer.model (and tokenizer_config.json's chat_template, when present);
//  - a llama2.c .bin has its tokenizer beside it: tokenizer.bin, tokenizer.model, or the one tok*.bin/tok*.model.
#pragma once

#include <memory>
#include <string>

#include "loader/model.h"
#include "loader/tokenizer.h"

namespace qkd {

struct ModelBundle {
  ModelWeights weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string tokenizer_path;  // where the tokenizer came from, for messages
  std::string chat_template;   // the model's own template text (Jinja), "" when it has none
};

// Throws qkd::Error naming the path when the model or its tokenizer cannot be found or read, and when the
// tokenizer's vocabulary is larger than the model's.
ModelBundle load_bundle(const std::string& model_path, const std::string& tokenizer_path = "");

// The tokenizer file that goes with a model path, or "" when none is found.
std::string find_tokenizer(const std::string& model_path);

}  // namespace qkd
