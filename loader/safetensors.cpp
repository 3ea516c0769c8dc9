#include "loader/safetensors.h"

#include "loader/atomic_file.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/ggml_quants.h"

namespace qkd {

namespace {

// The reference implementation refuses headers past 100 MB; a larger one is a corrupt length, not a model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> known[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"I32", DType::I32}};
  for (const auto& [name, t] : known) {
    if (s == name) {
      *out = t;
      return true;
    }
  }
  return false;
}

bool is_dense(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::I32; }

size_t dtype_bytes(DType t) { return ggml_row_bytes(t, 1); }

// A non-negative JSON integer as uint64, or false (negative, fractional, not a number).
bool json_u64(const nlohmann::json& v, uint64_t* out) {
  if (!v.is_number_unsigned()) return false;
  *out = v.get<uint64_t>();
  return true;
}

// numel * elem_size with every product checked: a hostile shape must not wrap into a small, "valid" size.
bool checked_nbytes(const std::vector<int64_t>& shape, size_t elem_size, int64_t* numel, uint64_t* nbytes) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, d, &n)) return false;
  }
  uint64_t b;
  if (__builtin_mul_overflow(static_cast<uint64_t>(n), static_cast<uint64_t>(elem_size), &b)) return false;
  *numel = n;
  *nbytes = b;
  return true;
}

struct Entry {
  TensorView view;
  uint64_t begin = 0, end = 0;
};

Entry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& j) {
  Entry e;
  e.view.name = name;
  QKD_CHECK(j.is_object(), "{}: tensor '{}': header entry is {}, expected an object", path, name, j.dump());
  auto dtype = j.find("dtype");
  QKD_CHECK(dtype != j.end() && dtype->is_string(), "{}: tensor '{}': missing or non-string 'dtype'", path, name);
  QKD_CHECK(parse_dtype(dtype->get<std::string>(), &e.view.dtype),
            "{}: tensor '{}': unsupported dtype '{}' (qkd reads F32, F16, BF16, I32)", path, name,
            dtype->get<std::string>());

  auto shape = j.find("shape");
  QKD_CHECK(shape != j.end() && shape->is_array(), "{}: tensor '{}': missing or non-array 'shape'", path, name);
  for (const auto& d : *shape) {
    uint64_t v;
    QKD_CHECK(json_u64(d, &v) && v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
              "{}: tensor '{}': shape {} has a dimension {} that is not a non-negative integer", path, name,
              shape->dump(), d.dump());
    e.view.shape.push_back(static_cast<int64_t>(v));
  }

  auto offs = j.find("data_offsets");
  QKD_CHECK(offs != j.end() && offs->is_array() && offs->size() == 2,
            "{}: tensor '{}': 'data_offsets' must be [begin, end], got {}", path, name,
            offs == j.end() ? std::string("nothing") : offs->dump());
  QKD_CHECK(json_u64((*offs)[0], &e.begin) && json_u64((*offs)[1], &e.end),
            "{}: tensor '{}': data_offsets {} are not non-negative integers", path, name, offs->dump());
  QKD_CHECK(e.begin <= e.end, "{}: tensor '{}': data_offsets {} begin after they end", path, name, offs->dump());

  int64_t numel;
  uint64_t nbytes;
  QKD_CHECK(checked_nbytes(e.view.shape, dtype_bytes(e.view.dtype), &numel, &nbytes),
            "{}: tensor '{}': shape {} overflows a 64-bit size", path, name, shape->dump());
  QKD_CHECK(e.end - e.begin == nbytes,
            "{}: tensor '{}': data_offsets {} span {} bytes but {} {} needs {}", path, name, offs->dump(),
            e.end - e.begin, dtype->get<std::string>(), e.view.shape_str(), nbytes);
  e.view.nbytes = static_cast<size_t>(nbytes);
  return e;
}

