// safetensors reader and writer, and TensorView::to_f32. Bad files are written byte by byte here, from the format's
// definition, into a temp folder; the writer's output is checked against the format by parsing it independently.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "loader/ggml_quants.h"
#include "loader/safetensors.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace qkd;

namespace {

using qkd::test::TempDir;

std::vector<std::byte> bytes_of(const void* p, size_t n) {
  std::vector<std::byte> b(n);
  if (n > 0) std::memcpy(b.data(), p, n);  // an empty view may have no data pointer
  return b;
}

// A file in the safetensors layout: 8-byte little-endian length, the header text, then `data_bytes` bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes, uint64_t header_len) {
  std::ofstream out(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header_len >> (8 * i)) & 0xff));
  out << header;
  for (size_t i = 0; i < data_bytes; ++i) out.put(static_cast<char>(i));
}
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  write_raw(path, header, data_bytes, header.size());
}

// The message of the qkd::Error that opening `path` throws, or "" when it opens.
std::string open_error(const std::string& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TensorView view(const std::string& name, DType t, std::vector<int64_t> shape, const void* data, size_t nbytes) {
  TensorView v;
  v.name = name;
  v.dtype = t;
  v.shape = std::move(shape);
  v.data = static_cast<const std::byte*>(data);
  v.nbytes = nbytes;
  return v;
}

}  // namespace

TEST_CASE("safetensors: writer output follows the format and reads back bit-exact") {
  TempDir dir;
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff, 0x0001};  // 1, -2, 65504, smallest subnormal
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc040, 0x0001};           // 1, -3, tiny
  const std::vector<int32_t> i32 = {7, -1, 2147483647, -2147483647 - 1, 0};
  const std::vector<TensorView> in = {
      view("h.f16", DType::F16, {2, 2}, f16.data(), 8),
      view("b.bf16", DType::BF16, {3, 1}, bf16.data(), 6),
      view("a.f32", DType::F32, {2, 3}, f32.data(), 24),
      view("c.i32", DType::I32, {5}, i32.data(), 20),
      view("empty", DType::F32, {0, 4}, nullptr, 0),
      view("scalar", DType::F32, {}, f32.data() + 2, 4),
  };
  const std::map<std::string, std::string> meta = {{"format", "qkd-int4"}, {"group_size", "128"}};
  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, in, meta);

  // No temp file is left beside the result.
  int n_files = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) {
    (void)e;
    ++n_files;
  }
  CHECK(n_files == 1);

  // Independent parse of the bytes: length prefix, 8-byte padded JSON header, offsets tiling the data.
  std::ifstream raw(path, std::ios::binary);
  std::vector<char> file((std::istreambuf_iterator<char>(raw)), std::istreambuf_iterator<char>());
  REQUIRE(file.size() >= 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
  CHECK(n % 8 == 0);
  const auto header = nlohmann::json::parse(file.begin() + 8, file.begin() + 8 + static_cast<int64_t>(n));
  CHECK(header["__metadata__"]["format"] == "qkd-int4");
  CHECK(header["__metadata__"]["group_size"] == "128");
  CHECK(header["a.f32"]["dtype"] == "F32");
  CHECK(header["h.f16"]["shape"] == nlohmann::json::array({2, 2}));
  uint64_t total = 0;
  for (const auto& t : in) {
    const auto& e = header[t.name];
    const uint64_t b = e["data_offsets"][0], en = e["data_offsets"][1];
    CHECK(en - b == t.nbytes);
    if (t.nbytes > 0) CHECK(std::memcmp(file.data() + 8 + n + b, t.data, t.nbytes) == 0);
    total += t.nbytes;
  }
  CHECK(file.size() == 8 + n + total);

  auto f = SafetensorsFile::open(path);
  CHECK(f->metadata() == meta);
  CHECK(f->tensors().size() == in.size());
  for (const auto& t : in) {
    CAPTURE(t.name);
    const TensorView* r = f->find(t.name);
    REQUIRE(r != nullptr);
    CHECK(r->dtype == t.dtype);
    CHECK(r->shape == t.shape);
    REQUIRE(r->nbytes == t.nbytes);
    CHECK(bytes_of(r->data, r->nbytes) == bytes_of(t.data, t.nbytes));
    // The writer groups wide dtypes first so every view is aligned to its element size.
    CHECK(reinterpret_cast<uintptr_t>(r->data) % ggml_row_bytes(t.dtype, 1) == 0);
  }
  CHECK(f->find("nope") == nullptr);
  CHECK_THROWS_WITH_AS(f->get("nope"), doctest::Contains("no tensor 'nope'"), Error);
  CHECK(f->get("scalar").numel() == 1);
  CHECK(f->get("empty").shape_str() == "[0, 4]");

  // Overwriting an existing file replaces it whole.
  write_safetensors(path, {in[2]});
  CHECK(SafetensorsFile::open(path)->tensors().size() == 1);
  CHECK(SafetensorsFile::open(path)->metadata().empty());
}

