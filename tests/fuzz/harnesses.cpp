#include "tests/fuzz/harnesses.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "kernels/error.h"
#include "kernels/int4_format.h"
#include "loader/chat_template.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/hf_checkpoint.h"
#include "loader/int4_checkpoint.h"
#include "loader/llama2c.h"
#include "loader/llama2c_tokenizer.h"
#include "loader/mmap_file.h"
#include "loader/safetensors.h"

namespace qkd::fuzz {
namespace {

namespace fs = std::filesystem;

// The loaders read files through mmap, so each input is written to a file of this process's own folder, which
// goes away at exit.
class Scratch {
 public:
  Scratch() : dir_(fs::temp_directory_path() / ("qkd-fuzz-" + std::to_string(::getpid()))) {
    fs::create_directories(dir_);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string write(const char* name, const uint8_t* data, size_t size) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    out.close();
    if (!out) {
      std::fprintf(stderr, "qkd fuzz: cannot write the scratch file %s\n", path.c_str());
      std::abort();
    }
    return path;
  }

 private:
  fs::path dir_;
};

Scratch& scratch() {
  static Scratch s;
  return s;
}

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "qkd fuzz: %s\n", what.c_str());
  std::abort();
}

// A view that starts inside the file's mapping must end inside it: the mapping is not instrumented by
// AddressSanitizer, so an overlong view would read past the file unnoticed. A view that starts elsewhere is a
// buffer the loader owns (the int4 loader copies unaligned data), which AddressSanitizer does watch; the loaders
// that never copy pass Owned::Never and must keep every view inside the file.
enum class Owned { Never, Allowed };

void check_inside(const std::byte* p, size_t n, const MappedFile& m, const std::string& what,
                  Owned owned = Owned::Never) {
  if (n == 0) return;
  const auto lo = reinterpret_cast<uintptr_t>(m.data()), hi = lo + m.size();
  const auto b = reinterpret_cast<uintptr_t>(p);
  if (owned == Owned::Allowed && p != nullptr && (b < lo || b >= hi)) return;
  if (p == nullptr || b < lo || b > hi || n > hi - b)
    finding(what + ": a view of " + std::to_string(n) + " bytes lies outside the file");
}

void check_view(const TensorView& t, const MappedFile& m, Owned owned = Owned::Never) {
  check_inside(t.data, t.nbytes, m, t.name, owned);
  if (t.dtype == DType::I4) {
    const Int4Weight w = t.int4_weight();  // throws qkd::Error when inconsistent
    int4_check(w, t.name.c_str());
    const int64_t n = t.shape.at(0), k = t.shape.at(1);
    const int64_t groups = k / int4_group_size(t.int4.group_size, static_cast<int>(k), t.name.c_str());
    const size_t scale_bytes = static_cast<size_t>(n * groups) * sizeof(uint16_t);
    check_inside(reinterpret_cast<const std::byte*>(t.int4.scales), scale_bytes, m, t.name + " scales", owned);
    if (t.int4.sym == Int4Symmetry::Asymmetric)
      check_inside(reinterpret_cast<const std::byte*>(t.int4.mins), scale_bytes, m, t.name + " mins", owned);
  }
  // Dequantize what is small enough to do on every input; this walks every byte of the view.
  if (t.numel() > 0 && t.numel() <= (int64_t{1} << 16)) (void)to_f32(t);
}

void check_model(const ModelWeights& w, const MappedFile& m, Owned owned = Owned::Never) {
  std::vector<const TensorView*> views{&w.tok_embeddings, &w.norm, &w.lm_head};
  for (const LayerWeights& l : w.layers)
    for (const TensorView* v : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_up,
                                &l.w_down})
      views.push_back(v);
  for (const TensorView* v : views) check_view(*v, m, owned);
}

// What the runtime does with a tokenizer: encode user text and chat markup, decode every id it produced, and
// look pieces up both ways.
void exercise_tokenizer(const Tokenizer& tok) {
  static const std::array<std::string_view, 6> texts{
      "", "Once upon a time", " two  spaces\tand\nnewlines\r\n", "héllo wörld 日本語 🙂 \xef\xbf\xbd",
      "<s>[INST] hi [/INST]</s><|im_start|>user\n<|im_end|>", "0123456789 !!?? ''\"\" ..."};
  for (std::string_view text : texts)
    for (bool special : {false, true}) {
      const std::vector<int32_t> ids = tok.encode(text, true, true, special);
      int32_t prev = -1;
      for (int32_t id : ids) {
        if (id < 0 || id >= tok.vocab_size()) finding("encode gave id " + std::to_string(id) + " outside the vocabulary");
        (void)tok.decode_token(prev, id);
        prev = id;
      }
      (void)tok.decode(ids);
    }
  const int n = std::min(tok.vocab_size(), 512);
  for (int32_t id = 0; id < n; ++id) {
    const std::string piece = tok.id_to_piece(id);
    (void)tok.piece_to_id(piece);
    (void)tok.decode_token(-1, id);
    (void)tok.decode_token(tok.bos_id(), id);
    (void)tok.is_end_of_generation(id);
  }
}

