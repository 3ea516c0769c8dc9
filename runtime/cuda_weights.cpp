#include "runtime/cuda_weights.h"

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/int4_gemm.h"
#include "loader/ggml_quants.h"
#include "runtime/cuda_layer_ops.h"

namespace qkd::runtime {
namespace {

// Rows converted per block on the host: bounds the fp32 staging copy (4096 rows of a 14336-wide weight is
// 235 MB) while keeping each device copy large.
constexpr int64_t kRowBlock = 4096;

int64_t rows_of(const TensorView& t) { return t.shape.size() == 2 ? t.shape[0] : 1; }
int64_t cols_of(const TensorView& t) { return t.shape.empty() ? 1 : t.shape.back(); }

// The int4 view of a DType::I4 tensor, built here from its parts (TensorView::int4_weight is the loader's).
Int4Weight int4_view(const TensorView& t) {
  Int4Weight w;
  w.packed = reinterpret_cast<const uint32_t*>(t.data);
  w.scales = t.int4.scales;
  w.mins = t.int4.mins;
  w.n = static_cast<int>(rows_of(t));
  w.k = static_cast<int>(cols_of(t));
  w.group_size = int4_group_size(t.int4.group_size, w.k, t.name.c_str());
  w.sym = t.int4.sym;
  w.scale_type = t.int4.scale_type;
  int4_check(w, t.name.c_str());
  QKD_CHECK(t.nbytes == static_cast<size_t>(int4_packed_bytes(w.n, w.k)),
            "tensor '{}': int4 {} needs {} bytes of packed words, the view has {}", t.name, t.shape_str(),
            int4_packed_bytes(w.n, w.k), t.nbytes);
  return w;
}

// Rows [r0, r0 + nr) of t as fp32, [nr, cols_of(t)].
void rows_to_f32(const TensorView& t, int64_t r0, int64_t nr, float* out) {
  const int64_t k = cols_of(t);
  if (t.dtype == DType::I4) {
    Int4Weight w = int4_view(t);
    const int64_t groups = w.k / w.group_size;
    w.packed += r0 * (w.k / 8);
    w.scales += r0 * groups;
    if (w.mins != nullptr) w.mins += r0 * groups;
    w.n = static_cast<int>(nr);
    cpu::dequantize_int4(w, out);
    return;
  }
  const size_t row_bytes = t.nbytes / static_cast<size_t>(rows_of(t));
  TensorView sub = t;
  sub.shape = {nr, k};
  sub.data = t.data + r0 * row_bytes;
  sub.nbytes = static_cast<size_t>(nr) * row_bytes;
  to_f32(sub, out);  // checks the view's byte count against its dtype and shape
}

template <typename T>
void copy_to_device(T* dst, const T* src, int64_t count) {
  CUDA_CHECK(cudaMemcpy(dst, src, static_cast<size_t>(count) * sizeof(T), cudaMemcpyHostToDevice));
}

void upload_int4(const DeviceLinear& d, int row0, const TensorView& t) {
  const int64_t n = rows_of(t);
  const int k = d.k;
  const int64_t words_per_row = k / 8, groups = k / d.fmt.group_size;
  auto* packed = const_cast<uint32_t*>(d.q.packed) + row0 * words_per_row;
  auto* scales = const_cast<uint16_t*>(d.q.scales) + row0 * groups;
  auto* mins = d.q.mins != nullptr ? const_cast<uint16_t*>(d.q.mins) + row0 * groups : nullptr;
  switch (t.dtype) {
    case DType::I4: {
      const Int4Weight w = int4_view(t);
      copy_to_device(packed, w.packed, n * words_per_row);
      copy_to_device(scales, w.scales, n * groups);
      if (mins != nullptr) copy_to_device(mins, w.mins, n * groups);
      return;
    }
    case DType::Q4_0:
    case DType::Q4_1: {
      QKD_CHECK(t.nbytes == static_cast<size_t>(n) * ggml_row_bytes(t.dtype, k),
                "tensor '{}': {} {} needs {} bytes, the view has {}", t.name, dtype_name(t.dtype), t.shape_str(),
                static_cast<size_t>(n) * ggml_row_bytes(t.dtype, k), t.nbytes);
      const size_t row_bytes = ggml_row_bytes(t.dtype, k);
      const auto* blocks = reinterpret_cast<const uint8_t*>(t.data);
      std::vector<uint32_t> p;
      std::vector<uint16_t> s, m;
      for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
        const int nr = static_cast<int>(std::min(kRowBlock, n - r0));
        p.resize(static_cast<size_t>(nr) * words_per_row);
        s.resize(static_cast<size_t>(nr) * groups);
        if (t.dtype == DType::Q4_0) {
          int4_from_q4_0(blocks + r0 * row_bytes, nr, k, p.data(), s.data());
        } else {
          m.resize(s.size());
          int4_from_q4_1(blocks + r0 * row_bytes, nr, k, p.data(), s.data(), m.data());
          copy_to_device(mins + r0 * groups, m.data(), nr * groups);
        }
        copy_to_device(packed + r0 * words_per_row, p.data(), nr * words_per_row);
        copy_to_device(scales + r0 * groups, s.data(), nr * groups);
      }
      return;
    }
    default: {  // dense: quantized at load
      const int64_t k_src = cols_of(t);
      std::vector<float> f;
      for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
        const int nr = static_cast<int>(std::min(kRowBlock, n - r0));
        f.assign(static_cast<size_t>(nr) * k, 0.0f);
        if (k_src == k) {
          rows_to_f32(t, r0, nr, f.data());
        } else {  // zero columns past the checkpoint's width
          std::vector<float> narrow(static_cast<size_t>(nr) * k_src);
          rows_to_f32(t, r0, nr, narrow.data());
          for (int r = 0; r < nr; ++r) std::copy_n(narrow.data() + r * k_src, k_src, f.data() + static_cast<int64_t>(r) * k);
        }
        const Int4HostWeight hw = int4_quantize(f.data(), nr, k, d.fmt.group_size, d.fmt.sym, d.fmt.scale_type);
        copy_to_device(packed + r0 * words_per_row, hw.packed.data(), nr * words_per_row);
        copy_to_device(scales + r0 * groups, hw.scales.data(), nr * groups);
        if (mins != nullptr) copy_to_device(mins + r0 * groups, hw.mins.data(), nr * groups);
      }
      return;
    }
  }
}

