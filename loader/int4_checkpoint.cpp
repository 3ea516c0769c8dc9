#include "loader/int4_checkpoint.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "kernels/int4_gemm.h"
#include "loader/bundle.h"
#include "loader/gguf_writer.h"
#include "loader/hf_checkpoint.h"
#include "loader/safetensors.h"

namespace qkd {

namespace fs = std::filesystem;

namespace {

constexpr const char* kModuleNames[kInt4ModuleCount] = {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"};
constexpr Int4ModuleSet kAllModules = (Int4ModuleSet{1} << kInt4ModuleCount) - 1;
constexpr int kNorm = -1;  // Slot::kind of the norms, which are never quantized
constexpr const char* kWeightsFile = "model.safetensors";
constexpr const char* kConfigFile = "config.json";
constexpr const char* kGgufTokenizerFile = "tokenizer.gguf";
// The same bound the safetensors reader puts on a header (loader/safetensors.cpp).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// One tensor position of a LLaMA model: its Hugging Face module name, its shape by the config, and where the
// view lives in a ModelWeights.
struct Slot {
  std::string module;  // "model.layers.0.self_attn.q_proj"; the file names "<module>.weight" / ".qweight" ...
  int kind;            // an Int4Module, or kNorm
  TensorView* view;
  std::vector<int64_t> shape;
  int layer = -1;      // the decoder layer it belongs to; -1 for the embeddings, the final norm and lm_head
};

// Every tensor of w in file order; w->layers must already hold config.n_layers entries. lm_head only when untied.
std::vector<Slot> model_slots(const ModelConfig& c, ModelWeights* w) {
  const int64_t dim = c.dim, q_rows = int64_t{c.n_heads} * c.head_dim, kv_rows = int64_t{c.n_kv_heads} * c.head_dim;
  const int64_t ffn = c.ffn_dim, vocab = c.vocab_size;
  QKD_CHECK(w->layers.size() == static_cast<size_t>(c.n_layers), "{}: {} layers of weights, config says {}",
            w->source, w->layers.size(), c.n_layers);
  auto kind = [](Int4Module m) { return static_cast<int>(m); };
  std::vector<Slot> s;
  s.push_back({"model.embed_tokens", kind(Int4Module::Embed), &w->tok_embeddings, {vocab, dim}});
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w->layers[static_cast<size_t>(i)];
    const std::string p = fmt::format("model.layers.{}.", i);
    s.push_back({p + "input_layernorm", kNorm, &l.attn_norm, {dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::Q), kind(Int4Module::Q), &l.wq, {q_rows, dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::K), kind(Int4Module::K), &l.wk, {kv_rows, dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::V), kind(Int4Module::V), &l.wv, {kv_rows, dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::O), kind(Int4Module::O), &l.wo, {dim, q_rows}, i});
    s.push_back({p + "post_attention_layernorm", kNorm, &l.ffn_norm, {dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::Gate), kind(Int4Module::Gate), &l.w_gate, {ffn, dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::Up), kind(Int4Module::Up), &l.w_up, {ffn, dim}, i});
    s.push_back({p + hf_linear_name(Int4Module::Down), kind(Int4Module::Down), &l.w_down, {dim, ffn}, i});
  }
  s.push_back({"model.norm", kNorm, &w->norm, {dim}});
  if (!c.tied_embeddings) s.push_back({"lm_head", kind(Int4Module::LmHead), &w->lm_head, {vocab, dim}});
  return s;
}

bool quantized(Int4ModuleSet set, int kind) { return kind >= 0 && ((set >> kind) & 1u) != 0; }
bool is_dense(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
DType scale_dtype(ScaleType t) { return t == ScaleType::BF16 ? DType::BF16 : DType::F16; }
const char* scale_type_name(ScaleType t) { return t == ScaleType::BF16 ? "bf16" : "fp16"; }
std::string group_size_text(int g) { return g == kInt4PerChannel ? std::string("channel") : std::to_string(g); }

void check_params(const Int4Params& p) {
  QKD_CHECK(p.group_size == kInt4PerChannel || p.group_size == 32 || p.group_size == 64 || p.group_size == 128,
            "int4 group_size {} must be 32, 64, 128 or per-channel", p.group_size);
  QKD_CHECK((p.modules & ~kAllModules) == 0, "int4 module set 0x{:x} has unknown bits", p.modules);
}

// Views bytes owned by storage as a tensor.
template <typename T>
TensorView owned_view(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<T>& buf) {
  TensorView t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data = reinterpret_cast<const std::byte*>(buf.data());
  t.nbytes = buf.size() * sizeof(T);
  return t;
}

// GPTQ's inputs for one tensor: its Hessian and the dampening; null for round to nearest.
struct GptqInput {
  const std::vector<double>* hessian;
  double percdamp;
};

TensorView quantize_tensor(const std::string& source, const Slot& s, const Int4Params& p, const GptqInput* gptq,
                           ModelWeights& w, Int4ModuleError& err, std::vector<std::string>& notes) {
  const TensorView& t = *s.view;
  QKD_CHECK(t.shape == s.shape, "{}: tensor '{}': shape {} disagrees with the config's [{}]", source, t.name,
            t.shape_str(), fmt::join(s.shape, ", "));
  QKD_CHECK(s.shape[0] <= INT_MAX && s.shape[1] <= INT_MAX, "{}: tensor '{}': shape {} is too large for int4",
            source, t.name, t.shape_str());
  const int n = static_cast<int>(s.shape[0]), k = static_cast<int>(s.shape[1]);
  const std::string what = fmt::format("{}: tensor '{}'", source, t.name);
  const int gs = int4_group_size(p.group_size, k, what.c_str());
  const std::vector<float> x = to_f32(t);

  auto q = std::make_shared<Int4HostWeight>();
  const bool fp16_g32 = p.scale_type == ScaleType::FP16 && gs == 32;
  const auto* blocks = reinterpret_cast<const uint8_t*>(t.data);
  if (gptq != nullptr) {
    QKD_CHECK(gptq->hessian->size() == static_cast<size_t>(k) * k,
              "{}: the calibration Hessian has {} entries, k = {} needs {}", what, gptq->hessian->size(), k,
              static_cast<size_t>(k) * k);
    Int4GptqArgs a;
    a.w = x.data();
    a.hessian = gptq->hessian->data();
    a.n = n;
    a.k = k;
    a.group_size = gs;
    a.sym = p.sym;
    a.scale_type = p.scale_type;
    a.search = p.scale_search;
    a.percdamp = gptq->percdamp;
    try {
      Int4GptqResult r = int4_gptq_quantize(a);
      if (r.percdamp != a.percdamp)
        notes.push_back(fmt::format("{}: GPTQ dampening raised from {} to {} (the Hessian was not positive definite)",
                                    t.name, a.percdamp, r.percdamp));
      *q = std::move(r.weight);
    } catch (const Error& e) {
      fail("{}: {}", what, e.what());
    }
  } else if (fp16_g32 && ((t.dtype == DType::Q4_0 && p.sym == Int4Symmetry::Symmetric) ||
                          (t.dtype == DType::Q4_1 && p.sym == Int4Symmetry::Asymmetric))) {
    // GGUF's own 4-bit blocks are already this format: copy the bits instead of re-rounding rounded values.
    *q = Int4HostWeight{{}, {}, {}, n, k, gs, p.sym, p.scale_type};
    q->packed.resize(static_cast<size_t>(n) * (k / 8));
    q->scales.resize(static_cast<size_t>(n) * (k / gs));
    if (t.dtype == DType::Q4_0) {
      int4_from_q4_0(blocks, n, k, q->packed.data(), q->scales.data());
    } else {
      q->mins.resize(q->scales.size());
      int4_from_q4_1(blocks, n, k, q->packed.data(), q->scales.data(), q->mins.data());
    }
  } else {
    try {
      *q = int4_quantize(x.data(), n, k, gs, p.sym, p.scale_type, p.scale_search);
    } catch (const Error& e) {
      fail("{}: {}", what, e.what());
    }
  }

  std::vector<float> deq(x.size());
  cpu::dequantize_int4(q->view(), deq.data());
  double sum_sq_err = 0.0, sum_sq = 0.0;
#pragma omp parallel for reduction(+ : sum_sq_err, sum_sq) schedule(static)
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = static_cast<double>(x[i]) - deq[i];
    sum_sq_err += e * e;
    sum_sq += static_cast<double>(x[i]) * x[i];
  }
  err.tensors += 1;
  err.params += static_cast<int64_t>(x.size());
  err.sum_sq_err += sum_sq_err;
  err.sum_sq += sum_sq;

  TensorView v = owned_view(s.module + ".qweight", DType::I4, s.shape, q->packed);
  v.int4 = {q->scales.data(), q->mins.empty() ? nullptr : q->mins.data(), gs, p.sym, p.scale_type};
  w.storage.push_back(std::move(q));
  return v;
}

// ---------------------------------------------------------------------------------------------- writing

void sync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open to sync it: {}", p.string(), std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL) fail("{}: fsync failed: {}", p.string(), std::strerror(err));
}

void write_text_file(const fs::path& p, const std::string& text) {
  {
    std::ofstream f(p, std::ios::binary);
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    f.close();
    QKD_CHECK(f.good(), "{}: write failed: {}", p.string(), std::strerror(errno));
  }
  sync_path(p, false);
}

// The temp directory beside the output; removed unless it was renamed into place.
struct TempDir {
  fs::path path;
  bool committed = false;
  ~TempDir() {
    std::error_code ec;
    if (!committed && !path.empty()) fs::remove_all(path, ec);
  }
};

bool is_empty_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec) && fs::is_empty(p, ec) && !ec;
}

