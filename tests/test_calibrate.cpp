// GPTQ's calibration (runtime/calibrate.h): the Hessians the CPU forward's hook collects against (2 / N) sum x x^T
// of the activations of the independent double-precision forward in tests/tiny_model.h, and the option errors.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "runtime/calibrate.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qkd;

TEST_CASE("calibration: the Hessians equal 2/N sum x x^T of the reference forward's linear inputs") {
  const ModelConfig c = test::tiny_config();
  const ModelWeights w = test::make_tiny_model(c, 21);
  std::mt19937 rng(4);
  std::uniform_int_distribution<int32_t> tok(0, c.vocab_size - 1);
  std::vector<int32_t> stream(100);
  for (int32_t& t : stream) t = tok(rng);

  runtime::CalibrationOptions o;
  o.window = 24;
  o.tokens = 80;  // three whole windows of 24: N = 72, the rest of the stream unused
  const Int4Calibration cal = runtime::collect_hessians(w, stream, o);
  REQUIRE(cal.tokens == 72);
  REQUIRE(cal.hessians.size() == static_cast<size_t>(c.n_layers));

  std::vector<std::array<std::vector<double>, kLinearInputCount>> want(static_cast<size_t>(c.n_layers));
  for (int i = 0; i < 3; ++i) {
    const std::span<const int32_t> win(stream.data() + i * 24, 24);
    test::reference_logits(w, win, [&](int layer, LinearInput in, const std::vector<double>& x) {
      const int cols = static_cast<int>(x.size() / 24);
      std::vector<double>& h = want[static_cast<size_t>(layer)][static_cast<size_t>(in)];
      h.resize(static_cast<size_t>(cols) * cols, 0.0);
      for (int r = 0; r < 24; ++r)
        for (int a = 0; a < cols; ++a)
          for (int b = 0; b < cols; ++b)
            h[static_cast<size_t>(a) * cols + b] += 2.0 / 72 * x[static_cast<size_t>(r) * cols + a] * x[static_cast<size_t>(r) * cols + b];
    });
  }
  for (int l = 0; l < c.n_layers; ++l) {
    for (int in = 0; in < kLinearInputCount; ++in) {
      CAPTURE(l);
      CAPTURE(in);
      const std::vector<double>& got = cal.hessians[static_cast<size_t>(l)][static_cast<size_t>(in)];
      const std::vector<double>& ref = want[static_cast<size_t>(l)][static_cast<size_t>(in)];
      REQUIRE(got.size() == ref.size());
      double max_ref = 0.0, max_err = 0.0;
      for (size_t i = 0; i < ref.size(); ++i) {
        max_ref = std::max(max_ref, std::fabs(ref[i]));
        max_err = std::max(max_err, std::fabs(got[i] - ref[i]));
      }
      // The CPU forward is fp32 (activations ~1e-6 relative after two layers); the sums are double in both.
      CHECK(max_err <= 1e-4 * max_ref);
    }
  }
}

TEST_CASE("calibration: too few tokens and a window beyond the context are errors naming the values") {
  const ModelConfig c = test::tiny_config();
  const ModelWeights w = test::make_tiny_model(c, 21);
  const std::vector<int32_t> stream(40, 3);
  runtime::CalibrationOptions o;
  o.window = 64;
  CHECK_ERROR_CONTAINS(runtime::collect_hessians(w, stream, o), "the text has 40 tokens, fewer than one window of 64");
  o.tokens = 32;
  CHECK_ERROR_CONTAINS(runtime::collect_hessians(w, stream, o), "32 tokens are fewer than one window of 64");
  o.window = 65;
  CHECK_ERROR_CONTAINS(runtime::collect_hessians(w, stream, o), "window 65 is longer than the model's context 64");
  o = {};
  CHECK(runtime::collect_hessians(w, std::vector<int32_t>(64, 3), o).tokens == 64);  // default window: the context
}
