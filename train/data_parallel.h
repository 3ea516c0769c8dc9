// Data parallelism over several engines (train/engine.h), one thread each: the GPUs of one host through NCCL, or,
// as a test vehicle for the same logic without GPUs, CPU engines talking through shared memory.
//   accumulate   the step's sequences are split evenly over the ranks; each runs its share as micro-batches
//   reduce       during the last micro-batch's backward pass, as soon as a layer's gradient is final (its quantizer
//                backward included), that range of the flat fp32 gradient is summed onto the ranks that own it
//                (NCCL reduces on a second stream, so the transfer of layer l overlaps the backward of layers < l);
//                the losses' 1 / (step tokens) already makes the sum the global mean
//   norm         each rank's sum of squares over its own shard, added in rank order: the global gradient norm
//   apply        ZeRO-1: each rank runs AdamW on its shard only (it keeps the moments of that shard alone), then
//                an all-gather of the master weights (and of the bf16 compute copy) makes the replicas identical
// The master weights stay whole on every rank: the fake quantization of every step reads all of them.
// NVLink SHARP (NVLS, multicast) is switched off (NCCL_NVLS_ENABLE=0) as the GPU machines require.
// NCCL is built only when CMake finds it (QKD_HAVE_NCCL); otherwise asking for --gpus > 1 is a clear error.
#pragma once

#include <cstdint>
#include <memory>

#include "train/engine.h"

namespace qkd::train {

enum class Transport : uint8_t {
  Nccl,  // CUDA engines, one a GPU (GPUs 0 .. opt.gpus - 1)
  Host,  // CPU engines in one process, reductions summed in rank order on the host
};

// Whether this build has NCCL (Transport::Nccl works).
bool nccl_built();

// opt.gpus ranks (1 is allowed: the same code paths with nothing to exchange).
std::unique_ptr<Engine> make_data_parallel_engine(const EngineOptions& opt, const Plan& plan, const HostInit& init,
                                                  const ModelWeights* teacher, Transport transport = Transport::Nccl);

}  // namespace qkd::train
