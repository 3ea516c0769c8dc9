// qkd-analyze: which projections does int4 quantization hurt most? Quantizes one projection type at a time and
// reports the forward and backward damage against the full-precision model (train/analyze.h), ranked, with a
// suggested --freeze list for qkd-train.
#include <cstdio>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/cli.h"
#include "kernels/error.h"
#include "loader/bundle.h"
#include "loader/int4_checkpoint.h"
#include "train/analyze.h"
#include "train/config.h"
#include "train/data.h"

int main(int argc, char** argv) {
  return qkd::cli::run_app("qkd-analyze", [&] {
    std::string model_path, data, backend = "auto";
    int bits = 4, group = 128, seq = 256, batch = 4;
    bool json = false;
    qkd::cli::ArgParser p("qkd-analyze",
                          "Quantizes one projection type (q, k, v, o, gate, up, down) at a time and ranks the damage "
                          "each does on its own: logits and per-layer output error, and the error of the gradients "
                          "reaching the other layers.");
    p.add("-m,--teacher", &model_path, "PATH", "the full-precision model");
    p.add("--data", &data, "FILES", "comma-separated text files; the first --batch windows are used");
    p.add("--backend", &backend, "NAME", "auto, cpu or cuda");
    p.add("--bits", &bits, "N", "bits of the quantized projection, 2..4");
    p.add("--group-size", &group, "N", "32, 64, 128, or 0 for per-channel");
    p.add("--seq-len", &seq, "N", "tokens per window");
    p.add("--batch", &batch, "N", "windows");
    p.add_switch("--json", &json, "print one JSON object");
    if (!p.parse(argc, argv)) return 0;
    if (model_path.empty()) throw qkd::cli::UsageError("--teacher PATH is required");
    if (data.empty()) throw qkd::cli::UsageError("--data FILES is required");
    if (seq < 2 || batch < 1) throw qkd::cli::UsageError(fmt::format("--seq-len {} / --batch {} invalid", seq, batch));
    if (group != 0 && group != 32 && group != 64 && group != 128)
      throw qkd::cli::UsageError(fmt::format("--group-size: {} is not 32, 64, 128 or 0", group));
    const qkd::ModelBundle b = qkd::load_bundle(model_path);
    const qkd::train::Windows w =
        qkd::train::make_windows(qkd::train::tokenize_files(qkd::train::split_list(data), *b.tokenizer), seq);
    if (w.count() < batch) qkd::fail("--data: {} windows of {} tokens, --batch needs {}", w.count(), seq + 1, batch);
    std::vector<int32_t> win(w.tokens.begin(), w.tokens.begin() + static_cast<int64_t>(batch) * (seq + 1));
    qkd::train::AnalyzeOptions o;
    o.backend = qkd::runtime::parse_backend(backend);
    o.bits = bits;
    o.group_size = group == 0 ? qkd::kInt4PerChannel : group;
    o.seq_len = seq;
    o.batch = batch;
    const qkd::train::AnalyzeResult r = qkd::train::analyze_projections(b.weights, win, o);
    if (json) {
      nlohmann::json j{{"model", model_path}, {"bits", bits}, {"group_size", group}, {"tokens", batch * seq},
                       {"backend", r.backend}, {"suggested_freeze", qkd::format_int4_modules(r.suggested_freeze)}};
      for (const auto& d : r.ranked)
        j["ranked"].push_back({{"module", qkd::int4_module_name(d.module)}, {"logits_rel", d.logits_rel},
                               {"layer_rel", d.layer_rel}, {"grad_rel_mean", d.grad_rel_mean},
                               {"grad_rel_max", d.grad_rel_max}, {"weight_rel", d.weight_rel}});
      std::printf("%s\n", j.dump().c_str());
      return 0;
    }
    std::printf("%-6s %12s %12s %14s %13s %12s\n", "module", "logits err", "last layer", "grad err mean",
                "grad err max", "weight err");
    for (const auto& d : r.ranked)
      std::printf("%-6s %12.5f %12.5f %14.5f %13.5f %12.5f\n", qkd::int4_module_name(d.module), d.logits_rel,
                  d.layer_rel.empty() ? 0.0 : d.layer_rel.back(), d.grad_rel_mean, d.grad_rel_max, d.weight_rel);
    std::printf("suggested --freeze %s\n", qkd::format_int4_modules(r.suggested_freeze).c_str());
    return 0;
  });
}
