// qkd-train's settings: one struct, read from a JSON file (--config), from flags, or both (flags win). The JSON
// keys are the flag names without the leading dashes and with '_' for '-': "--micro-batch 2" is
// {"micro_batch": 2}. Every value is checked by validate() before any file is loaded or any memory allocated.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "loader/model.h"
#include "train/plan.h"

namespace qkd::train {

struct TrainConfig {
  // what to train
  std::string mode = "distill";    // distill | pretrain
  std::string teacher;             // distill: the bf16 teacher (any model qkd loads)
  std::string init;                // the student's starting weights; default: the teacher
  std::string init_scales;         // a qkd int4 checkpoint whose scales start the LSQ step sizes and whose codes and
                                   // scales the frozen layers take bit for bit (e.g. qkd-quantize --gptq)
  std::string out;                 // output directory: checkpoint/, model/ (the int4 export), metrics.jsonl
  std::string backend = "auto";    // auto | cpu | cuda
  int gpus = 1;                    // > 1: data parallel over that many GPUs (NCCL)
  // quantization
  int bits = 4;                    // 2..8, or 16 for no quantization
  int group_size = 128;            // 32, 64, 128, or 0 for per-channel
  std::string freeze = "o,v";      // none, or a list from q,k,v,o,gate,up,down
  bool clip = false;               // learnable clip factor per module
  bool clip_search = false;        // frozen layers and LSQ step sizes start from a clip search (not full range)
  // data
  std::string data;                // comma-separated text files
  std::string val_data;            // comma-separated text files; default: the last val_fraction of `data`
  float val_fraction = 0.05f;
  int teacher_data = 0;            // > 0: that many sequences sampled from the teacher instead of `data`
  int seq_len = 256;
  int batch = 8;                   // sequences per optimizer step
  int micro_batch = 0;             // sequences per forward/backward pass; 0 = batch
  // losses
  float kd_weight = 1.0f;
  float ce_weight = 0.0f;
  float temperature = 1.0f;
  float contrastive_weight = 0.0f;
  float contrastive_temperature = 0.1f;
  // optimizer
  int steps = 1000;
  float lr = 1e-5f;
  float scale_lr = 0.0f;           // 0 = lr
  int warmup = 0;                  // linear warm-up steps, then cosine decay to lr * min_lr_ratio
  float min_lr_ratio = 0.1f;
  float weight_decay = 0.0f;
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float grad_clip = 1.0f;          // global gradient-norm clip; 0 = off
  // running
  uint64_t seed = 0;
  int eval_every = 100;            // validation every N steps (and at the end); 0 = only at the end
  int eval_windows = 64;           // validation windows used (at most)
  int save_every = 100;            // checkpoint every N steps (and at the end)
  int max_bad_steps = 5;           // consecutive NaN/Inf steps before training aborts
  bool resume = false;             // continue from out/checkpoint
  bool progress = true;            // the progress bar on stderr (only when stderr is a terminal)
  bool export_f32 = false;         // the exported student keeps embeddings, LM head and norms in fp32 (default bf16)
  std::string metrics;             // JSON-lines file; default out/metrics.jsonl
};

// Reads a JSON object of TrainConfig keys into `c` (only the keys present). Unknown keys and values of the wrong
// type are errors naming the file and the key.
void read_config_json(const std::string& path, TrainConfig& c);
void read_config_json_text(const std::string& text, const std::string& source, TrainConfig& c);

// The whole config as a JSON object (for checkpoints and metrics).
std::string config_to_json(const TrainConfig& c);

// The keys whose values shape the loss trajectory: a resumed run must have the same values for these.
std::vector<std::string> trajectory_keys();
// Throws naming the first key in trajectory_keys() whose value differs between the two JSON configs.
void check_resume_compatible(const std::string& saved_json, const std::string& current_json);

// Checks every value on its own (ranges, names, required fields for the mode) and throws qkd::Error naming the
// flag and the value. Does not read files.
void validate(const TrainConfig& c);

// The quantization spec the config asks for (after validate()).
QuantSpec quant_spec(const TrainConfig& c);

// Splits a comma-separated list, dropping empty items.
std::vector<std::string> split_list(const std::string& s);

}  // namespace qkd::train