// Puts the finished temp directory under `out`. A directory that was empty, or (Replace) an old checkpoint, is
// swapped out atomically: readers see the old checkpoint or the new one, never a mix.
void commit_dir(const fs::path& tmp, const fs::path& out, Overwrite overwrite) {
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(out, ec));
  if (!exists) {
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, out.c_str(), RENAME_NOREPLACE) == 0) return;
    fail("{}: cannot move the finished checkpoint {} into place: {}", out.string(), tmp.string(),
         errno == EEXIST ? "the output appeared while it was being written" : std::strerror(errno));
  }
  if (is_empty_dir(out)) {
    // rename(2) replaces an empty directory and fails with ENOTEMPTY if something was put into it meanwhile.
    if (::rename(tmp.c_str(), out.c_str()) == 0) return;
    fail("{}: cannot move the finished checkpoint {} into place: {}", out.string(), tmp.string(), std::strerror(errno));
  }
  QKD_CHECK(overwrite == Overwrite::Replace, "{}: already exists (pass --force to replace a qkd int4 checkpoint)",
            out.string());
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) != 0)
    fail("{}: cannot swap in the new checkpoint {}: {}", out.string(), tmp.string(), std::strerror(errno));
  fs::remove_all(tmp, ec);  // tmp now holds the old checkpoint
  QKD_CHECK(!ec, "{}: replaced, but removing the old checkpoint (now at {}) failed: {}", out.string(), tmp.string(),
            ec.message());
}

