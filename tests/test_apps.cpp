// The apps end to end, as a user runs them: stdout/stderr contents and exit codes, including every bad input the
// Foundation issue lists. Runs the built binaries from build/bin.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>
#include <csignal>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "loader/mmap_file.h"
#include "tests/test_util.h"

namespace {

struct Run {
  int code = -1;
  std::string out, err;
};

// Runs `args` (shell syntax) with a binary from build/bin, capturing stdout and stderr separately.
Run run(const std::string& bin, const std::string& args, const std::string& stdin_text = "") {
  namespace fs = std::filesystem;
  static int counter = 0;
  const fs::path dir = fs::temp_directory_path() / ("qkd-test-apps-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string tag = std::to_string(counter++);
  const fs::path in = dir / ("in" + tag), out = dir / ("out" + tag), err = dir / ("err" + tag);
  { std::FILE* f = std::fopen(in.c_str(), "wb"); std::fwrite(stdin_text.data(), 1, stdin_text.size(), f); std::fclose(f); }
  const std::string cmd = qkd::test::bin_dir() + "/" + bin + " " + args + " <" + in.string() + " >" + out.string() +
                          " 2>" + err.string();
  const int status = std::system(cmd.c_str());
  Run r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = qkd::read_text_file(out.string());
  r.err = qkd::read_text_file(err.string());
  return r;
}

std::string teacher() { return qkd::test::shared_data() + "/models/teacher-25m"; }

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

}  // namespace

TEST_CASE("qkd-run one-shot: stdout is the prompt then the generated text (greedy = transformers)") {
  QKD_REQUIRE_SHARED_DATA();
  const auto j = nlohmann::json::parse(qkd::read_text_file(qkd::test::fixtures_dir() + "/hf/teacher-25m.json"));
  const std::string text = j["text"];
  Run r = run("qkd-run", "-m " + teacher() + " --backend cpu --temp 0 -n 32 -c 128 -p '" + text + "'");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out == text + j["greedy_32_text"].get<std::string>() + "\n");
  CHECK(r.err.find("tok/s") != std::string::npos);  // statistics go to stderr
}

TEST_CASE("qkd-run with an empty prompt starts from BOS and drops the leading space") {
  QKD_REQUIRE_SHARED_DATA();
  Run r = run("qkd-run", "-m " + teacher() + " --backend cpu --temp 0 -n 12 -p ''");
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(r.out.size() > 2);
  CHECK(r.out[0] != ' ');
}

TEST_CASE("qkd-run sampling is reproducible with --seed") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string args = "-m " + teacher() + " --backend cpu --temp 0.9 --top-k 40 --top-p 0.9 --seed 42 -n 24 -p 'the king'";
  Run a = run("qkd-run", args), b = run("qkd-run", args);
  REQUIRE(a.code == 0);
  CHECK(a.out == b.out);
}

TEST_CASE("qkd-run chat REPL: replies stream, /reset works, EOF exits cleanly") {
  QKD_REQUIRE_SHARED_DATA();
  Run r = run("qkd-run", "-m " + teacher() + " --backend cpu --temp 0 -n 8", "once upon a time\n/reset\nthe lord said\n");
  INFO(r.err);
  CHECK(r.code == 0);
  CHECK(r.out.size() > 4);
  CHECK(r.err.find("chat template none") != std::string::npos);
}

TEST_CASE("qkd-run bad input: one-line errors naming the value, non-zero exit") {
  SUBCASE("unknown flag") {
    Run r = run("qkd-run", "--bogus");
    CHECK(r.code == 2);
    CHECK(r.err.find("unknown flag '--bogus'") != std::string::npos);
  }
  SUBCASE("a number that does not parse") {
    Run r = run("qkd-run", "-m x --temp abc");
    CHECK(r.code == 2);
    CHECK(r.err.find("--temp: 'abc' is not a valid number") != std::string::npos);
  }
  SUBCASE("sampling parameters out of range") {
    Run r = run("qkd-run", "-m x --top-p 1.5 -p hi");
    CHECK(r.code != 0);
    CHECK(r.err.find("--top-p") != std::string::npos);
    CHECK(r.err.find("1.5") != std::string::npos);
  }
  SUBCASE("missing model") {
    Run r = run("qkd-run", "-m /nonexistent/model -p hi");
    CHECK(r.code == 1);
    CHECK(r.err.find("/nonexistent/model") != std::string::npos);
  }
  SUBCASE("missing tokenizer") {
    Run r = run("qkd-run", "-m " + qkd::test::fixtures_dir() + "/hf/tiny-llama -p hi");
    CHECK(r.code == 1);
    CHECK(r.err.find("no tokenizer found") != std::string::npos);
  }
  SUBCASE("prompt bytes that are not UTF-8") {
    QKD_REQUIRE_SHARED_DATA();
    Run r = run("qkd-run", "-m " + teacher() + " --backend cpu -p \"$(printf 'ab\\377')\"");
    CHECK(r.code == 1);
    CHECK(r.err.find("not valid UTF-8: byte 0xff at offset 2") != std::string::npos);
  }
  SUBCASE("prompt longer than the context") {
    QKD_REQUIRE_SHARED_DATA();
    Run r = run("qkd-run", "-m " + teacher() + " --backend cpu -c 8 -p 'one two three four five six seven eight nine ten'");
    CHECK(r.code == 1);
    CHECK(r.err.find("but the context (-c) is 8") != std::string::npos);
  }
  SUBCASE("a context longer than the model's maximum is clamped with a warning") {
    QKD_REQUIRE_SHARED_DATA();
    Run r = run("qkd-run", "-m " + teacher() + " --backend cpu -c 99999 --temp 0 -n 2 -p hi");
    CHECK(r.code == 0);
    CHECK(r.err.find("longer than the model's maximum context 1024") != std::string::npos);
  }
  SUBCASE("--backend cuda without a GPU") {
    QKD_REQUIRE_SHARED_DATA();
    if (have_gpu()) return;
    Run r = run("qkd-run", "-m " + teacher() + " --backend cuda -p hi");
    CHECK(r.code == 1);
    CHECK(r.err.find("cuda") != std::string::npos);
  }
  SUBCASE("unknown backend and chat template") {
    Run r = run("qkd-run", "-m x --backend tpu");
    CHECK(r.code != 0);
    CHECK(r.err.find("'tpu'") != std::string::npos);
    Run t = run("qkd-run", "-m x --chat-template jinja2 -p hi");
    CHECK(t.code != 0);
    CHECK(t.err.find("jinja2") != std::string::npos);
  }
}

