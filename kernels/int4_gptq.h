// GPTQ (Frantar et al. 2022, arXiv 2210.17323) onto the int4 format (kernels/int4_format.h): the second-order
// alternative to int4_quantize's round to nearest. Given a linear layer's weight W[n, k] and the Hessian of its
// layer-wise loss ||W X^T - W_q X^T||^2 over calibration inputs x (rows of X),
//   H = (2 / N) sum_x x x^T    [k, k], accumulated in double,
// the columns are quantized left to right and each column's rounding error is pushed onto the columns not yet
// quantized through the upper Cholesky factor U of H^-1 (H^-1 = U^T U), which is the optimal (OBS) update:
//   e_j = (w_j - q_j) / U[j, j],   w_c -= e_j U[j, c]  for c > j            (every row independently)
// Rows only share U, so they are quantized in parallel.
//
// Details, as in the paper's reference implementation:
//   dead columns    diag H == 0 (an input that was always 0): H[j, j] = 1 and W[:, j] = 0
//   dampening       H += lambda I with lambda = percdamp * mean(diag H); when H (or H^-1) is still not positive
//                   definite in double, percdamp is multiplied by 10 up to kGptqDampRetries times, then it throws
//   lazy batches    within a block of kGptqBlock columns the updates go to the block's columns only; the rest of
//                   the row gets the block's errors at once after it (the same sums, in a cache-friendly order)
//   column order    natural (no act-order), so that every group stays contiguous
// Groups: when the loop reaches a group's first column, that group's scale (and min) come from int4_quantize_group
// (the format's rules, the optional ClipMse search) applied to the group's *current*, error-updated weights; each
// of its columns is then rounded on that grid when its turn comes (int4_quantize_value). The result is the same
// Int4HostWeight int4_quantize returns. With H = c I no error moves, and it is int4_quantize's bit for bit.
#pragma once

#include "kernels/int4_format.h"

namespace qkd {

constexpr int kGptqBlock = 128;        // columns of one lazy batch (the paper's B = 128)
constexpr int kGptqDampRetries = 3;    // tries with percdamp x10 each before giving up
constexpr double kGptqDefaultDamp = 0.01;

struct Int4GptqArgs {
  const float* w = nullptr;         // [n, k] fp32, finite
  const double* hessian = nullptr;  // [k, k] symmetric, (2 / N) sum x x^T; only its lower triangle is read
  int n = 0, k = 0;
  int group_size = 128;             // 32, 64, 128, kInt4PerChannel or k (int4_group_size)
  Int4Symmetry sym = Int4Symmetry::Symmetric;
  ScaleType scale_type = ScaleType::BF16;
  Int4ScaleSearch search = Int4ScaleSearch::None;
  double percdamp = kGptqDefaultDamp;  // > 0
};

struct Int4GptqResult {
  Int4HostWeight weight;
  double percdamp = 0.0;  // the dampening that worked: args.percdamp, or a retry's larger one
  int dead_columns = 0;
};

// Throws qkd::Error naming the value for bad arguments, a non-finite weight or Hessian entry, a Hessian that is
// not positive definite even after the retries, and (like int4_quantize) a scale beyond the storage type.
Int4GptqResult int4_gptq_quantize(const Int4GptqArgs& a);

}  // namespace qkd
