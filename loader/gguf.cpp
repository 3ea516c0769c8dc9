#include "loader/gguf.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "kernels/error.h"
#include "loader/ggml_quants.h"
#include "loader/gguf_tokenizer.h"

namespace qkd {

namespace {

constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
// Nested arrays recurse; a hostile file could nest deeper than the stack allows. No real key nests at all.
constexpr int kMaxArrayDepth = 8;
// Element and tensor counts are bounded so that byte sizes (at most 4 bytes an element) fit in 64 bits.
constexpr uint64_t kMaxElements = uint64_t{1} << 60;
// The fewest bytes a metadata entry (key length, value type, one-byte value) and a tensor info (name length,
// n_dims, type, offset) can take: a count larger than the bytes left divided by these cannot be real.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;

const char* ggml_type_name(uint32_t t) {
  // ggml.h's enum ggml_type; the gaps (4, 5, 31-33, 36-38) are types that were removed.
  static constexpr const char* kNames[] = {
      "F32",     "F16",    "Q4_0",   "Q4_1",    "",        "",      "Q5_0",   "Q5_1",   "Q8_0",    "Q8_1",
      "Q2_K",    "Q3_K",   "Q4_K",   "Q5_K",    "Q6_K",    "Q8_K",  "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
      "IQ4_NL",  "IQ3_S",  "IQ2_S",  "IQ4_XS",  "I8",      "I16",   "I32",    "I64",    "F64",     "IQ1_M",
      "BF16",    "",       "",       "",        "TQ1_0",   "TQ2_0", "",       "",       "",        "MXFP4"};
  if (t < std::size(kNames) && kNames[t][0] != '\0') return kNames[t];
  return "unknown";
}

bool dtype_from_ggml(uint32_t t, DType* out) {
  switch (t) {
    case 0: *out = DType::F32; return true;
    case 1: *out = DType::F16; return true;
    case 2: *out = DType::Q4_0; return true;
    case 3: *out = DType::Q4_1; return true;
    case 8: *out = DType::Q8_0; return true;
    case 30: *out = DType::BF16; return true;
    default: return false;
  }
}

size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    default: return 0;
  }
}

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::F64); }

// Reads the file front to back; every read is checked against the bytes left, so nothing past the end is
// touched and every failure names where it happened.
class Cursor {
 public:
  Cursor(const std::string& path, const std::byte* base, size_t size) : path_(path), base_(base), size_(size) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  const std::byte* take(size_t n, std::string_view ctx, const char* what) {
    if (n > left())
      fail("{}: {}: {} at byte {} needs {} bytes but the file ends at byte {}", path_, ctx, what, pos_, n, size_);
    const std::byte* p = base_ + pos_;
    pos_ += n;
    return p;
  }
  template <typename T>
  T read(std::string_view ctx, const char* what) {
    T v;
    std::memcpy(&v, take(sizeof(T), ctx, what), sizeof(T));  // the format has no alignment
    return v;
  }
  std::string_view str(std::string_view ctx, const char* what) {
    const size_t at = pos_;
    const uint64_t len = read<uint64_t>(ctx, what);
    if (len > left())
      fail("{}: {}: {} length {} at byte {} runs past the end of the file ({} bytes)", path_, ctx, what, len, at,
           size_);
    return {reinterpret_cast<const char*>(take(len, ctx, what)), static_cast<size_t>(len)};
  }

 private:
  const std::string& path_;
  const std::byte* base_;
  size_t size_;
  size_t pos_ = 0;
};