// A header-only look at a safetensors file's metadata "format"; "" for anything that is not one.
std::string safetensors_format(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  unsigned char len_bytes[8];
  if (!in.read(reinterpret_cast<char*>(len_bytes), 8)) return "";
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | len_bytes[i];
  if (len < 2 || len > kMaxHeaderBytes || in.peek() != '{') return "";
  std::string text(len, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(len))) return "";
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return "";
  auto meta = j.find("__metadata__");
  if (meta == j.end() || !meta->is_object()) return "";
  auto format = meta->find("format");
  return format != meta->end() && format->is_string() ? format->get<std::string>() : std::string();
}

// ---------------------------------------------------------------------------------------------- loading

struct Metadata {
  const std::map<std::string, std::string>& map;
  const std::string& file;

  const std::string& get(const char* key) const {
    auto it = map.find(key);
    QKD_CHECK(it != map.end(), "{}: __metadata__ has no '{}' (a qkd int4 checkpoint names it)", file, key);
    return it->second;
  }
  // The value of `key`, which must be one of `allowed`; returns its index.
  size_t one_of(const char* key, std::initializer_list<const char*> allowed) const {
    const std::string& v = get(key);
    size_t i = 0;
    for (const char* a : allowed) {
      if (v == a) return i;
      ++i;
    }
    fail("{}: __metadata__ '{}' is '{}', expected one of {}", file, key, v, fmt::join(allowed, ", "));
  }
};

// The bytes of a view, copied into an aligned owned buffer when the file placed them unaligned (a writer other
// than ours may); the int4 readers dereference uint32 / uint16 pointers.
const std::byte* aligned_bytes(const TensorView& t, size_t align, ModelWeights& w) {
  if (reinterpret_cast<uintptr_t>(t.data) % align == 0) return t.data;
  auto buf = std::make_shared<std::vector<uint32_t>>((t.nbytes + 3) / 4);
  std::memcpy(buf->data(), t.data, t.nbytes);
  w.storage.push_back(buf);
  return reinterpret_cast<const std::byte*>(buf->data());
}

const TensorView& require_tensor(const SafetensorsFile& st, const std::string& name, DType dtype,
                                 const std::vector<int64_t>& shape, const std::string& why,
                                 std::set<std::string>& used) {
  const TensorView* t = st.find(name);
  QKD_CHECK(t != nullptr, "{}: tensor '{}' is missing", st.path(), name);
  QKD_CHECK(t->dtype == dtype, "{}: tensor '{}': dtype {}, expected {}", st.path(), name, dtype_name(t->dtype),
            dtype_name(dtype));
  QKD_CHECK(t->shape == shape, "{}: tensor '{}': shape {} disagrees with {} = [{}]", st.path(), name, t->shape_str(),
            why, fmt::join(shape, ", "));
  used.insert(name);
  return *t;
}

