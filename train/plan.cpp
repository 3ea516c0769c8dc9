#include "train/plan.h"

#include <cstring>
#include <memory>

#include <fmt/format.h>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/fake_quant.h"

namespace qkd::train {

namespace {

// The order the modules appear in LayerPlan::linears and in Int4Module.
constexpr Int4Module kLinearModules[7] = {Int4Module::Q,    Int4Module::K,  Int4Module::V,   Int4Module::O,
                                          Int4Module::Gate, Int4Module::Up, Int4Module::Down};

// [out, in] of a layer's linear module.
std::pair<int, int> linear_shape(const ModelConfig& c, Int4Module m) {
  const int q_rows = c.n_heads * c.head_dim, kv_rows = c.n_kv_heads * c.head_dim;
  switch (m) {
    case Int4Module::Q: return {q_rows, c.dim};
    case Int4Module::K: return {kv_rows, c.dim};
    case Int4Module::V: return {kv_rows, c.dim};
    case Int4Module::O: return {c.dim, q_rows};
    case Int4Module::Gate: return {c.ffn_dim, c.dim};
    case Int4Module::Up: return {c.ffn_dim, c.dim};
    case Int4Module::Down: return {c.dim, c.ffn_dim};
    default: return {0, 0};
  }
}

const TensorView& layer_view(const LayerWeights& l, Int4Module m) {
  switch (m) {
    case Int4Module::Q: return l.wq;
    case Int4Module::K: return l.wk;
    case Int4Module::V: return l.wv;
    case Int4Module::O: return l.wo;
    case Int4Module::Gate: return l.w_gate;
    case Int4Module::Up: return l.w_up;
    default: return l.w_down;
  }
}

TensorView& layer_view(LayerWeights& l, Int4Module m) {
  return const_cast<TensorView&>(layer_view(static_cast<const LayerWeights&>(l), m));
}

// A frozen layer's packed codes and scales taken bit for bit from an int4 checkpoint (qkd-quantize --gptq, say),
// which must hold it the way the student keeps frozen layers: int4, the student's group size, symmetric, bf16
// scales, and the frozen layers must be 4-bit (fewer bits would use only part of the checkpoint's 16 levels).
Int4HostWeight frozen_from_checkpoint(const ModelWeights& ckpt, size_t layer, const LinearPlan& lin, int group,
                                      int bits) {
  const TensorView& t = layer_view(ckpt.layers[layer], lin.module);
  const std::string where =
      fmt::format("--init-scales {}: layer {} {} (frozen)", ckpt.source, layer, int4_module_name(lin.module));
  QKD_CHECK(bits == 4, "{}: the frozen layers are {}-bit; codes from an int4 checkpoint need --bits 4", where, bits);
  QKD_CHECK(t.dtype == DType::I4, "{}: is {} in the checkpoint, not int4 (quantize it there: --modules)", where,
            dtype_name(t.dtype));
  const Int4Weight q = t.int4_weight();
  QKD_CHECK(q.n == lin.n && q.k == lin.k, "{}: shape [{}, {}], the student's is [{}, {}]", where, q.n, q.k, lin.n,
            lin.k);
  QKD_CHECK(q.group_size == group, "{}: group size {}, the student uses {}", where, q.group_size, group);
  QKD_CHECK(q.sym == Int4Symmetry::Symmetric, "{}: asymmetric, the student's frozen layers are symmetric", where);
  QKD_CHECK(q.scale_type == ScaleType::BF16, "{}: fp16 scales, the student's frozen layers keep bf16 scales", where);
  Int4HostWeight w{{}, {}, {}, q.n, q.k, group, Int4Symmetry::Symmetric, ScaleType::BF16};
  w.packed.assign(q.packed, q.packed + static_cast<size_t>(q.n) * (q.k / 8));
  w.scales.assign(q.scales, q.scales + static_cast<size_t>(q.n) * (q.k / group));
  return w;
}

}  // namespace

std::string linear_module_name(int layer, Int4Module m) {
  return fmt::format("model.layers.{}.{}", layer, hf_linear_name(m));
}

namespace {

bool is_frozen(const QuantSpec& q, Int4Module m) { return ((q.frozen >> static_cast<int>(m)) & 1u) != 0; }

}  // namespace

void check_quant_spec(const QuantSpec& q, const ModelConfig& c) {
  QKD_CHECK(q.bits == kDenseBits || (q.bits >= kFakeQuantMinBits && q.bits <= kFakeQuantMaxBits),
            "bits: {} is not supported (2..8 for quantization-aware training, or 16 for none)", q.bits);
  QKD_CHECK((q.frozen & ~kInt4LinearModules) == 0,
            "freeze: '{}' names a module that is not a linear layer (q,k,v,o,gate,up,down)",
            format_int4_modules(q.frozen));
  QKD_CHECK(q.frozen == 0 || (q.frozen_bits_resolved() >= kFakeQuantMinBits && q.frozen_bits_resolved() <= 4),
            "freeze: frozen modules are stored as int4, so their bits must be 2..4 (they are {}); use --freeze none",
            q.frozen_bits_resolved());
  if (q.bits == kDenseBits && q.frozen == 0) return;
  for (Int4Module m : kLinearModules) {
    const auto [n, k] = linear_shape(c, m);
    const std::string what = fmt::format("group_size for {} (input dimension {})", int4_module_name(m), k);
    QKD_CHECK(k % kInt4KMultiple == 0, "{}: the input dimension must be a multiple of {} for int4", what,
              kInt4KMultiple);
    int4_group_size(q.group_size, k, what.c_str());  // throws naming the value when it does not divide k
    (void)n;
  }
}

int Plan::group_size(const LinearPlan& l) const { return int4_group_size(quant.group_size, l.k, "group_size"); }

Plan make_plan(const ModelConfig& c, const QuantSpec& q) {
  check_quant_spec(q, c);
  Plan p;
  p.config = c;
  p.quant = q;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay, bool compute_copy) {
    Segment s;
    s.name = std::move(name);
    s.numel = 1;
    for (int64_t d : shape) s.numel *= d;
    s.shape = std::move(shape);
    // 64-float alignment (256 bytes): every segment may be handed to cuBLASLt and to 16-byte vector loads.
    s.offset = (p.total + 63) / 64 * 64;
    s.decay = decay;
    s.compute_copy = compute_copy;
    p.total = s.offset + s.numel;
    p.segments.push_back(std::move(s));
    return static_cast<int>(p.segments.size()) - 1;
  };
  p.embed = add("model.embed_tokens.weight", {c.vocab_size, c.dim}, true, true);
  p.layers.resize(static_cast<size_t>(c.n_layers));
  for (int i = 0; i < c.n_layers; ++i) {
    LayerPlan& l = p.layers[static_cast<size_t>(i)];
    const std::string pre = fmt::format("model.layers.{}.", i);
    l.attn_norm = add(pre + "input_layernorm.weight", {c.dim}, false, true);
    l.ffn_norm = add(pre + "post_attention_layernorm.weight", {c.dim}, false, true);
    for (int j = 0; j < 7; ++j) {
      LinearPlan& lin = *l.linears()[j];
      lin.module = kLinearModules[j];
      std::tie(lin.n, lin.k) = linear_shape(c, lin.module);
      const std::string mod = linear_module_name(i, lin.module);
      if (is_frozen(q, lin.module)) {
        lin.kind = LinearKind::Frozen;
        lin.frozen = p.n_frozen++;
      } else if (q.bits == kDenseBits) {
        lin.kind = LinearKind::Dense;
        lin.w = add(mod + ".weight", {lin.n, lin.k}, true, true);
      } else {
        lin.kind = LinearKind::Quantized;
        lin.w = add(mod + ".weight", {lin.n, lin.k}, true, false);
        const int g = int4_group_size(q.group_size, lin.k, "group_size");
        lin.scale = add(mod + ".scales", {lin.n, lin.k / g}, false, false);
        if (q.clip) lin.clip = add(mod + ".clip", {1}, false, false);
      }
    }
  }
  p.norm = add("model.norm.weight", {c.dim}, false, true);
  p.lm_head = c.tied_embeddings ? p.embed : add("lm_head.weight", {c.vocab_size, c.dim}, true, true);
  return p;
}

