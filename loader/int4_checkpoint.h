// qkd int4 checkpoints: quantization of a loaded model into the int4 format (kernels/int4_format.h,
// docs/int4-format.md) by round to nearest or GPTQ (kernels/int4_gptq.h, with calibration Hessians from
// runtime/calibrate.h), and the checkpoint directory that stores it, defined here.
//
// A checkpoint is a directory, so that `qkd-run -m DIR` finds the weights and the tokenizer together:
//   model.safetensors   every tensor, and the "__metadata__" block below (self-contained: the config is in it)
//   config.json         the same config as Hugging Face JSON, for people and tools that look there
//   tokenizer files     copied from the source: tokenizer.model / tokenizer.bin / tok*.bin, tokenizer.json,
//                       tokenizer_config.json (the chat template), special_tokens_map.json, generation_config.json;
//                       for a GGUF source, tokenizer.gguf: a vocabulary-only GGUF with the source's tokenizer.* keys
// load_int4_checkpoint also accepts the model.safetensors file itself.
//
// Tensors, named after the Hugging Face module ("model.layers.3.self_attn.q_proj"):
//   quantized linear   "<module>.qweight"  I32  [n, k/8]            the packed uint32 words, bit for bit (safetensors
//                                                                   has no U32; the bits are the same)
//                      "<module>.scales"   BF16 or F16 [n, k/group_size]   (the scale_type)
//                      "<module>.mins"     same as scales, asymmetric only
//   everything else    "<module>.weight"   F32, F16 or BF16: the source's own dtype, so nothing is rounded
//                                          twice; GGUF block types (Q8_0, Q4_0, Q4_1) are stored as F32
// q_proj and k_proj rows (quantized or not) are in qkd's interleaved RoPE order (loader/model.h), not in Hugging
// Face's rotate-half order: "rope_layout" says so. lm_head is absent when the embeddings are tied.
//
// "__metadata__" (safetensors allows only strings):
//   format "qkd-int4", format_version "1", bits "4", group_size "32" | "64" | "128" | "channel",
//   symmetric "true" | "false", scale_type "bf16" | "fp16",
//   quantized_modules  comma list from q,k,v,o,gate,up,down,embed,lm_head (e.g. "q,k,v,o,gate,up,down"),
//   quantizer "rtn" | "rtn-clip-search" | "gptq" | "gptq-clip-search" (qkd-quantize), "qat" or "qat (frozen:
//   <quantizer>)" (qkd-train, the frozen layers' codes taken from an --init-scales checkpoint of that quantizer);
//   it records how the codes were chosen and is not checked when loading,
//   rope_layout "interleaved", source_model (the path quantized), source_format ("hf", "llama2c", "gguf"),
//   config (the model config as Hugging Face config.json text; it wins over config.json).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/int4_format.h"
#include "kernels/int4_gptq.h"
#include "loader/atomic_file.h"
#include "loader/model.h"