void check_finite_codes(const SafetensorsFile& st, const TensorView& t, ScaleType type) {
  const int64_t cols = t.shape[1];
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint16_t bits;
    std::memcpy(&bits, t.data + 2 * i, 2);
    const float v = int4_scale_to_float(bits, type);
    QKD_CHECK(std::isfinite(v), "{}: tensor '{}': value {} at [{}, {}] is not finite", st.path(), t.name, v,
              i / cols, i % cols);
  }
}

TensorView load_int4_tensor(const SafetensorsFile& st, const Slot& s, const Int4Params& p, ModelWeights& w,
                            std::set<std::string>& used) {
  const std::string qname = s.module + ".qweight";
  const int64_t n = s.shape[0], k = s.shape[1];
  const std::string what = fmt::format("{}: tensor '{}'", st.path(), qname);
  QKD_CHECK(k <= INT_MAX && n <= INT_MAX, "{}: shape [{}, {}] is too large for int4", what, n, k);
  const int gs = int4_group_size(p.group_size, static_cast<int>(k), what.c_str());
  const std::string shape_why = fmt::format("the config's [{}, {}] packed 8 per word, [n, k/8]", n, k);
  const std::string group_why =
      fmt::format("[n, k/group_size] for the config's [{}, {}] and group_size {}", n, k, group_size_text(p.group_size));

  const TensorView& packed = require_tensor(st, qname, DType::I32, {n, k / 8}, shape_why, used);
  const TensorView& scales = require_tensor(st, s.module + ".scales", scale_dtype(p.scale_type), {n, k / gs},
                                            group_why, used);
  check_finite_codes(st, scales, p.scale_type);
  const TensorView* mins = nullptr;
  if (p.sym == Int4Symmetry::Asymmetric) {
    mins = &require_tensor(st, s.module + ".mins", scale_dtype(p.scale_type), {n, k / gs}, group_why, used);
    check_finite_codes(st, *mins, p.scale_type);
  } else {
    QKD_CHECK(st.find(s.module + ".mins") == nullptr,
              "{}: tensor '{}.mins' is present but __metadata__ 'symmetric' is 'true'", st.path(), s.module);
  }

  TensorView v;
  v.name = qname;
  v.dtype = DType::I4;
  v.shape = s.shape;
  v.data = aligned_bytes(packed, 4, w);
  v.nbytes = packed.nbytes;
  v.int4.scales = reinterpret_cast<const uint16_t*>(aligned_bytes(scales, 2, w));
  v.int4.mins = mins != nullptr ? reinterpret_cast<const uint16_t*>(aligned_bytes(*mins, 2, w)) : nullptr;
  v.int4.group_size = gs;
  v.int4.sym = p.sym;
  v.int4.scale_type = p.scale_type;
  return v;
}

// rope parameters are written rounded to the shortest decimal that reads back as the same float, so that
// config.json shows 1e-05 rather than 9.999999747378752e-06.
double short_decimal(float x) { return std::stod(fmt::format("{}", x)); }

}  // namespace

// ---------------------------------------------------------------------------------------------- public API

const char* int4_module_name(Int4Module m) {
  const int i = static_cast<int>(m);
  return i >= 0 && i < kInt4ModuleCount ? kModuleNames[i] : "unknown";
}

const char* hf_linear_name(Int4Module m) {
  switch (m) {
    case Int4Module::Q: return "self_attn.q_proj";
    case Int4Module::K: return "self_attn.k_proj";
    case Int4Module::V: return "self_attn.v_proj";
    case Int4Module::O: return "self_attn.o_proj";
    case Int4Module::Gate: return "mlp.gate_proj";
    case Int4Module::Up: return "mlp.up_proj";
    case Int4Module::Down: return "mlp.down_proj";
    default: return "unknown";
  }
}

