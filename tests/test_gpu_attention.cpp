// CUDA attention (prefill: kernels/attention.cu; decode: kernels/decode_attention.cu) against the CPU twin
// cpu::attention_forward on the same bf16-representable q/k/v, fresh random values each run: GQA ratios 1, 3, 4
// and 8, head_dim 64 and 128, 1 and 3 query tokens for decode, contexts that are not multiples of the 64-key
// tile (1, 7, 129, 1000, 2049), batches whose sequences start at different positions, the generation cache
// layout and training's contiguous layout, and plans with one split, many splits and splits left empty.
// out and lse are poisoned with NaN first, and the cache past each sequence's context holds NaN, so a kernel that
// skips an output or reads a key it should not fails. Bounds: out is a softmax average of bf16 values with the
// probabilities rounded to bf16 for the tensor cores (prefill) and the result rounded to bf16, so
// ||out - ref|| / ||ref|| <= 1e-2; lse is fp32 throughout, |lse - ref| <= 1e-4 (1 + |ref|). Decode plans that
// split are also launched repeatedly, from a replayed CUDA graph, and two plans alternately on one workspace, to
// show that the merge counters reset.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "tests/gpu_test_util.h"
#include "kernels/decode_attention.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

using namespace qkd;

namespace {

using qkd::test::DeviceArray;

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

constexpr uint16_t kBf16NaN = 0x7fc0;

enum class Layout { Cache, Contiguous };  // [batch, n_kv_heads, max_seq, D] or [batch, seq, n_kv_heads, D]
enum class Path { Prefill, Decode };

struct Case {
  Path path;
  int n_heads, n_kv_heads, head_dim, seq_len;
  std::vector<int32_t> start_pos;  // one per batch element
  Layout layout = Layout::Cache;
  int plan_max_ctx = 0;            // decode: the plan's context bound (0: the largest live context)
  bool with_lse = true;
};

std::string describe(const Case& c) {
  std::string starts;
  for (int32_t s : c.start_pos) starts += fmt::format("{} ", s);
  return fmt::format("{} heads={}/{} head_dim={} seq_len={} start_pos=[{}] layout={} plan_max_ctx={}",
                     c.path == Path::Prefill ? "prefill" : "decode", c.n_heads, c.n_kv_heads, c.head_dim, c.seq_len,
                     starts, c.layout == Layout::Cache ? "cache" : "contiguous", c.plan_max_ctx);
}

// One case's inputs on the host and the device, the twin's result, and the CUDA op's arguments.
struct Problem {
  Case c;
  int batch = 0;
  size_t q_count = 0, lse_count = 0;
  std::vector<float> out_ref, lse_ref;
  std::unique_ptr<DeviceArray<uint16_t>> d_q, d_k, d_v, d_out;
  std::unique_ptr<DeviceArray<float>> d_lse;
  std::unique_ptr<DeviceArray<int32_t>> d_start;
  AttentionArgs<__nv_bfloat16> args{};

