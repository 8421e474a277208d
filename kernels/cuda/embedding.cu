// Embedding gather: rows of an f32 / f16 / bf16 table [vocab, dim] into f32 [n, dim] (CPU
// twin: kernels::EmbeddingGather in kernels/cpu/ops.cc).
//
// Grid/block: kThreads = 256 threads per block; a 2-D grid: blockIdx.y is the token t
// (striding by gridDim.y, grid.y = min(n, kMaxGridBlocks)), blockIdx.x * 256 + threadIdx.x the
// column c < dim (striding by gridDim.x * 256, grid.x = min(ceil(dim / 256), kMaxGridBlocks)).
// Every thread of a token reads the same ids[t] (one broadcast load per warp).
// Bounds: ids[t] is checked against [0, vocab) before any table access; a bad id writes
// zeros and is counted (atomicAdd by column 0's thread) into *num_bad_ids when given.
// c < dim and t < n guard every access; offsets are int64 (vocab * dim may exceed 2^31).
// Alignment: none beyond the element's own (4 bytes for f32, 2 for f16 / bf16): elements are
// read one at a time, so odd dims and odd row offsets are fine. Loads are coalesced along c.
// Shared memory: none.
// Conversions are exact (f16 -> f32 by cvt, bf16 -> f32 by a 16-bit shift, as
// kernels::Bf16ToF32): the output equals the CPU's bit for bit.
#include <cuda_fp16.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/launch.cuh"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = kElementThreads;

template <DType T>
__device__ __forceinline__ float LoadF32(const void* table, int64_t i) {
  if constexpr (T == DType::kF16) {
    return __half2float(static_cast<const __half*>(table)[i]);
  } else if constexpr (T == DType::kBF16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(table)[i]) << 16;
    return __uint_as_float(bits);
  } else {
    static_assert(T == DType::kF32, "embedding tables are f32, f16 or bf16");
    return static_cast<const float*>(table)[i];
  }
}

template <DType T>
__global__ void __launch_bounds__(kThreads)
    EmbeddingGatherKernel(const int32_t* ids, int64_t n, const void* table, int64_t vocab,
                          int64_t dim, float* out, int32_t* num_bad_ids) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
    const int64_t id = ids[t];
    float* o = out + t * dim;
    if (id < 0 || id >= vocab) {
      if (c0 == 0 && num_bad_ids != nullptr) atomicAdd(num_bad_ids, 1);
      for (int64_t c = c0; c < dim; c += stride) o[c] = 0.0f;
      continue;
    }
    const int64_t row = id * dim;
    for (int64_t c = c0; c < dim; c += stride) o[c] = LoadF32<T>(table, row + c);
  }
}

}  // namespace

absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et,
                             int64_t vocab, int64_t dim, float* out, int32_t* num_bad_ids,
                             cudaStream_t stream) {
  if (n < 0 || vocab < 0 || dim < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda::EmbeddingGather: negative size (n ", n,
                                                   ", vocab ", vocab, ", dim ", dim, ")"));
  }
  if (et != DType::kF32 && et != DType::kF16 && et != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda::EmbeddingGather: table dtype must be f32, f16 or bf16, got ", DTypeName(et)));
  }
  if (n == 0 || dim == 0) return absl::OkStatus();
  if (ids == nullptr || table == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("cuda::EmbeddingGather: null pointer");
  }
  const dim3 grid = RowColumnGrid(n, dim);
  switch (et) {
    case DType::kF16:
      EmbeddingGatherKernel<DType::kF16>
          <<<grid, kThreads, 0, stream>>>(ids, n, table, vocab, dim, out, num_bad_ids);
      break;
    case DType::kBF16:
      EmbeddingGatherKernel<DType::kBF16>
          <<<grid, kThreads, 0, stream>>>(ids, n, table, vocab, dim, out, num_bad_ids);
      break;
    default:
      EmbeddingGatherKernel<DType::kF32>
          <<<grid, kThreads, 0, stream>>>(ids, n, table, vocab, dim, out, num_bad_ids);
      break;
  }
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels::cuda