Int4ModuleSet parse_int4_modules(const std::string& list, const std::string& what) {
  Int4ModuleSet set = 0;
  size_t pos = 0;
  while (pos < list.size()) {
    size_t end = list.find(',', pos);
    if (end == std::string::npos) end = list.size();
    const std::string name = list.substr(pos, end - pos);
    int found = -1;
    for (int i = 0; i < kInt4ModuleCount; ++i)
      if (name == kModuleNames[i]) found = i;
    QKD_CHECK(found >= 0, "{}: unknown module '{}' in '{}' (known: {})", what, name, list,
              fmt::join(kModuleNames, ","));
    QKD_CHECK(!quantized(set, found), "{}: module '{}' is listed twice in '{}'", what, name, list);
    set |= Int4ModuleSet{1} << found;
    pos = end + 1;
    QKD_CHECK(end == list.size() || pos < list.size(), "{}: '{}' ends with a comma", what, list);
  }
  return set;
}

std::string format_int4_modules(Int4ModuleSet s) {
  std::vector<const char*> names;
  for (int i = 0; i < kInt4ModuleCount; ++i)
    if (quantized(s, i)) names.push_back(kModuleNames[i]);
  return fmt::format("{}", fmt::join(names, ","));
}

double Int4ModuleError::rel_rms() const { return sum_sq > 0.0 ? std::sqrt(sum_sq_err / sum_sq) : 0.0; }

LinearInput int4_linear_input(Int4Module m) {
  switch (m) {
    case Int4Module::Q:
    case Int4Module::K:
    case Int4Module::V: return LinearInput::AttnNorm;
    case Int4Module::O: return LinearInput::Attention;
    case Int4Module::Gate:
    case Int4Module::Up: return LinearInput::FfnNorm;
    case Int4Module::Down: return LinearInput::Swiglu;
    default: fail("int4_linear_input: {} is not a decoder layer's linear module", int4_module_name(m));
  }
}

Int4Quantized quantize_model_int4(const ModelWeights& src, const Int4Params& params, const Int4Calibration* gptq) {
  check_params(params);
  Int4Quantized q;
  q.params = params;
  q.quantizer = std::string(gptq != nullptr ? "gptq" : "rtn") +
                (params.scale_search == Int4ScaleSearch::ClipMse ? "-clip-search" : "");
  q.weights = src;  // views and storage: whatever stays unquantized stays zero-copy
  q.weights.format = kInt4CheckpointFormat;
  q.source_model = src.source;
  q.source_format = src.format;
  ModelConfig& c = q.weights.config;
  QKD_CHECK(c.arch == "llama", "{}: architecture '{}' cannot be quantized (qkd knows llama)", src.source, c.arch);
  // One tied matrix cannot be int4 as the embedding and bf16 as the head: quantizing only one of them unties them
  // (lm_head already views the same bytes, so nothing needs copying).
  if (c.tied_embeddings &&
      quantized(params.modules, static_cast<int>(Int4Module::Embed)) !=
          quantized(params.modules, static_cast<int>(Int4Module::LmHead)))
    c.tied_embeddings = false;

  QKD_CHECK(gptq == nullptr || gptq->hessians.size() == static_cast<size_t>(c.n_layers),
            "{}: the GPTQ calibration has {} layers, the model {}", src.source,
            gptq == nullptr ? 0 : gptq->hessians.size(), c.n_layers);

  std::vector<Int4ModuleError> errors(kInt4ModuleCount);
  for (const Slot& s : model_slots(c, &q.weights)) {
    if (quantized(params.modules, s.kind)) {
      const auto m = static_cast<Int4Module>(s.kind);
      GptqInput in{};
      const bool use_gptq = gptq != nullptr && m != Int4Module::Embed && m != Int4Module::LmHead;
      if (use_gptq) {
        in.hessian = &gptq->hessians[static_cast<size_t>(s.layer)][static_cast<size_t>(int4_linear_input(m))];
        in.percdamp = gptq->percdamp;
      }
      *s.view = quantize_tensor(src.source, s, params, use_gptq ? &in : nullptr, q.weights,
                                errors[static_cast<size_t>(s.kind)], q.notes);
    } else if (!is_dense(s.view->dtype)) {
      // GGUF blocks (and int4) are not safetensors dtypes; their exact fp32 values are.
      auto buf = std::make_shared<std::vector<float>>(to_f32(*s.view));
      *s.view = owned_view(s.view->name, DType::F32, s.view->shape, *buf);
      q.weights.storage.push_back(std::move(buf));
    }
  }
  if (c.tied_embeddings) q.weights.lm_head = q.weights.tok_embeddings;
  for (int i = 0; i < kInt4ModuleCount; ++i) {
    errors[static_cast<size_t>(i)].module = static_cast<Int4Module>(i);
    if (errors[static_cast<size_t>(i)].tensors > 0) q.errors.push_back(errors[static_cast<size_t>(i)]);
  }
  return q;
}

