// llama2.c checkpoints: synthetic legacy and version-1 files written here from export.py's layout (legacy_export,
// version1_export), the shared stories260K / babyllama models, and every size/header error.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "loader/llama2c.h"
#include "loader/model.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace qkd;

namespace {

using qkd::test::error_of;
using qkd::test::TempDir;

struct Dims {
  int dim = 16, hidden = 24, layers = 2, heads = 4, kv_heads = 2, vocab = 11, seq = 6;
  bool shared = true;
  int head_dim() const { return dim / heads; }
};

// Writes a checkpoint the way export.py does and remembers each tensor's values by name ("layers.1.wq", ...).
class Writer {
 public:
  explicit Writer(const std::string& path) : out_(path, std::ios::binary) {}

  void i32(int32_t v) { out_.write(reinterpret_cast<const char*>(&v), 4); }
  void u32(uint32_t v) { out_.write(reinterpret_cast<const char*>(&v), 4); }
  void u8(uint8_t v) { out_.put(static_cast<char>(v)); }
  void pad_to(std::streamoff n) {
    while (out_.tellp() < n) out_.put('\0');
  }
  // A tensor of n floats with values unique to it: (tensor number) * 1000 + index, exact in fp32.
  void tensor(const std::string& name, int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    const float base = static_cast<float>(values.size() + 1) * 1000.0f;
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = base + static_cast<float>(i);
    out_.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(n * 4));
    values[name] = std::move(v);
  }
  void stack(const char* name, int layers, int64_t n) {
    for (int l = 0; l < layers; ++l) tensor("layers." + std::to_string(l) + "." + name, n);
  }
  void header7(const Dims& d, int32_t vocab) {
    for (int32_t v : {d.dim, d.hidden, d.layers, d.heads, d.kv_heads, vocab, d.seq}) i32(v);
  }
  std::map<std::string, std::vector<float>> values;

 private:
  std::ofstream out_;
};

// legacy_export: header with the classifier flag in vocab's sign, then run.c's memory_map_weights order.
std::map<std::string, std::vector<float>> write_legacy(const std::string& path, const Dims& d) {
  Writer w(path);
  const int64_t D = d.dim, F = d.hidden, kv = int64_t{d.kv_heads} * d.head_dim();
  w.header7(d, d.shared ? d.vocab : -d.vocab);
  w.tensor("tok_embeddings", d.vocab * D);
  w.stack("rms_att", d.layers, D);
  w.stack("wq", d.layers, D * D);
  w.stack("wk", d.layers, kv * D);
  w.stack("wv", d.layers, kv * D);
  w.stack("wo", d.layers, D * D);
  w.stack("rms_ffn", d.layers, D);
  w.stack("w1", d.layers, F * D);
  w.stack("w2", d.layers, D * F);
  w.stack("w3", d.layers, F * D);
  w.tensor("norm", D);
  w.tensor("freq_cis_real", int64_t{d.seq} * d.head_dim() / 2);
  w.tensor("freq_cis_imag", int64_t{d.seq} * d.head_dim() / 2);
  if (!d.shared) w.tensor("wcls", d.vocab * D);
  return w.values;
}

// version1_export: magic, version, 7 ints, shared flag, zero padding to 256, norms first, then the matrices.
std::map<std::string, std::vector<float>> write_v1(const std::string& path, const Dims& d, int version = 1) {
  Writer w(path);
  const int64_t D = d.dim, F = d.hidden, kv = int64_t{d.kv_heads} * d.head_dim();
  w.u32(0x616b3432);
  w.i32(version);
  w.header7(d, d.vocab);
  w.u8(d.shared ? 1 : 0);
  w.pad_to(256);
  w.stack("rms_att", d.layers, D);
  w.stack("rms_ffn", d.layers, D);
  w.tensor("norm", D);
  w.tensor("tok_embeddings", d.vocab * D);
  w.stack("wq", d.layers, D * D);
  w.stack("wk", d.layers, kv * D);
  w.stack("wv", d.layers, kv * D);
  w.stack("wo", d.layers, D * D);
  w.stack("w1", d.layers, F * D);
  w.stack("w2", d.layers, D * F);
  w.stack("w3", d.layers, F * D);
  if (!d.shared) w.tensor("wcls", d.vocab * D);
  return w.values;
}

