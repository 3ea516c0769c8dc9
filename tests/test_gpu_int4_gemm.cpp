// CUDA int4 linear layer (kernels/int4_gemm.cu) against its CPU twin (kernels/cpu/int4_gemm.cpp), on fresh
// random inputs for every case: m = 1, 3, 16 (GEMV path), 17, 64, 512 (GEMM path), shapes that are not
// multiples of the tiles, every group size, both symmetries and scale types, forward and backward, = and +=.
// Overwritten outputs are poisoned with NaN first, so an element the kernel never wrote fails the check.
// Tolerance: bf16 operands and a bf16 output, ~1e-2 of the norm (the GPU also rounds each dequantized weight
// to bf16; the CPU keeps it exact).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"

using namespace qkd;

namespace {

constexpr double kTol = 1e-2;

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, bytes == 0 ? 16 : bytes)); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

template <typename T>
void upload(const DeviceBuffer& d, const std::vector<T>& h) {
  CUDA_CHECK(cudaMemcpy(d.p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}

struct DeviceWeight {
  DeviceBuffer packed, scales, mins;
  Int4Weight view;
  explicit DeviceWeight(const Int4HostWeight& q)
      : packed(q.packed.size() * 4), scales(q.scales.size() * 2), mins(q.mins.size() * 2) {
    upload(packed, q.packed);
    upload(scales, q.scales);
    if (!q.mins.empty()) upload(mins, q.mins);
    view = q.view();
    view.packed = packed.as<uint32_t>();
    view.scales = scales.as<uint16_t>();
    view.mins = q.mins.empty() ? nullptr : mins.as<uint16_t>();
  }
};

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

std::vector<float> normal(size_t count, float mean, float stddev) {
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng());
  return v;
}

// bf16 bits of v, and v replaced by the value those bits hold (what the GPU sees).
std::vector<uint16_t> to_bf16(std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    b[i] = float_to_bf16(v[i]);
    v[i] = bf16_to_float(b[i]);
  }
  return b;
}

struct Case {
  int m, n, k, group_size;
  Int4Symmetry sym;
  ScaleType st;
  bool backward;
  Accumulate mode;
};

std::string describe(const Case& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s m=%d n=%d k=%d group_size=%d %s %s %s", c.backward ? "backward" : "forward",
                c.m, c.n, c.k, c.group_size, c.sym == Int4Symmetry::Symmetric ? "sym" : "asym",
                c.st == ScaleType::BF16 ? "bf16" : "fp16", c.mode == Accumulate::Add ? "+=" : "=");
  return buf;
}

