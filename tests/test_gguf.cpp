// GGUF reader and GGUF -> ModelWeights. Good files come from tests/gen_gguf_fixtures.py (llama.cpp's gguf
// Python package wrote them; the expected values are its own dequantization). Bad files are written byte by
// byte here from the format's definition.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/mmap_file.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace qkd;

namespace {

std::string fixture(const std::string& name) { return test::fixtures_dir() + "/gguf/" + name; }

nlohmann::json read_json(const std::string& path) { return nlohmann::json::parse(read_text_file(path)); }

using qkd::test::TempDir;

// GGUF bytes, little-endian, as the format defines them.
struct Bytes {
  std::string b;
  template <typename T>
  Bytes& put(T v) {
    b.append(reinterpret_cast<const char*>(&v), sizeof(T));
    return *this;
  }
  Bytes& u32(uint32_t v) { return put(v); }
  Bytes& u64(uint64_t v) { return put(v); }
  Bytes& str(std::string_view s) {
    u64(s.size());
    b.append(s);
    return *this;
  }
  Bytes& header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    b.append("GGUF");
    return u32(version).u64(n_tensors).u64(n_kv);
  }
  Bytes& kv_string(std::string_view key, std::string_view value) { return str(key).u32(8).str(value); }
  Bytes& kv_u32(std::string_view key, uint32_t value) { return str(key).u32(4).u32(value); }
  Bytes& tensor(std::string_view name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    str(name).u32(static_cast<uint32_t>(ne.size()));
    for (uint64_t n : ne) u64(n);
    return u32(type).u64(offset);
  }
  Bytes& pad_to(size_t alignment) {
    while (b.size() % alignment != 0) b.push_back('\0');
    return *this;
  }
  Bytes& zeros(size_t n) {
    b.append(n, '\0');
    return *this;
  }
};

