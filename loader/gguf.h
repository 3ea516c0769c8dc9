// GGUF (llama.cpp's model file format), versions 2 and 3, read through mmap.
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count metadata entries
// (string key, u32 value type, value); tensor_count tensor infos (string name, u32 n_dims, u64 ne[n_dims],
// u32 ggml type, u64 offset); padding to general.alignment (default 32); the data section. A string is a u64
// byte length and the bytes. ne[0] is the innermost (row) length: a GGUF tensor with ne = [in, out] is qkd's
// row-major [out, in].
//
// GgufFile::open checks every count, length, dimension, type, offset and size against the file before it uses
// it, and throws qkd::Error naming the file, the key or tensor, and the value. Tensor data stays in the
// mapping: views are zero-copy and keep their GGML block layout (loader/ggml_quants.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loader/mmap_file.h"
#include "loader/model.h"
#include "loader/tensor.h"

namespace qkd {

// GGUF metadata value types, numbered as in the file.
enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10,
  I64 = 11, F64 = 12,
};

const char* gguf_type_name(GgufType t);

// One metadata value. Strings are views into the mapping (not NUL-terminated, not checked for UTF-8).
struct GgufValue {
  GgufType type = GgufType::U8;
  uint64_t u = 0;                 // U8 U16 U32 U64 BOOL
  int64_t i = 0;                  // I8 I16 I32 I64
  double f = 0;                   // F32 F64
  std::string_view str;           // STRING
  // ARRAY: elem_type and count, and the elements in the member that fits their type.
  GgufType elem_type = GgufType::U8;
  uint64_t count = 0;
  const std::byte* scalars = nullptr;    // numeric or BOOL elements, packed little-endian in the mapping
  std::vector<std::string_view> strings; // STRING elements
  std::vector<GgufValue> arrays;         // ARRAY elements (nested arrays)
};

struct GgufTensorInfo {
  std::string name;
  uint32_t ggml_type = 0;
  DType dtype = DType::F32;
  std::vector<int64_t> ne;  // GGUF order: ne[0] is the row length
  uint64_t offset = 0;      // from the start of the data section
  size_t nbytes = 0;
  const std::byte* data = nullptr;
};

class GgufFile {
 public:
  // Maps and validates the whole file. Throws qkd::Error on anything malformed or unsupported.
  static GgufFile open(const std::string& path);
  // Move-only: the indexes view names stored inside the object.
  GgufFile(GgufFile&&) = default;
  GgufFile& operator=(GgufFile&&) = default;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return map_->path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::shared_ptr<const MappedFile>& mapping() const { return map_; }

  // Metadata in file order.
  const std::vector<std::pair<std::string_view, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(std::string_view key) const;  // nullptr when absent
  bool has(std::string_view key) const { return find(key) != nullptr; }

  // Typed getters: throw naming the file and key when the key is absent or holds another type. Integer
  // getters accept any integer type whose value fits; float getters accept F32, F64 and integers.
  std::string_view get_string(std::string_view key) const;
  uint64_t get_uint(std::string_view key) const;
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  // The same with a default for an absent key (a present key of the wrong type still throws).
  std::string_view get_string(std::string_view key, std::string_view fallback) const;
  uint64_t get_uint(std::string_view key, uint64_t fallback) const;
  double get_float(std::string_view key, double fallback) const;
  bool get_bool(std::string_view key, bool fallback) const;
  // Arrays: throw when absent or when the elements have another type (numeric arrays accept any numeric
  // element type that converts exactly; float arrays accept F32 and F64).
  const std::vector<std::string_view>& get_string_array(std::string_view key) const;
  std::vector<float> get_float_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;
  // An array's element count, or -1 when the key is absent (throws when it is not an array).
  int64_t array_length(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;  // nullptr when absent
  // A zero-copy view with qkd's row-major shape (ne reversed).
  TensorView view(const GgufTensorInfo& t) const;

 private:
  GgufFile() = default;
  const GgufValue& require(std::string_view key, const char* what) const;

  std::shared_ptr<const MappedFile> map_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<std::pair<std::string_view, GgufValue>> kv_;
  std::unordered_map<std::string_view, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> tensor_index_;
};

// A LLaMA-architecture GGUF model (general.architecture = "llama") as qkd's ModelWeights: hyperparameters from
// the llama.* keys, views of the weights in their GGUF dtypes (F32, F16, BF16, Q8_0, Q4_0, Q4_1), tied
// embeddings when output.weight is absent, format "gguf". The mapping lives in ModelWeights::storage.
ModelWeights load_gguf_model(const std::string& path);
ModelWeights load_gguf_model(const GgufFile& file);

// Where tools/fetch-default-model.sh puts the default chat model:
// ${QKD_CACHE_DIR:-$HOME/.cache/qkd}/models/SmolLM2-135M-Instruct.Q4_1.gguf ("" when neither variable is set).
std::string default_model_path();

}  // namespace qkd
