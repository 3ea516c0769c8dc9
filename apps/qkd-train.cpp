// qkd-train: quantization-aware distillation of a bf16 teacher into an int4 student (or cross-entropy
// pretraining), train/trainer.h. Settings come from --config FILE.json, from flags, or both (flags win).
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "apps/cli.h"
#include "kernels/error.h"
#include "train/config.h"
#include "train/trainer.h"

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_sigint(int) { g_stop.store(true); }
}  // namespace

int main(int argc, char** argv) {
  return qkd::cli::run_app("qkd-train", [&] {
    qkd::train::TrainConfig c;
    // The JSON file is read first, wherever --config appears, so that every flag overrides it.
    for (int i = 1; i + 1 < argc; ++i)
      if (std::strcmp(argv[i], "--config") == 0) qkd::train::read_config_json(argv[i + 1], c);
    std::string config_path;
    bool no_progress = false;
    qkd::cli::ArgParser p("qkd-train",
                          "Quantization-aware knowledge distillation into an int4 student, with o_proj and v_proj "
                          "frozen as int4 by default (ov-freeze). Writes OUT/checkpoint, OUT/metrics.jsonl and the "
                          "int4 student OUT/model.");
    p.add("--config", &config_path, "FILE", "JSON settings (keys are the flag names with '_' for '-')");
    p.add("--mode", &c.mode, "MODE", "distill (KL to the teacher) or pretrain (cross-entropy only)");
    p.add("--teacher", &c.teacher, "PATH", "the teacher model (HF directory, GGUF, llama2.c, qkd int4)");
    p.add("--init", &c.init, "PATH", "the student's starting weights (default: the teacher)");
    p.add("--init-scales", &c.init_scales, "DIR",
          "a qkd int4 checkpoint (e.g. qkd-quantize --gptq) whose scales start the learned step sizes and whose "
          "codes and scales the frozen layers take as they are (symmetric, the same group size, --bits 4)");
    p.add("--out", &c.out, "DIR", "output directory");
    p.add("--backend", &c.backend, "NAME", "auto, cpu or cuda");
    p.add("--gpus", &c.gpus, "N", "data parallel over N GPUs of this host through NCCL");
    p.add("--bits", &c.bits, "N", "weight bits of the student, 2..8 (16: no quantization)");
    p.add("--group-size", &c.group_size, "N", "quantization group: 32, 64, 128, or 0 for per-channel");
    p.add("--freeze", &c.freeze, "LIST", "linear layers quantized once and frozen: none or a list of q,k,v,o,gate,up,down");
    p.add_switch("--clip", &c.clip, "learn a clipping factor per module (module-wise dynamic scaling)");
    p.add_switch("--clip-search", &c.clip_search,
                 "start the frozen layers and the step sizes from a per-group clip search, not the full range");
    p.add("--data", &c.data, "FILES", "comma-separated training text files");
    p.add("--val-data", &c.val_data, "FILES", "comma-separated validation text files (default: the tail of --data)");
    p.add("--val-fraction", &c.val_fraction, "F", "fraction of --data windows held out for validation");
    p.add("--teacher-data", &c.teacher_data, "N", "train on N sequences sampled from the teacher instead of --data");
    p.add("--seq-len", &c.seq_len, "N", "tokens per training sequence");
    p.add("--batch", &c.batch, "N", "sequences per optimizer step");
    p.add("--micro-batch", &c.micro_batch, "N", "sequences per forward/backward pass (gradient accumulation)");
    p.add("--kd-weight", &c.kd_weight, "W", "weight of the KL divergence to the teacher");
    p.add("--ce-weight", &c.ce_weight, "W", "weight of the cross-entropy on the data");
    p.add("--temperature", &c.temperature, "T", "distillation temperature");
    p.add("--contrastive-weight", &c.contrastive_weight, "W", "weight of token-level contrastive distillation");
    p.add("--contrastive-temperature", &c.contrastive_temperature, "T", "temperature of the contrastive loss");
    p.add("--steps", &c.steps, "N", "optimizer steps");
    p.add("--lr", &c.lr, "LR", "peak learning rate of the weights");
    p.add("--scale-lr", &c.scale_lr, "LR", "learning rate of the quantization scales (0: --lr)");
    p.add("--warmup", &c.warmup, "N", "linear warm-up steps before the cosine decay");
    p.add("--min-lr-ratio", &c.min_lr_ratio, "F", "final learning rate as a fraction of the peak");
    p.add("--weight-decay", &c.weight_decay, "W", "AdamW weight decay of the matrices");
    p.add("--beta1", &c.beta1, "B", "AdamW beta1");
    p.add("--beta2", &c.beta2, "B", "AdamW beta2");
    p.add("--eps", &c.eps, "E", "AdamW epsilon");
    p.add("--grad-clip", &c.grad_clip, "N", "clip the global gradient norm to N (0: off)");
    p.add("--seed", &c.seed, "N", "data order and teacher sampling seed");
    p.add("--eval-every", &c.eval_every, "N", "validation every N steps (0: only at the end)");
    p.add("--eval-windows", &c.eval_windows, "N", "validation windows used");
    p.add("--save-every", &c.save_every, "N", "checkpoint every N steps (0: only at the end)");
    p.add("--max-bad-steps", &c.max_bad_steps, "N", "abort after N consecutive non-finite steps");
    p.add_switch("--resume", &c.resume, "continue from OUT/checkpoint");
    p.add_switch("--no-progress", &no_progress, "no progress bar");
    p.add_switch("--export-f32", &c.export_f32,
                 "export the embeddings, LM head and norms in fp32 (default bf16, the copy the CUDA forward trained)");
    p.add("--metrics", &c.metrics, "FILE", "JSON-lines metrics (default OUT/metrics.jsonl)");
    if (!p.parse(argc, argv)) return 0;
    if (no_progress) c.progress = false;
    try {
      qkd::train::validate(c);
    } catch (const qkd::Error& e) {
      throw qkd::cli::UsageError(e.what());
    }
    std::signal(SIGINT, on_sigint);
    qkd::train::TrainHooks hooks;
    hooks.stop = &g_stop;
    const qkd::train::TrainResult r = qkd::train::run_training(c, hooks);
    if (r.stopped) return 130;
    std::printf("%s\n", r.model_dir.c_str());
    return 0;
  });
}