namespace qkd {

constexpr const char* kInt4CheckpointFormat = "qkd-int4";
constexpr int kInt4CheckpointVersion = 1;

// The modules that may be quantized, in the order summaries and metadata list them.
enum class Int4Module : uint8_t { Q, K, V, O, Gate, Up, Down, Embed, LmHead };
constexpr int kInt4ModuleCount = 9;
using Int4ModuleSet = uint32_t;  // bit (1 << module)
constexpr Int4ModuleSet int4_module_bit(Int4Module m) { return Int4ModuleSet{1} << static_cast<int>(m); }
constexpr Int4ModuleSet kInt4LinearModules = (Int4ModuleSet{1} << 7) - 1;  // q, k, v, o, gate, up, down

const char* int4_module_name(Int4Module m);  // "q", ..., "embed", "lm_head"
// A decoder layer's linear module as Hugging Face names it, "self_attn.q_proj" ... "mlp.down_proj" (the q..down
// modules only; "unknown" for embed and lm_head, which sit outside the layers).
const char* hf_linear_name(Int4Module m);
// "q,k,v" -> set; throws naming `what` and the unknown or repeated name. The empty string is the empty set.
Int4ModuleSet parse_int4_modules(const std::string& list, const std::string& what);
std::string format_int4_modules(Int4ModuleSet s);

struct Int4Params {
  int group_size = 128;  // 32, 64, 128 or kInt4PerChannel
  Int4Symmetry sym = Int4Symmetry::Symmetric;
  ScaleType scale_type = ScaleType::BF16;
  Int4ModuleSet modules = kInt4LinearModules;
  Int4ScaleSearch scale_search = Int4ScaleSearch::None;  // qkd-quantize --clip-search: ClipMse
};

// The input a decoder layer's linear module reads (q, k, v: AttnNorm; o: Attention; gate, up: FfnNorm; down:
// Swiglu); embed and lm_head are not such modules and throw.
LinearInput int4_linear_input(Int4Module m);

// GPTQ's calibration (runtime/calibrate.h): per decoder layer and linear input, the Hessian H = (2 / N) sum x x^T
// of the input rows x over the N calibration tokens, [cols, cols] row-major in double. One pass of the
// unquantized model: every layer sees the full-precision activations, not those of already quantized layers.
struct Int4Calibration {
  std::vector<std::array<std::vector<double>, kLinearInputCount>> hessians;  // [n_layers][LinearInput]
  int64_t tokens = 0;                                                        // N
  double percdamp = kGptqDefaultDamp;                                        // kernels/int4_gptq.h
};

// Relative RMS error of one module kind over all layers: sqrt(sum (w - dequant(q(w)))^2 / sum w^2), in double.
struct Int4ModuleError {
  Int4Module module = Int4Module::Q;
  int tensors = 0;
  int64_t params = 0;
  double sum_sq_err = 0.0, sum_sq = 0.0;
  double rel_rms() const;
};

struct Int4Quantized {
  // format "qkd-int4": DType::I4 views of the quantized modules (owned by storage), the others as in the source
  // (F32 for GGUF block types). With tied embeddings and exactly one of embed / lm_head quantized, it is untied.
  ModelWeights weights;
  Int4Params params;
  std::string source_model, source_format;  // the source's path and loader format, for the metadata
  std::string quantizer = "rtn";            // metadata 'quantizer' (see the header comment)
  std::vector<Int4ModuleError> errors;      // one per quantized module kind, in Int4Module order
  std::vector<std::string> notes;           // e.g. a GPTQ dampening raised for a tensor, for the user to see
};

// Quantizes src (any loader's ModelWeights): round to nearest with int4_quantize, or, given a calibration, GPTQ
// (int4_gptq_quantize) for the decoder layers' linear modules; embed and lm_head, when quantized, always round to
// nearest. Without a calibration, a Q4_0 (Q4_1) GGUF weight asked for as symmetric (asymmetric) fp16 g32 is
// copied bit for bit (int4_from_q4_0 / _1). Throws qkd::Error naming the tensor when its k does not fit the group
// size, a value cannot be quantized or its Hessian is not positive definite even after GPTQ's dampening retries.
Int4Quantized quantize_model_int4(const ModelWeights& src, const Int4Params& params,
                                  const Int4Calibration* gptq = nullptr);

// Throws qkd::Error unless `out` may be written: with Refuse it must not exist; with Replace it may also be an
// existing qkd int4 checkpoint directory or an empty directory (never any other directory: --force must not
// delete a user's folder). Called by write_int4_checkpoint, and by apps before the slow work.
void check_int4_output(const std::string& out, Overwrite overwrite);

// Writes the checkpoint directory `out`. q.weights must hold DType::I4 views with q.params for exactly the modules
// q.params names, and F32/F16/BF16 for the rest. `companions` (files, e.g. from int4_companion_files) are copied
// in under their own names; a GGUF source's tokenizer is written as tokenizer.gguf. Atomic: everything is written
// into a temp directory beside `out`, synced, and renamed into place (exchanged with the old checkpoint under
// Replace, which is then removed).
void write_int4_checkpoint(const std::string& out, const Int4Quantized& q, const std::vector<std::string>& companions,
                           Overwrite overwrite);

// The tokenizer files that belong beside a loaded model (see the header comment), those that exist: for an HF
// directory the listed names, for a llama2.c file loader/bundle.h's find_tokenizer; none for GGUF, whose
// tokenizer lives inside the file.
std::vector<std::string> int4_companion_files(const ModelWeights& src);

// True when `path` is a qkd int4 checkpoint: a directory whose model.safetensors, or a safetensors file whose
// metadata, says format "qkd-int4". Reads only what it needs and never throws for other files.
bool is_int4_checkpoint(const std::string& path);

// Loads and validates a checkpoint (directory or its model.safetensors): format, version, bits, group size,
// symmetry, scale type, modules and config from the metadata; every expected tensor present with the dtype and
// shape the config and group size give; no unexpected tensor. format = "qkd-int4". Throws qkd::Error naming the
// file, the tensor or metadata key, and the value.
ModelWeights load_int4_checkpoint(const std::string& path);

// The metadata 'quantizer' of a checkpoint (directory or model.safetensors), "" when it has none (written before
// the key existed). Throws qkd::Error when `path` is not a qkd int4 checkpoint.
std::string int4_checkpoint_quantizer(const std::string& path);

// A ModelConfig as Hugging Face config.json text (model_type llama, rope_parameters in the transformers 5 style),
// which parse_hf_config (loader/hf_checkpoint.h) reads back to the same config.
std::string model_config_to_hf_json(const ModelConfig& c);

}  // namespace qkd
