// The safetensors format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}},
// then the data section; offsets are relative to the data section and the tensors tile it with no gap and no
// overlap (the format forbids holes so that a file cannot smuggle other content).
//
// The reader maps the file and validates the whole header before handing out any view: header length, JSON,
// dtype (F32, F16, BF16, I32), shapes (non-negative, numel not overflowing), offsets (ordered, inside the data
// section, byte size == numel * dtype size, no overlap, no gap). Views are zero-copy into the mapping and may be
// unaligned for their dtype; they stay valid while the SafetensorsFile lives.
//
// The writer writes atomically (temp file beside the target, fsync, rename), so a crash never leaves a torn file
// under the final name. qkd's own checkpoints (int4) use it with their format name and parameters in metadata.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loader/mmap_file.h"
#include "loader/tensor.h"

namespace qkd {

class SafetensorsFile {
 public:
  // Throws qkd::Error naming the file and the offending tensor, field and value.
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path);

  const std::string& path() const { return map_->path(); }
  // Every tensor, in the order of their data in the file.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // nullptr when the file has no tensor of that name.
  const TensorView* find(std::string_view name) const;
  // Throws qkd::Error "<file>: no tensor '<name>'" when absent.
  const TensorView& get(std::string_view name) const;
  // The "__metadata__" string map (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::shared_ptr<const MappedFile>& mapping() const { return map_; }

 private:
  SafetensorsFile() = default;
  std::shared_ptr<const MappedFile> map_;
  std::vector<TensorView> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes the tensors (name, dtype, shape, data, nbytes; dense dtypes F32/F16/BF16/I32 only) in the given order,
// with the metadata as "__metadata__". Names must be unique and not "__metadata__"; nbytes must equal
// numel * dtype size. Atomic: the file appears under `path` complete or not at all. Throws qkd::Error.
void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace qkd