GgufValue parse_value(Cursor& c, const std::string& path, GgufType type, std::string_view ctx, int depth) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufType::U8: v.u = c.read<uint8_t>(ctx, "value"); break;
    case GgufType::U16: v.u = c.read<uint16_t>(ctx, "value"); break;
    case GgufType::U32: v.u = c.read<uint32_t>(ctx, "value"); break;
    case GgufType::U64: v.u = c.read<uint64_t>(ctx, "value"); break;
    case GgufType::I8: v.i = c.read<int8_t>(ctx, "value"); break;
    case GgufType::I16: v.i = c.read<int16_t>(ctx, "value"); break;
    case GgufType::I32: v.i = c.read<int32_t>(ctx, "value"); break;
    case GgufType::I64: v.i = c.read<int64_t>(ctx, "value"); break;
    case GgufType::F32: v.f = c.read<float>(ctx, "value"); break;
    case GgufType::F64: v.f = c.read<double>(ctx, "value"); break;
    case GgufType::BOOL:
      v.u = c.read<uint8_t>(ctx, "value");
      QKD_CHECK(v.u <= 1, "{}: {}: bool value {} is neither 0 nor 1", path, ctx, v.u);
      break;
    case GgufType::STRING: v.str = c.str(ctx, "string"); break;
    case GgufType::ARRAY: {
      QKD_CHECK(depth < kMaxArrayDepth, "{}: {}: arrays nested more than {} deep", path, ctx, kMaxArrayDepth);
      const uint32_t et = c.read<uint32_t>(ctx, "array element type");
      QKD_CHECK(valid_type(et), "{}: {}: unknown array element type {}", path, ctx, et);
      v.elem_type = static_cast<GgufType>(et);
      v.count = c.read<uint64_t>(ctx, "array length");
      const size_t min_elem = v.elem_type == GgufType::STRING  ? 8
                              : v.elem_type == GgufType::ARRAY ? 12
                                                               : scalar_size(v.elem_type);
      if (v.count > c.left() / min_elem)
        fail("{}: {}: array length {} of {} cannot fit in the {} bytes left in the file", path, ctx, v.count,
             gguf_type_name(v.elem_type), c.left());
      if (v.elem_type == GgufType::STRING) {
        v.strings.reserve(v.count);
        for (uint64_t k = 0; k < v.count; ++k) v.strings.push_back(c.str(ctx, "array string"));
      } else if (v.elem_type == GgufType::ARRAY) {
        v.arrays.reserve(v.count);
        for (uint64_t k = 0; k < v.count; ++k) v.arrays.push_back(parse_value(c, path, GgufType::ARRAY, ctx, depth + 1));
      } else {
        v.scalars = c.take(v.count * min_elem, ctx, "array data");
        if (v.elem_type == GgufType::BOOL)
          for (uint64_t k = 0; k < v.count; ++k)
            QKD_CHECK(static_cast<uint8_t>(v.scalars[k]) <= 1, "{}: {}: element {}: bool value {} is neither 0 nor 1",
                      path, ctx, k, static_cast<uint8_t>(v.scalars[k]));
      }
      break;
    }
  }
  return v;
}

template <typename T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Integer array element k as int64 when it is exactly representable.
bool int_element(const GgufValue& a, uint64_t k, int64_t* out) {
  const std::byte* p = a.scalars + k * scalar_size(a.elem_type);
  switch (a.elem_type) {
    case GgufType::U8: *out = load<uint8_t>(p); return true;
    case GgufType::U16: *out = load<uint16_t>(p); return true;
    case GgufType::U32: *out = load<uint32_t>(p); return true;
    case GgufType::I8: *out = load<int8_t>(p); return true;
    case GgufType::I16: *out = load<int16_t>(p); return true;
    case GgufType::I32: *out = load<int32_t>(p); return true;
    case GgufType::I64: *out = load<int64_t>(p); return true;
    case GgufType::U64: {
      const uint64_t u = load<uint64_t>(p);
      *out = static_cast<int64_t>(u);
      return u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    }
    default: return false;
  }
}

bool is_unsigned(GgufType t) {
  return t == GgufType::U8 || t == GgufType::U16 || t == GgufType::U32 || t == GgufType::U64;
}
bool is_signed(GgufType t) {
  return t == GgufType::I8 || t == GgufType::I16 || t == GgufType::I32 || t == GgufType::I64;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::U8: return "UINT8";
    case GgufType::I8: return "INT8";
    case GgufType::U16: return "UINT16";
    case GgufType::I16: return "INT16";
    case GgufType::U32: return "UINT32";
    case GgufType::I32: return "INT32";
    case GgufType::F32: return "FLOAT32";
    case GgufType::BOOL: return "BOOL";
    case GgufType::STRING: return "STRING";
    case GgufType::ARRAY: return "ARRAY";
    case GgufType::U64: return "UINT64";
    case GgufType::I64: return "INT64";
    case GgufType::F64: return "FLOAT64";
  }
  return "unknown";
}

