// RMSNorm and LayerNorm on the GPU: the CUDA twins of kernels::RmsNorm / kernels::LayerNorm
// (kernels/ops.h), with the same arguments plus a stream. All pointers are device memory;
// y may equal x (in place). The launch is asynchronous: a returned OK means it was queued.
// INVALID_ARGUMENT for negative sizes or null pointers; rows == 0 or dim == 0 is a no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvrelay::kernels::cuda {

// y[r][i] = x[r][i] * (1 / sqrt(mean_i(x[r][i]^2) + eps)) * w[i]; x, y: [rows, dim], w: [dim].
absl::Status RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y,
                     cudaStream_t stream);

// y[r][i] = (x[r][i] - mean) / sqrt(var + eps) * w[i] + b[i] (biased variance).
absl::Status LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim,
                       float eps, float* y, cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
