// cuBLASLt bf16 GEMM (kernels/gemm.cu) against a double-precision product of the same bf16 inputs, for the
// four transpose combinations (the linear layer's forward, dgrad and wgrad among them), bf16 and fp32 outputs,
// = and +=, on fresh random inputs. Overwritten outputs are poisoned with NaN first. Tolerance: a bf16 output
// ~1e-2 of the norm; an fp32 output 1e-5 (exact bf16 products, fp32 sums).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"

using namespace qkd;

namespace {

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, bytes)); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

// Random bf16 bits and the values they hold.
std::vector<uint16_t> random_bf16(size_t count, std::vector<float>& values) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> bits(count);
  values.resize(count);
  for (size_t i = 0; i < count; ++i) {
    bits[i] = float_to_bf16(d(rng()));
    values[i] = bf16_to_float(bits[i]);
  }
  return bits;
}

struct Case {
  int m, n, k;
  Transpose ta, tb;
  GemmOut out;
  Accumulate mode;
  float alpha = 1.0f;
  int offset = 0;  // elements added to every pointer: exercises the alignment-keyed plans
};

void check_case(CublasLt& lt, const Case& c) {
  INFO("m=" << c.m << " n=" << c.n << " k=" << c.k << " trans_a=" << (c.ta == Transpose::Yes)
            << " trans_b=" << (c.tb == Transpose::Yes) << " out=" << (c.out == GemmOut::F32 ? "f32" : "bf16")
            << " mode=" << (c.mode == Accumulate::Add ? "+=" : "=") << " alpha=" << c.alpha << " offset=" << c.offset);
  const size_t na = static_cast<size_t>(c.m) * c.k, nb = static_cast<size_t>(c.n) * c.k,
               ny = static_cast<size_t>(c.m) * c.n;
  std::vector<float> a, b, y0;
  const std::vector<uint16_t> a_bits = random_bf16(na, a), b_bits = random_bf16(nb, b);
  const std::vector<uint16_t> y0_bits = random_bf16(ny, y0);
  const size_t out_size = c.out == GemmOut::F32 ? 4 : 2;
  const size_t off = static_cast<size_t>(c.offset);

  DeviceBuffer da((na + off) * 2), db((nb + off) * 2), dy((ny + off) * out_size);
  auto* pa = static_cast<uint16_t*>(da.p) + off;
  auto* pb = static_cast<uint16_t*>(db.p) + off;
  void* py = static_cast<char*>(dy.p) + off * out_size;
  CUDA_CHECK(cudaMemcpy(pa, a_bits.data(), na * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(pb, b_bits.data(), nb * 2, cudaMemcpyHostToDevice));
  // y starts as NaN (=) or as y0 (+=)
  std::vector<unsigned char> y_init(ny * out_size);
  for (size_t i = 0; i < ny; ++i) {
    if (c.out == GemmOut::F32) {
      const float v = c.mode == Accumulate::Add ? y0[i] : NAN;
      std::memcpy(&y_init[i * 4], &v, 4);
    } else {
      const uint16_t v = c.mode == Accumulate::Add ? y0_bits[i] : uint16_t{0xFFFF};
      std::memcpy(&y_init[i * 2], &v, 2);
    }
  }
  CUDA_CHECK(cudaMemcpy(py, y_init.data(), y_init.size(), cudaMemcpyHostToDevice));

  GemmArgs args{py, reinterpret_cast<const __nv_bfloat16*>(pa), reinterpret_cast<const __nv_bfloat16*>(pb), c.m,
                c.n, c.k};
  args.trans_a = c.ta;
  args.trans_b = c.tb;
  args.out = c.out;
  args.mode = c.mode;
  args.alpha = c.alpha;
  cuda::gemm(lt, args, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<unsigned char> got_raw(y_init.size());
  CUDA_CHECK(cudaMemcpy(got_raw.data(), py, got_raw.size(), cudaMemcpyDeviceToHost));

  double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
  size_t non_finite = 0;
  std::string first;
  for (int i = 0; i < c.m; ++i) {
    for (int j = 0; j < c.n; ++j) {
      double ref = 0.0;
      for (int l = 0; l < c.k; ++l) {
        const size_t ai = c.ta == Transpose::No ? static_cast<size_t>(i) * c.k + l : static_cast<size_t>(l) * c.m + i;
        const size_t bi = c.tb == Transpose::Yes ? static_cast<size_t>(j) * c.k + l : static_cast<size_t>(l) * c.n + j;
        const double av = a[ai], bv = b[bi];
        ref += av * bv;
      }
      ref *= c.alpha;
      const size_t idx = static_cast<size_t>(i) * c.n + j;
      if (c.mode == Accumulate::Add) ref += y0[idx];
      double g;
      if (c.out == GemmOut::F32) {
        float f;
        std::memcpy(&f, &got_raw[idx * 4], 4);
        g = f;
      } else {
        uint16_t h;
        std::memcpy(&h, &got_raw[idx * 2], 2);
        g = bf16_to_float(h);
      }
      if (!std::isfinite(g)) {
        if (non_finite++ == 0) first = std::to_string(i) + ", " + std::to_string(j);
        continue;
      }
      err2 += (g - ref) * (g - ref);
      ref2 += ref * ref;
      max_abs = std::fmax(max_abs, std::fabs(g - ref));
    }
  }
  const double rel = std::sqrt(err2 / std::fmax(ref2, 1e-30));
  const double tol = c.out == GemmOut::F32 ? 1e-5 : 1e-2;
  INFO("relative error " << rel << " (tolerance " << tol << "), max abs error " << max_abs << ", " << non_finite
                         << " non-finite outputs, first at " << first);
  CHECK(non_finite == 0);
  CHECK(rel <= tol);
}

}  // namespace

TEST_CASE("cuBLASLt bf16 GEMM: every transpose, both output types, = and +=") {
  CublasLt lt;
  const int shapes[][3] = {{1, 200, 352}, {3, 264, 384}, {17, 256, 4096}, {64, 328, 96}, {512, 200, 352}};
  int index = 0;
  for (const auto& s : shapes) {
    for (Transpose ta : {Transpose::No, Transpose::Yes}) {
      for (Transpose tb : {Transpose::No, Transpose::Yes}) {
        for (GemmOut out : {GemmOut::BF16, GemmOut::F32}) {
          const Accumulate mode = index++ % 2 == 0 ? Accumulate::Overwrite : Accumulate::Add;
          check_case(lt, {s[0], s[1], s[2], ta, tb, out, mode});
        }
      }
    }
  }
}

TEST_CASE("cuBLASLt bf16 GEMM: cached plans are reused and keyed by alignment; alpha scales") {
  CublasLt lt;
  for (int rep = 0; rep < 2; ++rep) {
    check_case(lt, {33, 128, 256, Transpose::No, Transpose::Yes, GemmOut::BF16, Accumulate::Overwrite});
  }
  check_case(lt, {33, 128, 256, Transpose::No, Transpose::Yes, GemmOut::BF16, Accumulate::Overwrite, 0.5f, 1});
  check_case(lt, {33, 128, 256, Transpose::Yes, Transpose::No, GemmOut::F32, Accumulate::Add, -2.0f, 4});
}

TEST_CASE("cuBLASLt bf16 GEMM rejects bad shapes") {
  CublasLt lt;
  GemmArgs args{nullptr, nullptr, nullptr, 4, 4, 0};
  CHECK_THROWS_AS(cuda::gemm(lt, args, nullptr), Error);
  args.k = 4;
  CHECK_THROWS_AS(cuda::gemm(lt, args, nullptr), Error);  // null operands
  args.m = 0;
  CHECK_NOTHROW(cuda::gemm(lt, args, nullptr));  // nothing to do
}
