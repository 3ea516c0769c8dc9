// Faults during the writes of files qkd makes: a process killed with SIGKILL at a random point of a write, many
// times over, never leaves a checkpoint that fails to load, and what loads is always one complete checkpoint
// (the previous one or the new one, never a mixture); a full disk makes the write fail with an error that names
// the file and the reason, and leaves the previous file intact and no temp file behind. loader/atomic_file.h
// makes this so: temp file, fsync, rename.
//
// The full disk is a file-size limit (RLIMIT_FSIZE) set in a forked child, with SIGXFSZ ignored: every write past
// the limit fails with EFBIG, through the real writers, with no privileges and no mount (CI may run as any user).
// ENOSPC takes the same path through AtomicFile::write (any errno fails the write and names it); one case also
// fills a real disk: a 20 MiB tmpfs mounted in a child's own user and mount namespaces (skipped, with a message,
// where the kernel refuses unprivileged namespaces).
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "kernels/error.h"
#include "loader/int4_checkpoint.h"
#include "loader/safetensors.h"
#include "test_util.h"
#include "tiny_model.h"
#include "train/checkpoint.h"

namespace {

using namespace qkd;
using namespace qkd::train;

constexpr int64_t kTotal = int64_t{1} << 20;  // 4 MiB per buffer, 12 MiB a checkpoint: a write long enough to cut

TrainState state_with(float marker, int64_t step) {
  TrainState s;
  s.step = step;
  s.adam_step = step;
  s.config_json = R"({"bits":4})";
  s.master.assign(static_cast<size_t>(kTotal), marker);
  s.m.assign(static_cast<size_t>(kTotal), marker + 0.5f);
  s.v.assign(static_cast<size_t>(kTotal), marker + 0.25f);
  return s;
}

// Runs body() in a forked child and returns the string it returns, passed back through a pipe; "<unexpected
// exception> ..." when it throws, or a description of how the child died. The child changes what it likes
// (resource limits, namespaces, mounts) without touching this process.
template <typename F>
std::string in_child(F&& body) {
  int pipe_fds[2];
  REQUIRE(pipe(pipe_fds) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    close(pipe_fds[0]);
    std::string msg;
    try {
      msg = body();
    } catch (const std::exception& e) {
      msg = std::string("<unexpected exception> ") + e.what();
    }
    const ssize_t w = write(pipe_fds[1], msg.data(), msg.size());
    _exit(w == static_cast<ssize_t>(msg.size()) ? 0 : 4);
  }
  close(pipe_fds[1]);
  std::string msg;
  char buf[512];
  for (ssize_t r; (r = read(pipe_fds[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<size_t>(r));
  close(pipe_fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fmt::format("<the child died: status {:#x}>", status);
  return msg;
}

// Runs fn in a forked child whose files may not grow past limit_bytes, as if the disk filled up there. Returns
// the qkd::Error message fn threw, "<no error>" when it returned, or a description of what else happened.
template <typename F>
std::string error_with_file_size_limit(rlim_t limit_bytes, F&& fn) {
  return in_child([&]() -> std::string {
    std::signal(SIGXFSZ, SIG_IGN);  // a write past the limit then fails with EFBIG instead of killing the process
    const rlimit lim{limit_bytes, limit_bytes};
    if (setrlimit(RLIMIT_FSIZE, &lim) != 0) return std::string("<setrlimit failed> ") + std::strerror(errno);
    try {
      fn();
    } catch (const qkd::Error& e) {
      return e.what();
    } catch (const std::exception& e) {
      return std::string("<not a qkd::Error> ") + e.what();
    }
    return "<no error>";
  });
}

// Runs fn in a forked child that has a tmpfs of `bytes` mounted on `dir`, in its own user and mount namespaces
// (no privileges needed; nothing outside the child sees the mount). fn returns a report string, which this
// returns; "<skip> why" when the namespaces or the mount are refused.
template <typename F>
std::string in_private_tmpfs(const std::string& dir, size_t bytes, F&& fn) {
  const uid_t uid = getuid();
  const gid_t gid = getgid();
  return in_child([&]() -> std::string {
    auto write_proc = [](const char* file, const std::string& text) {
      const int fd = open(file, O_WRONLY);
      if (fd < 0) return false;
      const bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
      close(fd);
      return ok;
    };
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) return std::string("<skip> unshare: ") + std::strerror(errno);
    // map this user to root inside, so that the mount and the files on it are ours
    if (!write_proc("/proc/self/setgroups", "deny") || !write_proc("/proc/self/uid_map", fmt::format("0 {} 1", uid)) ||
        !write_proc("/proc/self/gid_map", fmt::format("0 {} 1", gid)))
      return std::string("<skip> id maps: ") + std::strerror(errno);
    if (mount("tmpfs", dir.c_str(), "tmpfs", 0, fmt::format("size={}", bytes).c_str()) != 0)
      return std::string("<skip> mount tmpfs: ") + std::strerror(errno);
    return fn();
  });
}

// The names in a directory (temp files start with '.').
std::vector<std::string> listing(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

constexpr const char* kTooLarge = "File too large";  // strerror(EFBIG)

}  // namespace

TEST_CASE("SIGKILL during checkpoint writes, 40 times at random points: the checkpoint always loads whole") {
  test::TempDir tmp("fault-kill");
  const std::string path = checkpoint_path(tmp.str());
  save_train_state(path, state_with(0.0f, 0));
  std::mt19937 rng(1234);
  int saw_new = 0;
  for (int round = 1; round <= 40; ++round) {
    int done_pipe[2];
    REQUIRE(pipe(done_pipe) == 0);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // The child rewrites the checkpoint with new contents, over and over, until it is killed, and says on the
      // pipe each time a write has completed.
      close(done_pipe[0]);
      for (int k = 0;; ++k) {
        save_train_state(path, state_with(static_cast<float>(round * 1000 + k), round * 1000 + k));
        const char one = 1;
        if (write(done_pipe[1], &one, 1) != 1) _exit(1);
      }
    }
    close(done_pipe[1]);
    // Even rounds kill at a random point of the first write; odd rounds wait for one completed write first, so
    // that the kill cuts a later one and the checkpoint found must be the newer whole one.
    if (round % 2 == 1) {
      char c;
      REQUIRE(read(done_pipe[0], &c, 1) == 1);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 40000)(rng)));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    close(done_pipe[0]);
    REQUIRE(WIFSIGNALED(status));
    const TrainState s = load_train_state(path, kTotal);  // throws if torn
    const float marker = s.master.front();
    CHECK(static_cast<int64_t>(marker) == s.step);
    bool whole = true;
    for (int64_t i = 0; i < kTotal; i += 4099)
      whole = whole && s.master[static_cast<size_t>(i)] == marker && s.m[static_cast<size_t>(i)] == marker + 0.5f &&
              s.v[static_cast<size_t>(i)] == marker + 0.25f;
    CHECK_MESSAGE(whole, fmt::format("round {}: the checkpoint of step {} mixes contents", round, s.step));
    CHECK(s.master.back() == marker);
    saw_new += s.step >= round * 1000;
    if (round % 2 == 1) CHECK(s.step >= round * 1000);  // a completed write is never lost
  }
  MESSAGE(fmt::format("40 kills; {} of them after the child had replaced the checkpoint at least once", saw_new));
  CHECK(saw_new >= 20);
  // A later save over the leftovers of the killed writers still works.
  save_train_state(path, state_with(7.0f, 7));
  CHECK(load_train_state(path, kTotal).step == 7);
}

TEST_CASE("a write that cannot complete leaves the previous checkpoint in place") {
  test::TempDir tmp("fault-ro");
  const std::string path = checkpoint_path(tmp.str());
  save_train_state(path, state_with(1.0f, 1));
  // The checkpoint directory made read-only: the temp file cannot be created (root ignores the mode, so then the
  // test only checks that the second write succeeded whole).
  std::filesystem::permissions(std::filesystem::path(path).parent_path(), std::filesystem::perms::owner_read |
                                                                              std::filesystem::perms::owner_exec);
  bool threw = false;
  try {
    save_train_state(path, state_with(2.0f, 2));
  } catch (const std::exception& e) {
    threw = true;
    CHECK(std::string(e.what()).find(std::filesystem::path(path).parent_path().string()) != std::string::npos);
  }
  std::filesystem::permissions(std::filesystem::path(path).parent_path(), std::filesystem::perms::owner_all);
  const TrainState s = load_train_state(path, kTotal);
  CHECK(s.step == (threw ? 1 : 2));
  CHECK(s.master.front() == (threw ? 1.0f : 2.0f));
}

TEST_CASE("a full disk during a checkpoint write: a clear error, the previous checkpoint intact, no temp file") {
  test::TempDir tmp("fault-full");
  const std::string path = checkpoint_path(tmp.str());
  const std::string dir = std::filesystem::path(path).parent_path().string();
  save_train_state(path, state_with(1.0f, 1));
  const auto before = listing(dir);
  // 12 MiB to write; the disk "fills up" after 1 MiB, then after 0 bytes (not even the header fits).
  for (rlim_t limit : {rlim_t{1} << 20, rlim_t{0}}) {
    CAPTURE(limit);
    const std::string msg = error_with_file_size_limit(limit, [&] { save_train_state(path, state_with(2.0f, 2)); });
    MESSAGE(msg);
    CHECK(msg.find(path) != std::string::npos);      // names the file
    CHECK(msg.find(kTooLarge) != std::string::npos);  // and says why
    CHECK(listing(dir) == before);                    // no temp file left behind
    const TrainState s = load_train_state(path, kTotal);
    CHECK(s.step == 1);
    bool intact = true;
    for (int64_t i = 0; i < kTotal; i += 4099)
      intact = intact && s.master[static_cast<size_t>(i)] == 1.0f && s.m[static_cast<size_t>(i)] == 1.5f &&
               s.v[static_cast<size_t>(i)] == 1.25f;
    CHECK(intact);
  }
  // Room again: the next save goes through.
  save_train_state(path, state_with(3.0f, 3));
  CHECK(load_train_state(path, kTotal).step == 3);
}

TEST_CASE("a full disk during a safetensors write: a clear error and no file, old or temp, changed") {
  test::TempDir tmp("fault-full-st");
  const std::string path = tmp / "model.safetensors";
  std::vector<float> big(1 << 18, 0.5f), small(4, 0.25f);
  const auto tensor = [](const std::vector<float>& v) {
    TensorView t;
    t.name = "w";
    t.dtype = DType::F32;
    t.shape = {static_cast<int64_t>(v.size())};
    t.data = reinterpret_cast<const std::byte*>(v.data());
    t.nbytes = v.size() * sizeof(float);
    return t;
  };
  // A new file that does not fit: nothing appears.
  std::string msg = error_with_file_size_limit(64 << 10, [&] { write_safetensors(path, {tensor(big)}); });
  MESSAGE(msg);
  CHECK(msg.find(path) != std::string::npos);
  CHECK(msg.find(kTooLarge) != std::string::npos);
  CHECK(listing(tmp.str()).empty());
  // Replacing a file with one that does not fit: the old one stays, whole.
  write_safetensors(path, {tensor(small)}, {{"version", "old"}});
  msg = error_with_file_size_limit(64 << 10, [&] { write_safetensors(path, {tensor(big)}, {{"version", "new"}}); });
  CHECK(msg.find(kTooLarge) != std::string::npos);
  CHECK(listing(tmp.str()) == std::vector<std::string>{"model.safetensors"});
  const auto st = SafetensorsFile::open(path);
  CHECK(st->metadata().at("version") == "old");
  CHECK(to_f32(st->get("w")) == small);
}

TEST_CASE("a full disk during an int4 checkpoint write (qkd-quantize): a clear error, the old checkpoint intact") {
  test::TempDir tmp("fault-full-int4");
  const std::string out = tmp / "model-int4";
  const ModelWeights src = test::make_tiny_model(test::tiny_config(), 7);
  Int4Params p;
  p.group_size = 32;
  const Int4Quantized q = quantize_model_int4(src, p);
  write_int4_checkpoint(out, q, {}, Overwrite::Refuse);
  const ModelWeights old = load_int4_checkpoint(out);
  const std::vector<float> old_emb = to_f32(old.tok_embeddings);
  const auto before = listing(tmp.str());
  Int4Params p2 = p;
  p2.sym = Int4Symmetry::Asymmetric;
  const Int4Quantized q2 = quantize_model_int4(src, p2);
  const std::string msg =
      error_with_file_size_limit(8 << 10, [&] { write_int4_checkpoint(out, q2, {}, Overwrite::Replace); });
  MESSAGE(msg);
  // The message names the checkpoint asked for first, then the file being written: model.safetensors inside the
  // output's temp folder, <dir>/.model-int4.tmp.XXXXXX/ (the folder is renamed to the output once complete).
  CHECK(msg.rfind(out + ": writing the checkpoint failed, nothing was replaced: ", 0) == 0);
  CHECK(msg.find(tmp.str() + "/.model-int4.tmp.") != std::string::npos);
  CHECK(msg.find("/model.safetensors: ") != std::string::npos);
  CHECK(msg.find(kTooLarge) != std::string::npos);
  CHECK(listing(tmp.str()) == before);  // no temp folder left behind
  const ModelWeights again = load_int4_checkpoint(out);
  CHECK(again.layers.at(0).wq.int4.sym == Int4Symmetry::Symmetric);
  CHECK(to_f32(again.tok_embeddings) == old_emb);
}

TEST_CASE("a really full disk (a 20 MiB tmpfs): ENOSPC names the file, the previous checkpoint stays whole") {
  test::TempDir tmp("fault-enospc");
  // 12 MiB a checkpoint: the first fits, the second's temp file cannot (the old one must stay until the rename)
  const std::string report = in_private_tmpfs(tmp.str(), size_t{20} << 20, [&] {
    const std::string path = tmp.str() + "/train-state.safetensors";
    save_train_state(path, state_with(1.0f, 1));
    const auto before = listing(tmp.str());
    std::string msg = "<no error>";
    try {
      save_train_state(path, state_with(2.0f, 2));
    } catch (const Error& e) {
      msg = e.what();
    }
    const TrainState s = load_train_state(path, kTotal);
    bool intact = s.step == 1;
    for (int64_t i = 0; i < kTotal; i += 4099)
      intact = intact && s.master[static_cast<size_t>(i)] == 1.0f && s.v[static_cast<size_t>(i)] == 1.25f;
    return fmt::format("{}\n{}\n{}", msg, intact ? "intact" : "CHANGED",
                       listing(tmp.str()) == before ? "same files" : "files differ");
  });
  if (report.rfind("<skip>", 0) == 0) {
    MESSAGE("skipped: " << report << " (unprivileged user namespaces are off here; the file-size cases above cover the "
                                     "same error path)");
    return;
  }
  MESSAGE(report);
  CHECK(report.find(tmp.str() + "/train-state.safetensors") != std::string::npos);  // names the file
  CHECK(report.find("No space left on device") != std::string::npos);                // and says why
  CHECK(report.find("\nintact\n") != std::string::npos);                             // the old checkpoint loads whole
  CHECK(report.find("\nsame files") != std::string::npos);                            // no temp file left behind
}