void check_view(const TensorView& v, const std::vector<int64_t>& shape,
                const std::map<std::string, std::vector<float>>& values, const std::string& name) {
  CAPTURE(name);
  REQUIRE(values.count(name) == 1);
  CHECK(v.dtype == DType::F32);
  CHECK(v.shape == shape);
  CHECK(to_f32(v) == values.at(name));
}

void check_model(const ModelWeights& w, const Dims& d, const std::map<std::string, std::vector<float>>& values) {
  const ModelConfig& c = w.config;
  CHECK(w.format == "llama2c");
  CHECK(c.dim == d.dim);
  CHECK(c.ffn_dim == d.hidden);
  CHECK(c.n_layers == d.layers);
  CHECK(c.n_heads == d.heads);
  CHECK(c.n_kv_heads == d.kv_heads);
  CHECK(c.head_dim == d.head_dim());
  CHECK(c.vocab_size == d.vocab);
  CHECK(c.max_seq_len == d.seq);
  CHECK(c.tied_embeddings == d.shared);
  CHECK(c.rope_theta == 10000.0f);
  CHECK(c.norm_eps == 1e-5f);
  CHECK(c.bos_id == 1);
  CHECK(c.eos_ids == std::vector<int32_t>{2});
  const int64_t D = d.dim, F = d.hidden, kv = int64_t{d.kv_heads} * d.head_dim();
  check_view(w.tok_embeddings, {d.vocab, D}, values, "tok_embeddings");
  check_view(w.norm, {D}, values, "norm");
  check_view(w.lm_head, {d.vocab, D}, values, d.shared ? "tok_embeddings" : "wcls");
  CHECK((w.lm_head.data == w.tok_embeddings.data) == d.shared);
  REQUIRE(w.layers.size() == static_cast<size_t>(d.layers));
  for (int l = 0; l < d.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    check_view(lw.attn_norm, {D}, values, p + "rms_att");
    check_view(lw.wq, {D, D}, values, p + "wq");
    check_view(lw.wk, {kv, D}, values, p + "wk");
    check_view(lw.wv, {kv, D}, values, p + "wv");
    check_view(lw.wo, {D, D}, values, p + "wo");
    check_view(lw.ffn_norm, {D}, values, p + "rms_ffn");
    check_view(lw.w_gate, {F, D}, values, p + "w1");
    check_view(lw.w_up, {F, D}, values, p + "w3");
    check_view(lw.w_down, {D, F}, values, p + "w2");
  }
}

}  // namespace

