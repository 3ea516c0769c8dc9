#include "runtime/eval.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "kernels/error.h"

namespace qkd::runtime {

namespace {

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\v\f") == std::string_view::npos;
}

std::string_view strip_newlines(std::string_view s) {
  const size_t b = s.find_first_not_of("\r\n");
  if (b == std::string_view::npos) return {};
  const size_t e = s.find_last_not_of("\r\n");
  return s.substr(b, e - b + 1);
}

// NLL of each row of logits [n, vocab] predicting targets [n], as a log-softmax in double, into nll[n]. Rows
// are independent, so they run in parallel; the caller sums them in row order, which keeps the total bit-identical
// to a serial loop whatever the thread count (the exps in double are most of qkd-eval's time).
void row_nll(const float* logits, const int32_t* targets, int n, int vocab, double* nll) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < n; ++t) {
    const float* row = logits + static_cast<int64_t>(t) * vocab;
    const double mx = *std::max_element(row, row + vocab);
    double z = 0.0;
    for (int v = 0; v < vocab; ++v) z += std::exp(row[v] - mx);
    nll[t] = mx + std::log(z) - row[targets[t]];
  }
}

}  // namespace

std::vector<std::string_view> split_documents(std::string_view text) {
  std::vector<std::string_view> docs;
  size_t doc_begin = std::string_view::npos;  // start of the current run of non-blank lines
  size_t doc_end = 0;                         // end of its last non-blank line
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    const std::string_view line = text.substr(pos, eol - pos);
    if (is_blank(line)) {
      if (doc_begin != std::string_view::npos) {
        docs.push_back(strip_newlines(text.substr(doc_begin, doc_end - doc_begin)));
        doc_begin = std::string_view::npos;
      }
    } else {
      if (doc_begin == std::string_view::npos) doc_begin = pos;
      doc_end = eol;
    }
    pos = eol + 1;
  }
  if (doc_begin != std::string_view::npos) docs.push_back(strip_newlines(text.substr(doc_begin, doc_end - doc_begin)));
  return docs;
}

std::vector<int32_t> tokenize_documents(const Tokenizer& tok, std::span<const std::string_view> docs) {
  std::vector<int32_t> stream;
  for (std::string_view d : docs) {
    const std::vector<int32_t> ids = tok.encode(d, /*add_bos=*/true, /*add_eos=*/true);
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  return stream;
}

std::vector<int32_t> tokenize_text_files(const std::vector<std::string>& paths, const Tokenizer& tok,
                                         const std::string& flag) {
  std::vector<int32_t> stream;
  for (const std::string& p : paths) {
    std::ifstream f(p, std::ios::binary);
    QKD_CHECK(f.good(), "{} {}: cannot open the file", flag, p);
    std::stringstream ss;
    ss << f.rdbuf();
    QKD_CHECK(!f.bad(), "{} {}: read error", flag, p);
    const std::string text = ss.str();
    const auto docs = split_documents(text);
    QKD_CHECK(!docs.empty(), "{} {}: the file holds no text", flag, p);
    const std::vector<int32_t> t = tokenize_documents(tok, docs);
    stream.insert(stream.end(), t.begin(), t.end());
  }
  return stream;
}

namespace {
// Per row r: KL(softmax(ref) || softmax(z)) in double into kl[r], and whether the argmaxes agree (lowest index on
// ties) into agree[r]. Parallel over rows like row_nll, summed in row order by the caller.
void compare_rows(const float* z, const float* ref, int rows, int vocab, double* kl, uint8_t* agree) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const float* a = z + static_cast<int64_t>(r) * vocab;
    const float* b = ref + static_cast<int64_t>(r) * vocab;
    int arg_a = 0, arg_b = 0;
    for (int i = 1; i < vocab; ++i) {
      if (a[i] > a[arg_a]) arg_a = i;
      if (b[i] > b[arg_b]) arg_b = i;
    }
    agree[r] = arg_a == arg_b;
    double sa = 0.0, sb = 0.0;
    for (int i = 0; i < vocab; ++i) {
      sa += std::exp(static_cast<double>(a[i]) - a[arg_a]);
      sb += std::exp(static_cast<double>(b[i]) - b[arg_b]);
    }
    const double lse_a = a[arg_a] + std::log(sa), lse_b = b[arg_b] + std::log(sb);
    double k = 0.0;
    for (int i = 0; i < vocab; ++i) {
      const double lpb = b[i] - lse_b;
      k += std::exp(lpb) * (lpb - (a[i] - lse_a));
    }
    kl[r] = k;
  }
}
}  // namespace