void check_int4_output(const std::string& out, Overwrite overwrite) {
  QKD_CHECK(!out.empty(), "no output path given");
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(out, ec);
  if (!fs::exists(st) || is_empty_dir(out)) return;
  QKD_CHECK(overwrite == Overwrite::Replace, "{}: already exists (pass --force to replace a qkd int4 checkpoint)", out);
  QKD_CHECK(fs::is_directory(st) && safetensors_format(fs::path(out) / kWeightsFile) == kInt4CheckpointFormat,
            "{}: exists and is not a qkd int4 checkpoint directory; refusing to replace it even with --force", out);
}

void write_int4_checkpoint(const std::string& out, const Int4Quantized& q, const std::vector<std::string>& companions,
                           Overwrite overwrite) {
  check_params(q.params);
  check_int4_output(out, overwrite);
  const Int4Params& p = q.params;
  ModelWeights w = q.weights;  // model_slots hands out pointers into a copy; the views are cheap to copy
  const ModelConfig& c = w.config;
  QKD_CHECK(!c.tied_embeddings || quantized(p.modules, static_cast<int>(Int4Module::Embed)) ==
                                      quantized(p.modules, static_cast<int>(Int4Module::LmHead)),
            "{}: tied embeddings need embed and lm_head both quantized or both not, modules are '{}'", out,
            format_int4_modules(p.modules));

  std::vector<TensorView> tensors;
  for (const Slot& s : model_slots(c, &w)) {
    const TensorView& t = *s.view;
    QKD_CHECK(t.shape == s.shape, "{}: tensor '{}': shape {} disagrees with the config's [{}]", out, t.name,
              t.shape_str(), fmt::join(s.shape, ", "));
    if (!quantized(p.modules, s.kind)) {
      QKD_CHECK(is_dense(t.dtype), "{}: tensor '{}': dtype {} cannot be stored unquantized (F32, F16, BF16)", out,
                t.name, dtype_name(t.dtype));
      TensorView d = t;
      d.name = s.module + ".weight";
      tensors.push_back(std::move(d));
      continue;
    }
    const Int4Weight iw = t.int4_weight();
    const int gs = int4_group_size(p.group_size, iw.k, t.name.c_str());
    QKD_CHECK(iw.group_size == gs && iw.sym == p.sym && iw.scale_type == p.scale_type,
              "{}: tensor '{}': its int4 parameters (group {}, {}, {}) differ from the checkpoint's (group {}, {}, {})",
              out, t.name, iw.group_size, iw.sym == Int4Symmetry::Symmetric ? "symmetric" : "asymmetric",
              scale_type_name(iw.scale_type), gs, p.sym == Int4Symmetry::Symmetric ? "symmetric" : "asymmetric",
              scale_type_name(p.scale_type));
    const int64_t n = iw.n, groups = iw.k / gs;
    TensorView packed;
    packed.name = s.module + ".qweight";
    packed.dtype = DType::I32;  // the uint32 words' bits: safetensors has no U32
    packed.shape = {n, iw.k / 8};
    packed.data = t.data;
    packed.nbytes = t.nbytes;
    tensors.push_back(packed);
    TensorView scales;
    scales.name = s.module + ".scales";
    scales.dtype = scale_dtype(p.scale_type);
    scales.shape = {n, groups};
    scales.data = reinterpret_cast<const std::byte*>(iw.scales);
    scales.nbytes = static_cast<size_t>(int4_scales_bytes(iw.n, iw.k, gs));
    tensors.push_back(scales);
    if (p.sym == Int4Symmetry::Asymmetric) {
      TensorView mins = scales;
      mins.name = s.module + ".mins";
      mins.data = reinterpret_cast<const std::byte*>(iw.mins);
      tensors.push_back(std::move(mins));
    }
  }

  const std::string config_json = model_config_to_hf_json(c);
  const std::map<std::string, std::string> meta{
      {"format", kInt4CheckpointFormat},
      {"format_version", std::to_string(kInt4CheckpointVersion)},
      {"bits", "4"},
      {"group_size", group_size_text(p.group_size)},
      {"symmetric", p.sym == Int4Symmetry::Symmetric ? "true" : "false"},
      {"scale_type", scale_type_name(p.scale_type)},
      {"quantized_modules", format_int4_modules(p.modules)},
      {"quantizer", q.quantizer},
      {"rope_layout", "interleaved"},
      {"source_model", q.source_model},
      {"source_format", q.source_format},
      {"config", config_json},
  };

  const fs::path target = fs::absolute(out);
  TempDir tmp;
  std::string tmpl = (target.parent_path() / ("." + target.filename().string() + ".tmp.XXXXXX")).string();
  if (::mkdtemp(tmpl.data()) == nullptr)
    fail("{}: cannot create a temp directory in {}: {}", out, target.parent_path().string(), std::strerror(errno));
  tmp.path = tmpl;
  // mkdtemp makes it 0700; a checkpoint is as readable as any model folder
  if (::chmod(tmp.path.c_str(), 0755) != 0)
    fail("{}: chmod of {} failed: {}", out, tmp.path.string(), std::strerror(errno));

  // A failed write (a full disk, say) names the checkpoint the user asked for, not only the temp folder; the
  // temp folder is removed and an existing checkpoint at `out` is untouched.
  try {
    write_safetensors((tmp.path / kWeightsFile).string(), tensors, meta);
    write_text_file(tmp.path / kConfigFile, config_json + "\n");
  } catch (const Error& e) {
    fail("{}: writing the checkpoint failed, nothing was replaced: {}", out, e.what());
  }
  for (const std::string& f : companions) {
    const fs::path name = fs::path(f).filename();
    QKD_CHECK(name != kWeightsFile && name != kConfigFile && name != kGgufTokenizerFile && !fs::exists(tmp.path / name),
              "{}: companion file {} collides with a file of the checkpoint", out, f);
    std::error_code ec;
    fs::copy_file(f, tmp.path / name, ec);
    QKD_CHECK(!ec, "{}: cannot copy {} into the checkpoint: {}", out, f, ec.message());
    // a read-only source (a shared model folder) should not make the copy read-only
    fs::permissions(tmp.path / name, fs::perms::owner_write, fs::perm_options::add, ec);
    sync_path(tmp.path / name, false);
  }
  if (q.source_format == "gguf") write_gguf_tokenizer(q.source_model, (tmp.path / kGgufTokenizerFile).string());
  sync_path(tmp.path, true);
  commit_dir(tmp.path, target, overwrite);
  tmp.committed = true;
  sync_path(target.parent_path(), true);  // the rename is durable once the parent's entry is on disk
}

