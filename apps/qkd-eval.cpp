// qkd-eval: perplexity of a text file under a model, by the rule written in runtime/eval.h and the README.
#include <cstdio>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "apps/cli.h"
#include "apps/model_setup.h"
#include "kernels/error.h"
#include "loader/mmap_file.h"
#include "runtime/eval.h"

int main(int argc, char** argv) {
  return qkd::cli::run_app("qkd-eval", [&] {
    qkd::cli::ModelFlags mf;
    mf.ctx = 512;
    std::string text_path;
    std::string teacher_path;
    int batch = 4;
    bool json = false;
    qkd::cli::ArgParser p("qkd-eval", "Perplexity of a text file: documents split at blank lines, each BOS + text + "
                                      "EOS, scored in non-overlapping windows of --ctx tokens.");
    qkd::cli::add_model_flags(p, mf, "window length in tokens");
    p.add("--text", &text_path, "FILE", "the UTF-8 text to score");
    p.add("--batch", &batch, "N", "windows run together");
    p.add("--teacher", &teacher_path, "PATH",
          "also run this reference model (a student's teacher) and report the KL divergence to it and the top-1 "
          "agreement with it");
    p.add_switch("--json", &json, "print one JSON object instead of text");
    if (!p.parse(argc, argv)) return 0;
    if (text_path.empty()) throw qkd::cli::UsageError("--text FILE is required");
    if (mf.ctx <= 0) throw qkd::cli::UsageError(fmt::format("-c/--ctx: {} must be positive", mf.ctx));
    if (batch <= 0) throw qkd::cli::UsageError(fmt::format("--batch: {} must be positive", batch));

    const std::string text = qkd::read_text_file(text_path);
    if (const int64_t bad = qkd::find_invalid_utf8(text); bad >= 0)
      qkd::fail("{}: not valid UTF-8: byte 0x{:02x} at offset {}", text_path, static_cast<unsigned char>(text[bad]),
                bad);
    qkd::cli::LoadedApp app = qkd::cli::load_for_app("qkd-eval", mf, mf.ctx, batch);
    const int ctx = app.model->ctx();
    qkd::cli::LoadedApp teacher;
    if (!teacher_path.empty()) {
      qkd::cli::ModelFlags tf = mf;
      tf.model = teacher_path;
      tf.tokenizer.clear();
      tf.ctx = ctx;
      teacher = qkd::cli::load_for_app("qkd-eval", tf, ctx, batch);
    }
    const auto docs = qkd::runtime::split_documents(text);
    const std::vector<int32_t> stream = qkd::runtime::tokenize_documents(*app.bundle.tokenizer, docs);
    std::fprintf(stderr, "qkd-eval: %zu documents, %zu tokens, windows of %d\n", docs.size(), stream.size(), ctx);
    const qkd::runtime::EvalResult r = qkd::runtime::evaluate(*app.model, stream, ctx, [](int64_t done, int64_t total) {
      std::fprintf(stderr, "\rqkd-eval: window %lld/%lld", static_cast<long long>(done), static_cast<long long>(total));
      if (done == total) std::fprintf(stderr, "\n");
    }, teacher.model.get());
    if (json) {
      nlohmann::json j{{"model", app.bundle.weights.source}, {"text", text_path}, {"ctx", ctx},
                       {"backend", qkd::runtime::backend_name(app.model->backend())},
                       {"documents", docs.size()}, {"n_tokens", r.n_tokens}, {"n_windows", r.n_windows},
                       {"mean_nll", r.mean_nll}, {"perplexity", r.perplexity}};
      if (r.has_reference) {
        j["teacher"] = teacher_path;
        j["kl_to_teacher"] = r.mean_kl;
        j["top1_agreement"] = r.top1_agreement;
      }
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("tokens %lld  mean_nll %.6f  perplexity %.4f", static_cast<long long>(r.n_tokens), r.mean_nll,
                  r.perplexity);
      if (r.has_reference) std::printf("  kl_to_teacher %.6f  top1_agreement %.4f", r.mean_kl, r.top1_agreement);
      std::printf("\n");
    }
    return 0;
  });
}
