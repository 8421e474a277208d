// Row-wise data movement of the forward pass on the GPU: the residual add, the learned
// position-embedding add (GPT-2) and the gather of the rows that want logits. CPU twins:
// kernels::AddInPlace (kernels/ops.h) and CpuBackend::AddPositionEmbedding / GatherRows
// (kernels/cpu/cpu_backend.cc). Pointers are device memory; launches are asynchronous on
// `stream` (an OK return means queued). INVALID_ARGUMENT for negative sizes or null pointers
// of non-empty data; an empty op is a no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvrelay::kernels::cuda {

// x[i] += y[i] for i < n (x and y do not overlap, or are equal).
absl::Status AddInPlace(float* x, const float* y, int64_t n, cudaStream_t stream);

// x[t][:] += table[positions[t]][:] for t < n; table: [max_pos][dim] f32. A position outside
// [0, max_pos) leaves row t unchanged and adds 1 to *num_bad (device, may be null).
absl::Status AddPositionEmbedding(const float* table, int64_t max_pos, const int64_t* positions,
                                  int64_t n, int64_t dim, float* x, int32_t* num_bad,
                                  cudaStream_t stream);

// out[i][:] = x[rows[i]][:] for i < n; x: [num_rows][dim]. A row outside [0, num_rows) writes
// zeros to out[i] and adds 1 to *num_bad (device, may be null).
absl::Status GatherRows(const float* x, int64_t num_rows, int64_t dim, const int64_t* rows,
                        int64_t n, float* out, int32_t* num_bad, cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