std::vector<std::string> int4_companion_files(const ModelWeights& src) {
  // GGUF files carry their tokenizer inside; whatever sits beside one belongs to something else.
  if (src.format == "gguf") return {};
  std::vector<std::string> files;
  std::error_code ec;
  if (fs::is_directory(src.source, ec)) {
    for (const char* name : {"tokenizer.model", "tokenizer.bin", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "generation_config.json"}) {
      const fs::path p = fs::path(src.source) / name;
      if (fs::is_regular_file(p, ec)) files.push_back(p.string());
    }
  }
  const std::string tok = find_tokenizer(src.source);
  bool listed = false;
  for (const std::string& f : files) listed = listed || fs::path(f).filename() == fs::path(tok).filename();
  if (!tok.empty() && !listed) files.push_back(tok);
  return files;
}

bool is_int4_checkpoint(const std::string& path) {
  std::error_code ec;
  const fs::path file = fs::is_directory(path, ec) ? fs::path(path) / kWeightsFile : fs::path(path);
  return fs::is_regular_file(file, ec) && safetensors_format(file) == kInt4CheckpointFormat;
}

ModelWeights load_int4_checkpoint(const std::string& path) {
  std::error_code ec;
  const std::string file = fs::is_directory(path, ec) ? (fs::path(path) / kWeightsFile).string() : path;
  QKD_CHECK(fs::exists(file, ec), "{}: {} not found: not a qkd int4 checkpoint", path, file);
  const std::shared_ptr<const SafetensorsFile> st = SafetensorsFile::open(file);
  const Metadata m{st->metadata(), file};

  const std::string& format = m.get("format");
  QKD_CHECK(format == kInt4CheckpointFormat, "{}: __metadata__ 'format' is '{}', expected '{}'", file, format,
            kInt4CheckpointFormat);
  const std::string& version = m.get("format_version");
  QKD_CHECK(version == std::to_string(kInt4CheckpointVersion),
            "{}: __metadata__ 'format_version' is '{}'; this qkd reads version {}", file, version,
            kInt4CheckpointVersion);
  QKD_CHECK(m.get("bits") == "4", "{}: __metadata__ 'bits' is '{}', expected '4'", file, m.get("bits"));
  Int4Params p;
  const int group_sizes[] = {32, 64, 128, kInt4PerChannel};
  p.group_size = group_sizes[m.one_of("group_size", {"32", "64", "128", "channel"})];
  p.sym = m.one_of("symmetric", {"true", "false"}) == 0 ? Int4Symmetry::Symmetric : Int4Symmetry::Asymmetric;
  p.scale_type = m.one_of("scale_type", {"bf16", "fp16"}) == 0 ? ScaleType::BF16 : ScaleType::FP16;
  p.modules = parse_int4_modules(m.get("quantized_modules"), file + ": __metadata__ 'quantized_modules'");
  m.one_of("rope_layout", {"interleaved"});

  ModelWeights w;
  w.config = parse_hf_config(m.get("config"), file + ": __metadata__ 'config'");
  w.source = path;
  w.format = kInt4CheckpointFormat;
  w.layers.resize(static_cast<size_t>(w.config.n_layers));
  const ModelConfig& c = w.config;
  QKD_CHECK(!c.tied_embeddings || quantized(p.modules, static_cast<int>(Int4Module::Embed)) ==
                                      quantized(p.modules, static_cast<int>(Int4Module::LmHead)),
            "{}: config ties the embeddings but __metadata__ 'quantized_modules' '{}' quantizes only one of "
            "embed and lm_head",
            file, m.get("quantized_modules"));

  std::set<std::string> used;
  for (const Slot& s : model_slots(c, &w)) {
    if (quantized(p.modules, s.kind)) {
      *s.view = load_int4_tensor(*st, s, p, w, used);
      continue;
    }
    const std::string name = s.module + ".weight";
    const TensorView* t = st->find(name);
    QKD_CHECK(t != nullptr, "{}: tensor '{}' is missing", file, name);
    QKD_CHECK(is_dense(t->dtype), "{}: tensor '{}': dtype {} is not a weight dtype (F32, F16, BF16)", file, name,
              dtype_name(t->dtype));
    QKD_CHECK(t->shape == s.shape, "{}: tensor '{}': shape {} disagrees with the config's [{}]", file, name,
              t->shape_str(), fmt::join(s.shape, ", "));
    *s.view = *t;
    used.insert(name);
  }
  if (c.tied_embeddings) w.lm_head = w.tok_embeddings;
  for (const TensorView& t : st->tensors()) {
    QKD_CHECK(used.count(t.name) != 0, "{}: unexpected tensor '{}' (quantized_modules '{}', {} layers{})", file,
              t.name, m.get("quantized_modules"), c.n_layers, c.tied_embeddings ? ", tied embeddings" : "");
  }
  w.storage.push_back(st);
  return w;
}