// The message of the qkd::Error that opening `path` throws, or "" when it opens.
std::string open_error(const std::string& path) {
  try {
    GgufFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string model_error(const std::string& path) {
  try {
    load_gguf_model(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("metadata of every value type, nested arrays included") {
  const GgufFile f = GgufFile::open(fixture("types.gguf"));
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 64);
  CHECK(f.get_string("general.architecture") == "test");
  CHECK(f.find("test.u8")->type == GgufType::U8);
  CHECK(f.get_uint("test.u8") == 200);
  CHECK(f.get_int("test.i8") == -100);
  CHECK(f.get_uint("test.u16") == 65000);
  CHECK(f.get_int("test.i16") == -32000);
  CHECK(f.get_uint("test.u32") == 4000000000u);
  CHECK(f.get_int("test.i32") == -2000000000);
  CHECK(f.get_float("test.f32") == 0.15625);
  CHECK(f.get_bool("test.bool"));
  CHECK(f.get_string("test.string") == "h\xC3\xA9llo \xE2\x96\x81 world");
  CHECK(f.get_uint("test.u64") == (uint64_t{1} << 63) + 5);
  CHECK(f.get_int("test.i64") == -(int64_t{1} << 62));
  CHECK(f.get_float("test.f64") == -2.5e-300);
  CHECK(f.get_int_array("test.array.i32") == std::vector<int64_t>{1, -2, 3});
  CHECK(f.get_float_array("test.array.f32") == std::vector<float>{0.5f, -1.25f});
  CHECK(f.get_string_array("test.array.str") == std::vector<std::string_view>{"a", "", "\xC3\xBC" "ber"});
  const GgufValue* b = f.find("test.array.bool");
  REQUIRE(b != nullptr);
  CHECK(b->elem_type == GgufType::BOOL);
  CHECK(b->count == 3);
  CHECK(static_cast<int>(b->scalars[0]) == 1);
  CHECK(static_cast<int>(b->scalars[1]) == 0);
  const GgufValue* nested = f.find("test.array.nested");
  REQUIRE(nested != nullptr);
  CHECK(nested->elem_type == GgufType::ARRAY);
  REQUIRE(nested->arrays.size() == 2);
  CHECK(nested->arrays[0].elem_type == GgufType::I32);
  CHECK(nested->arrays[0].count == 2);
  CHECK(nested->arrays[1].count == 3);
  int32_t third = 0;
  std::memcpy(&third, nested->arrays[1].scalars + 8, 4);
  CHECK(third == 5);
  CHECK(f.array_length("test.array.str") == 3);
  CHECK(f.array_length("no.such.key") == -1);
  CHECK(f.get_uint("no.such.key", 7) == 7);

  // Wrong types and missing keys name the file, the key and what was found.
  auto err = [&](auto fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(has(err([&] { f.get_string("test.u8"); }), "types.gguf: key 'test.u8' is UINT8, expected STRING"));
  CHECK(has(err([&] { f.get_uint("test.i8"); }), "key 'test.i8' is -100, expected a non-negative integer"));
  CHECK(has(err([&] { f.get_uint("missing.key"); }), "key 'missing.key' (an unsigned integer) is missing"));
  CHECK(has(err([&] { f.get_int("test.u64"); }), "key 'test.u64' = 9223372036854775813 is too large"));
  CHECK(has(err([&] { f.get_float_array("test.array.str"); }), "is ARRAY of STRING, expected ARRAY of FLOAT32"));
}

TEST_CASE("tensors of every supported type dequantize as gguf.quants does") {
  const GgufFile f = GgufFile::open(fixture("types.gguf"));
  const nlohmann::json expected = read_json(fixture("types.expected.json"));
  REQUIRE(f.tensors().size() == expected["tensors"].size());
  for (const auto& e : expected["tensors"]) {
    const std::string name = e["name"];
    CAPTURE(name);
    const GgufTensorInfo* info = f.find_tensor(name);
    REQUIRE(info != nullptr);
    CHECK(info->ne == e["ne"].get<std::vector<int64_t>>());
    CHECK(info->offset % 64 == 0);
    const TensorView v = f.view(*info);
    CHECK(v.shape == e["shape"].get<std::vector<int64_t>>());
    CHECK(std::string(dtype_name(v.dtype)) == e["type"].get<std::string>());
    CHECK(v.data >= f.mapping()->data());
    CHECK(v.data + v.nbytes <= f.mapping()->data() + f.mapping()->size());
    const std::vector<float> got = to_f32(v);
    const std::vector<float> want = e["values"].get<std::vector<float>>();
    REQUIRE(got.size() == want.size());
    // Both sides do the same fp32 operations; allow one rounding of difference (an FMA contraction).
    double max_err = 0;
    size_t bad = 0, first_bad = 0;
    for (size_t k = 0; k < got.size(); ++k) {
      const double err = std::fabs(double(got[k]) - want[k]);
      max_err = std::max(max_err, err);
      if (err > 2e-7 * (1.0 + std::fabs(want[k])) && bad++ == 0) first_bad = k;
    }
    INFO("max abs error " << max_err << "; first mismatch at " << first_bad << ": got " << got[first_bad]
                          << ", want " << want[first_bad]);
    CHECK(bad == 0);
  }
}

TEST_CASE("a llama GGUF becomes ModelWeights with zero-copy views and the metadata's hyperparameters") {
  const nlohmann::json expected = read_json(fixture("tiny-llama.expected.json"));
  for (const char* name : {"tiny-llama.gguf", "tiny-llama-tied.gguf"}) {
    CAPTURE(name);
    const nlohmann::json& ex = std::string(name) == "tiny-llama.gguf" ? expected : expected["tied"];
    const nlohmann::json& c = ex["config"];
    const ModelWeights w = load_gguf_model(fixture(name));
    CHECK(w.format == "gguf");
    CHECK(w.config.arch == "llama");
    CHECK(w.config.dim == c["dim"]);
    CHECK(w.config.n_layers == c["n_layers"]);
    CHECK(w.config.n_heads == c["n_heads"]);
    CHECK(w.config.n_kv_heads == c["n_kv_heads"]);
    CHECK(w.config.head_dim == c["head_dim"]);
    CHECK(w.config.ffn_dim == c["ffn_dim"]);
    CHECK(w.config.vocab_size == c["vocab_size"]);
    CHECK(w.config.max_seq_len == c["max_seq_len"]);
    CHECK(w.config.rope_theta == c["rope_theta"].get<float>());
    CHECK(w.config.norm_eps == c["norm_eps"].get<float>());
    CHECK(w.config.tied_embeddings == c["tied"].get<bool>());
    CHECK(w.config.rope_scaling.type == RopeScalingType::None);
    CHECK(w.config.bos_id == 1);
    CHECK(w.config.eos_ids == std::vector<int32_t>{0, 2});  // eos <|im_end|> and the control <|endoftext|>
    REQUIRE(w.layers.size() == static_cast<size_t>(w.config.n_layers));
    CHECK(!w.storage.empty());
    if (w.config.tied_embeddings) {
      CHECK(w.lm_head.data == w.tok_embeddings.data);
    }

    std::vector<const TensorView*> views = {&w.tok_embeddings, &w.norm};
    if (!w.config.tied_embeddings) views.push_back(&w.lm_head);
    for (const LayerWeights& L : w.layers)
      for (const TensorView* v : {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_norm, &L.w_gate, &L.w_up, &L.w_down})
        views.push_back(v);
    CHECK(views.size() == ex["tensors"].size());
    for (const TensorView* v : views) {
      CAPTURE(v->name);
      const nlohmann::json& t = ex["tensors"].at(v->name);
      CHECK(v->shape == t["shape"].get<std::vector<int64_t>>());
      CHECK(std::string(dtype_name(v->dtype)) == t["type"].get<std::string>());
      const std::vector<float> x = to_f32(*v);
      double sum = 0, sum_sq = 0;
      for (float a : x) {
        sum += a;
        sum_sq += double(a) * a;
      }
      // Sums of the same fp32 values in double; only the order of addition may differ.
      CHECK(sum == doctest::Approx(t["sum"].get<double>()).epsilon(1e-9));
      CHECK(sum_sq == doctest::Approx(t["sum_sq"].get<double>()).epsilon(1e-9));
      // The first and last values in storage order: q/k rows are used as stored (GGUF is already interleaved).
      const auto head = t["head"].get<std::vector<float>>();
      const auto tail = t["tail"].get<std::vector<float>>();
      for (size_t k = 0; k < 4; ++k) {
        CHECK(x[k] == doctest::Approx(head[k]).epsilon(2e-7));
        CHECK(x[x.size() - 4 + k] == doctest::Approx(tail[k]).epsilon(2e-7));
      }
    }
  }
}

TEST_CASE("the tiny model's own tokenizer encodes as Hugging Face tokenizers does") {
  const nlohmann::json expected = read_json(fixture("tiny-llama.expected.json"));
  const auto tok = load_gguf_tokenizer(fixture("tiny-llama.gguf"));
  CHECK(tok->vocab_size() == 269);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->is_end_of_generation(2));
  CHECK(tok->is_end_of_generation(0));
  CHECK(!tok->is_end_of_generation(1));
  for (const auto& e : expected["encodings"]) {
    const std::string text = e["text"];
    CAPTURE(text);
    const std::vector<int32_t> ids = tok->encode(text, /*add_bos=*/true, false, /*parse_special=*/true);
    CHECK(ids == e["ids"].get<std::vector<int32_t>>());  // add_bos_token is false: no BOS
  }
}

TEST_CASE("version 2 files read like version 3; version 1 and other versions fail clearly") {
  TempDir dir;
  Bytes v2;
  v2.header(2, 1, 1).kv_string("general.architecture", "test").tensor("w", {32, 2}, 0, 0).pad_to(32).zeros(256);
  const GgufFile f = GgufFile::open(dir.write("v2.gguf", v2.b));
  CHECK(f.version() == 2);
  CHECK(f.view(f.tensors()[0]).shape == std::vector<int64_t>{2, 32});

  Bytes v1;
  v1.b.append("GGUF");
  v1.u32(1).u32(0).u32(0);
  CHECK(has(open_error(dir.write("v1.gguf", v1.b)), "v1.gguf: GGUF version 1 is not supported"));
  Bytes v4;
  v4.header(4, 0, 0);
  CHECK(has(open_error(dir.write("v4.gguf", v4.b)), "GGUF version 4 is not supported"));
  CHECK(has(open_error(dir.write("magic.gguf", "GGML\x03\0\0\0")), "not a GGUF file (it starts with bytes '47474d4c'"));
  CHECK(has(open_error(dir.write("empty.gguf", "")), "not a GGUF file"));
}

TEST_CASE("bad files give one precise error each, never a crash") {
  TempDir dir;
  auto one_tensor = [](uint32_t type, uint64_t offset, std::vector<uint64_t> ne = {32, 2}) {
    Bytes b;
    b.header(3, 1, 1).kv_string("general.architecture", "llama").tensor("blk.0.attn_q.weight", ne, type, offset);
    b.pad_to(32).zeros(1024);
    return b.b;
  };
  SUBCASE("absurd counts are refused before anything is allocated") {
    Bytes kv;
    kv.header(3, 0, uint64_t{1} << 60);
    CHECK(has(open_error(dir.write("kv.gguf", kv.b)),
              "kv.gguf: header: metadata key/value count 1152921504606846976 cannot fit in the 0 bytes"));
    Bytes tn;
    tn.header(3, uint64_t{1} << 62, 0).zeros(100);
    CHECK(has(open_error(dir.write("tn.gguf", tn.b)), "header: tensor count 4611686018427387904 cannot fit"));
    Bytes arr;
    arr.header(3, 0, 1).str("tokenizer.ggml.tokens").u32(9).u32(8).u64(uint64_t{1} << 61).zeros(64);
    CHECK(has(open_error(dir.write("arr.gguf", arr.b)),
              "key 'tokenizer.ggml.tokens': array length 2305843009213693952 of STRING cannot fit in the 64 bytes"));
  }
  SUBCASE("a string length past the end of the file") {
    Bytes k;
    k.header(3, 0, 1).u64(1000).zeros(20);
    CHECK(has(open_error(dir.write("key.gguf", k.b)),
              "key.gguf: metadata entry 0: key length 1000 at byte 24 runs past the end of the file (52 bytes)"));
    Bytes v;
    v.header(3, 0, 1).str("general.name").u32(8).u64(uint64_t{1} << 63);
    CHECK(has(open_error(dir.write("val.gguf", v.b)), "key 'general.name': string length 9223372036854775808"));
    Bytes t;
    t.header(3, 1, 0).u64(99).b.append("abc").append(30, '\0');
    CHECK(has(open_error(dir.write("tname.gguf", t.b)), "tensor info 0: name length 99 at byte 24 runs past the end"));
  }
  SUBCASE("a file cut short anywhere fails cleanly") {
    const std::string whole = read_text_file(fixture("tiny-llama.gguf"));
    for (size_t cut = 0; cut < whole.size(); cut += cut < 2000 ? 7 : 1999) {
      CAPTURE(cut);
      const std::string msg = model_error(dir.write("cut.gguf", whole.substr(0, cut)));
      CHECK(!msg.empty());
    }
    const std::string at_3000 = open_error(dir.write("cut.gguf", whole.substr(0, 3000)));
    CHECK(has(at_3000, "cut.gguf: key 'tokenizer.ggml.tokens': "));
    CHECK(has(at_3000, "needs 8 bytes but the file ends at byte 3000"));
    CHECK(has(open_error(dir.write("cut.gguf", whole.substr(0, whole.size() - 1))),
              "run past the end of the data section"));
  }
  SUBCASE("corrupted bytes in the metadata and tensor infos: an error or a valid file, never a crash") {
    const std::string whole = read_text_file(fixture("tiny-llama.gguf"));
    const GgufFile good = GgufFile::open(fixture("tiny-llama.gguf"));
    const size_t meta_end = static_cast<size_t>(good.tensors()[0].data - good.mapping()->data());
    REQUIRE(meta_end < whole.size());
    uint64_t state = 12345;
    auto next = [&] { return state = state * 6364136223846793005ull + 1442695040888963407ull; };
    int failures = 0;
    for (int trial = 0; trial < 400; ++trial) {
      std::string bad = whole;
      for (int k = 0; k < 3; ++k) bad[next() % meta_end] = static_cast<char>(next() >> 56);
      const std::string path = dir.write("flip.gguf", bad);
      try {
        load_gguf_model(path);
        load_gguf_tokenizer(path);
      } catch (const Error&) {
        ++failures;
      }
    }
    CHECK(failures > 0);
  }
  SUBCASE("unknown value types, tensor types and dimension counts") {
    Bytes vt;
    vt.header(3, 0, 1).str("general.name").u32(13).zeros(8);
    CHECK(has(open_error(dir.write("vt.gguf", vt.b)), "key 'general.name': unknown value type 13"));
    CHECK(has(open_error(dir.write("q4k.gguf", one_tensor(12, 0, {256, 2}))),
              "q4k.gguf: tensor 'blk.0.attn_q.weight': ggml type 12 (Q4_K) is not supported (F32, F16, BF16, Q8_0, "
              "Q4_0 and Q4_1 are)"));
    CHECK(has(open_error(dir.write("t99.gguf", one_tensor(99, 0))), "ggml type 99 (unknown) is not supported"));
    CHECK(has(open_error(dir.write("dims.gguf", one_tensor(0, 0, {2, 2, 2, 2, 2}))),
              "tensor 'blk.0.attn_q.weight': 5 dimensions (1 to 4 are allowed)"));
    CHECK(has(open_error(dir.write("dim0.gguf", one_tensor(0, 0, {32, 0}))), "dimension 1 is 0"));
    CHECK(has(open_error(dir.write("huge.gguf", one_tensor(0, 0, {uint64_t{1} << 40, uint64_t{1} << 30}))),
              "dimension 1 is 1073741824 (the element count must be 1 to 2^60)"));
    CHECK(has(open_error(dir.write("row.gguf", one_tensor(2, 0, {48, 2}))),
              "row length 48 is not a multiple of the 32-value Q4_0 block"));
    Bytes deep;
    deep.header(3, 0, 1).str("k").u32(9);
    for (int d = 0; d < 20; ++d) deep.u32(9).u64(1);
    deep.u32(4).u64(0);
    CHECK(has(open_error(dir.write("deep.gguf", deep.b)), "key 'k': arrays nested more than 8 deep"));
    Bytes boolean;
    boolean.header(3, 0, 1).str("flag").u32(7).put<uint8_t>(2);
    CHECK(has(open_error(dir.write("bool.gguf", boolean.b)), "key 'flag': bool value 2 is neither 0 nor 1"));
    Bytes twice;
    twice.header(3, 0, 2).kv_u32("a", 1).kv_u32("a", 2);
    CHECK(has(open_error(dir.write("twice.gguf", twice.b)), "key 'a' appears twice"));
  }
  SUBCASE("offsets: unaligned, past the end, overlapping") {
    CHECK(has(open_error(dir.write("unaligned.gguf", one_tensor(0, 16))),
              "unaligned.gguf: tensor 'blk.0.attn_q.weight': offset 16 is not aligned to 32"));
    CHECK(has(open_error(dir.write("past.gguf", one_tensor(0, 1024))),
              "tensor 'blk.0.attn_q.weight': 256 F32 bytes at data offset 1024 run past the end of the data section "
              "(1024 bytes)"));
    CHECK(has(open_error(dir.write("far.gguf", one_tensor(0, uint64_t{1} << 63))), "run past the end of the data section"));
    Bytes two;
    two.header(3, 2, 0).tensor("a", {32, 2}, 0, 0).tensor("b", {32}, 0, 224).pad_to(32).zeros(512);
    CHECK(has(open_error(dir.write("overlap.gguf", two.b)),
              "tensor 'a' (data bytes 0 to 256) overlaps tensor 'b' (from data byte 224)"));
    Bytes align;
    align.header(3, 0, 1).kv_u32("general.alignment", 48);
    CHECK(has(open_error(dir.write("align.gguf", align.b)), "key 'general.alignment': 48 is not a power of two"));
    Bytes dup;
    dup.header(3, 2, 0).tensor("a", {32}, 0, 0).tensor("a", {32}, 0, 128).pad_to(32).zeros(512);
    CHECK(has(open_error(dir.write("dup.gguf", dup.b)), "tensor 'a' appears twice"));
  }
  SUBCASE("models: unsupported architecture, missing or misshapen tensors") {
    Bytes qwen;
    qwen.header(3, 0, 1).kv_string("general.architecture", "qwen2");
    CHECK(has(model_error(dir.write("qwen.gguf", qwen.b)),
              "qwen.gguf: general.architecture is 'qwen2'; qkd reads only 'llama' GGUF models"));
    Bytes hp;
    hp.header(3, 0, 1).kv_string("general.architecture", "llama");
    CHECK(has(model_error(dir.write("hp.gguf", hp.b)), "key 'llama.embedding_length' (an unsigned integer) is missing"));
    auto llama = [](uint32_t n_kv_heads, bool with_rope_freqs) {
      Bytes b;
      b.header(3, with_rope_freqs ? 2 : 1, 10).kv_string("general.architecture", "llama");
      b.kv_u32("llama.embedding_length", 32).kv_u32("llama.block_count", 1).kv_u32("llama.attention.head_count", 4);
      b.kv_u32("llama.feed_forward_length", 64).kv_u32("llama.context_length", 64).kv_u32("llama.vocab_size", 8);
      b.str("llama.attention.layer_norm_rms_epsilon").u32(6).put<float>(1e-5f);
      b.kv_u32("llama.attention.head_count_kv", n_kv_heads).kv_u32("llama.rope.dimension_count", 8);
      b.tensor("token_embd.weight", {32, 8}, 0, 0);
      if (with_rope_freqs) b.tensor("rope_freqs.weight", {4}, 0, 1024);
      return b.pad_to(32).zeros(2048).b;
    };
    CHECK(has(model_error(dir.write("gqa.gguf", llama(3, false))), "head_count 4 is not a multiple of head_count_kv 3"));
    CHECK(has(model_error(dir.write("freqs.gguf", llama(2, true))),
              "tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not supported yet"));
    Bytes ok;
    ok.header(3, 1, 9).kv_string("general.architecture", "llama");
    ok.kv_u32("llama.embedding_length", 32).kv_u32("llama.block_count", 1).kv_u32("llama.attention.head_count", 4);
    ok.kv_u32("llama.feed_forward_length", 64).kv_u32("llama.context_length", 64).kv_u32("llama.vocab_size", 8);
    ok.str("llama.attention.layer_norm_rms_epsilon").u32(6).put<float>(1e-5f);
    ok.kv_u32("llama.rope.dimension_count", 4);
    ok.tensor("token_embd.weight", {32, 8}, 0, 0).pad_to(32).zeros(2048);
    CHECK(has(model_error(dir.write("rope.gguf", ok.b)),
              "key 'llama.rope.dimension_count' = 4 differs from head_dim 8"));
  }
  SUBCASE("models: missing tensors, wrong shapes, unused tensors") {
    auto llama = [](std::vector<std::pair<std::string, std::vector<uint64_t>>> tensors) {
      Bytes b;
      b.header(3, tensors.size(), 8).kv_string("general.architecture", "llama");
      b.kv_u32("llama.embedding_length", 32).kv_u32("llama.block_count", 1).kv_u32("llama.attention.head_count", 4);
      b.kv_u32("llama.feed_forward_length", 64).kv_u32("llama.context_length", 64).kv_u32("llama.vocab_size", 8);
      b.str("llama.attention.layer_norm_rms_epsilon").u32(6).put<float>(1e-5f);
      uint64_t offset = 0;
      for (const auto& [name, ne] : tensors) {
        b.tensor(name, ne, 0, offset);
        uint64_t n = 4;
        for (uint64_t d : ne) n *= d;
        offset += (n + 31) / 32 * 32;
      }
      return b.pad_to(32).zeros(offset).b;
    };
    CHECK(has(model_error(dir.write("noembd.gguf", llama({}))), "noembd.gguf: tensor 'token_embd.weight' is missing"));
    CHECK(has(model_error(dir.write("vocab.gguf", llama({{"token_embd.weight", {32, 9}}}))),
              "vocab.gguf: key 'llama.vocab_size' = 8 differs from token_embd.weight's 9 rows"));
    CHECK(has(model_error(dir.write("shape.gguf", llama({{"token_embd.weight", {48, 8}}}))),
              "tensor 'token_embd.weight' has shape [8, 48], expected [8, 32]"));
    CHECK(has(model_error(dir.write("noq.gguf", llama({{"token_embd.weight", {32, 8}}, {"blk.0.attn_norm.weight", {32}}}))),
              "tensor 'blk.0.attn_q.weight' is missing"));
    std::vector<std::pair<std::string, std::vector<uint64_t>>> full = {
        {"token_embd.weight", {32, 8}},        {"blk.0.attn_norm.weight", {32}},     {"blk.0.attn_q.weight", {32, 32}},
        {"blk.0.attn_k.weight", {32, 32}},     {"blk.0.attn_v.weight", {32, 32}},    {"blk.0.attn_output.weight", {32, 32}},
        {"blk.0.ffn_norm.weight", {32}},       {"blk.0.ffn_gate.weight", {32, 64}},  {"blk.0.ffn_up.weight", {32, 64}},
        {"blk.0.ffn_down.weight", {64, 32}},   {"output_norm.weight", {32}}};
    const ModelWeights w = load_gguf_model(dir.write("full.gguf", llama(full)));
    CHECK(w.config.tied_embeddings);
    CHECK(w.config.head_dim == 8);
    CHECK(w.layers[0].w_down.shape == std::vector<int64_t>{32, 64});
    full.push_back({"blk.0.attn_q.bias", {32}});
    CHECK(has(model_error(dir.write("bias.gguf", llama(full))),
              "bias.gguf: tensor 'blk.0.attn_q.bias' is not part of a 1-layer llama model"));
  }
}

TEST_CASE("the default model, when fetched, loads as SmolLM2-135M-Instruct Q4_1") {
  const std::string path = default_model_path();
  if (path.empty() || !fs::exists(path)) {
    MESSAGE("skipped: " << path << " is absent (tools/fetch-default-model.sh puts it there)");
    return;
  }
  const ModelWeights w = load_gguf_model(path);
  const ModelConfig& c = w.config;
  CHECK(c.dim == 576);
  CHECK(c.n_layers == 30);
  CHECK(c.n_heads == 9);
  CHECK(c.n_kv_heads == 3);
  CHECK(c.head_dim == 64);
  CHECK(c.ffn_dim == 1536);
  CHECK(c.vocab_size == 49152);
  CHECK(c.max_seq_len == 8192);
  CHECK(c.rope_theta == 100000.0f);
  CHECK(c.norm_eps == 1e-5f);
  CHECK(c.tied_embeddings);
  CHECK(c.eos_ids == std::vector<int32_t>{0, 2});
  CHECK(w.tok_embeddings.dtype == DType::Q8_0);
  CHECK(w.layers[0].wq.dtype == DType::Q4_1);
  CHECK(w.layers[29].w_down.shape == std::vector<int64_t>{576, 1536});
  const std::vector<float> norm = to_f32(w.norm);
  for (float x : norm) CHECK(std::isfinite(x));
}
