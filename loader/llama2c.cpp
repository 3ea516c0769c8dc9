#include "loader/llama2c.h"

#include <cstring>

#include <fmt/format.h>

#include "kernels/error.h"
#include "loader/mmap_file.h"

namespace qkd {

namespace {

constexpr uint32_t kMagic = 0x616b3432;  // "ak42" as export.py writes it, little-endian
constexpr size_t kLegacyHeaderBytes = 7 * 4;
constexpr size_t kV1HeaderBytes = 256;

template <typename T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Element counts of the checkpoint's pieces; a header of large int32 values must not wrap a 64-bit product.
struct Counter {
  const std::string& path;
  uint64_t mul(uint64_t a, uint64_t b) const {
    uint64_t r;
    QKD_CHECK(!__builtin_mul_overflow(a, b, &r), "{}: header sizes overflow 64 bits ({} * {})", path, a, b);
    return r;
  }
  uint64_t add(uint64_t a, uint64_t b) const {
    uint64_t r;
    QKD_CHECK(!__builtin_add_overflow(a, b, &r), "{}: header sizes overflow 64 bits ({} + {})", path, a, b);
    return r;
  }
};

// Hands out consecutive fp32 tensors of the mapped file.
struct Cursor {
  const std::byte* p;
  TensorView take(std::string name, std::vector<int64_t> shape) {
    TensorView t;
    t.name = std::move(name);
    t.dtype = DType::F32;
    t.shape = std::move(shape);
    t.data = p;
    t.nbytes = static_cast<size_t>(t.numel()) * 4;
    p += t.nbytes;
    return t;
  }
  // One stack [n_layers, shape...] as per-layer views.
  std::vector<TensorView> take_stack(const char* name, int n_layers, const std::vector<int64_t>& shape) {
    std::vector<TensorView> out;
    for (int l = 0; l < n_layers; ++l) out.push_back(take(fmt::format("layers.{}.{}", l, name), shape));
    return out;
  }
};

}  // namespace

Llama2cHeader parse_llama2c_header(const std::byte* data, size_t size, const std::string& path) {
  Llama2cHeader h;
  QKD_CHECK(size >= kLegacyHeaderBytes, "{}: {} bytes is too short for a llama2.c header ({} bytes)", path, size,
            kLegacyHeaderBytes);
  const std::byte* fields = data;
  if (load<uint32_t>(data) == kMagic) {
    QKD_CHECK(size >= kV1HeaderBytes, "{}: {} bytes is too short for a llama2.c version-1 header ({} bytes)", path,
              size, kV1HeaderBytes);
    h.version = load<int32_t>(data + 4);
    QKD_CHECK(h.version != 2, "{}: llama2.c version 2 (int8 Q8_0 export) is not supported; export with --version 1",
              path);
    QKD_CHECK(h.version == 1, "{}: unknown llama2.c version {} (qkd reads the legacy format and version 1)", path,
              h.version);
    fields = data + 8;
    const uint8_t shared = static_cast<uint8_t>(data[8 + kLegacyHeaderBytes]);
    QKD_CHECK(shared <= 1, "{}: shared_classifier flag is {}, expected 0 or 1", path, shared);
    h.shared_classifier = shared == 1;
    h.header_bytes = kV1HeaderBytes;
  } else {
    h.header_bytes = kLegacyHeaderBytes;
  }
  h.dim = load<int32_t>(fields);
  h.hidden_dim = load<int32_t>(fields + 4);
  h.n_layers = load<int32_t>(fields + 8);
  h.n_heads = load<int32_t>(fields + 12);
  h.n_kv_heads = load<int32_t>(fields + 16);
  const int32_t vocab = load<int32_t>(fields + 20);
  h.seq_len = load<int32_t>(fields + 24);
  if (h.version == 0) {
    QKD_CHECK(vocab != INT32_MIN, "{}: vocab_size {} is invalid", path, vocab);
    h.shared_classifier = vocab > 0;
    h.vocab_size = vocab < 0 ? -vocab : vocab;
  } else {
    QKD_CHECK(vocab > 0, "{}: vocab_size {} must be positive in version 1", path, vocab);
    h.vocab_size = vocab;
  }

  QKD_CHECK(h.dim > 0 && h.hidden_dim > 0 && h.n_layers > 0 && h.n_heads > 0 && h.n_kv_heads > 0 &&
                h.vocab_size > 0 && h.seq_len > 0,
            "{}: header has a non-positive size: dim {}, hidden_dim {}, n_layers {}, n_heads {}, n_kv_heads {}, "
            "vocab_size {}, seq_len {}",
            path, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, vocab, h.seq_len);
  QKD_CHECK(h.dim % h.n_heads == 0, "{}: dim {} is not a multiple of n_heads {}", path, h.dim, h.n_heads);
  QKD_CHECK(h.n_heads % h.n_kv_heads == 0, "{}: n_heads {} is not a multiple of n_kv_heads {}", path, h.n_heads,
            h.n_kv_heads);
  const int head_dim = h.dim / h.n_heads;
  QKD_CHECK(head_dim % 2 == 0, "{}: head_dim {} (dim {} / n_heads {}) is odd; RoPE rotates pairs", path, head_dim,
            h.dim, h.n_heads);

  const Counter c{path};
  const uint64_t D = h.dim, F = h.hidden_dim, L = h.n_layers, V = h.vocab_size;
  const uint64_t kv_dim = c.mul(h.n_kv_heads, head_dim);
  uint64_t floats = c.mul(V, D);                                          // tok_embeddings
  floats = c.add(floats, c.mul(L, c.add(c.mul(2, D),                     // rms_att, rms_ffn
                                        c.add(c.mul(2, c.mul(D, D)),     // wq, wo
                                              c.add(c.mul(2, c.mul(D, kv_dim)),  // wk, wv
                                                    c.mul(3, c.mul(D, F)))))));  // w1, w2, w3
  floats = c.add(floats, D);                                              // final norm
  if (h.version == 0) floats = c.add(floats, c.mul(h.seq_len, head_dim));  // freq_cis real + imag, unused
  if (!h.shared_classifier) floats = c.add(floats, c.mul(V, D));          // wcls
  h.expected_bytes = c.add(h.header_bytes, c.mul(floats, 4));
  QKD_CHECK(h.expected_bytes == size,
            "{}: file is {} bytes but its header (version {}, dim {}, hidden_dim {}, n_layers {}, n_heads {}, "
            "n_kv_heads {}, vocab_size {}, seq_len {}, shared_classifier {}) implies {} bytes",
            path, size, h.version, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len,
            h.shared_classifier, h.expected_bytes);
  return h;
}

ModelWeights load_llama2c(const std::string& path) {
  auto map = MappedFile::open(path);
  const Llama2cHeader h = parse_llama2c_header(map->data(), map->size(), path);
  ModelWeights w;
  w.source = path;
  w.format = "llama2c";
  w.storage.push_back(map);
  ModelConfig& c = w.config;
  c.arch = "llama";
  c.dim = h.dim;
  c.n_layers = h.n_layers;
  c.n_heads = h.n_heads;
  c.n_kv_heads = h.n_kv_heads;
  c.head_dim = h.dim / h.n_heads;
  c.ffn_dim = h.hidden_dim;
  c.vocab_size = h.vocab_size;
  c.max_seq_len = h.seq_len;
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.tied_embeddings = h.shared_classifier;
  c.bos_id = 1;
  c.eos_ids = {2};

  const int64_t D = h.dim, F = h.hidden_dim, V = h.vocab_size, L = h.n_layers;
  const int64_t q_dim = int64_t{h.n_heads} * c.head_dim, kv_dim = int64_t{h.n_kv_heads} * c.head_dim;
  Cursor cur{map->data() + h.header_bytes};
  std::vector<TensorView> rms_att, rms_ffn;
  if (h.version == 0) {
    w.tok_embeddings = cur.take("tok_embeddings", {V, D});
    rms_att = cur.take_stack("rms_att_weight", h.n_layers, {D});
  } else {
    rms_att = cur.take_stack("rms_att_weight", h.n_layers, {D});
    rms_ffn = cur.take_stack("rms_ffn_weight", h.n_layers, {D});
    w.norm = cur.take("rms_final_weight", {D});
    w.tok_embeddings = cur.take("tok_embeddings", {V, D});
  }
  auto wq = cur.take_stack("wq", h.n_layers, {q_dim, D});
  auto wk = cur.take_stack("wk", h.n_layers, {kv_dim, D});
  auto wv = cur.take_stack("wv", h.n_layers, {kv_dim, D});
  auto wo = cur.take_stack("wo", h.n_layers, {D, q_dim});
  if (h.version == 0) rms_ffn = cur.take_stack("rms_ffn_weight", h.n_layers, {D});
  auto w1 = cur.take_stack("w1", h.n_layers, {F, D});
  auto w2 = cur.take_stack("w2", h.n_layers, {D, F});
  auto w3 = cur.take_stack("w3", h.n_layers, {F, D});
  if (h.version == 0) {
    w.norm = cur.take("rms_final_weight", {D});
    cur.p += static_cast<size_t>(h.seq_len) * static_cast<size_t>(c.head_dim) * 4;  // freq_cis_real and _imag
  }
  w.lm_head = h.shared_classifier ? w.tok_embeddings : cur.take("wcls", {V, D});
  QKD_CHECK(cur.p == map->data() + map->size(), "{}: internal layout mismatch after {} layers", path, L);

  w.layers.resize(static_cast<size_t>(h.n_layers));
  for (size_t l = 0; l < w.layers.size(); ++l) {
    LayerWeights& lw = w.layers[l];
    lw.attn_norm = rms_att[l];
    lw.wq = wq[l];
    lw.wk = wk[l];
    lw.wv = wv[l];
    lw.wo = wo[l];
    lw.ffn_norm = rms_ffn[l];
    lw.w_gate = w1[l];
    lw.w_up = w3[l];
    lw.w_down = w2[l];
  }
  return w;
}

}  // namespace qkd