void upload_bf16(const DeviceLinear& d, int row0, const TensorView& t) {
  const int64_t n = rows_of(t), k_src = cols_of(t), k = d.k;
  uint16_t* dst = reinterpret_cast<uint16_t*>(d.w) + row0 * k;
  if (t.dtype == DType::BF16 && k_src == k) {
    QKD_CHECK(t.nbytes == static_cast<size_t>(n * k) * 2, "tensor '{}': BF16 {} needs {} bytes, the view has {}",
              t.name, t.shape_str(), n * k * 2, t.nbytes);
    CUDA_CHECK(cudaMemcpy(dst, t.data, t.nbytes, cudaMemcpyHostToDevice));
    return;
  }
  std::vector<float> f;
  std::vector<uint16_t> h;
  for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, n - r0);
    f.resize(static_cast<size_t>(nr * k_src));
    rows_to_f32(t, r0, nr, f.data());
    h.assign(static_cast<size_t>(nr * k), 0);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t c = 0; c < k_src; ++c) h[r * k + c] = float_to_bf16(f[r * k_src + c]);
    copy_to_device(dst + r0 * k, h.data(), nr * k);
  }
}

}  // namespace

std::string LinearFormat::str() const {
  if (!int4) return "bf16";
  return fmt::format("int4 g{} {} {}-scales", group_size, sym == Int4Symmetry::Symmetric ? "sym" : "asym",
                     scale_type == ScaleType::BF16 ? "bf16" : "fp16");
}

int64_t DeviceLinear::bytes() const {
  if (!fmt.int4) return static_cast<int64_t>(n) * k * 2;
  return int4_packed_bytes(n, k) + int4_scales_bytes(n, k, fmt.group_size) +
         int4_mins_bytes(n, k, fmt.group_size, fmt.sym);
}