  explicit Problem(const Case& cs);
  // out and lse all NaN, so that an output a launch skips shows up.
  void poison_outputs() const {
    d_out->poison();
    d_lse->poison();
  }
  // Compares out (and lse) with the twin; MESSAGE reports the errors.
  void check() const;
};

Problem::Problem(const Case& cs) : c(cs), batch(static_cast<int>(cs.start_pos.size())) {
  const int D = c.head_dim;
  int max_ctx = 0;
  for (int32_t s : c.start_pos) max_ctx = std::max(max_ctx, s + c.seq_len);
  const int max_seq = max_ctx + 13;  // cache capacity past the longest context: NaN there

  AttentionArgs<float> ref{};
  ref.batch = batch;
  ref.seq_len = c.seq_len;
  ref.n_heads = c.n_heads;
  ref.n_kv_heads = c.n_kv_heads;
  ref.head_dim = D;
  ref.scale = 1.0f / std::sqrt(static_cast<float>(D));
  size_t kv_count = 0;
  if (c.layout == Layout::Cache) {
    ref.kv_seq_stride = D;
    ref.kv_head_stride = static_cast<int64_t>(max_seq) * D;
    ref.kv_batch_stride = ref.kv_head_stride * c.n_kv_heads;
    kv_count = static_cast<size_t>(ref.kv_batch_stride) * batch;
  } else {
    REQUIRE(max_ctx == c.seq_len);  // training: the whole sequence at once from position 0
    ref.kv_seq_stride = static_cast<int64_t>(c.n_kv_heads) * D;
    ref.kv_head_stride = D;
    ref.kv_batch_stride = ref.kv_seq_stride * c.seq_len;
    kv_count = static_cast<size_t>(ref.kv_batch_stride) * batch;
  }

  std::normal_distribution<float> normal(0.0f, 1.0f);
  q_count = static_cast<size_t>(batch) * c.seq_len * c.n_heads * D;
  std::vector<uint16_t> q_bits(q_count), k_bits(kv_count, kBf16NaN), v_bits(kv_count, kBf16NaN);
  std::vector<float> q(q_count), k(kv_count, NAN), v(kv_count, NAN);
  for (size_t i = 0; i < q_count; ++i) {
    q_bits[i] = float_to_bf16(normal(rng()));
    q[i] = bf16_to_float(q_bits[i]);
  }
  for (int b = 0; b < batch; ++b) {
    for (int g = 0; g < c.n_kv_heads; ++g) {
      for (int j = 0; j < c.start_pos[b] + c.seq_len; ++j) {
        const size_t off = b * ref.kv_batch_stride + g * ref.kv_head_stride + j * ref.kv_seq_stride;
        for (int d = 0; d < D; ++d) {
          k_bits[off + d] = float_to_bf16(normal(rng()));
          v_bits[off + d] = float_to_bf16(normal(rng()));
          k[off + d] = bf16_to_float(k_bits[off + d]);
          v[off + d] = bf16_to_float(v_bits[off + d]);
        }
      }
    }
  }

  lse_count = static_cast<size_t>(batch) * c.n_heads * c.seq_len;
  out_ref.resize(q_count);
  lse_ref.resize(lse_count);
  ref.out = out_ref.data();
  ref.q = q.data();
  ref.k = k.data();
  ref.v = v.data();
  ref.lse = lse_ref.data();
  ref.start_pos = c.start_pos.data();
  cpu::attention_forward(ref);

  d_q = std::make_unique<DeviceArray<uint16_t>>(q_bits);
  d_k = std::make_unique<DeviceArray<uint16_t>>(k_bits);
  d_v = std::make_unique<DeviceArray<uint16_t>>(v_bits);
  d_out = std::make_unique<DeviceArray<uint16_t>>(q_count);
  d_lse = std::make_unique<DeviceArray<float>>(lse_count);
  d_start = std::make_unique<DeviceArray<int32_t>>(c.start_pos);
  poison_outputs();
  args.out = d_out->bf16();
  args.q = d_q->bf16();
  args.k = d_k->bf16();
  args.v = d_v->bf16();
  args.lse = c.with_lse ? d_lse->ptr : nullptr;
  args.start_pos = d_start->ptr;
  args.batch = batch;
  args.seq_len = c.seq_len;
  args.n_heads = c.n_heads;
  args.n_kv_heads = c.n_kv_heads;
  args.head_dim = D;
  args.kv_batch_stride = ref.kv_batch_stride;
  args.kv_head_stride = ref.kv_head_stride;
  args.kv_seq_stride = ref.kv_seq_stride;
  args.scale = ref.scale;
}

void Problem::check() const {
  std::vector<float> out(q_count);
  const std::vector<uint16_t> out_bits = d_out->download();
  for (size_t i = 0; i < q_count; ++i) out[i] = bf16_to_float(out_bits[i]);
  double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
  size_t n_nan = 0;
  for (size_t i = 0; i < q_count; ++i) {
    if (!std::isfinite(out[i])) ++n_nan;
    const double e = static_cast<double>(out[i]) - out_ref[i];
    err2 += e * e;
    ref2 += static_cast<double>(out_ref[i]) * out_ref[i];
    max_abs = std::max(max_abs, std::fabs(e));
  }
  const double norm_rel = std::sqrt(err2 / ref2);
  MESSAGE(describe(c) << ": out max abs " << max_abs << ", norm rel " << norm_rel);
  CHECK(n_nan == 0);
  CHECK(norm_rel <= 1e-2);
  if (c.with_lse) {
    const std::vector<float> lse = d_lse->download();
    double lse_max = 0.0;
    size_t bad = 0;
    std::string first;
    for (size_t i = 0; i < lse_count; ++i) {
      const double e = std::fabs(static_cast<double>(lse[i]) - lse_ref[i]);
      lse_max = std::max(lse_max, std::isfinite(e) ? e : INFINITY);
      if (!(e <= 1e-4 * (1.0 + std::fabs(lse_ref[i])))) {
        if (bad < 5) first += fmt::format("  lse[{}] got {} want {}\n", i, lse[i], lse_ref[i]);
        ++bad;
      }
    }
    MESSAGE(describe(c) << ": lse max abs " << lse_max);
    INFO(bad << " lse values outside the bound\n" << first);
    CHECK(bad == 0);
  }
}

DecodeAttentionPlan plan_for(const Problem& pr) {
  int max_ctx = 0;
  for (int32_t s : pr.c.start_pos) max_ctx = std::max(max_ctx, s + pr.c.seq_len);
  return cuda::decode_attention_plan(pr.batch, pr.c.seq_len, pr.c.n_heads, pr.c.n_kv_heads, pr.c.head_dim,
                                     pr.c.plan_max_ctx > 0 ? pr.c.plan_max_ctx : max_ctx);
}

// A decode workspace as a caller prepares it once: the partials NaN (a merge that reads a partial no split wrote
// fails), the counters zero.
std::unique_ptr<DeviceArray<unsigned char>> make_workspace(size_t workspace_bytes, size_t counter_bytes) {
  auto ws = std::make_unique<DeviceArray<unsigned char>>(workspace_bytes);
  ws->poison();
  CUDA_CHECK(cudaMemset(ws->ptr, 0, counter_bytes));
  return ws;
}

// The merge counters must be zero after every completed launch.
void check_counters_zero(const DeviceArray<unsigned char>& ws, size_t counter_bytes) {
  std::vector<unsigned char> head(counter_bytes);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(head.data(), ws.ptr, counter_bytes, cudaMemcpyDeviceToHost));
  const size_t nonzero = static_cast<size_t>(std::count_if(head.begin(), head.end(), [](unsigned char x) {
    return x != 0;
  }));
  INFO(nonzero << " nonzero counter bytes of " << counter_bytes);
  CHECK(nonzero == 0);
}