uint64_t read_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

}  // namespace

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->map_ = MappedFile::open(path);
  const uint64_t file_size = f->map_->size();
  QKD_CHECK(file_size >= 8, "{}: {} bytes is too short for a safetensors header length (8 bytes)", path, file_size);
  const uint64_t header_len = read_le64(f->map_->data());
  QKD_CHECK(header_len <= file_size - 8, "{}: header length {} runs past the end of the {}-byte file", path,
            header_len, file_size);
  QKD_CHECK(header_len <= kMaxHeaderBytes, "{}: header length {} exceeds the {}-byte limit", path, header_len,
            kMaxHeaderBytes);

  const char* text = reinterpret_cast<const char*>(f->map_->data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + header_len);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: header is not valid JSON: {}", path, e.what());
  }
  QKD_CHECK(header.is_object(), "{}: header is a JSON {}, expected an object", path, header.type_name());

  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      QKD_CHECK(value.is_object(), "{}: __metadata__ is a JSON {}, expected an object of strings", path,
                value.type_name());
      for (const auto& [mk, mv] : value.items()) {
        QKD_CHECK(mv.is_string(), "{}: __metadata__ '{}' is {}, expected a string", path, mk, mv.dump());
        f->metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(path, key, value));
  }

  // The tensors must tile the data section exactly, as the format requires: sorted by position, each begins where
  // the previous ended. This rejects overlaps (two views of the same bytes), gaps and trailing bytes in one pass.
  const uint64_t data_size = file_size - 8 - header_len;
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const std::string* prev = nullptr;
  for (const Entry& e : entries) {
    QKD_CHECK(e.end <= data_size, "{}: tensor '{}': data_offsets [{}, {}] exceed the {}-byte data section", path,
              e.view.name, e.begin, e.end, data_size);
    QKD_CHECK(e.begin >= expected, "{}: tensor '{}': data_offsets [{}, {}] overlap tensor '{}' (which ends at {})",
              path, e.view.name, e.begin, e.end, prev != nullptr ? *prev : std::string(), expected);
    QKD_CHECK(e.begin == expected, "{}: tensor '{}': data_offsets [{}, {}] leave a gap after byte {}", path,
              e.view.name, e.begin, e.end, expected);
    expected = e.end;
    prev = &e.view.name;
  }
  QKD_CHECK(expected == data_size, "{}: tensors cover {} bytes of the {}-byte data section", path, expected,
            data_size);

  const std::byte* data = f->map_->data() + 8 + header_len;
  f->tensors_.reserve(entries.size());
  for (Entry& e : entries) {
    e.view.data = data + e.begin;
    f->index_.emplace(e.view.name, f->tensors_.size());
    f->tensors_.push_back(std::move(e.view));
  }
  return f;
}

const TensorView* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorView& SafetensorsFile::get(std::string_view name) const {
  const TensorView* t = find(name);
  QKD_CHECK(t != nullptr, "{}: no tensor '{}'", path(), name);
  return *t;
}

void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> names;
  for (const TensorView& t : tensors) {
    QKD_CHECK(!t.name.empty() && t.name != "__metadata__", "{}: invalid tensor name '{}'", path, t.name);
    QKD_CHECK(names.insert(t.name).second, "{}: tensor '{}' given twice", path, t.name);
    QKD_CHECK(is_dense(t.dtype), "{}: tensor '{}': safetensors cannot hold dtype {}", path, t.name,
              dtype_name(t.dtype));
    for (int64_t d : t.shape) QKD_CHECK(d >= 0, "{}: tensor '{}': negative dimension in {}", path, t.name, t.shape_str());
    int64_t numel;
    uint64_t nbytes;
    QKD_CHECK(checked_nbytes(t.shape, dtype_bytes(t.dtype), &numel, &nbytes), "{}: tensor '{}': shape {} overflows",
              path, t.name, t.shape_str());
    QKD_CHECK(nbytes == t.nbytes, "{}: tensor '{}': {} {} needs {} bytes, the view has {}", path, t.name,
              dtype_name(t.dtype), t.shape_str(), nbytes, t.nbytes);
    QKD_CHECK(t.nbytes == 0 || t.data != nullptr, "{}: tensor '{}' has no data", path, t.name);
  }

  // Wider dtypes first: with the header padded to a multiple of 8, every tensor then starts aligned to its own
  // element size, so readers may use the mapped bytes directly.
  std::vector<const TensorView*> order;
  for (const TensorView& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) {
    return dtype_bytes(a->dtype) > dtype_bytes(b->dtype);
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorView* t : order) {
    header[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {offset, offset + t->nbytes}}};
    offset += t->nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // JSON allows trailing whitespace; upstream pads the same way
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(static_cast<uint64_t>(text.size()) >> (8 * i));

  AtomicFile out(path);
  out.write(len_bytes, 8);
  out.write(text.data(), text.size());
  for (const TensorView* t : order) out.write(t->data, t->nbytes);
  out.commit(Overwrite::Replace);
}

}  // namespace qkd