// Runs one case on the GPU and the CPU twin; returns ||gpu - cpu|| / ||cpu|| (or +inf when an output is not
// finite) and reports the worst elements on failure.
void check_case(const Case& c) {
  INFO(describe(c));
  const float offset = c.sym == Int4Symmetry::Asymmetric ? 0.01f : 0.0f;
  std::vector<float> w = normal(static_cast<size_t>(c.n) * c.k, offset, 0.05f);
  const Int4HostWeight q = int4_quantize(w.data(), c.n, c.k, c.group_size, c.sym, c.st);
  const DeviceWeight dw(q);

  const int in_cols = c.backward ? c.n : c.k, out_cols = c.backward ? c.k : c.n;
  const size_t in_count = static_cast<size_t>(c.m) * in_cols, out_count = static_cast<size_t>(c.m) * out_cols;
  std::vector<float> x = normal(in_count, 0.0f, 1.0f);
  const std::vector<uint16_t> x_bits = to_bf16(x);
  std::vector<float> y0 = normal(out_count, 0.0f, 1.0f);
  std::vector<uint16_t> y0_bits = to_bf16(y0);
  if (c.mode == Accumulate::Overwrite) y0_bits.assign(out_count, 0xFFFF);  // NaN poison

  DeviceBuffer dx(in_count * 2), dy(out_count * 2);
  upload(dx, x_bits);
  upload(dy, y0_bits);
  const auto* xin = dx.as<__nv_bfloat16>();
  auto* yout = dy.as<__nv_bfloat16>();
  if (c.backward) {
    cuda::int4_gemm_backward({yout, xin, dw.view, c.m, c.mode}, nullptr);
  } else {
    cuda::int4_gemm_forward({yout, xin, dw.view, c.m, c.mode}, nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> got(out_count);
  CUDA_CHECK(cudaMemcpy(got.data(), dy.p, out_count * 2, cudaMemcpyDeviceToHost));

  std::vector<float> ref(c.mode == Accumulate::Add ? y0 : std::vector<float>(out_count, 0.0f));
  if (c.backward) {
    cpu::int4_gemm_backward({ref.data(), x.data(), q.view(), c.m, c.mode});
  } else {
    cpu::int4_gemm_forward({ref.data(), x.data(), q.view(), c.m, c.mode});
  }

  double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
  size_t unwritten = 0, first_bad = out_count;
  for (size_t i = 0; i < out_count; ++i) {
    const double g = bf16_to_float(got[i]);
    if (!std::isfinite(g)) {
      ++unwritten;
      if (first_bad == out_count) first_bad = i;
      continue;
    }
    const double d = g - ref[i];
    err2 += d * d;
    ref2 += static_cast<double>(ref[i]) * ref[i];
    max_abs = std::fmax(max_abs, std::fabs(d));
  }
  const double rel = std::sqrt(err2 / std::fmax(ref2, 1e-30));
  const double rms = std::sqrt(ref2 / out_count);
  if (unwritten != 0 || rel > kTol) {
    std::string bad;
    int shown = 0;
    for (size_t i = 0; i < out_count && shown < 5; ++i) {
      const double g = bf16_to_float(got[i]);
      if (!std::isfinite(g) || std::fabs(g - ref[i]) > kTol * rms * 4) {
        bad += " [" + std::to_string(i / out_cols) + "," + std::to_string(i % out_cols) + "] gpu " +
               std::to_string(g) + " cpu " + std::to_string(ref[i]) + ";";
        ++shown;
      }
    }
    INFO("relative error " << rel << ", max abs error " << max_abs << " (rms of reference " << rms << "), "
                           << unwritten << " non-finite outputs (first at " << first_bad << "); first mismatches:"
                           << bad);
    CHECK(unwritten == 0);
    CHECK(rel <= kTol);
  }
}

const int kMs[] = {1, 3, 16, 17, 64, 512};

void sweep(int n, int k, std::initializer_list<int> group_sizes, bool backward) {
  int index = 0;
  for (int m : kMs) {
    for (int gs : group_sizes) {
      for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
        for (ScaleType st : {ScaleType::BF16, ScaleType::FP16}) {
          const Accumulate mode = index++ % 2 == 0 ? Accumulate::Overwrite : Accumulate::Add;
          check_case({m, n, k, gs, sym, st, backward, mode});
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("int4 forward: every group size, symmetry and scale type, m from 1 to 512") {
  // n = 200 (not a multiple of 16 or 128), k = 352 (11 x 32: a partial GEMV chunk and GEMM step)
  sweep(200, 352, {32, 352}, false);
  // n = 264, k = 384 allows every group size
  sweep(264, 384, {32, 64, 128, 384}, false);
}

TEST_CASE("int4 backward (dx = dy . W): every group size, symmetry and scale type, m from 1 to 512") {
  sweep(200, 352, {32, 352}, true);
  sweep(264, 384, {32, 64, 128, 384}, true);
}

TEST_CASE("int4 forward with n not a multiple of 8") {
  for (int m : {1, 5, 12, 40}) {
    check_case({m, 77, 64, 32, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Overwrite});
    check_case({m, 77, 64, 64, Int4Symmetry::Asymmetric, ScaleType::FP16, false, Accumulate::Add});
  }
}

TEST_CASE("int4 on Llama-2-7B shapes") {
  check_case({1, 4096, 4096, 128, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Overwrite});
  check_case({1, 4096, 11008, 128, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Add});
  check_case({16, 11008, 4096, 128, Int4Symmetry::Asymmetric, ScaleType::FP16, false, Accumulate::Overwrite});
  check_case({7, 4096, 4096, 64, Int4Symmetry::Symmetric, ScaleType::FP16, false, Accumulate::Overwrite});
  check_case({512, 1024, 4096, 128, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Overwrite});
  check_case({300, 4096, 1024, 128, Int4Symmetry::Symmetric, ScaleType::BF16, true, Accumulate::Add});
  // per-channel asymmetric fp16: the case where rounding fp16 scales/mins to bf16 on the device would bias rows
  check_case({2, 1024, 11008, 11008, Int4Symmetry::Asymmetric, ScaleType::FP16, false, Accumulate::Overwrite});
  check_case({40, 512, 4096, 4096, Int4Symmetry::Asymmetric, ScaleType::FP16, true, Accumulate::Overwrite});
}

TEST_CASE("int4 GEMV over long rows: several load batches per warp, a partial last one") {
  int index = 0;
  for (int m : {1, 3, 8, 16}) {
    const Accumulate mode = index % 2 == 0 ? Accumulate::Overwrite : Accumulate::Add;
    const Int4Symmetry sym = index % 3 == 0 ? Int4Symmetry::Asymmetric : Int4Symmetry::Symmetric;
    const ScaleType st = index % 4 < 2 ? ScaleType::BF16 : ScaleType::FP16;
    ++index;
    check_case({m, 1000, 5120, 128, sym, st, false, mode});  // 40 chunks of 128 columns
    check_case({m, 200, 11008, 32, sym, st, false, mode});   // 86 chunks
  }
}

TEST_CASE("int4 GEMV with more row tiles than resident blocks: several tiles a block, idle warps on short rows") {
  // 769 tiles of 16 rows (the last one partial) against ~2 blocks per SM: every block walks several tiles
  check_case({1, 12290, 4096, 128, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Overwrite});
  check_case({4, 9000, 1024, 32, Int4Symmetry::Asymmetric, ScaleType::FP16, false, Accumulate::Add});
  // k = 352: 3 chunks of 128 columns, so most warps of a block have no chunk but still meet at every tile
  check_case({1, 30000, 352, 32, Int4Symmetry::Asymmetric, ScaleType::BF16, false, Accumulate::Add});
  check_case({11, 6000, 352, 352, Int4Symmetry::Symmetric, ScaleType::FP16, false, Accumulate::Overwrite});
  // x too large for shared memory (m = 16, k = 8192): read through L1 instead
  check_case({16, 5000, 8192, 64, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Add});
}

TEST_CASE("int4 factored GEMV (group of 128 or a whole row, m = 1 and 2): each launch shape, partial chunks") {
  // The factored kernel applies each group's scale once per 128-column chunk. Every symmetry and scale type on
  // short rows: per-channel k = 11008 and 352 end in a partial chunk, k = 64 is a chunk half past k; n = 77 / 300
  // end in a partial 16-row tile.
  int index = 0;
  for (int m : {1, 2}) {
    for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
      for (ScaleType st : {ScaleType::BF16, ScaleType::FP16}) {
        const Accumulate mode = index++ % 2 == 0 ? Accumulate::Overwrite : Accumulate::Add;
        check_case({m, 77, 11008, 11008, sym, st, false, mode});
        check_case({m, 300, 352, 352, sym, st, false, mode});
        check_case({m, 40, 64, 64, sym, st, false, mode});
        check_case({m, 1000, 1152, 128, sym, st, false, mode});
      }
    }
  }
  // n picks the launch shape (16, 8 or 4 warps a block below 350, below 700 and from 700 tiles of 16 rows); k is
  // long enough for several register batches per warp, the last one partial
  check_case({1, 11201, 2176, 128, Int4Symmetry::Symmetric, ScaleType::BF16, false, Accumulate::Overwrite});
  check_case({2, 11201, 2176, 128, Int4Symmetry::Asymmetric, ScaleType::FP16, false, Accumulate::Add});
  check_case({1, 5601, 2176, 128, Int4Symmetry::Asymmetric, ScaleType::BF16, false, Accumulate::Add});
  check_case({2, 5601, 2176, 2176, Int4Symmetry::Symmetric, ScaleType::FP16, false, Accumulate::Overwrite});
  check_case({1, 4096, 4224, 128, Int4Symmetry::Symmetric, ScaleType::FP16, false, Accumulate::Add});
  check_case({2, 2000, 11008, 128, Int4Symmetry::Asymmetric, ScaleType::BF16, false, Accumulate::Overwrite});
}

TEST_CASE("int4 CUDA launchers reject bad arguments with the offending value") {
  std::vector<float> w = normal(96 * 128, 0.0f, 0.05f);
  const Int4HostWeight q = int4_quantize(w.data(), 96, 128, 32, Int4Symmetry::Symmetric, ScaleType::BF16);
  const DeviceWeight dw(q);
  DeviceBuffer x(64 * 128 * 2 + 16), y(64 * 128 * 2);
  auto* xin = x.as<__nv_bfloat16>();
  auto* yout = y.as<__nv_bfloat16>();
  auto throws_with = [](auto&& f, const std::string& needle) {
    try {
      f();
    } catch (const Error& e) {
      INFO("message: " << std::string(e.what()));
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
      return;
    }
    FAIL("no qkd::Error thrown; expected one mentioning '" << needle << "'");
  };
  Int4Weight v = dw.view;
  v.k = 100;
  throws_with([&] { cuda::int4_gemm_forward({yout, xin, v, 4}, nullptr); }, "k 100");
  v = dw.view;
  v.n = 100;  // fine for the forward, not for the backward
  throws_with([&] { cuda::int4_gemm_backward({yout, xin, v, 4}, nullptr); }, "n 100 must be a multiple of 8");
  throws_with([&] { cuda::int4_gemm_forward({yout, xin, dw.view, -2}, nullptr); }, "m -2");
  throws_with([&] { cuda::int4_gemm_forward({yout, xin + 1, dw.view, 4}, nullptr); }, "16-byte aligned");
  // m = 0 is a no-op: the (poisoned) output stays as it was
  std::vector<uint16_t> poison(64 * 128, 0xFFFF), back(64 * 128);
  upload(y, poison);
  cuda::int4_gemm_forward({yout, xin, dw.view, 0}, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(back.data(), y.p, back.size() * 2, cudaMemcpyDeviceToHost));
  CHECK(back == poison);
}