void DeviceLinear::plan(DeviceArena& arena) {
  if (!fmt.int4) {
    off_data_ = arena.reserve(static_cast<size_t>(bytes()));
    return;
  }
  off_data_ = arena.reserve(static_cast<size_t>(int4_packed_bytes(n, k)));
  off_scales_ = arena.reserve(static_cast<size_t>(int4_scales_bytes(n, k, fmt.group_size)));
  if (fmt.sym == Int4Symmetry::Asymmetric) {
    off_mins_ = arena.reserve(static_cast<size_t>(int4_mins_bytes(n, k, fmt.group_size, fmt.sym)));
  }
}

void DeviceLinear::bind(const DeviceArena& arena) {
  if (!fmt.int4) {
    w = arena.at<__nv_bfloat16>(off_data_);
    return;
  }
  q.packed = arena.at<uint32_t>(off_data_);
  q.scales = arena.at<uint16_t>(off_scales_);
  q.mins = fmt.sym == Int4Symmetry::Asymmetric ? arena.at<uint16_t>(off_mins_) : nullptr;
  q.n = n;
  q.k = k;
  q.group_size = fmt.group_size;
  q.sym = fmt.sym;
  q.scale_type = fmt.scale_type;
}

LinearFormat tensor_format(const TensorView& t, int k_dev, int quantize_group) {
  const int64_t k_src = cols_of(t);
  switch (t.dtype) {
    case DType::I4:
      if (k_src == k_dev) return {true, int4_group_size(t.int4.group_size, k_dev, t.name.c_str()), t.int4.sym,
                                  t.int4.scale_type};
      break;
    case DType::Q4_0:
      if (k_src == k_dev && k_dev % kInt4KMultiple == 0) return {true, 32, Int4Symmetry::Symmetric, ScaleType::FP16};
      break;
    case DType::Q4_1:
      if (k_src == k_dev && k_dev % kInt4KMultiple == 0) return {true, 32, Int4Symmetry::Asymmetric, ScaleType::FP16};
      break;
    default:
      if (quantize_group > 0 && k_dev % kInt4KMultiple == 0 && k_dev % quantize_group == 0) {
        return {true, quantize_group, Int4Symmetry::Symmetric, ScaleType::BF16};
      }
      break;
  }
  return {};
}

LinearFormat stacked_format(std::span<const TensorView* const> parts, int k_dev, int quantize_group) {
  const LinearFormat first = tensor_format(*parts[0], k_dev, quantize_group);
  for (const TensorView* t : parts.subspan(1)) {
    if (!(tensor_format(*t, k_dev, quantize_group) == first)) return {};
  }
  return first;
}

void upload_rows(const DeviceLinear& dst, int row0, const TensorView& t) {
  QKD_CHECK(row0 >= 0 && row0 + rows_of(t) <= dst.n && cols_of(t) <= dst.k,
            "tensor '{}': {} does not fit rows {}.. of a [{}, {}] device weight", t.name, t.shape_str(), row0, dst.n,
            dst.k);
  if (dst.fmt.int4) {
    upload_int4(dst, row0, t);
  } else {
    upload_bf16(dst, row0, t);
  }
}

void fill_random_rows(const DeviceLinear& dst, int row0, int n, float scale, uint64_t seed, cudaStream_t stream) {
  if (!dst.fmt.int4) {
    fill_uniform_bf16(dst.w + static_cast<int64_t>(row0) * dst.k, static_cast<int64_t>(n) * dst.k, -scale, scale,
                      seed, stream);
    return;
  }
  QKD_CHECK(dst.fmt.sym == Int4Symmetry::Symmetric && dst.fmt.scale_type == ScaleType::BF16,
            "fill_random_rows: random int4 weights are symmetric with bf16 scales, not {}", dst.fmt.str());
  const int64_t words_per_row = dst.k / 8, groups = dst.k / dst.fmt.group_size;
  fill_random_u32(const_cast<uint32_t*>(dst.q.packed) + row0 * words_per_row, n * words_per_row, seed, stream);
  // |s (u - 8)| <= 8 s < scale
  fill_uniform_bf16(reinterpret_cast<__nv_bfloat16*>(const_cast<uint16_t*>(dst.q.scales)) + row0 * groups,
                    n * groups, scale / 16, scale / 8, seed ^ 0x5CA1E5ull, stream);
}

}  // namespace qkd::runtime