HostInit init_parameters(const Plan& plan, const ModelWeights& init, const ModelWeights* scales_from) {
  const ModelConfig& c = plan.config;
  const ModelConfig& ic = init.config;
  QKD_CHECK(ic.dim == c.dim && ic.n_layers == c.n_layers && ic.n_heads == c.n_heads &&
                ic.n_kv_heads == c.n_kv_heads && ic.head_dim == c.head_dim && ic.ffn_dim == c.ffn_dim &&
                ic.vocab_size == c.vocab_size,
            "{}: its shape (dim {}, layers {}, heads {}/{}, ffn {}, vocab {}) differs from the student's", init.source,
            ic.dim, ic.n_layers, ic.n_heads, ic.n_kv_heads, ic.ffn_dim, ic.vocab_size);
  HostInit h;
  h.master.assign(static_cast<size_t>(plan.total), 0.0f);
  h.frozen.resize(static_cast<size_t>(plan.n_frozen));
  auto load = [&](int seg, const TensorView& t) {
    const Segment& s = plan.segments[static_cast<size_t>(seg)];
    QKD_CHECK(t.numel() == s.numel, "{}: tensor {} has shape {}, the student needs {} values", init.source, s.name,
              t.shape_str(), s.numel);
    to_f32(t, h.master.data() + s.offset);
  };
  load(plan.embed, init.tok_embeddings);
  load(plan.norm, init.norm);
  if (plan.lm_head != plan.embed) load(plan.lm_head, init.lm_head);
  std::vector<float> w;
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const LayerPlan& l = plan.layers[i];
    const LayerWeights& lw = init.layers[i];
    load(l.attn_norm, lw.attn_norm);
    load(l.ffn_norm, lw.ffn_norm);
    for (const LinearPlan* lin : l.linears()) {
      const TensorView& t = layer_view(lw, lin->module);
      const int g = lin->kind == LinearKind::Dense ? 0 : plan.group_size(*lin);
      if (lin->kind == LinearKind::Frozen) {
        if (scales_from != nullptr) {
          h.frozen[static_cast<size_t>(lin->frozen)] =
              frozen_from_checkpoint(*scales_from, i, *lin, g, plan.quant.frozen_bits_resolved());
          continue;
        }
        QKD_CHECK(t.numel() == int64_t{lin->n} * lin->k, "{}: layer {} {} has shape {}, expected [{}, {}]",
                  init.source, i, int4_module_name(lin->module), t.shape_str(), lin->n, lin->k);
        w.resize(static_cast<size_t>(t.numel()));
        to_f32(t, w.data());
        std::vector<float> s(static_cast<size_t>(lin->n) * (lin->k / g));
        const int fb = plan.quant.frozen_bits_resolved();
        cpu::fake_quant_init_scales(w.data(), lin->n, lin->k, g, fb, s.data(), plan.quant.scale_search);
        h.frozen[static_cast<size_t>(lin->frozen)] = cpu::fake_quant_export(w.data(), s.data(), nullptr, lin->n, lin->k, g, fb);
        continue;
      }
      load(lin->w, t);
      if (lin->kind != LinearKind::Quantized) continue;
      const Segment& ws = plan.segments[static_cast<size_t>(lin->w)];
      const Segment& ss = plan.segments[static_cast<size_t>(lin->scale)];
      float* scale = h.master.data() + ss.offset;
      if (scales_from != nullptr) {
        const TensorView& q = layer_view(scales_from->layers[i], lin->module);
        QKD_CHECK(q.dtype == DType::I4, "{}: layer {} {} is {}, not int4: it cannot give initial scales",
                  scales_from->source, i, int4_module_name(lin->module), dtype_name(q.dtype));
        const Int4Weight qw = q.int4_weight();
        QKD_CHECK(qw.group_size == g && qw.n == lin->n && qw.k == lin->k && qw.sym == Int4Symmetry::Symmetric,
                  "{}: layer {} {} has group size {} ({}), the student uses symmetric group size {}",
                  scales_from->source, i, int4_module_name(lin->module), qw.group_size,
                  qw.sym == Int4Symmetry::Symmetric ? "symmetric" : "asymmetric", g);
        for (int64_t j = 0; j < ss.numel; ++j) scale[j] = int4_scale_to_float(qw.scales[j], qw.scale_type);
      } else {
        cpu::fake_quant_init_scales(h.master.data() + ws.offset, lin->n, lin->k, g, plan.quant.bits, scale,
                                    plan.quant.scale_search);
      }
      if (lin->clip >= 0) h.master[static_cast<size_t>(plan.segments[static_cast<size_t>(lin->clip)].offset)] = 1.0f;
    }
  }
  return h;
}

