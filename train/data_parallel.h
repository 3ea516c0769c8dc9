// Data parallelism over the GPUs of one host through NCCL: one engine (train/engine.h) per GPU, each with the
// whole student, the teacher and the optimizer state (replicated), driven from one thread per GPU.
//   accumulate   the step's sequences are split evenly over the GPUs, each runs its share
//   gradients    each GPU finishes its quantizer gradients, then one NCCL all-reduce (sum) of the flat fp32
//                gradient buffer; the losses' 1 / (step tokens) already makes the sum the global mean
//   apply        every GPU runs the same AdamW on the same reduced gradient, so the replicas stay identical
// NVLink SHARP (NVLS, multicast) is switched off (NCCL_NVLS_ENABLE=0) as the GPU machines require.
// Built only when CMake finds NCCL (QKD_HAVE_NCCL); otherwise asking for --gpus > 1 is a clear error.
#pragma once

#include <memory>

#include "train/engine.h"

namespace qkd::train {

std::unique_ptr<Engine> make_data_parallel_engine(const EngineOptions& opt, const Plan& plan, const HostInit& init,
                                                  const ModelWeights* teacher);

}  // namespace qkd::train