GgufFile GgufFile::open(const std::string& path) {
  GgufFile g;
  g.map_ = MappedFile::open(path);
  const std::byte* base = g.map_->data();
  const size_t size = g.map_->size();
  Cursor c(path, base, size);

  if (size < 4 || std::memcmp(base, "GGUF", 4) != 0) {
    std::string head;
    for (size_t k = 0; k < std::min<size_t>(size, 4); ++k) head += fmt::format("{:02x}", static_cast<uint8_t>(base[k]));
    fail("{}: not a GGUF file (it starts with bytes '{}', not 'GGUF')", path, head);
  }
  c.take(4, "header", "magic");
  g.version_ = c.read<uint32_t>("header", "version");
  if (g.version_ == 1)
    fail("{}: GGUF version 1 is not supported (versions 2 and 3 are); convert the model again with a current llama.cpp",
         path);
  if (g.version_ != 2 && g.version_ != 3)
    fail("{}: GGUF version {} is not supported (versions 2 and 3 are; a big-endian file reads as a huge version)",
         path, g.version_);
  const uint64_t n_tensors = c.read<uint64_t>("header", "tensor count");
  const uint64_t n_kv = c.read<uint64_t>("header", "metadata key/value count");
  if (n_kv > c.left() / kMinKvBytes)
    fail("{}: header: metadata key/value count {} cannot fit in the {} bytes after the header", path, n_kv, c.left());
  if (n_tensors > c.left() / kMinTensorInfoBytes)
    fail("{}: header: tensor count {} cannot fit in the {} bytes after the header", path, n_tensors, c.left());

  g.kv_.reserve(n_kv);
  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string entry = fmt::format("metadata entry {}", k);
    const std::string_view key = c.str(entry, "key");
    const std::string ctx = fmt::format("key '{}'", key);
    const uint32_t type = c.read<uint32_t>(ctx, "value type");
    QKD_CHECK(valid_type(type), "{}: {}: unknown value type {}", path, ctx, type);
    GgufValue v = parse_value(c, path, static_cast<GgufType>(type), ctx, 0);
    QKD_CHECK(g.kv_index_.emplace(key, g.kv_.size()).second, "{}: {} appears twice", path, ctx);
    g.kv_.emplace_back(key, std::move(v));
  }

  if (const GgufValue* a = g.find("general.alignment")) {
    QKD_CHECK(is_unsigned(a->type), "{}: key 'general.alignment' is {}, expected an unsigned integer", path,
              gguf_type_name(a->type));
    QKD_CHECK(a->u > 0 && (a->u & (a->u - 1)) == 0 && a->u <= (uint64_t{1} << 30),
              "{}: key 'general.alignment': {} is not a power of two (up to 2^30)", path, a->u);
    g.alignment_ = a->u;
  }

  g.tensors_.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo t;
    t.name = std::string(c.str(fmt::format("tensor info {}", k), "name"));
    const std::string ctx = fmt::format("tensor '{}'", t.name);
    const uint32_t n_dims = c.read<uint32_t>(ctx, "dimension count");
    QKD_CHECK(n_dims >= 1 && n_dims <= kMaxDims, "{}: {}: {} dimensions (1 to {} are allowed)", path, ctx, n_dims,
              kMaxDims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = c.read<uint64_t>(ctx, "dimension");
      QKD_CHECK(ne >= 1 && ne <= kMaxElements / numel, "{}: {}: dimension {} is {} (the element count must be 1 to 2^60)",
                path, ctx, d, ne);
      numel *= ne;
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    t.ggml_type = c.read<uint32_t>(ctx, "type");
    if (!dtype_from_ggml(t.ggml_type, &t.dtype))
      fail("{}: {}: ggml type {} ({}) is not supported (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are)", path, ctx,
           t.ggml_type, ggml_type_name(t.ggml_type));
    const bool blocked = t.dtype == DType::Q8_0 || t.dtype == DType::Q4_0 || t.dtype == DType::Q4_1;
    QKD_CHECK(!blocked || t.ne[0] % kGgmlBlock == 0, "{}: {}: row length {} is not a multiple of the {}-value {} block",
              path, ctx, t.ne[0], kGgmlBlock, dtype_name(t.dtype));
    t.nbytes = ggml_row_bytes(t.dtype, t.ne[0]) * static_cast<size_t>(numel / static_cast<uint64_t>(t.ne[0]));
    t.offset = c.read<uint64_t>(ctx, "data offset");
    g.tensors_.push_back(std::move(t));
  }
  // Index after the vector stops growing: the keys view the names stored in it.
  g.tensor_index_.clear();
  for (size_t k = 0; k < g.tensors_.size(); ++k)
    QKD_CHECK(g.tensor_index_.emplace(g.tensors_[k].name, k).second, "{}: tensor '{}' appears twice", path,
              g.tensors_[k].name);

  if (g.tensors_.empty()) return g;  // a vocabulary-only file may end before its (empty) data section
  const uint64_t data_start = (c.pos() + g.alignment_ - 1) / g.alignment_ * g.alignment_;
  QKD_CHECK(data_start <= size, "{}: the data section would start at byte {}, past the end of the file ({} bytes)",
            path, data_start, size);
  const uint64_t data_size = size - data_start;
  for (GgufTensorInfo& t : g.tensors_) {
    QKD_CHECK(t.offset % g.alignment_ == 0, "{}: tensor '{}': offset {} is not aligned to {}", path, t.name, t.offset,
              g.alignment_);
    if (t.offset > data_size || t.nbytes > data_size - t.offset)
      fail("{}: tensor '{}': {} {} bytes at data offset {} run past the end of the data section ({} bytes)", path,
           t.name, t.nbytes, dtype_name(t.dtype), t.offset, data_size);
    t.data = base + data_start + t.offset;
  }
  std::vector<size_t> order(g.tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return g.tensors_[a].offset < g.tensors_[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const GgufTensorInfo& a = g.tensors_[order[k - 1]];
    const GgufTensorInfo& b = g.tensors_[order[k]];
    if (a.offset + a.nbytes > b.offset)
      fail("{}: tensor '{}' (data bytes {} to {}) overlaps tensor '{}' (from data byte {})", path, a.name, a.offset,
           a.offset + a.nbytes, b.name, b.offset);
  }
  return g;
}

