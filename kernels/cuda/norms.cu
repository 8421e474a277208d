// RMSNorm and LayerNorm over the rows of a row-major [rows, dim] f32 matrix (CPU twins:
// kernels::RmsNorm / kernels::LayerNorm in kernels/cpu/ops.cc).
//
// Grid/block: one block of kThreads = 256 threads (8 warps) per row; block b handles rows
// b, b + gridDim.x, ... (grid = min(rows, kMaxGridBlocks)), so any row count works and every row
// is reduced by the same block shape whatever the batch size.
// Per row: thread t reads elements i = t, t + 256, ... < dim (a warp reads 32 consecutive
// floats: coalesced) and sums its terms in double in increasing i; the block then reduces
// with a fixed tree (xor-butterfly over the 32 lanes of each warp, the 8 warp sums through
// shared memory, the same butterfly in warp 0). The reduction order depends only on dim,
// never on rows or launch: results are deterministic and batch-invariant. Sums are double,
// as on the CPU, so the float 1/rms (1/std) nearly always equals the CPU's bit for bit.
// A second pass (LayerNorm: a second reduction, for the variance around the mean, then a
// third pass) re-reads the row from global memory (L1/L2 hits) and writes y with the
// per-element arithmetic of kernels/device_math.h.
// Bounds: every access is guarded by i < dim and r < rows; indices are int64.
// Alignment: none beyond float's 4 bytes (scalar loads; any dim, any row offset).
// Shared memory: static, (kWarps + 1) doubles = 72 bytes per block.
// In place (y == x) is safe: a row is fully read (and the block synchronised) before any
// element of it is written, and each element is then read and written by the same thread.
// Compiled with --fmad=false (kernels/cuda/CMakeLists.txt): no fused multiply-adds, so the
// per-element arithmetic is exactly the CPU's.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/norms.cuh"
#include "kernels/device_math.h"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ double WarpSum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, the same value in every thread. scratch: kWarps + 1 doubles.
__device__ double BlockSum(double v, double* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < kWarps ? scratch[lane] : 0.0;
    t = WarpSum(t);
    if (lane == 0) scratch[kWarps] = t;
  }
  __syncthreads();
  const double total = scratch[kWarps];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

__global__ void __launch_bounds__(kThreads)
    RmsNormKernel(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y) {
  __shared__ double scratch[kWarps + 1];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * dim;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += kThreads) ss += math::RmsNormSquare(xr[i]);
    ss = BlockSum(ss, scratch);
    const float inv = math::RmsNormInvRms(ss, dim, eps);
    float* yr = y + r * dim;
    for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
      yr[i] = math::RmsNormApply(xr[i], inv, w[i]);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    LayerNormKernel(const float* x, const float* w, const float* b, int64_t rows, int64_t dim,
                    float eps, float* y) {
  __shared__ double scratch[kWarps + 1];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * dim;
    double mean = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += kThreads) mean += xr[i];
    mean = BlockSum(mean, scratch) / dim;
    double var = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
      var += math::LayerNormSquaredDeviation(xr[i], mean);
    }
    var = BlockSum(var, scratch) / dim;
    const float inv = math::LayerNormInvStd(var, eps);
    const float m = static_cast<float>(mean);
    float* yr = y + r * dim;
    for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
      yr[i] = math::LayerNormApply(xr[i], m, inv, w[i], b[i]);
    }
  }
}

// OK and *launch = false for an empty matrix; INVALID_ARGUMENT for bad arguments.
absl::Status CheckArgs(const char* op, int64_t rows, int64_t dim, bool pointers_set, bool* launch) {
  *launch = false;
  if (rows < 0 || dim < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": negative size (rows ", rows, ", dim ", dim, ")"));
  }
  if (rows == 0 || dim == 0) return absl::OkStatus();
  if (!pointers_set) return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer"));
  *launch = true;
  return absl::OkStatus();
}

unsigned Blocks(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxGridBlocks)); }

}  // namespace

absl::Status RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y,
                     cudaStream_t stream) {
  bool launch = false;
  absl::Status st = CheckArgs("cuda::RmsNorm", rows, dim, x && w && y, &launch);
  if (!st.ok() || !launch) return st;
  RmsNormKernel<<<Blocks(rows), kThreads, 0, stream>>>(x, w, rows, dim, eps, y);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim,
                       float eps, float* y, cudaStream_t stream) {
  bool launch = false;
  absl::Status st = CheckArgs("cuda::LayerNorm", rows, dim, x && w && b && y, &launch);
  if (!st.ok() || !launch) return st;
  LayerNormKernel<<<Blocks(rows), kThreads, 0, stream>>>(x, w, b, rows, dim, eps, y);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels::cuda
