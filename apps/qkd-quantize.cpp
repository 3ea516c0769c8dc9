// qkd-quantize: int4 quantization of an HF, llama2.c or GGUF model into a qkd int4 checkpoint directory
// (loader/int4_checkpoint.h), or with --format gguf into a GGUF Q4_0 / Q4_1 file (loader/gguf_writer.h): round to
// nearest, or GPTQ with --gptq FILES (calibration Hessians from runtime/calibrate.h, kernels/int4_gptq.h).
// --clip-search picks each group's range by squared error among clipped candidates (Int4ScaleSearch::ClipMse).
// Prints each module's relative RMS quantization error to stderr.
#include <cstdio>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "apps/cli.h"
#include "apps/model_setup.h"
#include "kernels/error.h"
#include "loader/gguf_writer.h"
#include "loader/bundle.h"
#include "loader/int4_checkpoint.h"
#include "runtime/calibrate.h"
#include "runtime/eval.h"
#include "train/config.h"

namespace {

int parse_group_size(const std::string& s) {
  if (s == "channel") return qkd::kInt4PerChannel;
  if (s == "32" || s == "64" || s == "128") return std::stoi(s);
  throw qkd::cli::UsageError(fmt::format("--group-size: '{}' is not 32, 64, 128 or channel", s));
}

void print_summary(const qkd::Int4Quantized& q, const std::string& group) {
  const qkd::Int4Params& p = q.params;
  std::fprintf(stderr, "qkd-quantize: int4, group %s, %s, %s scales, modules %s, %s, quantizer %s\n", group.c_str(),
               p.sym == qkd::Int4Symmetry::Symmetric ? "symmetric" : "asymmetric",
               p.scale_type == qkd::ScaleType::BF16 ? "bf16" : "fp16", qkd::format_int4_modules(p.modules).c_str(),
               p.scale_search == qkd::Int4ScaleSearch::ClipMse ? "clip search" : "full-range groups",
               q.quantizer.c_str());
  for (const std::string& note : q.notes) std::fprintf(stderr, "qkd-quantize: warning: %s\n", note.c_str());
  std::fprintf(stderr, "qkd-quantize: %-8s %8s %10s %12s\n", "module", "tensors", "params", "rel_rms_err");
  for (const qkd::Int4ModuleError& e : q.errors)
    std::fprintf(stderr, "qkd-quantize: %-8s %8d %10s %12.6f\n", qkd::int4_module_name(e.module), e.tensors,
                 qkd::cli::format_count(static_cast<double>(e.params)).c_str(), e.rel_rms());
}

}  // namespace