TEST_CASE("safetensors: writer refuses bad tensors and leaves nothing behind") {
  TempDir dir;
  const std::vector<float> x(4, 1.0f);
  const std::string path = dir.file("w.safetensors");
  CHECK_THROWS_WITH_AS(write_safetensors(path, {view("w", DType::F32, {3}, x.data(), 16)}),
                       doctest::Contains("tensor 'w': F32 [3] needs 12 bytes, the view has 16"), Error);
  CHECK_THROWS_WITH_AS(write_safetensors(path, {view("w", DType::F32, {4}, x.data(), 16),
                                                view("w", DType::F32, {4}, x.data(), 16)}),
                       doctest::Contains("tensor 'w' given twice"), Error);
  CHECK_THROWS_WITH_AS(write_safetensors(path, {view("q", DType::Q4_0, {32}, x.data(), 16)}),
                       doctest::Contains("cannot hold dtype Q4_0"), Error);
  CHECK(fs::is_empty(dir.path));
  CHECK_THROWS_WITH_AS(write_safetensors(dir.file("no/such/dir/w.safetensors"), {}),
                       doctest::Contains("no/such/dir/w.safetensors"), Error);
}

TEST_CASE("safetensors: every malformed file is an Error naming the file and the value") {
  TempDir dir;
  struct Case {
    const char* what;
    std::string header;
    size_t data_bytes;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"bad json", R"({"a": {"dtype": "F32", )", 0, {"not valid JSON"}},
      {"not an object", "[1, 2]", 0, {"expected an object"}},
      {"unknown dtype", R"({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", 8,
       {"tensor 'w'", "unsupported dtype 'F64'"}},
      {"negative dim", R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8,
       {"tensor 'w'", "dimension -2"}},
      {"fractional dim", R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4,
       {"tensor 'w'", "dimension 1.5"}},
      {"numel overflow",
       R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})", 0,
       {"tensor 'w'", "overflows"}},
      {"size mismatch", R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8,
       {"tensor 'w'", "span 8 bytes", "F32 [3] needs 12"}},
      {"begin after end", R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8,
       {"tensor 'w'", "[8,4]", "begin after they end"}},
      {"offsets missing", R"({"w": {"dtype": "F32", "shape": [1]}})", 4, {"tensor 'w'", "data_offsets"}},
      {"out of range", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8,
       {"tensor 'w'", "[0, 16]", "exceed the 8-byte data section"}},
      {"overlap",
       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       12, {"tensor 'b'", "[4, 12]", "overlap tensor 'a'"}},
      {"gap",
       R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
       12, {"tensor 'b'", "gap after byte 4"}},
      {"trailing bytes", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 12,
       {"cover 4 bytes of the 12-byte data section"}},
      {"metadata value", R"({"__metadata__": {"group_size": 128}})", 0, {"__metadata__ 'group_size'", "128"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    const std::string path = dir.file(std::string("bad-") + std::to_string(&c - cases.data()) + ".safetensors");
    write_raw(path, c.header, c.data_bytes);
    const std::string msg = open_error(path);
    CAPTURE(msg);
    CHECK(msg.find(path) != std::string::npos);
    for (const auto& e : c.expect) CHECK(msg.find(e) != std::string::npos);
  }

  const std::string past = dir.file("past-eof.safetensors");
  write_raw(past, "{}", 0, 1000);
  CHECK(open_error(past).find("header length 1000 runs past the end of the 10-byte file") != std::string::npos);

  const std::string tiny = dir.file("tiny.safetensors");
  std::ofstream(tiny, std::ios::binary) << "abcde";
  CHECK(open_error(tiny).find(tiny + ": 5 bytes is too short") != std::string::npos);
  CHECK(open_error(dir.file("absent.safetensors")).find("absent.safetensors: cannot open") != std::string::npos);
}

TEST_CASE("safetensors: a truncated file is refused") {
  TempDir dir;
  const std::vector<float> x = {1, 2, 3, 4};
  const std::string path = dir.file("t.safetensors");
  write_safetensors(path, {view("x", DType::F32, {4}, x.data(), 16)});
  fs::resize_file(path, fs::file_size(path) - 4);
  const std::string msg = open_error(path);
  CAPTURE(msg);
  CHECK(msg.find(path + ": tensor 'x': data_offsets [0, 16] exceed the 12-byte data section") != std::string::npos);
}