TEST_CASE("qkd-eval --json on teacher-25m matches transformers' perplexity within 1e-3 nats") {
  QKD_REQUIRE_SHARED_DATA();
  const auto ref = nlohmann::json::parse(qkd::read_text_file(qkd::test::fixtures_dir() + "/hf/teacher-25m-eval.json"));
  Run r = run("qkd-eval", "-m " + teacher() + " --backend cpu --json -c " + std::to_string(ref["ctx"].get<int>()) +
                              " --text " + qkd::test::fixtures_dir() + "/hf/eval.txt");
  INFO(r.err);
  REQUIRE(r.code == 0);
  const auto j = nlohmann::json::parse(r.out);
  CHECK(j["n_tokens"].get<int64_t>() == ref["n_tokens"].get<int64_t>());
  CHECK(std::abs(j["mean_nll"].get<double>() - ref["mean_nll"].get<double>()) < 1e-3);
  CHECK(std::abs(j["perplexity"].get<double>() - ref["ppl"].get<double>()) / ref["ppl"].get<double>() < 1e-3);
}

TEST_CASE("qkd-eval bad input") {
  Run r = run("qkd-eval", "-m x");
  CHECK(r.code == 2);
  CHECK(r.err.find("--text") != std::string::npos);
  Run m = run("qkd-eval", "-m x --text /nonexistent.txt");
  CHECK(m.code == 1);
  CHECK(m.err.find("/nonexistent.txt") != std::string::npos);
}

TEST_CASE("qkd-run REPL: Ctrl-C stops the reply and the session goes on; babyllama writes words") {
  QKD_REQUIRE_SHARED_DATA();
  // Drive the REPL through pipes: one long reply, SIGINT once it streams, then a second turn and EOF.
  int in_pipe[2], out_pipe[2], err_pipe[2];
  REQUIRE(pipe(in_pipe) == 0);
  REQUIRE(pipe(out_pipe) == 0);
  REQUIRE(pipe(err_pipe) == 0);
  const std::string bin = qkd::test::bin_dir() + "/qkd-run";
  const std::string model = teacher();
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    dup2(in_pipe[0], 0);
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    for (int fd : {in_pipe[0], in_pipe[1], out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) close(fd);
    execl(bin.c_str(), bin.c_str(), "-m", model.c_str(), "--backend", "cpu", "-n", "-1", "--seed", "1", nullptr);
    _exit(127);
  }
  close(in_pipe[0]);
  close(out_pipe[1]);
  close(err_pipe[1]);
  const std::string turn1 = "once upon a time\n";
  REQUIRE(write(in_pipe[1], turn1.data(), turn1.size()) == static_cast<ssize_t>(turn1.size()));
  std::string out;
  char buf[4096];
  while (out.size() < 40) {  // the reply is streaming
    const ssize_t n = read(out_pipe[0], buf, sizeof buf);
    REQUIRE(n > 0);
    out.append(buf, static_cast<size_t>(n));
  }
  REQUIRE(kill(pid, SIGINT) == 0);
  const std::string turn2 = "the lord said\n";
  REQUIRE(write(in_pipe[1], turn2.data(), turn2.size()) == static_cast<ssize_t>(turn2.size()));
  close(in_pipe[1]);  // EOF after the second turn: the REPL exits cleanly
  for (ssize_t n; (n = read(out_pipe[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  std::string err;
  for (ssize_t n; (n = read(err_pipe[0], buf, sizeof buf)) > 0;) err.append(buf, static_cast<size_t>(n));
  int status = 0;
  waitpid(pid, &status, 0);
  INFO(err);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(err.find("[reply stopped]") != std::string::npos);
  close(out_pipe[0]);
  close(err_pipe[0]);

  // The smaller llama2.c model, greedily: real English words, printable text.
  Run r = run("qkd-run", "-m " + qkd::test::shared_data() + "/models/babyllama-tok105/model.bin --backend cpu --temp 0 "
                         "-n 60 -p 'Once upon a time'");
  REQUIRE(r.code == 0);
  for (const char* word : {" a ", " was ", " to ", "."}) CHECK(r.out.find(word) != std::string::npos);
  for (char c : r.out) CHECK((c == '\n' || (c >= 32 && c < 127)));
}
