// int4 -> bf16 dequantization on the GPU (kernels/int4_dequant.h), two ways:
//  - bit for bit against a host emulation of the per-group arithmetic int4_format.h documents for the device
//    (int4_device::dequant_word): bf16 scales, bf16(s (u - 8)) or bf16(s u + m) rounded once; fp16 scales,
//    bf16(fmaf(128 + u, s, b)) with b = -136 s or fmaf(-128, s, m) rounded to fp32 once;
//  - within a bound of the CPU twin cpu::dequantize_int4 (exact fp32 values): half a bf16 unit for symmetric
//    groups (s (u - 8) is exact, so the GPU holds bf16(cpu) exactly); for asymmetric groups one bf16 unit, plus,
//    with fp16 scales, the fp32 rounding of the bias m - 128 s, which can be large next to a small s u + m.
// Shapes: odd row counts, every group size, per-channel, k = 32 (a row of one piece).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/int4_dequant.h"
#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"
#include "tests/gpu_test_util.h"

using namespace qkd;
using qkd::test::DeviceArray;

namespace {

// Round-to-nearest-even of a double straight to bf16 (8 significant bits): going through float would round
// twice, which can differ from the device's single rounding.
uint16_t bf16_of(double x) {
  if (x == 0.0) return float_to_bf16(static_cast<float>(x));
  int e = 0;
  const double m = std::frexp(x, &e);  // x = m 2^e, 0.5 <= |m| < 1
  return float_to_bf16(static_cast<float>(std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8)));
}

void check(int n, int k, int group_size, Int4Symmetry sym, ScaleType st) {
  CAPTURE(n);
  CAPTURE(k);
  CAPTURE(group_size);
  CAPTURE(sym == Int4Symmetry::Symmetric ? "sym" : "asym");
  CAPTURE(st == ScaleType::BF16 ? "bf16 scales" : "fp16 scales");
  std::mt19937 rng(static_cast<uint32_t>(n * 7919 + k * 31 + group_size + static_cast<int>(sym) * 3 + static_cast<int>(st)));
  std::normal_distribution<float> d(sym == Int4Symmetry::Asymmetric ? 0.01f : 0.0f, 0.05f);
  std::vector<float> w(static_cast<size_t>(n) * k);
  for (float& x : w) x = d(rng);
  const Int4HostWeight q = int4_quantize(w.data(), n, k, group_size, sym, st);
  std::vector<float> want(w.size());
  cpu::dequantize_int4(q.view(), want.data());

  DeviceArray<uint32_t> packed(q.packed);
  DeviceArray<uint16_t> scales(q.scales);
  DeviceArray<uint16_t> mins(q.mins.empty() ? std::vector<uint16_t>{0} : q.mins);
  Int4Weight view = q.view();
  view.packed = packed.ptr;
  view.scales = scales.ptr;
  view.mins = q.mins.empty() ? nullptr : mins.ptr;
  DeviceArray<uint16_t> out(w.size());
  out.poison();
  cuda::int4_dequantize({out.bf16(), view}, nullptr);
  const std::vector<uint16_t> got = out.download();

  // the device's arithmetic on the host
  const int groups = static_cast<int>(int4_groups_per_row(k, q.group_size));
  auto emulate = [&](size_t i, double* slack) {
    const size_t row = i / k, col = i % k;
    const size_t gi = row * groups + col / q.group_size;
    const uint32_t u = int4_get(q.packed.data() + row * (k / 8), static_cast<int>(col));
    const bool asym = sym == Int4Symmetry::Asymmetric;
    if (st == ScaleType::BF16) {
      const double s = bf16_to_float(q.scales[gi]), m = asym ? bf16_to_float(q.mins[gi]) : 0.0;
      *slack = 0.0;
      // s u + m is exact in double: s and m have 8 significant bits, u 4
      return bf16_of(s * (static_cast<double>(u) - (asym ? 0 : kInt4Zero)) + m);
    }
    const float s = fp16_to_float(q.scales[gi]);
    const float b = asym ? std::fmaf(-128.0f, s, fp16_to_float(q.mins[gi])) : -136.0f * s;
    *slack = asym ? std::ldexp(std::fabs(128.0f * s) + std::fabs(fp16_to_float(q.mins[gi])), -24) : 0.0;
    return float_to_bf16(std::fmaf(128.0f + static_cast<float>(u), s, b));
  };
  size_t bad_bits = 0, bad_bound = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double slack = 0.0;
    const uint16_t emu = emulate(i, &slack);
    if (got[i] != emu && bad_bits++ == 0) {
      MESSAGE("element " << i << " (row " << i / k << ", column " << i % k << "): GPU bits " << got[i] << " ("
                         << bf16_to_float(got[i]) << "), emulation " << emu << " (" << bf16_to_float(emu) << ")");
    }
    // one bf16 unit of the CPU value (half for symmetric), plus the bias rounding
    const double ulp = std::ldexp(1.0, std::ilogb(want[i] == 0.0f ? 1e-30f : want[i]) - 7);
    const double bound = (sym == Int4Symmetry::Symmetric ? 0.5 : 1.0) * ulp + slack;
    if (std::fabs(static_cast<double>(bf16_to_float(got[i])) - want[i]) > bound && bad_bound++ == 0) {
      MESSAGE("element " << i << ": GPU " << bf16_to_float(got[i]) << ", CPU twin " << want[i] << ", bound " << bound);
    }
  }
  CHECK(bad_bits == 0);
  CHECK(bad_bound == 0);
}

}  // namespace

TEST_CASE("int4_dequantize matches the CPU twin for every group size, symmetry and scale type") {
  for (ScaleType st : {ScaleType::BF16, ScaleType::FP16}) {
    for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
      for (int g : {32, 64, 128}) check(37, 512, g, sym, st);
      check(5, 160, kInt4PerChannel, sym, st);
      check(3, 32, 32, sym, st);
      check(1031, 4096, 128, sym, st);
    }
  }
}

TEST_CASE("int4_dequantize refuses an invalid weight view") {
  Int4Weight bad;
  bad.n = 4;
  bad.k = 48;  // not a multiple of 32
  bad.group_size = 32;
  DeviceArray<uint16_t> out(4 * 48);
  CHECK_THROWS_AS(cuda::int4_dequantize({out.bf16(), bad}, nullptr), qkd::Error);
}