TEST_CASE("to_f32: F16 and BF16 bit patterns, I32, F32") {
  // Values known from the IEEE formats' definitions, and agreement with kernels/dtype.h.
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x3555, 0x8000};
  const std::vector<double> f16_want = {1.0, -2.0, 65504.0, std::ldexp(1.0, -24), 0.333251953125, -0.0};
  TensorView t = view("f16", DType::F16, {2, 3}, f16.data(), 12);
  std::vector<float> got = to_f32(t);
  for (size_t i = 0; i < f16.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == f16_want[i]);
    CHECK(got[i] == fp16_to_float(f16[i]));
  }
  CHECK(std::signbit(got[5]));

  const std::vector<uint16_t> bf16 = {0x3f80, 0xc040, 0x4049, 0x0001};
  const std::vector<double> bf16_want = {1.0, -3.0, 3.140625, std::ldexp(1.0, -133)};
  got = to_f32(view("bf16", DType::BF16, {4}, bf16.data(), 8));
  for (size_t i = 0; i < bf16.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == bf16_want[i]);
    CHECK(got[i] == bf16_to_float(bf16[i]));
  }

  const std::vector<int32_t> i32 = {-5, 0, 16777216};
  got = to_f32(view("i32", DType::I32, {3}, i32.data(), 12));
  CHECK(got == std::vector<float>{-5.0f, 0.0f, 16777216.0f});

  // Unaligned source: views into files need not be aligned to their element size.
  std::vector<std::byte> buf(1 + 8);
  const float two[2] = {0.25f, -8.5f};
  std::memcpy(buf.data() + 1, two, 8);
  got = to_f32(view("f32", DType::F32, {2}, buf.data() + 1, 8));
  CHECK(got == std::vector<float>{0.25f, -8.5f});

  CHECK_THROWS_WITH_AS(to_f32(view("bad", DType::F32, {3}, two, 8)),
                       doctest::Contains("tensor 'bad': F32 [3] needs 12 bytes, the view has 8"), Error);
}

TEST_CASE("to_f32: Q8_0, Q4_0, Q4_1 blocks, row by row") {
  // Two rows of 64 values = 2 blocks a row; each block's scale differs so a misplaced block shows.
  const int rows = 2, cols = 64, blocks = rows * cols / 32;
  const uint16_t scales[4] = {0x3800, 0x3c00, 0xb400, 0x4000};  // 0.5, 1, -0.25, 2
  const double scale_val[4] = {0.5, 1.0, -0.25, 2.0};
  const uint16_t mins[4] = {0x0000, 0x3c00, 0xbc00, 0x3800};    // 0, 1, -1, 0.5
  const double min_val[4] = {0.0, 1.0, -1.0, 0.5};

  std::vector<std::byte> q8(static_cast<size_t>(blocks) * 34), q40(static_cast<size_t>(blocks) * 18),
      q41(static_cast<size_t>(blocks) * 20);
  std::vector<double> want8(rows * cols), want40(rows * cols), want41(rows * cols);
  for (int b = 0; b < blocks; ++b) {
    std::memcpy(&q8[b * 34], &scales[b], 2);
    std::memcpy(&q40[b * 18], &scales[b], 2);
    std::memcpy(&q41[b * 20], &scales[b], 2);
    std::memcpy(&q41[b * 20 + 2], &mins[b], 2);
    for (int i = 0; i < 32; ++i) {
      const int8_t v8 = static_cast<int8_t>(i * 7 - 100 + b);
      q8[b * 34 + 2 + i] = static_cast<std::byte>(v8);
      want8[b * 32 + i] = scale_val[b] * v8;
      const int v4 = (i * 5 + b) % 16;  // value i of the block: byte i%16, low nibble for i < 16
      const size_t byte = static_cast<size_t>(i % 16);
      const int shift = i < 16 ? 0 : 4;
      q40[b * 18 + 2 + byte] |= static_cast<std::byte>(v4 << shift);
      q41[b * 20 + 4 + byte] |= static_cast<std::byte>(v4 << shift);
      want40[b * 32 + i] = scale_val[b] * (v4 - 8);
      want41[b * 32 + i] = scale_val[b] * v4 + min_val[b];
    }
  }
  struct Q {
    DType t;
    const std::vector<std::byte>* data;
    const std::vector<double>* want;
  };
  for (const Q& q : {Q{DType::Q8_0, &q8, &want8}, Q{DType::Q4_0, &q40, &want40}, Q{DType::Q4_1, &q41, &want41}}) {
    CAPTURE(dtype_name(q.t));
    const std::vector<float> got = to_f32(view("q", q.t, {rows, cols}, q.data->data(), q.data->size()));
    int bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i] != (*q.want)[i] && bad++ < 5) MESSAGE("index " << i << ": got " << got[i] << " want " << (*q.want)[i]);
    }
    CHECK(bad == 0);
  }
  CHECK_THROWS_WITH_AS(to_f32(view("q", DType::Q4_0, {2, 48}, q40.data(), 72)),
                       doctest::Contains("tensor 'q': Q4_0 rows of 48 values are not whole 32-value blocks"), Error);
  CHECK_THROWS_WITH_AS(to_f32(view("q", DType::Q8_0, {rows, cols}, q8.data(), q8.size() - 1)),
                       doctest::Contains("tensor 'q': Q8_0 [2, 64] needs 136 bytes"), Error);
}
