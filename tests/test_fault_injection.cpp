// Faults during the trainer's checkpoint writes: a process killed with SIGKILL at a random point of a write, many
// times over, never leaves a checkpoint that fails to load, and what loads is always one complete checkpoint
// (the previous one or the new one, never a mixture). loader/atomic_file.h makes this so: temp file, fsync,
// rename.
#include <chrono>
#include <csignal>
#include <filesystem>
#include <random>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "test_util.h"
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
