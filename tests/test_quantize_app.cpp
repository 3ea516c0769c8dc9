// qkd-quantize end to end through the built binaries (build/bin), as a user runs it: the summary on stderr, the
// checkpoint it writes, refusing to overwrite, usage errors (exit 2) and bad models (exit 1), and qkd-run on the
// int4 checkpoint it wrote.
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <sys/wait.h>
#include <unistd.h>

#include "loader/int4_checkpoint.h"
#include "loader/mmap_file.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;

namespace {

struct Run {
  int code = -1;
  std::string out, err;
};

// One scratch directory for the whole run, removed at exit.
struct Scratch {
  fs::path dir = fs::temp_directory_path() / ("qkd-test-quantize-app-" + std::to_string(::getpid()));
  Scratch() {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

fs::path scratch() {
  static const Scratch s;
  return s.dir;
}

// Runs `args` (shell syntax) with a binary from build/bin, capturing stdout and stderr separately.
Run run(const std::string& bin, const std::string& args) {
  static int counter = 0;
  const std::string tag = std::to_string(counter++);
  const fs::path out = scratch() / ("out" + tag), err = scratch() / ("err" + tag);
  const std::string cmd =
      qkd::test::bin_dir() + "/" + bin + " " + args + " </dev/null >" + out.string() + " 2>" + err.string();
  const int status = std::system(cmd.c_str());
  Run r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = qkd::read_text_file(out.string());
  r.err = qkd::read_text_file(err.string());
  return r;
}

std::string tiny() { return qkd::test::fixtures_dir() + "/hf/tiny-llama"; }
std::string out_path(const std::string& name) { return (scratch() / name).string(); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("qkd-quantize writes a checkpoint, prints per-module errors, and refuses to overwrite without --force") {
  const std::string out = out_path("tiny-g32");
  Run r = run("qkd-quantize", "-m " + tiny() + " -o " + out + " --group-size 32 --asym --scale-type fp16");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out.empty());  // everything goes to stderr
  CHECK(contains(r.err, "group 32, asymmetric, fp16 scales, modules q,k,v,o,gate,up,down"));
  CHECK(contains(r.err, "rel_rms_err"));
  for (const char* m : {"q", "k", "v", "o", "gate", "up", "down"})
    CHECK_MESSAGE(contains(r.err, std::string("qkd-quantize: ") + m + " "), m);
  CHECK(qkd::is_int4_checkpoint(out));
  CHECK(fs::exists(out + "/config.json"));

  const auto before = fs::last_write_time(out + "/model.safetensors");
  r = run("qkd-quantize", "-m " + tiny() + " -o " + out + " --group-size 32");
  CHECK(r.code == 1);
  CHECK(contains(r.err, out + ": already exists (pass --force"));
  CHECK(fs::last_write_time(out + "/model.safetensors") == before);
  r = run("qkd-quantize", "-m " + tiny() + " -o " + out + " --group-size 32 --force");
  CHECK(r.code == 0);
  CHECK(contains(qkd::read_text_file(out + "/model.safetensors").substr(0, 4096), "\"symmetric\":\"true\""));

  const std::string mine = out_path("mine");
  fs::create_directories(mine);
  std::ofstream(mine + "/keep.txt") << "keep";
  r = run("qkd-quantize", "-m " + tiny() + " -o " + mine + " --group-size 32 --force");
  CHECK(r.code == 1);
  CHECK(contains(r.err, "not a qkd int4 checkpoint directory"));
  CHECK(qkd::read_text_file(mine + "/keep.txt") == "keep");
}

TEST_CASE("qkd-quantize --clip-search: lower error in every module, named in the summary and the metadata") {
  // rel_rms_err of each module from the summary lines "qkd-quantize: <module> <tensors> <params> <err>"
  auto errors = [](const std::string& err) {
    std::map<std::string, double> e;
    std::istringstream in(err);
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string tag, module, tensors, params;
      double v = 0.0;
      if (f >> tag >> module >> tensors >> params >> v && tag == "qkd-quantize:" && tensors != "tensors") e[module] = v;
    }
    return e;
  };
  const std::string plain = out_path("tiny-plain"), search = out_path("tiny-search");
  Run a = run("qkd-quantize", "-m " + tiny() + " -o " + plain + " --group-size 32 --force");
  Run b = run("qkd-quantize", "-m " + tiny() + " -o " + search + " --group-size 32 --clip-search --force");
  INFO(a.err);
  INFO(b.err);
  REQUIRE(a.code == 0);
  REQUIRE(b.code == 0);
  CHECK(contains(a.err, "full-range groups"));
  CHECK(contains(b.err, "clip search"));
  const auto ea = errors(a.err), eb = errors(b.err);
  REQUIRE(ea.size() == 7);
  REQUIRE(eb.size() == 7);
  for (const auto& [module, e] : ea) {
    CAPTURE(module);
    CHECK(eb.at(module) < e);
  }
  CHECK(contains(qkd::read_text_file(plain + "/model.safetensors").substr(0, 4096), "\"quantizer\":\"rtn\""));
  CHECK(contains(qkd::read_text_file(search + "/model.safetensors").substr(0, 4096),
                 "\"quantizer\":\"rtn-clip-search\""));
  CHECK_NOTHROW(qkd::load_int4_checkpoint(search));  // loads like any other checkpoint
}

TEST_CASE("qkd-quantize usage errors exit 2, unquantizable models exit 1 naming the tensor") {
  const std::string m = "-m " + tiny() + " -o " + out_path("never");
  for (const char* bad : {"--group-size 48", "--sym --asym", "--modules q,x", "--modules ''", "--scale-type fp32",
                          "--format onnx", "--format gguf --group-size 128", "--format gguf --scale-type bf16"}) {
    const Run r = run("qkd-quantize", m + " " + bad);
    INFO(bad << ": " << r.err);
    CHECK(r.code == 2);
  }
  Run r = run("qkd-quantize", "-m " + tiny());
  CHECK(r.code == 2);
  CHECK(contains(r.err, "-o PATH is required"));
  r = run("qkd-quantize", m);  // default group 128 does not divide the fixture's k = 64
  CHECK(r.code == 1);
  CHECK(contains(r.err, "tensor 'model.layers.0.self_attn.q_proj.weight': k 64 is not a multiple of group_size 128"));
  r = run("qkd-quantize", "-m " + out_path("no-such-model") + " -o " + out_path("never"));
  CHECK(r.code == 1);
  CHECK_FALSE(fs::exists(out_path("never")));
}

TEST_CASE("qkd-quantize --format gguf writes a GGUF that refuses to be overwritten") {
  const std::string out = out_path("tiny.gguf");
  const std::string src = qkd::test::fixtures_dir() + "/gguf/tiny-llama.gguf";
  Run r = run("qkd-quantize", "-m " + src + " -o " + out + " --format gguf --asym");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(qkd::read_text_file(out).substr(0, 4) == "GGUF");
  r = run("qkd-quantize", "-m " + src + " -o " + out + " --format gguf");
  CHECK(r.code == 1);
  CHECK(contains(r.err, "already exists"));
  CHECK(run("qkd-quantize", "-m " + src + " -o " + out + " --format gguf --force").code == 0);
}

TEST_CASE("qkd-quantize --gptq: calibrated checkpoints and GGUF files; bad calibration input names the flag") {
  // The GGUF fixture carries its tokenizer, which the calibration text needs.
  const std::string m = "-m " + qkd::test::fixtures_dir() + "/gguf/tiny-llama.gguf --group-size 32 --force ";
  const std::string text = qkd::test::fixtures_dir() + "/hf/eval.txt";
  const std::string out = out_path("tiny-gptq"), clip = out_path("tiny-gptq-clip");
  Run r = run("qkd-quantize", m + "-o " + out + " --gptq " + text + " --gptq-tokens 256");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(contains(r.err, "GPTQ calibration on 256 tokens of " + text));
  CHECK(contains(r.err, "quantizer gptq"));
  CHECK(contains(qkd::read_text_file(out + "/model.safetensors").substr(0, 4096), "\"quantizer\":\"gptq\""));
  CHECK_NOTHROW(qkd::load_int4_checkpoint(out));
  r = run("qkd-quantize", m + "-o " + clip + " --clip-search --asym --gptq " + text + "," + text + " --gptq-damp 0.1");
  REQUIRE(r.code == 0);
  CHECK(contains(qkd::read_text_file(clip + "/model.safetensors").substr(0, 4096),
                 "\"quantizer\":\"gptq-clip-search\""));
  r = run("qkd-quantize", m + "-o " + out_path("tiny-gptq.gguf") + " --format gguf --gptq " + text);
  CHECK(r.code == 0);
  CHECK(qkd::read_text_file(out_path("tiny-gptq.gguf")).substr(0, 4) == "GGUF");

  for (const auto& [bad, want] : {std::pair{"--gptq-damp 0", "--gptq-damp: 0 is not in (0, 1)"},
                                  std::pair{"--gptq-damp 1", "--gptq-damp: 1 is not in (0, 1)"},
                                  std::pair{"--gptq-tokens 0", "--gptq-tokens: 0 is not positive"},
                                  std::pair{"--gptq ,", "--gptq: ',' names no file"}}) {
    r = run("qkd-quantize", m + "-o " + out_path("never") + " --gptq " + text + " " + bad);
    INFO(bad << ": " << r.err);
    CHECK(r.code == 2);
    CHECK(contains(r.err, want));
  }
  // a GPTQ setting without --gptq would otherwise be silently ignored
  for (const auto& [bad, want] : {std::pair{"--gptq-tokens 1024", "--gptq-tokens is a GPTQ setting"},
                                  std::pair{"--gptq-damp 0.1", "--gptq-damp is a GPTQ setting"}}) {
    r = run("qkd-quantize", m + "-o " + out_path("never") + " " + bad);
    INFO(bad << ": " << r.err);
    CHECK(r.code == 2);
    CHECK(contains(r.err, want));
  }
  const std::string empty = out_path("empty.txt");
  std::ofstream(empty) << "\n \n";
  for (const auto& [bad, want] :
       {std::pair{"--gptq " + out_path("missing.txt"), "--gptq " + out_path("missing.txt") + ": cannot open the file"},
        std::pair{"--gptq " + empty, "--gptq " + empty + ": the file holds no text"},
        std::pair{"--gptq " + text + " --gptq-tokens 8",
                  std::string("--gptq-tokens 8): calibration: 8 tokens are fewer than one window")}}) {
    r = run("qkd-quantize", m + "-o " + out_path("never") + " " + bad);
    INFO(bad << ": " << r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, want));
  }
  CHECK_FALSE(fs::exists(out_path("never")));
}

TEST_CASE("qkd-run generates from the int4 checkpoints qkd-quantize writes") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string data = qkd::test::shared_data();
  const std::string teacher = out_path("teacher-int4");
  Run r = run("qkd-quantize", "-m " + data + "/models/teacher-25m -o " + teacher);
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(fs::exists(teacher + "/tokenizer.model"));
  r = run("qkd-run", "-m " + teacher + " --backend cpu --temp 0 -n 16 -p 'Once upon a time'");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out.rfind("Once upon a time", 0) == 0);
  CHECK(r.out.size() > std::string("Once upon a time").size() + 10);
  CHECK(contains(r.err, "qkd-int4"));

  // llama2.c: the feed-forward width 172 is no multiple of 32, so only attention can be int4
  const std::string stories = data + "/models/stories260K/stories260K.bin";
  r = run("qkd-quantize", "-m " + stories + " -o " + out_path("stories-all") + " --group-size 32");
  CHECK(r.code == 1);
  CHECK(contains(r.err, "k 172 must be a positive multiple of 32"));
  const std::string s = out_path("stories-int4");
  r = run("qkd-quantize", "-m " + stories + " -o " + s + " --group-size 32 --modules q,k,v,o");
  REQUIRE(r.code == 0);
  CHECK(fs::exists(s + "/tok512.bin"));
  r = run("qkd-run", "-m " + s + " --backend cpu --temp 0 -n 16 -p 'Once upon a time'");
  INFO(r.err);
  CHECK(r.code == 0);
  CHECK(r.out.rfind("Once upon a time", 0) == 0);
}