template <typename F>
void expect_clean(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    // a clean refusal: what a malformed file must give. QKD_FUZZ_VERBOSE=1 prints it (to check that the seeds
    // load).
    static const bool verbose = std::getenv("QKD_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "qkd fuzz: refused: %s\n", e.what());
  }
}

}  // namespace

void fuzz_safetensors(const uint8_t* data, size_t size) {
  const std::string path = scratch().write("model.safetensors", data, size);
  expect_clean([&] {
    const auto st = SafetensorsFile::open(path);
    for (const TensorView& t : st->tensors()) {
      check_view(t, *st->mapping());
      if (st->find(t.name) != &t) finding("find('" + t.name + "') does not give the tensor listed under that name");
    }
    (void)st->metadata();
  });
}

void fuzz_hf_config(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  expect_clean([&] { (void)parse_hf_config(text, "fuzz/config.json"); });
}

void fuzz_llama2c(const uint8_t* data, size_t size) {
  // The header parser reads from memory: give it a heap copy of exactly the input's size so that AddressSanitizer
  // sees any read past the end.
  const std::vector<std::byte> copy(reinterpret_cast<const std::byte*>(data),
                                    reinterpret_cast<const std::byte*>(data) + size);
  expect_clean([&] { (void)parse_llama2c_header(copy.data(), copy.size(), "fuzz/model.bin"); });
  const std::string path = scratch().write("model.bin", data, size);
  expect_clean([&] {
    const ModelWeights w = load_llama2c(path);
    // load_llama2c keeps its one mapping first in storage (loader/llama2c.cpp).
    if (w.storage.empty()) finding("llama2.c weights own no storage");
    check_model(w, *static_cast<const MappedFile*>(w.storage.front().get()));
  });
}

void fuzz_gguf(const uint8_t* data, size_t size) {
  const std::string path = scratch().write("model.gguf", data, size);
  expect_clean([&] {
    const GgufFile f = GgufFile::open(path);
    for (const GgufTensorInfo& t : f.tensors()) {
      check_inside(t.data, t.nbytes, *f.mapping(), t.name);
      if (f.find_tensor(t.name) == nullptr) finding("find_tensor('" + t.name + "') misses a listed tensor");
    }
    for (const auto& [key, value] : f.metadata())
      if (f.find(key) == nullptr) finding("find('" + std::string(key) + "') misses a listed key");
    expect_clean([&] { check_model(load_gguf_model(f), *f.mapping()); });
    expect_clean([&] {
      std::string note;
      const ChatTemplate tmpl = detect_chat_template(f.get_string("tokenizer.chat_template", ""), &note);
      const std::vector<ChatMessage> chat{{"system", "be brief"}, {"user", "hi"}, {"assistant", "hello"}};
      (void)format_chat(tmpl, chat, true);
    });
  });
}

void fuzz_int4_checkpoint(const uint8_t* data, size_t size) {
  const std::string path = scratch().write("model.safetensors", data, size);
  expect_clean([&] {
    (void)is_int4_checkpoint(path);
    const ModelWeights w = load_int4_checkpoint(path);
    // load_int4_checkpoint keeps the SafetensorsFile last in storage, after any aligned copies
    // (loader/int4_checkpoint.cpp).
    if (w.storage.empty()) finding("int4 weights own no storage");
    const auto* st = static_cast<const SafetensorsFile*>(w.storage.back().get());
    check_model(w, *st->mapping(), Owned::Allowed);
  });
}

void fuzz_llama2c_tokenizer(const uint8_t* data, size_t size) {
  // Parsed from memory: an exact-size heap copy, so that AddressSanitizer sees any read past the end.
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  expect_clean([&] {
    const auto tok = Llama2cTokenizer::from_bytes("fuzz/tokenizer.bin", bytes);
    exercise_tokenizer(*tok);
  });
}

void fuzz_gguf_tokenizer(const uint8_t* data, size_t size) {
  const std::string path = scratch().write("vocab.gguf", data, size);
  expect_clean([&] {
    const GgufFile f = GgufFile::open(path);
    (void)gguf_end_of_generation_ids(f);
    const auto tok = load_gguf_tokenizer(f);
    exercise_tokenizer(*tok);
  });
}

std::span<const Harness> harnesses() {
  static const Harness all[] = {
      {"safetensors", fuzz_safetensors},   {"hf_config", fuzz_hf_config},
      {"llama2c", fuzz_llama2c},           {"gguf", fuzz_gguf},
      {"int4_checkpoint", fuzz_int4_checkpoint}, {"llama2c_tokenizer", fuzz_llama2c_tokenizer},
      {"gguf_tokenizer", fuzz_gguf_tokenizer},
  };
  return all;
}

}  // namespace qkd::fuzz
