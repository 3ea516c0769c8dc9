#include "loader/atomic_file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/error.h"

namespace qkd {

AtomicFile::AtomicFile(std::string target) : target_(std::move(target)) {
  const std::filesystem::path t = std::filesystem::absolute(target_);
  dir_ = t.parent_path().string();
  std::string tmpl = (t.parent_path() / ("." + t.filename().string() + ".tmp.XXXXXX")).string();
  fd_ = ::mkstemp(tmpl.data());
  if (fd_ < 0) fail("{}: cannot create a temp file in {}: {}", target_, dir_, std::strerror(errno));
  temp_ = tmpl;
  if (::fchmod(fd_, 0644) != 0) fail("{}: chmod of the temp file failed: {}", target_, std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
}

void AtomicFile::write(const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) fail("{}: write failed: {}", target_, std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit(Overwrite overwrite) {
  if (::fsync(fd_) != 0) fail("{}: fsync failed: {}", target_, std::strerror(errno));
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("{}: close failed: {}", target_, std::strerror(errno));
  const int rc = overwrite == Overwrite::Refuse
                     ? ::renameat2(AT_FDCWD, temp_.c_str(), AT_FDCWD, target_.c_str(), RENAME_NOREPLACE)
                     : ::rename(temp_.c_str(), target_.c_str());
  if (rc != 0) fail("{}: cannot move the finished file into place: {}", target_, std::strerror(errno));
  committed_ = true;
  // The rename is durable only once the directory entry is on disk too.
  const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) fail("{}: cannot open directory {} to sync it: {}", target_, dir_, std::strerror(errno));
  const int drc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (drc != 0 && err != EINVAL) fail("{}: fsync of directory {} failed: {}", target_, dir_, std::strerror(err));
}

}  // namespace qkd
