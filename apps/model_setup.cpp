#include "apps/model_setup.h"

#include <cstdio>
#include <filesystem>

#include <fmt/format.h>

#include "kernels/error.h"
#include "loader/gguf.h"

namespace qkd::cli {

std::string format_count(double n) {
  if (n >= 1e9) return fmt::format("{:.1f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.1f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

static double count_params(const ModelWeights& w) {
  double n = static_cast<double>(w.tok_embeddings.numel()) + static_cast<double>(w.norm.numel());
  if (!w.config.tied_embeddings) n += static_cast<double>(w.lm_head.numel());
  for (const LayerWeights& l : w.layers)
    for (const TensorView* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down})
      n += static_cast<double>(t->numel());
  return n;
}

LoadedApp load_for_app(const char* prog, const ModelFlags& flags, int default_ctx, int max_batch) {
  ModelFlags f = flags;
  if (f.model.empty()) {
    f.model = default_model_path();
    if (f.model.empty() || !std::filesystem::is_regular_file(f.model))
      throw UsageError(fmt::format("no model given (-m PATH), and the default model is not at {}: run "
                                   "tools/fetch-default-model.sh to download it",
                                   f.model.empty() ? "~/.cache/qkd/models" : f.model));
    std::fprintf(stderr, "%s: no -m given: using the default model SmolLM2-135M-Instruct (GGUF Q4_1), %s\n", prog,
                 f.model.c_str());
  }
  const runtime::BackendKind backend = runtime::parse_backend(flags.backend);
  if (flags.ctx < 0) throw UsageError(fmt::format("-c/--ctx: {} is negative", flags.ctx));

  LoadedApp app;
  app.bundle = load_bundle(f.model, f.tokenizer);
  const ModelConfig& c = app.bundle.weights.config;
  int ctx = flags.ctx > 0 ? flags.ctx : default_ctx > 0 ? default_ctx : c.max_seq_len;
  if (c.max_seq_len > 0 && ctx > c.max_seq_len) {
    std::fprintf(stderr, "%s: warning: -c %d is longer than the model's maximum context %d; using %d\n", prog, ctx,
                 c.max_seq_len, c.max_seq_len);
    ctx = c.max_seq_len;
  }
  std::fprintf(stderr, "%s: model %s (%s, %s parameters, dim %d, %d layers, %d/%d heads, vocab %d), tokenizer %s\n",
               prog, app.bundle.weights.source.c_str(), app.bundle.weights.format.c_str(),
               format_count(count_params(app.bundle.weights)).c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads,
               c.vocab_size, app.bundle.tokenizer_path.c_str());
  runtime::ModelOptions opt;
  opt.max_batch = max_batch;
  opt.ctx = ctx;
  opt.backend = backend;
  app.model = runtime::make_model(app.bundle.weights, opt);
  std::fprintf(stderr, "%s: backend %s, context %d\n", prog, runtime::backend_name(app.model->backend()),
               app.model->ctx());
  return app;
}

}  // namespace qkd::cli