const GgufValue* GgufFile::find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufValue& GgufFile::require(std::string_view key, const char* what) const {
  const GgufValue* v = find(key);
  if (v == nullptr) fail("{}: key '{}' ({}) is missing", path(), key, what);
  return *v;
}

std::string_view GgufFile::get_string(std::string_view key) const {
  const GgufValue& v = require(key, "a string");
  QKD_CHECK(v.type == GgufType::STRING, "{}: key '{}' is {}, expected STRING", path(), key, gguf_type_name(v.type));
  return v.str;
}

uint64_t GgufFile::get_uint(std::string_view key) const {
  const GgufValue& v = require(key, "an unsigned integer");
  if (is_unsigned(v.type)) return v.u;
  QKD_CHECK(is_signed(v.type), "{}: key '{}' is {}, expected an unsigned integer", path(), key, gguf_type_name(v.type));
  QKD_CHECK(v.i >= 0, "{}: key '{}' is {}, expected a non-negative integer", path(), key, v.i);
  return static_cast<uint64_t>(v.i);
}

int64_t GgufFile::get_int(std::string_view key) const {
  const GgufValue& v = require(key, "an integer");
  if (is_signed(v.type)) return v.i;
  QKD_CHECK(is_unsigned(v.type), "{}: key '{}' is {}, expected an integer", path(), key, gguf_type_name(v.type));
  QKD_CHECK(v.u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "{}: key '{}' = {} is too large",
            path(), key, v.u);
  return static_cast<int64_t>(v.u);
}

double GgufFile::get_float(std::string_view key) const {
  const GgufValue& v = require(key, "a number");
  if (v.type == GgufType::F32 || v.type == GgufType::F64) return v.f;
  if (is_unsigned(v.type)) return static_cast<double>(v.u);
  if (is_signed(v.type)) return static_cast<double>(v.i);
  fail("{}: key '{}' is {}, expected a number", path(), key, gguf_type_name(v.type));
}

