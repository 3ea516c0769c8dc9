// The CUDA backend's own interface, beyond runtime/model.h: what qkd-bench and the GPU tests need to time and
// inspect a decode step on the device. Generation and evaluation use the Model interface only.
//
// Layout on the device (runtime/cuda_model.cpp): bf16 embeddings, norms and LM head; each layer's q/k/v
// projections fused into one [q_dim + 2 kv_dim, dim] weight and gate/up into one [2 ffn_dim, dim] weight, bf16
// or int4 (kernels/int4_format.h); a bf16 KV cache [n_layers][max_batch, n_kv_heads, ctx, head_dim]; and the
// activations of one step of at most 512 tokens, all in one arena sized before anything is allocated.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <cuda_runtime.h>

#include "runtime/model.h"

namespace qkd::runtime {

// Device bytes by purpose.
struct CudaMemoryUse {
  int64_t weights = 0;      // everything a forward reads that is not the cache or activations
  int64_t kv_cache = 0;
  int64_t activations = 0;  // activations, logits, decode-attention workspace, step inputs
  int64_t library = 0;      // cuBLASLt workspace and the reserve kept for the CUDA runtime (estimated)
  int64_t total() const { return weights + kv_cache + activations + library; }
};

class CudaModel : public Model {
 public:
  // The stream every kernel of the model runs on (timing events go on it).
  virtual cudaStream_t stream() const = 0;

  // Copies one decode step's inputs to the device (tokens[b] at position start_pos[b], b < batch) and waits
  // for the copy. replay_decode then runs that step as often as asked without touching the host.
  virtual void set_decode_inputs(std::span<const int32_t> tokens, std::span<const int32_t> start_pos) = 0;
  // Enqueues the captured decode step for `batch` sequences (capturing it on first use) followed by the greedy
  // pick of each next token on the device; returns without synchronizing. Each replay writes the same cache
  // positions, so replays of one input are idempotent.
  virtual void replay_decode(int batch) = 0;

  virtual CudaMemoryUse memory_use() const = 0;
  // Bytes a decode step of `batch` sequences reads from device memory when each sequence attends over
  // `context` cached positions plus its new token: every weight once (one embedding row per sequence), and
  // the keys and values of context + 1 positions per layer and sequence.
  virtual int64_t decode_bytes_read(int batch, int context) const = 0;
  // "int4 g128 (224 of 224 linear weights)", "bf16": how the linear weights are stored.
  virtual std::string weight_format() const = 0;
};

std::unique_ptr<CudaModel> make_cuda_model_impl(const ModelWeights& w, const ModelOptions& opt);

// A model of the given shape with random weights generated on the device (for benchmarks: a 7B preset costs
// neither host memory nor an upload). Linear weights are int4 with group size opt.quantize_group when it is
// > 0 (random nibbles, bf16 scales), else bf16; norms near 1; embeddings and LM head small uniform values.
std::unique_ptr<CudaModel> make_cuda_model_random(const ModelConfig& c, const ModelOptions& opt, uint64_t seed);

}  // namespace qkd::runtime