Int4Quantized export_student(const Plan& plan, const std::vector<float>& master,
                             const std::vector<Int4HostWeight>& frozen, const std::string& source_model,
                             bool dense_f32) {
  const ModelConfig& c = plan.config;
  Int4Quantized q;
  q.source_model = source_model;
  q.source_format = "qkd-train";
  q.quantizer = "qat";  // learned scales (LSQ); the trainer notes frozen layers taken from a checkpoint
  q.params.group_size = plan.quant.group_size;
  q.params.sym = Int4Symmetry::Symmetric;
  q.params.scale_type = ScaleType::BF16;
  q.params.modules = plan.quant.bits == kDenseBits ? plan.quant.frozen : kInt4LinearModules;
  ModelWeights& w = q.weights;
  w.config = c;
  w.source = source_model;
  w.format = "qkd-int4";
  w.layers.resize(static_cast<size_t>(c.n_layers));
  auto dense = [&](int seg) {
    const Segment& s = plan.segments[static_cast<size_t>(seg)];
    TensorView t;
    t.name = s.name;
    t.shape = s.shape;
    if (dense_f32) {
      auto buf = std::make_shared<std::vector<float>>(master.begin() + s.offset, master.begin() + s.offset + s.numel);
      t.dtype = DType::F32;
      t.data = reinterpret_cast<const std::byte*>(buf->data());
      t.nbytes = buf->size() * sizeof(float);
      w.storage.push_back(buf);
    } else {
      auto buf = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(s.numel));
      for (int64_t i = 0; i < s.numel; ++i) (*buf)[static_cast<size_t>(i)] = float_to_bf16(master[static_cast<size_t>(s.offset + i)]);
      t.dtype = DType::BF16;
      t.data = reinterpret_cast<const std::byte*>(buf->data());
      t.nbytes = buf->size() * sizeof(uint16_t);
      w.storage.push_back(buf);
    }
    return t;
  };
  auto int4 = [&](std::shared_ptr<Int4HostWeight> hw, const std::string& name) {
    TensorView t;
    t.name = name;
    t.dtype = DType::I4;
    t.shape = {hw->n, hw->k};
    t.data = reinterpret_cast<const std::byte*>(hw->packed.data());
    t.nbytes = hw->packed.size() * sizeof(uint32_t);
    t.int4.scales = hw->scales.data();
    t.int4.group_size = hw->group_size;
    t.int4.sym = hw->sym;
    t.int4.scale_type = hw->scale_type;
    w.storage.push_back(hw);
    return t;
  };
  w.tok_embeddings = dense(plan.embed);
  w.norm = dense(plan.norm);
  w.lm_head = plan.lm_head == plan.embed ? w.tok_embeddings : dense(plan.lm_head);
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const LayerPlan& l = plan.layers[i];
    LayerWeights& lw = w.layers[i];
    lw.attn_norm = dense(l.attn_norm);
    lw.ffn_norm = dense(l.ffn_norm);
    for (const LinearPlan* lin : l.linears()) {
      const std::string name = linear_module_name(static_cast<int>(i), lin->module);
      TensorView& t = layer_view(lw, lin->module);
      if (lin->kind == LinearKind::Frozen) {
        t = int4(std::make_shared<Int4HostWeight>(frozen[static_cast<size_t>(lin->frozen)]), name);
      } else if (lin->kind == LinearKind::Dense) {
        t = dense(lin->w);
      } else {
        const Segment& ws = plan.segments[static_cast<size_t>(lin->w)];
        const Segment& ss = plan.segments[static_cast<size_t>(lin->scale)];
        const float* clip =
            lin->clip >= 0 ? master.data() + plan.segments[static_cast<size_t>(lin->clip)].offset : nullptr;
        t = int4(std::make_shared<Int4HostWeight>(cpu::fake_quant_export(master.data() + ws.offset,
                                                                          master.data() + ss.offset, clip, lin->n,
                                                                          lin->k, plan.group_size(*lin),
                                                                          plan.quant.bits)),
                 name);
      }
    }
  }
  return q;
}

}  // namespace qkd::train
