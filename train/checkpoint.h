// The trainer's resumable state: one safetensors file, train-state.safetensors, in <out>/checkpoint/, written
// atomically (temp file, fsync, rename: loader/atomic_file.h), so a crash or a kill mid-write leaves the previous
// checkpoint whole.
//   tensors   "master", "adam_m", "adam_v"     F32 [plan.total]   the flat buffers of train/plan.h
//             "frozen.<i>.qweight"             I32 [n, k/8]       frozen layer i's packed int4 words
//             "frozen.<i>.scales"              BF16 [n, k/group]
//   metadata  format "qkd-train-state", format_version "1", step (optimizer steps done), adam_step (steps
//             applied, i.e. without the skipped ones), bad_streak, plan_total, config (train/config.h JSON)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/int4_format.h"

namespace qkd::train {

constexpr const char* kTrainStateFormat = "qkd-train-state";
constexpr int kTrainStateVersion = 1;

struct TrainState {
  int64_t step = 0;
  int64_t adam_step = 0;
  int bad_streak = 0;
  std::string config_json;
  std::vector<float> master, m, v;
  std::vector<Int4HostWeight> frozen;
};

std::string checkpoint_path(const std::string& out_dir);  // <out>/checkpoint/train-state.safetensors

void save_train_state(const std::string& path, const TrainState& s);
// Throws qkd::Error naming the file and the field when it is missing, of another format or version, or when a
// tensor's size does not match plan_total.
TrainState load_train_state(const std::string& path, int64_t plan_total);

}  // namespace qkd::train