TEST_CASE("llama2.c: synthetic legacy and version-1 files, shared and separate classifier") {
  TempDir dir;
  for (bool shared : {true, false}) {
    CAPTURE(shared);
    Dims d;
    d.shared = shared;
    const std::string legacy = dir.file(shared ? "legacy-shared.bin" : "legacy-wcls.bin");
    const auto lv = write_legacy(legacy, d);
    check_model(load_model(legacy), d, lv);
    const std::string v1 = dir.file(shared ? "v1-shared.bin" : "v1-wcls.bin");
    const auto vv = write_v1(v1, d);
    check_model(load_model(v1), d, vv);
    std::ifstream in(v1, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const Llama2cHeader h = parse_llama2c_header(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size(), v1);
    CHECK(h.version == 1);
    CHECK(h.header_bytes == 256);
    CHECK(h.shared_classifier == shared);
    CHECK(h.expected_bytes == bytes.size());
  }
}

TEST_CASE("llama2.c: header and size errors name the file and the values") {
  TempDir dir;
  Dims d;
  const std::string v2 = dir.file("v2.bin");
  write_v1(v2, d, 2);
  std::string msg = error_of([&] { load_model(v2); });
  CHECK(msg.find(v2 + ": llama2.c version 2 (int8 Q8_0 export) is not supported") != std::string::npos);
  const std::string v3 = dir.file("v3.bin");
  write_v1(v3, d, 3);
  msg = error_of([&] { load_model(v3); });
  CHECK(msg.find(v3 + ": unknown llama2.c version 3") != std::string::npos);

  Dims odd = d;
  odd.heads = 3;  // 16 is not a multiple of 3
  const std::string bad_heads = dir.file("heads.bin");
  write_legacy(bad_heads, odd);
  msg = error_of([&] { load_model(bad_heads); });
  CHECK(msg.find(bad_heads + ": dim 16 is not a multiple of n_heads 3") != std::string::npos);

  // One extra float: the header implies the size exactly (legacy RoPE tables included).
  const std::string longer = dir.file("longer.bin");
  write_legacy(longer, d);
  const uintmax_t size = fs::file_size(longer);
  std::ofstream(longer, std::ios::binary | std::ios::app).write("\0\0\0\0", 4);
  msg = error_of([&] { load_model(longer); });
  CAPTURE(msg);
  CHECK(msg.find(longer + ": file is " + std::to_string(size + 4) + " bytes") != std::string::npos);
  CHECK(msg.find("implies " + std::to_string(size) + " bytes") != std::string::npos);

  const std::string tiny = dir.file("tiny.bin");
  std::ofstream(tiny, std::ios::binary) << "abc";
  msg = error_of([&] { load_model(tiny); });
  CHECK(msg.find(tiny + ": 3 bytes is too short for a llama2.c header") != std::string::npos);

  msg = error_of([&] { load_model(dir.file("absent.bin")); });
  CHECK(msg.find("absent.bin: cannot open") != std::string::npos);
}

TEST_CASE("llama2.c: stories260K") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string path = test::shared_data() + "/models/stories260K/stories260K.bin";
  const ModelWeights w = load_model(path);
  const ModelConfig& c = w.config;
  CHECK(w.format == "llama2c");
  CHECK(c.dim == 64);
  CHECK(c.ffn_dim == 172);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.head_dim == 8);
  CHECK(c.vocab_size == 512);
  CHECK(c.max_seq_len == 512);
  CHECK(c.tied_embeddings);
  CHECK(w.lm_head.data == w.tok_embeddings.data);
  CHECK(w.layers[4].wk.shape == std::vector<int64_t>{32, 64});
  CHECK(w.layers[4].w_down.shape == std::vector<int64_t>{64, 172});

  // The final norm is followed by export.py's cos/sin tables: row 0 is cos 0 = 1 and sin 0 = 0, row 1 of the
  // cos table starts with cos(1 * 10000^0) = cos 1. Reading them right after the loader's norm view checks that
  // every offset before it is right, from the file's own content.
  const float* after_norm = reinterpret_cast<const float*>(w.norm.data + w.norm.nbytes);
  for (int i = 0; i < 4; ++i) CHECK(after_norm[i] == 1.0f);
  CHECK(after_norm[4] == doctest::Approx(std::cos(1.0)).epsilon(1e-6));
  const float* sin_table = after_norm + 512 * 4;
  for (int i = 0; i < 4; ++i) CHECK(sin_table[i] == 0.0f);
  CHECK(sin_table[4] == doctest::Approx(std::sin(1.0)).epsilon(1e-6));

  // Trained norms are near 1; a misplaced view would read matrix entries instead.
  for (const LayerWeights& l : w.layers) {
    const std::vector<float> g = to_f32(l.ffn_norm);
    double mean = 0;
    for (float x : g) mean += x;
    CHECK(mean / g.size() > 0.2);
  }

  TempDir dir;
  const std::string cut = dir.file("stories260K.bin");
  fs::copy_file(path, cut);
  fs::resize_file(cut, fs::file_size(path) - 4);
  const std::string msg = error_of([&] { load_model(cut); });
  CAPTURE(msg);
  CHECK(msg.find(cut + ": file is 1056536 bytes") != std::string::npos);
  CHECK(msg.find("implies 1056540 bytes") != std::string::npos);
}

TEST_CASE("llama2.c: babyllama-tok105") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string path = test::shared_data() + "/models/babyllama-tok105/model.bin";
  const ModelWeights w = load_model(path);
  const ModelConfig& c = w.config;
  CHECK(c.dim == 128);
  CHECK(c.ffn_dim == 352);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.vocab_size == 105);
  CHECK(c.max_seq_len == 256);
  CHECK(c.tied_embeddings);
  const float* after_norm = reinterpret_cast<const float*>(w.norm.data + w.norm.nbytes);
  for (int i = 0; i < 8; ++i) CHECK(after_norm[i] == 1.0f);

  TempDir dir;
  const std::string cut = dir.file("model.bin");
  fs::copy_file(path, cut);
  fs::resize_file(cut, fs::file_size(path) - 4);
  CHECK_THROWS_WITH_AS(load_model(cut), doctest::Contains("file is 3762200 bytes"), Error);
}
