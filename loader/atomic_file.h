// Files qkd writes (checkpoints, GGUF exports) are written atomically: the bytes go to a temp file beside the
// target, which is synced and then renamed into place, and the directory entry is synced too. A crash, a full
// disk or an exception at any point leaves the old file (or no file) and no temp file behind.
#pragma once

#include <cstddef>
#include <string>

namespace qkd {

// Refuse: the final rename fails rather than replace a file that appeared meanwhile. Replace: swap it atomically.
enum class Overwrite { Refuse, Replace };

class AtomicFile {
 public:
  explicit AtomicFile(std::string target);  // creates the temp file; throws qkd::Error naming the target
  ~AtomicFile();                            // removes the temp file unless commit() went through
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* buf, size_t n);
  // fsync, close, rename into place, fsync the directory.
  void commit(Overwrite overwrite = Overwrite::Replace);

 private:
  std::string target_, temp_, dir_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace qkd
