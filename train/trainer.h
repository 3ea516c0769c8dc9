// The distillation loop behind qkd-train: load the teacher and the data, build the engine (train/engine.h), run
// the optimizer steps with progress, JSON-lines metrics, periodic validation and atomic checkpoints, and export
// the trained student as a qkd int4 checkpoint that qkd-run, qkd-eval and qkd-bench load.
//
// Files in the output directory:
//   checkpoint/train-state.safetensors   the resumable state (train/checkpoint.h), after every save_every steps
//   metrics.jsonl                        one JSON object per step ({"type": "train", ...}) and per validation
//                                        ({"type": "val", ...}); a resumed run drops the lines of the steps it redoes
//   model/                               the int4 export (loader/int4_checkpoint.h), at the end
//
// A step whose loss or gradient norm is NaN or Inf is skipped (no update) with a warning; after max_bad_steps of
// them in a row training stops with an error, leaving the last checkpoint, which holds only good steps, in place.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "train/config.h"

namespace qkd::train {

struct TrainHooks {
  const std::atomic<bool>* stop = nullptr;          // set (e.g. by SIGINT): save a checkpoint after this step, return
  std::function<double(int64_t step, double loss)> loss_filter;  // tests: replaces a step's loss (fault injection)
  std::function<void(const std::string& line)> log;              // progress lines; default stderr
};

struct TrainResult {
  int64_t steps_done = 0;
  bool stopped = false;     // ended early by hooks.stop
  double last_loss = 0.0;
  double val_ppl = 0.0;     // of the last validation
  std::string model_dir;    // the exported int4 checkpoint ("" when stopped early)
};

TrainResult run_training(const TrainConfig& cfg, const TrainHooks& hooks = {});

}  // namespace qkd::train