int main(int argc, char** argv) {
  return qkd::cli::run_app("qkd-quantize", [&] {
    std::string model, out, format = "qkd", modules = "q,k,v,o,gate,up,down", gptq;
    std::optional<std::string> group, scale_type;
    // empty unless given, so that a GPTQ setting without --gptq is refused rather than ignored
    std::optional<int> gptq_tokens_flag;
    std::optional<float> gptq_damp_flag;
    bool sym = false, asym = false, quantize_embeddings = false, quantize_lm_head = false, force = false,
         clip_search = false;
    qkd::cli::ArgParser p("qkd-quantize",
                          "Int4 quantization of a model, round to nearest or GPTQ (--gptq), into a qkd int4 "
                          "checkpoint directory (or a GGUF Q4_0/Q4_1 file with --format gguf).");
    p.add("-m,--model", &model, "PATH", "the model: an HF directory, a llama2.c .bin or a .gguf");
    p.add("-o,--output", &out, "PATH", "the checkpoint directory (qkd) or file (gguf) to write");
    p.add("--format", &format, "qkd|gguf", "qkd int4 checkpoint, or GGUF Q4_0 (--sym) / Q4_1 (--asym)");
    p.add("--group-size", &group, "32|64|128|channel", "columns per scale (default 128; gguf: 32)");
    p.add_switch("--sym", &sym, "symmetric groups: a scale each (the default)");
    p.add_switch("--asym", &asym, "asymmetric groups: a scale and a min each");
    p.add("--scale-type", &scale_type, "bf16|fp16", "storage type of scales and mins (default bf16; gguf: fp16)");
    p.add("--modules", &modules, "LIST", "linear modules to quantize, from q,k,v,o,gate,up,down");
    p.add_switch("--quantize-embeddings", &quantize_embeddings, "quantize the token embeddings too");
    p.add_switch("--quantize-lm-head", &quantize_lm_head, "quantize the LM head too");
    p.add_switch("--clip-search", &clip_search,
                 "per group, also try ranges clipped to 0.975..0.525 of max|w| and keep the least squared error");
    p.add("--gptq", &gptq, "FILES",
          "GPTQ with calibration text (comma-separated files; documents as qkd-eval reads them), not round to "
          "nearest; never calibrate on the text you evaluate on");
    p.add("--gptq-tokens", &gptq_tokens_flag, "N",
          fmt::format("calibration tokens, in windows of min(context, 512) (default: {})",
                      qkd::runtime::kCalibrationTokens));
    p.add("--gptq-damp", &gptq_damp_flag, "F",
          fmt::format("GPTQ dampening, a fraction of the Hessian's mean diagonal, in (0, 1) (default: {})",
                      qkd::kGptqDefaultDamp));
    p.add_switch("--force", &force, "replace an existing output (only a qkd checkpoint or a GGUF file)");
    if (!p.parse(argc, argv)) return 0;

    if (model.empty()) throw qkd::cli::UsageError("-m PATH is required");
    if (out.empty()) throw qkd::cli::UsageError("-o PATH is required");
    if (format != "qkd" && format != "gguf")
      throw qkd::cli::UsageError(fmt::format("--format: '{}' is not qkd or gguf", format));
    if (sym && asym) throw qkd::cli::UsageError("--sym and --asym exclude each other");
    const std::vector<std::string> gptq_files = qkd::train::split_list(gptq);
    if (!gptq.empty() && gptq_files.empty()) throw qkd::cli::UsageError(fmt::format("--gptq: '{}' names no file", gptq));
    if (gptq.empty() && (gptq_tokens_flag || gptq_damp_flag))
      throw qkd::cli::UsageError(fmt::format("{} is a GPTQ setting: give --gptq FILES too",
                                             gptq_tokens_flag ? "--gptq-tokens" : "--gptq-damp"));
    const int gptq_tokens = gptq_tokens_flag.value_or(static_cast<int>(qkd::runtime::kCalibrationTokens));
    const float gptq_damp = gptq_damp_flag.value_or(static_cast<float>(qkd::kGptqDefaultDamp));
    if (!(gptq_damp > 0.0f && gptq_damp < 1.0f))
      throw qkd::cli::UsageError(fmt::format("--gptq-damp: {} is not in (0, 1)", gptq_damp));
    if (gptq_tokens <= 0) throw qkd::cli::UsageError(fmt::format("--gptq-tokens: {} is not positive", gptq_tokens));
    const bool gguf = format == "gguf";
    qkd::Int4Params params;
    params.sym = asym ? qkd::Int4Symmetry::Asymmetric : qkd::Int4Symmetry::Symmetric;
    params.scale_search = clip_search ? qkd::Int4ScaleSearch::ClipMse : qkd::Int4ScaleSearch::None;
    const std::string group_text = group.value_or(gguf ? "32" : "128");
    params.group_size = parse_group_size(group_text);
    const std::string scale_text = scale_type.value_or(gguf ? "fp16" : "bf16");
    if (scale_text != "bf16" && scale_text != "fp16")
      throw qkd::cli::UsageError(fmt::format("--scale-type: '{}' is not bf16 or fp16", scale_text));
    params.scale_type = scale_text == "bf16" ? qkd::ScaleType::BF16 : qkd::ScaleType::FP16;
    if (gguf && (params.group_size != 32 || params.scale_type != qkd::ScaleType::FP16))
      throw qkd::cli::UsageError(fmt::format("--format gguf writes Q4_0/Q4_1, which are group 32 with fp16 scales; "
                                             "--group-size {} --scale-type {} cannot be stored there",
                                             group_text, scale_text));
    try {
      params.modules = qkd::parse_int4_modules(modules, "--modules");
    } catch (const qkd::Error& e) {
      throw qkd::cli::UsageError(e.what());
    }
    if ((params.modules & qkd::kInt4LinearModules) == 0) throw qkd::cli::UsageError("--modules: nothing to quantize");
    if (quantize_embeddings) params.modules |= qkd::int4_module_bit(qkd::Int4Module::Embed);
    if (quantize_lm_head) params.modules |= qkd::int4_module_bit(qkd::Int4Module::LmHead);
    const qkd::Overwrite overwrite = force ? qkd::Overwrite::Replace : qkd::Overwrite::Refuse;

    // Before the slow part: a refused output should not cost a quantization run.
    if (gguf) {
      qkd::check_gguf_output(out, overwrite);
    } else {
      qkd::check_int4_output(out, overwrite);
    }
    // GPTQ tokenizes its calibration text, so it loads the tokenizer with the model.
    qkd::ModelBundle b;
    if (gptq_files.empty()) {
      b.weights = qkd::load_model(model);
    } else {
      b = qkd::load_bundle(model);
    }
    const qkd::ModelWeights& src = b.weights;
    std::fprintf(stderr, "qkd-quantize: model %s (%s, dim %d, %d layers, vocab %d)\n", model.c_str(),
                 src.format.c_str(), src.config.dim, src.config.n_layers, src.config.vocab_size);
    std::optional<qkd::Int4Calibration> calibration;
    if (!gptq_files.empty()) {
      const std::vector<int32_t> stream = qkd::runtime::tokenize_text_files(gptq_files, *b.tokenizer, "--gptq");
      qkd::runtime::CalibrationOptions co;
      co.tokens = gptq_tokens;
      co.percdamp = gptq_damp;
      try {
        calibration = qkd::runtime::collect_hessians(src, stream, co);
      } catch (const qkd::Error& e) {
        qkd::fail("--gptq {} (--gptq-tokens {}): {}", gptq, gptq_tokens, e.what());
      }
      std::fprintf(stderr, "qkd-quantize: GPTQ calibration on %lld tokens of %s (of %zu), percdamp %g\n",
                   static_cast<long long>(calibration->tokens), gptq.c_str(), stream.size(), gptq_damp);
    }
    const qkd::Int4Quantized q = qkd::quantize_model_int4(src, params, calibration ? &*calibration : nullptr);
    print_summary(q, group_text);

    if (gguf) {
      qkd::export_gguf(out, q, overwrite);
    } else {
      const std::vector<std::string> companions = qkd::int4_companion_files(src);
      qkd::write_int4_checkpoint(out, q, companions, overwrite);
      if (companions.empty() && q.source_format != "gguf")
        std::fprintf(stderr, "qkd-quantize: warning: no tokenizer found beside %s; the checkpoint has none (give "
                             "qkd-run --tokenizer PATH)\n", model.c_str());
    }
    std::fprintf(stderr, "qkd-quantize: wrote %s\n", out.c_str());
    return 0;
  });
}