void run_case(const Case& c) {
  INFO(describe(c));
  const Problem pr(c);
  if (c.path == Path::Prefill) {
    cuda::attention_forward(pr.args, nullptr);
  } else {
    const DecodeAttentionPlan plan = plan_for(pr);
    INFO("n_splits=" << plan.n_splits);
    const auto workspace = make_workspace(plan.workspace_bytes, plan.counter_bytes);
    cuda::decode_attention_forward(pr.args, plan, workspace->ptr, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  pr.check();
}

}  // namespace

TEST_CASE("prefill attention matches the twin") {
  // GQA ratio 1, 3, 4, 8 over both head dims; prompt lengths off the 64-row tile; batch 2 with different starts
  // (a prompt appended after cached tokens).
  const std::vector<Case> cases = {
      {Path::Prefill, 4, 4, 64, 1, {0}},
      {Path::Prefill, 4, 4, 128, 7, {0}},
      {Path::Prefill, 6, 2, 64, 129, {0, 37}},
      {Path::Prefill, 12, 3, 128, 129, {5}},
      {Path::Prefill, 8, 2, 128, 1000, {0}},
      {Path::Prefill, 8, 1, 64, 200, {0, 1849}},
      {Path::Prefill, 16, 2, 128, 65, {3, 0}},
      {Path::Prefill, 4, 4, 64, 64, {64}},
      {Path::Prefill, 6, 2, 128, 300, {0, 0}, Layout::Contiguous},
      {Path::Prefill, 8, 8, 64, 2049, {0}, Layout::Cache, 0, false},
  };
  for (const Case& c : cases) run_case(c);
}

TEST_CASE("decode attention matches the twin") {
  std::vector<Case> cases;
  // m = 1 and 3 query tokens, contexts 1, 7, 129, 1000, 2049, GQA 1/3/4/8, both head dims.
  const int ratios[][2] = {{4, 4}, {6, 2}, {8, 2}, {16, 2}};
  const int contexts[] = {1, 7, 129, 1000, 2049};
  int pick = 0;
  for (int seq_len : {1, 3}) {
    for (int ctx : contexts) {
      for (const auto& r : ratios) {
        const int head_dim = (pick++ % 2 == 0) ? 128 : 64;
        if (ctx < seq_len) continue;
        cases.push_back({Path::Decode, r[0], r[1], head_dim, seq_len, {ctx - seq_len}});
      }
    }
  }
  // Batch 2 at different positions; a plan sized for a long cache with a short live context (empty splits);
  // a plan with a single split; the largest group (8 heads x 16 tokens = 128 rows per kv head); 9 rows
  // (two rows per thread); training layout.
  cases.push_back({Path::Decode, 8, 2, 128, 1, {2048, 6}});
  cases.push_back({Path::Decode, 12, 4, 64, 3, {1000, 0}});
  cases.push_back({Path::Decode, 32, 32, 128, 1, {100}, Layout::Cache, 4096});
  cases.push_back({Path::Decode, 4, 4, 64, 1, {40}, Layout::Cache, 64});
  cases.push_back({Path::Decode, 16, 2, 128, 16, {777}});
  cases.push_back({Path::Decode, 16, 2, 64, 16, {0, 300}});
  cases.push_back({Path::Decode, 3, 1, 128, 3, {500}});
  cases.push_back({Path::Decode, 4, 2, 64, 20, {0}, Layout::Contiguous});
  cases.push_back({Path::Decode, 8, 8, 128, 2, {2047}, Layout::Cache, 0, false});
  for (const Case& c : cases) run_case(c);
}

// The merge of the splits runs in the split kernel's last CTA per (sequence, kv head), counted on counters in
// the workspace that each launch must leave at zero. So the same plan and workspace are launched three times in a
// row, then from a captured graph replayed three times, out and lse poisoned before each: every launch must match
// the twin, equal the first bit for bit (the merge reads every partial from memory, so which CTA finishes last
// must not matter), and leave the counters zero. GQA 1, 4, 8, head_dim 64 and 128, batch 1 and 3, contexts off
// the 64-key tile and off the split length, and a plan for a long cache over short contexts (empty splits).
TEST_CASE("decode attention gives the same result launch after launch and in graph replays") {
  const std::vector<Case> cases = {
      {Path::Decode, 8, 8, 128, 1, {999}},
      {Path::Decode, 8, 8, 64, 1, {1332, 700, 2048}},
      {Path::Decode, 16, 4, 64, 1, {776}},
      {Path::Decode, 16, 4, 128, 1, {2048, 5, 1000}},
      {Path::Decode, 32, 4, 128, 1, {1500}},
      {Path::Decode, 16, 2, 64, 3, {900, 1200, 64}},
      {Path::Decode, 32, 4, 64, 2, {3000, 1, 77}, Layout::Cache, 0, false},
      {Path::Decode, 8, 2, 128, 1, {100, 250, 37}, Layout::Cache, 4096},
  };
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreate(&stream));
  for (const Case& c : cases) {
    INFO(describe(c));
    const Problem pr(c);
    const DecodeAttentionPlan plan = plan_for(pr);
    INFO("n_splits=" << plan.n_splits);
    REQUIRE(plan.n_splits > 1);  // the merge path; any GPU with more than 12 SMs splits these
    const auto workspace = make_workspace(plan.workspace_bytes, plan.counter_bytes);
    std::vector<uint16_t> first_out;
    std::vector<float> first_lse;
    auto check_launch = [&](const char* what, int rep) {
      INFO(what << " " << rep);
      pr.check();
      const std::vector<uint16_t> out = pr.d_out->download();
      const std::vector<float> lse = pr.d_lse->download();
      if (first_out.empty()) {
        first_out = out;
        first_lse = lse;
      } else {
        size_t differ = 0;
        for (size_t i = 0; i < out.size(); ++i) differ += out[i] != first_out[i];
        INFO(differ << " of " << out.size() << " out values differ from the first launch's");
        CHECK(differ == 0);
        if (c.with_lse) CHECK(std::memcmp(lse.data(), first_lse.data(), lse.size() * sizeof(float)) == 0);
      }
      check_counters_zero(*workspace, plan.counter_bytes);
    };
    for (int rep = 0; rep < 3; ++rep) {
      pr.poison_outputs();
      cuda::decode_attention_forward(pr.args, plan, workspace->ptr, stream);
      CUDA_CHECK(cudaStreamSynchronize(stream));
      check_launch("launch", rep);
    }
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    cuda::decode_attention_forward(pr.args, plan, workspace->ptr, stream);
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int rep = 0; rep < 3; ++rep) {
      pr.poison_outputs();
      CUDA_CHECK(cudaGraphLaunch(exec, stream));
      CUDA_CHECK(cudaStreamSynchronize(stream));
      check_launch("graph replay", rep);
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
}

// The runtime keeps one workspace for its batch-1 plan and its batch-N plan, which split differently: each plan's
// partials must stay clear of the other's counters. Launch the two alternately, back to back, on one workspace.
TEST_CASE("decode attention plans of different batch share one workspace") {
  for (const int head_dim : {64, 128}) {
    const Problem one({Path::Decode, 32, 8, head_dim, 1, {1234}});
    const Problem three({Path::Decode, 32, 8, head_dim, 1, {1800, 3, 611}});
    const DecodeAttentionPlan plan_one = plan_for(one), plan_three = plan_for(three);
    INFO("head_dim " << head_dim << ", n_splits " << plan_one.n_splits << " and " << plan_three.n_splits);
    REQUIRE(plan_one.n_splits > 1);
    REQUIRE(plan_three.n_splits > 1);
    const size_t counter_bytes = std::max(plan_one.counter_bytes, plan_three.counter_bytes);
    const auto workspace =
        make_workspace(std::max(plan_one.workspace_bytes, plan_three.workspace_bytes), counter_bytes);
    for (int rep = 0; rep < 2; ++rep) {
      one.poison_outputs();
      three.poison_outputs();
      const bool one_first = rep == 0;
      for (int k = 0; k < 2; ++k) {
        if ((k == 0) == one_first) {
          cuda::decode_attention_forward(one.args, plan_one, workspace->ptr, nullptr);
        } else {
          cuda::decode_attention_forward(three.args, plan_three, workspace->ptr, nullptr);
        }
      }
      CUDA_CHECK(cudaDeviceSynchronize());
      one.check();
      three.check();
      check_counters_zero(*workspace, counter_bytes);
    }
  }
}

TEST_CASE("attention launchers reject unsupported shapes") {
  DeviceArray<uint16_t> buf(1 << 16);
  DeviceArray<int32_t> start(std::vector<int32_t>{0});
  AttentionArgs<__nv_bfloat16> a{};
  a.out = buf.bf16();
  a.q = a.k = a.v = buf.bf16();
  a.start_pos = start.ptr;
  a.batch = 1;
  a.seq_len = 1;
  a.n_heads = 4;
  a.n_kv_heads = 4;
  a.head_dim = 96;
  a.kv_seq_stride = 96;
  a.kv_head_stride = 96 * 16;
  a.kv_batch_stride = 96 * 16 * 4;
  a.scale = 0.1f;
  CHECK_THROWS_AS(cuda::attention_forward(a, nullptr), Error);
  CHECK_THROWS_AS(cuda::decode_attention_plan(1, 1, 4, 4, 96, 16), Error);
  a.head_dim = 64;
  a.n_kv_heads = 3;
  CHECK_THROWS_AS(cuda::attention_forward(a, nullptr), Error);
  // 32 heads per kv head x 5 tokens = 160 query rows: too many for one decode CTA.
  CHECK_THROWS_AS(cuda::decode_attention_plan(1, 5, 32, 1, 64, 100), Error);
  a.n_kv_heads = 4;
  const DecodeAttentionPlan plan = cuda::decode_attention_plan(1, 1, 4, 4, 64, 16);
  a.seq_len = 2;  // more tokens than the plan
  CHECK_THROWS_AS(cuda::decode_attention_forward(a, plan, nullptr, nullptr), Error);
}

// Not a test: decode-attention time for a Llama-2-7B layer (32 heads, head_dim 128, batch 1), run with
// `test_gpu_attention --no-skip -tc="decode attention timing*"`. Eight layers' caches are cycled, as in a real
// step, so K/V come from HBM rather than from a 50 MB L2 still holding the previous call's; the calls are
// replayed from a CUDA graph so launch gaps stay out of the figure.
TEST_CASE("decode attention timing (7B shape)" * doctest::skip()) {
  const int n_heads = 32, D = 128, max_seq = 4096, n_layers = 8, reps = 25;
  const size_t kv_count = static_cast<size_t>(n_heads) * max_seq * D;
  std::vector<uint16_t> bits(kv_count);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint16_t& b : bits) b = float_to_bf16(normal(rng()));
  std::vector<std::unique_ptr<DeviceArray<uint16_t>>> caches;
  for (int i = 0; i < 2 * n_layers; ++i) caches.push_back(std::make_unique<DeviceArray<uint16_t>>(bits));
  DeviceArray<uint16_t> d_q(static_cast<size_t>(n_heads) * D), d_out(static_cast<size_t>(n_heads) * D);
  d_q.upload(std::vector<uint16_t>(bits.begin(), bits.begin() + n_heads * D));
  const DecodeAttentionPlan plan = cuda::decode_attention_plan(1, 1, n_heads, n_heads, D, max_seq);
  const auto workspace = make_workspace(plan.workspace_bytes, plan.counter_bytes);
  cudaStream_t stream;
  cudaEvent_t t0, t1;
  CUDA_CHECK(cudaStreamCreate(&stream));
  CUDA_CHECK(cudaEventCreate(&t0));
  CUDA_CHECK(cudaEventCreate(&t1));
  for (int ctx : {128, 512, 2048}) {
    DeviceArray<int32_t> d_start(std::vector<int32_t>{ctx - 1});
    AttentionArgs<__nv_bfloat16> a{};
    a.out = d_out.bf16();
    a.q = d_q.bf16();
    a.start_pos = d_start.ptr;
    a.batch = 1;
    a.seq_len = 1;
    a.n_heads = a.n_kv_heads = n_heads;
    a.head_dim = D;
    a.kv_seq_stride = D;
    a.kv_head_stride = static_cast<int64_t>(max_seq) * D;
    a.kv_batch_stride = a.kv_head_stride * n_heads;
    a.scale = 1.0f / std::sqrt(static_cast<float>(D));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int r = 0; r < reps; ++r) {
      for (int layer = 0; layer < n_layers; ++layer) {
        a.k = caches[2 * layer]->bf16();
        a.v = caches[2 * layer + 1]->bf16();
        cuda::decode_attention_forward(a, plan, workspace->ptr, stream);
      }
    }
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_CHECK(cudaGraphLaunch(exec, stream));  // warm-up
    std::vector<float> times;
    for (int rep = 0; rep < 7; ++rep) {
      CUDA_CHECK(cudaEventRecord(t0, stream));
      CUDA_CHECK(cudaGraphLaunch(exec, stream));
      CUDA_CHECK(cudaEventRecord(t1, stream));
      CUDA_CHECK(cudaEventSynchronize(t1));
      float ms = 0.0f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
      times.push_back(ms * 1000.0f / (reps * n_layers));
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    std::sort(times.begin(), times.end());
    const double bytes = 2.0 * n_heads * ctx * D * 2;  // K and V of the live context, bf16
    MESSAGE(fmt::format("decode attention 7B layer ctx {}: {:.2f} us/layer (median of 7 graph replays of {} calls, "
                        "n_splits {}), K+V {:.1f} MB -> {:.0f} GB/s",
                        ctx, times[3], reps * n_layers, plan.n_splits, bytes / 1e6, bytes / (times[3] * 1e-6) / 1e9));
  }
  CUDA_CHECK(cudaEventDestroy(t0));
  CUDA_CHECK(cudaEventDestroy(t1));
  CUDA_CHECK(cudaStreamDestroy(stream));
}