bool GgufFile::get_bool(std::string_view key) const {
  const GgufValue& v = require(key, "a bool");
  QKD_CHECK(v.type == GgufType::BOOL, "{}: key '{}' is {}, expected BOOL", path(), key, gguf_type_name(v.type));
  return v.u != 0;
}

std::string_view GgufFile::get_string(std::string_view key, std::string_view fallback) const {
  return has(key) ? get_string(key) : fallback;
}
uint64_t GgufFile::get_uint(std::string_view key, uint64_t fallback) const {
  return has(key) ? get_uint(key) : fallback;
}
double GgufFile::get_float(std::string_view key, double fallback) const {
  return has(key) ? get_float(key) : fallback;
}
bool GgufFile::get_bool(std::string_view key, bool fallback) const { return has(key) ? get_bool(key) : fallback; }

const std::vector<std::string_view>& GgufFile::get_string_array(std::string_view key) const {
  const GgufValue& v = require(key, "an array of strings");
  QKD_CHECK(v.type == GgufType::ARRAY && v.elem_type == GgufType::STRING, "{}: key '{}' is {} of {}, expected ARRAY of STRING",
            path(), key, gguf_type_name(v.type), gguf_type_name(v.elem_type));
  return v.strings;
}

std::vector<float> GgufFile::get_float_array(std::string_view key) const {
  const GgufValue& v = require(key, "an array of floats");
  QKD_CHECK(v.type == GgufType::ARRAY && (v.elem_type == GgufType::F32 || v.elem_type == GgufType::F64),
            "{}: key '{}' is {} of {}, expected ARRAY of FLOAT32", path(), key, gguf_type_name(v.type),
            gguf_type_name(v.elem_type));
  std::vector<float> out(v.count);
  for (uint64_t k = 0; k < v.count; ++k)
    out[k] = v.elem_type == GgufType::F32 ? load<float>(v.scalars + 4 * k)
                                          : static_cast<float>(load<double>(v.scalars + 8 * k));
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(std::string_view key) const {
  const GgufValue& v = require(key, "an array of integers");
  QKD_CHECK(v.type == GgufType::ARRAY && (is_signed(v.elem_type) || is_unsigned(v.elem_type)),
            "{}: key '{}' is {} of {}, expected ARRAY of integers", path(), key, gguf_type_name(v.type),
            gguf_type_name(v.elem_type));
  std::vector<int64_t> out(v.count);
  for (uint64_t k = 0; k < v.count; ++k)
    QKD_CHECK(int_element(v, k, &out[k]), "{}: key '{}': element {} is too large", path(), key, k);
  return out;
}

int64_t GgufFile::array_length(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return -1;
  QKD_CHECK(v->type == GgufType::ARRAY, "{}: key '{}' is {}, expected ARRAY", path(), key, gguf_type_name(v->type));
  return static_cast<int64_t>(v->count);
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

TensorView GgufFile::view(const GgufTensorInfo& t) const {
  TensorView v;
  v.name = t.name;
  v.dtype = t.dtype;
  v.shape.assign(t.ne.rbegin(), t.ne.rend());
  v.data = t.data;
  v.nbytes = t.nbytes;
  return v;
}

namespace {

int positive_int(const GgufFile& f, std::string_view key, uint64_t value) {
  QKD_CHECK(value >= 1 && value <= (uint64_t{1} << 30), "{}: key '{}' = {} is out of range (1 to 2^30)", f.path(), key,
            value);
  return static_cast<int>(value);
}

RopeScaling gguf_rope_scaling(const GgufFile& f) {
  RopeScaling r;
  // Llama 3.1-style scaling is stored as a per-frequency factor tensor, not as parameters qkd's config holds.
  QKD_CHECK(f.find_tensor("rope_freqs.weight") == nullptr,
            "{}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not supported yet", f.path());
  std::string_view type = f.get_string("llama.rope.scaling.type", "");
  if (type.empty() && f.has("llama.rope.scale_linear")) type = "linear";  // the key older converters wrote
  if (type.empty() || type == "none") return r;
  QKD_CHECK(type == "linear", "{}: key 'llama.rope.scaling.type' = '{}' is not supported (none and linear are)",
            f.path(), type);
  r.type = RopeScalingType::Linear;
  r.factor = static_cast<float>(f.has("llama.rope.scaling.factor") ? f.get_float("llama.rope.scaling.factor")
                                                                   : f.get_float("llama.rope.scale_linear"));
  QKD_CHECK(r.factor >= 1.0f, "{}: linear RoPE scaling factor {} is below 1", f.path(), r.factor);
  return r;
}

}  // namespace

ModelWeights load_gguf_model(const std::string& path) { return load_gguf_model(GgufFile::open(path)); }

ModelWeights load_gguf_model(const GgufFile& f) {
  const std::string& path = f.path();
  const std::string_view arch = f.get_string("general.architecture");
  QKD_CHECK(arch == "llama", "{}: general.architecture is '{}'; qkd reads only 'llama' GGUF models", path, arch);

  ModelWeights w;
  w.source = path;
  w.format = "gguf";
  ModelConfig& c = w.config;
  c.arch = "llama";
  c.dim = positive_int(f, "llama.embedding_length", f.get_uint("llama.embedding_length"));
  c.n_layers = positive_int(f, "llama.block_count", f.get_uint("llama.block_count"));
  c.n_heads = positive_int(f, "llama.attention.head_count", f.get_uint("llama.attention.head_count"));
  c.n_kv_heads = positive_int(f, "llama.attention.head_count_kv",
                              f.get_uint("llama.attention.head_count_kv", static_cast<uint64_t>(c.n_heads)));
  c.ffn_dim = positive_int(f, "llama.feed_forward_length", f.get_uint("llama.feed_forward_length"));
  c.max_seq_len = positive_int(f, "llama.context_length", f.get_uint("llama.context_length"));
  c.norm_eps = static_cast<float>(f.get_float("llama.attention.layer_norm_rms_epsilon"));
  c.rope_theta = static_cast<float>(f.get_float("llama.rope.freq_base", 10000.0));
  c.rope_scaling = gguf_rope_scaling(f);
  QKD_CHECK(c.norm_eps > 0.0f, "{}: key 'llama.attention.layer_norm_rms_epsilon' = {} is not positive", path, c.norm_eps);
  QKD_CHECK(c.rope_theta > 0.0f, "{}: key 'llama.rope.freq_base' = {} is not positive", path, c.rope_theta);
  QKD_CHECK(c.n_heads % c.n_kv_heads == 0, "{}: head_count {} is not a multiple of head_count_kv {}", path, c.n_heads,
            c.n_kv_heads);
  if (f.has("llama.attention.key_length")) {
    c.head_dim = positive_int(f, "llama.attention.key_length", f.get_uint("llama.attention.key_length"));
  } else {
    QKD_CHECK(c.dim % c.n_heads == 0, "{}: embedding_length {} is not a multiple of head_count {}", path, c.dim, c.n_heads);
    c.head_dim = c.dim / c.n_heads;
  }
  QKD_CHECK(c.head_dim % 2 == 0, "{}: head_dim {} is odd; RoPE rotates pairs", path, c.head_dim);
  for (const char* key : {"llama.attention.value_length", "llama.rope.dimension_count"}) {
    if (!f.has(key)) continue;
    const uint64_t v = f.get_uint(key);
    QKD_CHECK(v == static_cast<uint64_t>(c.head_dim), "{}: key '{}' = {} differs from head_dim {} (qkd needs them equal)",
              path, key, v, c.head_dim);
  }
  // The vocabulary is token_embd's row count (the logits' width); the tokenizer may have fewer tokens than a
  // padded embedding, never more.
  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  QKD_CHECK(embd != nullptr, "{}: tensor 'token_embd.weight' is missing", path);
  QKD_CHECK(embd->ne.size() == 2, "{}: tensor 'token_embd.weight' has {} dimensions, expected 2", path, embd->ne.size());
  c.vocab_size = positive_int(f, "token_embd.weight", static_cast<uint64_t>(embd->ne[1]));
  if (f.has("llama.vocab_size"))
    QKD_CHECK(f.get_uint("llama.vocab_size") == static_cast<uint64_t>(c.vocab_size),
              "{}: key 'llama.vocab_size' = {} differs from token_embd.weight's {} rows", path,
              f.get_uint("llama.vocab_size"), c.vocab_size);
  const int64_t n_tokens = f.array_length("tokenizer.ggml.tokens");
  QKD_CHECK(n_tokens <= c.vocab_size, "{}: tokenizer.ggml.tokens has {} tokens, more than token_embd.weight's {} rows",
            path, n_tokens, c.vocab_size);
  if (f.has("tokenizer.ggml.bos_token_id")) {
    const uint64_t bos = f.get_uint("tokenizer.ggml.bos_token_id");
    QKD_CHECK(bos < static_cast<uint64_t>(c.vocab_size), "{}: key 'tokenizer.ggml.bos_token_id' = {} is not a token id",
              path, bos);
    c.bos_id = static_cast<int32_t>(bos);
  }
  const std::vector<int32_t> eos = gguf_end_of_generation_ids(f);
  if (!eos.empty()) c.eos_ids = eos;

  // llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.modify_tensors) applies LlamaModel.permute to
  // q_proj/k_proj: reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2), which turns Hugging Face's rotate-half
  // row order back into Meta's interleaved pairs. GGUF q/k rows are therefore already in qkd's order
  // (loader/model.h) and are used as they are.
  std::vector<std::string> used;
  auto get = [&](const std::string& name, std::vector<int64_t> shape) {
    const GgufTensorInfo* t = f.find_tensor(name);
    QKD_CHECK(t != nullptr, "{}: tensor '{}' is missing", path, name);
    TensorView v = f.view(*t);
    QKD_CHECK(v.shape == shape, "{}: tensor '{}' has shape {}, expected [{}]", path, name, v.shape_str(),
              fmt::join(shape, ", "));
    used.push_back(name);
    return v;
  };
  const int64_t q_rows = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_rows = int64_t{c.n_kv_heads} * c.head_dim;
  w.tok_embeddings = get("token_embd.weight", {c.vocab_size, c.dim});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = fmt::format("blk.{}.", l);
    LayerWeights L;
    L.attn_norm = get(p + "attn_norm.weight", {c.dim});
    L.wq = get(p + "attn_q.weight", {q_rows, c.dim});
    L.wk = get(p + "attn_k.weight", {kv_rows, c.dim});
    L.wv = get(p + "attn_v.weight", {kv_rows, c.dim});
    L.wo = get(p + "attn_output.weight", {c.dim, q_rows});
    L.ffn_norm = get(p + "ffn_norm.weight", {c.dim});
    L.w_gate = get(p + "ffn_gate.weight", {c.ffn_dim, c.dim});
    L.w_up = get(p + "ffn_up.weight", {c.ffn_dim, c.dim});
    L.w_down = get(p + "ffn_down.weight", {c.dim, c.ffn_dim});
    w.layers.push_back(std::move(L));
  }
  w.norm = get("output_norm.weight", {c.dim});
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  w.lm_head = c.tied_embeddings ? w.tok_embeddings : get("output.weight", {c.vocab_size, c.dim});
  // A tensor this loader does not use (a bias, an extra layer) would be silently ignored and give a wrong model.
  if (used.size() != f.tensors().size()) {
    for (const GgufTensorInfo& t : f.tensors())
      if (std::find(used.begin(), used.end(), t.name) == used.end())
        fail("{}: tensor '{}' is not part of a {}-layer llama model; qkd does not know what to do with it", path,
             t.name, c.n_layers);
  }
  w.storage.push_back(f.mapping());
  return w;
}

std::string default_model_path() {
  std::string dir;
  if (const char* c = std::getenv("QKD_CACHE_DIR"); c != nullptr && *c != '\0') {
    dir = c;
  } else if (const char* h = std::getenv("HOME"); h != nullptr && *h != '\0') {
    dir = std::string(h) + "/.cache/qkd";
  } else {
    return "";
  }
  return dir + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace qkd
