// Residual add, position-embedding add and row gather (kernels/cuda/rows.cuh).
//
// Grid/block: kThreads = 256 threads per block.
//  - AddInPlace: a 1-D grid-stride loop over n, grid = min(ceil(n / 256), kMaxGridBlocks).
//  - AddPositionEmbedding / GatherRows: a 2-D grid; blockIdx.x * 256 + threadIdx.x is the
//    column c < dim (striding by gridDim.x * 256), blockIdx.y the row t < n (striding by
//    gridDim.y): grid.x = min(ceil(dim / 256), kMaxGridBlocks), grid.y = min(n, kMaxGridBlocks).
//    Every thread of a row reads the row's index (position / source row) itself: a broadcast
//    load, no shared memory.
// Arithmetic: one float add per element, as the CPU (no reduction, nothing to order); the
// file is compiled with --fmad=false like every kernel here.
// Bounds: c < dim, t < n, i < n guarded; indices are int64; a bad position / row is counted
// in *num_bad (atomicAdd by the row's thread 0 of block x 0) and its row left unchanged
// (position) or zeroed (gather), so nothing outside the tables is read.
// Alignment: float's 4 bytes (scalar, coalesced accesses; any dim). Shared memory: none.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/rows.cuh"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = kElementThreads;

__global__ void __launch_bounds__(kThreads) AddKernel(float* x, const float* y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    x[i] = x[i] + y[i];
  }
}

// Row t of `dst` (+)= row index[t] of `src` (num_src rows). kAdd: dst += src (a bad index
// leaves the row); else dst = src (a bad index zeroes it).
template <bool kAdd>
__global__ void __launch_bounds__(kThreads)
    RowKernel(const float* src, int64_t num_src, const int64_t* index, int64_t n, int64_t dim,
              float* dst, int32_t* num_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
    const int64_t r = index[t];
    const bool bad = r < 0 || r >= num_src;
    if (bad && blockIdx.x == 0 && threadIdx.x == 0 && num_bad != nullptr) atomicAdd(num_bad, 1);
    if (bad && kAdd) continue;
    float* d = dst + t * dim;
    const float* s = src + (bad ? 0 : r) * dim;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < dim;
         c += stride) {
      if constexpr (kAdd) {
        d[c] = d[c] + s[c];
      } else {
        d[c] = bad ? 0.0f : s[c];
      }
    }
  }
}

template <bool kAdd>
absl::Status LaunchRows(const char* op, const float* src, int64_t num_src, const int64_t* index,
                        int64_t n, int64_t dim, float* dst, int32_t* num_bad, cudaStream_t stream) {
  if (n < 0 || dim < 0 || num_src < 0) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": negative size (rows ", n, ", dim ", dim,
                                                   ", table rows ", num_src, ")"));
  }
  if (n == 0 || dim == 0) return absl::OkStatus();
  if (src == nullptr || index == nullptr || dst == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer"));
  }
  const dim3 grid = RowColumnGrid(n, dim);
  RowKernel<kAdd><<<grid, kThreads, 0, stream>>>(src, num_src, index, n, dim, dst, num_bad);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status AddInPlace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cuda::AddInPlace: negative size ", n));
  if (n == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr) {
    return absl::InvalidArgumentError("cuda::AddInPlace: null pointer");
  }
  AddKernel<<<GridStrideBlocks(n), kThreads, 0, stream>>>(x, y, n);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status AddPositionEmbedding(const float* table, int64_t max_pos, const int64_t* positions,
                                  int64_t n, int64_t dim, float* x, int32_t* num_bad,
                                  cudaStream_t stream) {
  return LaunchRows<true>("cuda::AddPositionEmbedding", table, max_pos, positions, n, dim, x,
                          num_bad, stream);
}

absl::Status GatherRows(const float* x, int64_t num_rows, int64_t dim, const int64_t* rows,
                        int64_t n, float* out, int32_t* num_bad, cudaStream_t stream) {
  return LaunchRows<false>("cuda::GatherRows", x, num_rows, rows, n, dim, out, num_bad, stream);
}

}  // namespace kvrelay::kernels::cuda
