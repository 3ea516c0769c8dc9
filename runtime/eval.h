// Perplexity of a model on a text corpus. The rule, exactly (the trainer's data pipeline reuses the first two
// steps, so train and eval see the same token stream):
//
// 1. split_documents: the text is cut into lines at '\n'. A line is blank when it is empty or holds only
//    ' ', '\t', '\r', '\v', '\f'. Documents are the maximal runs of non-blank lines; one or more blank lines
//    separate them. A document's text is the bytes of its run exactly as in the file (inner line breaks kept,
//    including the '\r' of CRLF files), minus any '\r' and '\n' characters at its start and end: the stripping
//    removes only newline characters, so leading indentation and trailing spaces are kept.
// 2. tokenize_documents: each document becomes BOS + encode(text) + EOS (Tokenizer::encode with add_bos and
//    add_eos), and the documents' tokens are concatenated in order into one stream.
// 3. evaluate: the stream is scored in non-overlapping windows x = stream[i : i + ctx + 1] for i = 0, ctx,
//    2 ctx, ... while the window has at least 2 tokens (the last one may be shorter). Each window runs x[:-1]
//    with a fresh cache (start_pos 0) and scores the prediction of x[1:]: NLL_t = logsumexp(logits_t) -
//    logits_t[x[t + 1]], a numerically stable log-softmax in double. Every stream token but the first of each
//    window is scored once. n_tokens = number of scored tokens, mean_nll = sum NLL / n_tokens (nats),
//    perplexity = exp(mean_nll).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "loader/tokenizer.h"
#include "runtime/model.h"

namespace qkd::runtime {

// Views into `text`, which must outlive them.
std::vector<std::string_view> split_documents(std::string_view text);

std::vector<int32_t> tokenize_documents(const Tokenizer& tok, std::span<const std::string_view> docs);

// Steps 1 and 2 over text files, concatenated in order. Throws qkd::Error naming `flag` and the file when it
// cannot be read or holds no document.
std::vector<int32_t> tokenize_text_files(const std::vector<std::string>& paths, const Tokenizer& tok,
                                         const std::string& flag);

struct EvalResult {
  int64_t n_tokens = 0;   // tokens scored
  int64_t n_windows = 0;
  double mean_nll = 0.0;  // nats per token
  double perplexity = 0.0;
  // with a reference model (e.g. the teacher of a quantized student), over the same scored tokens:
  bool has_reference = false;
  double mean_kl = 0.0;         // mean KL(reference || model) per token, nats (softmax at temperature 1)
  double top1_agreement = 0.0;  // fraction of tokens whose argmax matches the reference's
};

// windows_done / windows_total after each batch of windows.
using EvalProgress = std::function<void(int64_t windows_done, int64_t windows_total)>;

// Scores `stream` by the rule above. ctx must be in [1, model.ctx()]; windows run max_batch() at a time (fewer
// when their logits would pass 256 MiB). Throws qkd::Error when the stream has fewer than 2 tokens. With a
// reference model, it also runs the reference on every window and fills the KL and top-1 agreement fields.
EvalResult evaluate(Model& model, std::span<const int32_t> stream, int ctx, const EvalProgress& progress = {},
                    Model* reference = nullptr);

}  // namespace qkd::runtime
