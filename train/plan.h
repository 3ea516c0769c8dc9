// The student's parameters, planned once from the model config and the quantization spec, before any memory is
// allocated on either backend.
//
// Every trainable tensor is a segment of ONE flat fp32 buffer (the master weights); the gradients and the two
// AdamW moments use the same layout, so clipping, the optimizer and checkpoints each see a single array. Each
// linear module of each layer is one of:
//   Frozen     quantized once (round to nearest, `bits`; or taken from an --init-scales checkpoint's codes, e.g.
//              GPTQ's), held as packed int4 and run through the int4 GEMM in
//              the forward and the backward-data pass; no master copy, no gradient, no optimizer state
//              (ov-freeze, arXiv 2403.18159, freezes o and v).
//   Quantized  fp32 master weight + learnable per-group scales (+ an optional per-module clip factor), run
//              through fake quantization (kernels/fake_quant.h) with the straight-through estimator.
//   Dense      fp32 master weight used at full precision (bits = 16, or a teacher-shaped pretraining run).
// Norm weights, the embedding and an untied LM head are Dense segments: they stay full precision, as in LLM-QAT
// and the ov-freeze paper, and they train.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/int4_format.h"
#include "loader/int4_checkpoint.h"
#include "loader/model.h"

namespace qkd::train {

constexpr int kDenseBits = 16;  // bits = 16 means "no quantization"

struct QuantSpec {
  int bits = 4;                                  // 2..8 fake-quantized, or kDenseBits
  int group_size = 128;                          // 32, 64, 128 or kInt4PerChannel (the whole row)
  bool clip = false;                             // learnable per-module clip factor (arXiv 2203.10705)
  Int4ModuleSet frozen = int4_module_bit(Int4Module::O) | int4_module_bit(Int4Module::V);
  int frozen_bits = 0;                           // bits of the frozen layers, 2..4; 0 = `bits`
  // how the frozen layers' scales and the LSQ step sizes start (--clip-search: ClipMse; kernels/int4_format.h)
  Int4ScaleSearch scale_search = Int4ScaleSearch::None;
  int frozen_bits_resolved() const { return frozen_bits != 0 ? frozen_bits : bits; }
};

// Throws qkd::Error naming the field and value unless `q` fits `c`: bits in 2..8 or 16, a group size that divides
// every linear layer's input dimension (and k a multiple of 32, the int4 format's rule), frozen modules only
// among q,k,v,o,gate,up,down, and frozen modules only with frozen bits <= 4 (they are stored as int4).
void check_quant_spec(const QuantSpec& q, const ModelConfig& c);

enum class LinearKind : uint8_t { Frozen, Quantized, Dense };

struct Segment {
  std::string name;           // Hugging Face tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
  int64_t offset = 0, numel = 0;
  std::vector<int64_t> shape;
  bool decay = false;         // AdamW weight decay applies (matrices yes; norms, scales, clip factors no)
  bool compute_copy = false;  // the forward reads a compute-precision copy of it (Dense tensors)
};

struct LinearPlan {
  Int4Module module = Int4Module::Q;
  LinearKind kind = LinearKind::Dense;
  int n = 0, k = 0;  // [out, in]
  int w = -1;        // segment of the master weight (Quantized, Dense)
  int scale = -1;    // segment of the scales [n, k / group] (Quantized)
  int clip = -1;     // segment of the clip factor [1] (Quantized with QuantSpec::clip)
  int frozen = -1;   // index into Plan::frozen (Frozen)
};

struct LayerPlan {
  int attn_norm = -1, ffn_norm = -1;
  LinearPlan q, k, v, o, gate, up, down;
  std::array<LinearPlan*, 7> linears() { return {&q, &k, &v, &o, &gate, &up, &down}; }
  std::array<const LinearPlan*, 7> linears() const { return {&q, &k, &v, &o, &gate, &up, &down}; }
};

struct Plan {
  ModelConfig config;
  QuantSpec quant;
  std::vector<Segment> segments;
  int64_t total = 0;                 // floats in the flat buffer
  int embed = -1, norm = -1, lm_head = -1;  // lm_head == embed when the embeddings are tied
  std::vector<LayerPlan> layers;
  int n_frozen = 0;

  int group_size(const LinearPlan& l) const;  // resolved (per-channel = k)
};

Plan make_plan(const ModelConfig& c, const QuantSpec& q);

// The Hugging Face module of a layer's linear layer, e.g. "model.layers.3.self_attn.q_proj" (segment names are
// this plus ".weight", ".scales" or ".clip").
std::string linear_module_name(int layer, Int4Module m);

// Initial values, on the host: the master weights from `init` (a model of the same shape: the teacher, or any
// loader's model), clip factors 1, and from `scales_from` (a qkd int4 checkpoint, may be null) when given, else
// by round to nearest: the step sizes, and the frozen modules, whose packed codes and scales it then supplies bit
// for bit (the checkpoint must hold them as int4 with the student's group size, symmetric, bf16 scales, and the
// frozen bits must be 4). Throws qkd::Error naming the tensor (or the checkpoint, layer and module) and the
// mismatch.
struct HostInit {
  std::vector<float> master;                // [plan.total]
  std::vector<Int4HostWeight> frozen;       // [plan.n_frozen]
};
HostInit init_parameters(const Plan& plan, const ModelWeights& init, const ModelWeights* scales_from);

// The trained student as an int4 model (the Quantized and Frozen linear layers as DType::I4, bf16 scales,
// symmetric; the Dense tensors -- embeddings, LM head, norms -- as BF16, rounded to nearest even, which is the
// compute copy the CUDA forward trained with; as F32 when dense_f32), ready for write_int4_checkpoint. `storage`
// of the result owns the bytes.
Int4Quantized export_student(const Plan& plan, const std::vector<float>& master,
                             const std::vector<Int4HostWeight>& frozen, const std::string& source_model,
                             bool dense_f32 = false);

}  // namespace qkd::train
