// Dense bf16 GEMM through cuBLASLt (kernels/gemm.h):  y[m, n] (=|+=) alpha * op_a(a) . op_b(b), row-major.
// cuBLASLt is column-major. A row-major [r, c] matrix is the column-major [c, r] one, so the row-major
// product y = op_a(a) . op_b(b) is computed as the column-major y^T = op_b(b)^T . op_a(a)^T: cuBLASLt's A is
// our b, its B is our a, and its D is y seen as [n, m] with leading dimension n; no data moves.
#include "kernels/gemm.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <unordered_map>

#include "kernels/cuda_check.h"

namespace qkd {
namespace {

struct PlanKey {
  int m, n, k;
  Transpose trans_a, trans_b;
  GemmOut out;
  uint32_t align_a, align_b, align_y;  // bytes, a power of two up to 256: the heuristic's choice depends on them
  bool operator==(const PlanKey& o) const {
    return m == o.m && n == o.n && k == o.k && trans_a == o.trans_a && trans_b == o.trans_b && out == o.out &&
           align_a == o.align_a && align_b == o.align_b && align_y == o.align_y;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& p) const {
    size_t h = 0;
    for (uint64_t v : {uint64_t(p.m), uint64_t(p.n), uint64_t(p.k), uint64_t(p.trans_a), uint64_t(p.trans_b),
                       uint64_t(p.out), uint64_t(p.align_a), uint64_t(p.align_b), uint64_t(p.align_y)}) {
      h = h * 0x9E3779B97F4A7C15ull + std::hash<uint64_t>{}(v);
    }
    return h;
  }
};

// Descriptors and the chosen algorithm for one key; owns the descriptors.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t lt_a = nullptr;  // our b
  cublasLtMatrixLayout_t lt_b = nullptr;  // our a
  cublasLtMatrixLayout_t lt_d = nullptr;  // y, also cuBLASLt's C
  cublasLtMatmulAlgo_t algo{};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {  // destruction must not throw: statuses are ignored
    if (lt_d != nullptr) cublasLtMatrixLayoutDestroy(lt_d);
    if (lt_b != nullptr) cublasLtMatrixLayoutDestroy(lt_b);
    if (lt_a != nullptr) cublasLtMatrixLayoutDestroy(lt_a);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(256, a & (~a + 1)));
}

}  // namespace

struct CublasLt::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;

  ~Impl() {
    plans.clear();
    if (workspace != nullptr) cudaFree(workspace);
    if (handle != nullptr) cublasLtDestroy(handle);
  }

  const Plan& plan(const PlanKey& key) {
    auto it = plans.find(key);
    if (it != plans.end()) return *it->second;
    auto pl = std::make_unique<Plan>();
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&pl->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = key.trans_b == Transpose::Yes ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = key.trans_a == Transpose::Yes ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pl->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pl->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    const uint64_t m = key.m, n = key.n, k = key.k;
    // our b: [n, k] row-major (Yes) is column-major k x n; [k, n] row-major (No) is column-major n x k
    if (key.trans_b == Transpose::Yes) {
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl->lt_a, CUDA_R_16BF, k, n, static_cast<int64_t>(k)));
    } else {
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl->lt_a, CUDA_R_16BF, n, k, static_cast<int64_t>(n)));
    }
    // our a: [m, k] row-major (No) is column-major k x m; [k, m] row-major (Yes) is column-major m x k
    if (key.trans_a == Transpose::No) {
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl->lt_b, CUDA_R_16BF, k, m, static_cast<int64_t>(k)));
    } else {
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl->lt_b, CUDA_R_16BF, m, k, static_cast<int64_t>(m)));
    }
    const cudaDataType_t out_type = key.out == GemmOut::BF16 ? CUDA_R_16BF : CUDA_R_32F;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl->lt_d, out_type, n, m, static_cast<int64_t>(n)));

    cublasLtMatmulPreference_t pref = nullptr;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const uint64_t ws = workspace_bytes;
    const cublasStatus_t st = [&] {
      cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                              sizeof ws);
      const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_y},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_y}};
      for (const auto& [attr, bytes] : aligns) {
        if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, attr, &bytes, sizeof bytes);
      }
      if (s == CUBLAS_STATUS_SUCCESS) {
        s = cublasLtMatmulAlgoGetHeuristic(handle, pl->op, pl->lt_a, pl->lt_b, pl->lt_d, pl->lt_d, pref, 1, &result,
                                           &found);
      }
      return s;
    }();
    cublasLtMatmulPreferenceDestroy(pref);
    CUBLAS_CHECK(st);
    QKD_CHECK(found > 0, "cuda::gemm: cuBLASLt offers no algorithm for m {} n {} k {} (trans_a {}, trans_b {})",
              key.m, key.n, key.k, key.trans_a == Transpose::Yes, key.trans_b == Transpose::Yes);
    pl->algo = result.algo;
    return *plans.emplace(key, std::move(pl)).first->second;
  }
};

CublasLt::CublasLt(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  CUBLAS_CHECK(cublasLtCreate(&impl_->handle));
  if (workspace_bytes > 0) CUDA_CHECK(cudaMalloc(&impl_->workspace, workspace_bytes));
  impl_->workspace_bytes = workspace_bytes;
}

CublasLt::~CublasLt() = default;

namespace cuda {

void gemm(CublasLt& lt, const GemmArgs& a, cudaStream_t stream) {
  QKD_CHECK(a.m >= 0 && a.n >= 0 && a.k > 0, "cuda::gemm: shape m {} n {} k {} invalid (k must be positive)", a.m,
            a.n, a.k);
  if (a.m == 0 || a.n == 0) return;
  QKD_CHECK(a.y != nullptr && a.a != nullptr && a.b != nullptr, "cuda::gemm: null operand (y {}, a {}, b {})", a.y,
            static_cast<const void*>(a.a), static_cast<const void*>(a.b));
  const PlanKey key{a.m, a.n, a.k, a.trans_a, a.trans_b, a.out, alignment(a.a), alignment(a.b), alignment(a.y)};
  CublasLt::Impl& im = lt.impl();
  const Plan& pl = im.plan(key);
  const float beta = a.mode == Accumulate::Add ? 1.0f : 0.0f;  // beta 0: cuBLASLt does not read y
  CUBLAS_CHECK(cublasLtMatmul(im.handle, pl.op, &a.alpha, a.b, pl.lt_a, a.a, pl.lt_b, &beta, a.y, pl.lt_d, a.y,
                              pl.lt_d, &pl.algo, im.workspace, im.workspace_bytes, stream));
}

}  // namespace cuda
}  // namespace qkd