std::string int4_checkpoint_quantizer(const std::string& path) {
  QKD_CHECK(is_int4_checkpoint(path), "{}: not a qkd int4 checkpoint", path);
  std::error_code ec;
  const std::string file = fs::is_directory(path, ec) ? (fs::path(path) / kWeightsFile).string() : path;
  const std::shared_ptr<const SafetensorsFile> st = SafetensorsFile::open(file);
  const auto it = st->metadata().find("quantizer");
  return it != st->metadata().end() ? it->second : std::string();
}

std::string model_config_to_hf_json(const ModelConfig& c) {
  QKD_CHECK(c.arch == "llama", "model_config_to_hf_json: architecture '{}' is not llama", c.arch);
  nlohmann::ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_size"] = c.dim;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["intermediate_size"] = c.ffn_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_seq_len;
  j["rms_norm_eps"] = short_decimal(c.norm_eps);
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["tie_word_embeddings"] = c.tied_embeddings;
  // parse_hf_config defaults an absent bos_token_id to 1; qkd has no "no BOS" id to write in its place.
  if (c.bos_id >= 0) j["bos_token_id"] = c.bos_id;
  if (c.eos_ids.size() == 1) {
    j["eos_token_id"] = c.eos_ids[0];
  } else if (!c.eos_ids.empty()) {
    j["eos_token_id"] = c.eos_ids;
  }
  nlohmann::ordered_json rope;
  rope["rope_theta"] = short_decimal(c.rope_theta);
  switch (c.rope_scaling.type) {
    case RopeScalingType::None: rope["rope_type"] = "default"; break;
    case RopeScalingType::Linear:
      rope["rope_type"] = "linear";
      rope["factor"] = short_decimal(c.rope_scaling.factor);
      break;
    case RopeScalingType::Llama3:
      rope["rope_type"] = "llama3";
      rope["factor"] = short_decimal(c.rope_scaling.factor);
      rope["low_freq_factor"] = short_decimal(c.rope_scaling.low_freq_factor);
      rope["high_freq_factor"] = short_decimal(c.rope_scaling.high_freq_factor);
      rope["original_max_position_embeddings"] = c.rope_scaling.original_max_position;
      break;
  }
  j["rope_parameters"] = rope;
  return j.dump(2);
}

}  // namespace qkd