EvalResult evaluate(Model& model, std::span<const int32_t> stream, int ctx, const EvalProgress& progress,
                    Model* reference) {
  if (reference != nullptr) {
    QKD_CHECK(reference->config().vocab_size == model.config().vocab_size,
              "evaluate: the reference model's vocabulary ({}) differs from the model's ({})",
              reference->config().vocab_size, model.config().vocab_size);
    QKD_CHECK(ctx <= reference->ctx(), "evaluate: window length (-c) {} is longer than the reference model's context {}",
              ctx, reference->ctx());
  }
  QKD_CHECK(ctx >= 1 && ctx <= model.ctx(), "evaluate: window length (-c) {} must be in [1, {}] (the model's context)",
            ctx, model.ctx());
  const int64_t n = static_cast<int64_t>(stream.size());
  QKD_CHECK(n >= 2, "evaluate: the token stream has {} tokens; at least 2 are needed to score one", n);
  const int vocab = model.config().vocab_size;
  // Inputs are checked by the model; the last token is only ever a target, so check the whole stream here.
  for (int64_t i = 0; i < n; ++i) {
    QKD_CHECK(stream[i] >= 0 && stream[i] < vocab, "evaluate: token {} at stream index {} is outside the vocabulary (vocab_size {})",
              stream[i], i, vocab);
  }
  const int64_t n_windows = (n - 2) / ctx + 1;  // window w starts at w * ctx and needs 2 tokens there
  const int64_t full_windows = std::min(n_windows, (n - 1) / ctx);  // windows with all ctx + 1 tokens

  const int64_t logits_cap = (int64_t{256} << 20) / (static_cast<int64_t>(ctx) * vocab * sizeof(float));
  const int max_batch = static_cast<int>(std::clamp<int64_t>(
      logits_cap, 1, reference != nullptr ? std::min(model.max_batch(), reference->max_batch()) : model.max_batch()));
  std::vector<float> logits(static_cast<size_t>(max_batch) * ctx * vocab);
  std::vector<float> ref_logits(reference != nullptr ? logits.size() : 0);
  double total_kl = 0.0;
  int64_t agree = 0;
  std::vector<int32_t> inputs(static_cast<size_t>(max_batch) * ctx);
  std::vector<int32_t> targets(inputs.size());
  const std::vector<int32_t> start_pos(max_batch, 0);
  std::vector<double> nll_rows(inputs.size()), kl_rows(reference != nullptr ? inputs.size() : 0);
  std::vector<uint8_t> agree_rows(kl_rows.size());

  EvalResult r;
  double total_nll = 0.0;
  for (int64_t w = 0; w < n_windows;) {
    // Full windows run together; the short last one runs alone with its own length.
    const int64_t batch = w < full_windows ? std::min<int64_t>(max_batch, full_windows - w) : 1;
    const int64_t begin = w * ctx;
    const int len = static_cast<int>(std::min<int64_t>(ctx, n - 1 - begin));  // tokens predicted per window
    for (int64_t b = 0; b < batch; ++b) {
      const int32_t* x = stream.data() + begin + b * ctx;
      std::copy(x, x + len, inputs.begin() + b * len);
      std::copy(x + 1, x + 1 + len, targets.begin() + b * len);
    }
    const size_t used = static_cast<size_t>(batch) * len;
    model.forward(std::span<const int32_t>(inputs.data(), used), static_cast<int>(batch), len,
                  std::span<const int32_t>(start_pos.data(), batch), LogitsMode::All, logits.data());
    row_nll(logits.data(), targets.data(), static_cast<int>(used), vocab, nll_rows.data());
    for (size_t t = 0; t < used; ++t) total_nll += nll_rows[t];
    if (reference != nullptr) {
      reference->forward(std::span<const int32_t>(inputs.data(), used), static_cast<int>(batch), len,
                         std::span<const int32_t>(start_pos.data(), batch), LogitsMode::All, ref_logits.data());
      compare_rows(logits.data(), ref_logits.data(), static_cast<int>(used), vocab, kl_rows.data(), agree_rows.data());
      for (size_t t = 0; t < used; ++t) {
        total_kl += kl_rows[t];
        agree += agree_rows[t];
      }
    }
    r.n_tokens += static_cast<int64_t>(used);
    w += batch;
    if (progress) progress(w, n_windows);
  }
  r.n_windows = n_windows;
  r.mean_nll = total_nll / static_cast<double>(r.n_tokens);
  r.perplexity = std::exp(r.mean_nll);
  if (reference != nullptr) {
    r.has_reference = true;
    r.mean_kl = total_kl / static_cast<double>(r.n_tokens);
    r.top1_agreement = static_cast<double>(agree) / static_cast<double>(r.n_tokens);
  }
  return r;
}

}  // namespace qkd::runtime
