// A read-only memory map of a whole file. Loaders keep a shared_ptr to it in ModelWeights::storage so that
// TensorViews into the mapping stay valid as long as the model does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace qkd {

class MappedFile {
 public:
  // Throws qkd::Error naming the path and the OS error when the file cannot be opened or mapped.
  static std::shared_ptr<const MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

// Reads a whole (small) file into a string; throws qkd::Error naming the path.
std::string read_text_file(const std::string& path);

}  // namespace qkd
