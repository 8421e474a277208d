// SwiGLU and GELU on the GPU: the CUDA twins of kernels::SiluMul / GeluTanh / GeluErf
// (kernels/ops.h), with the same arguments plus a stream. Pointers are device memory. The
// launch is asynchronous: a returned OK means it was queued. INVALID_ARGUMENT for negative
// sizes or null pointers; an empty input is a no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvrelay::kernels::cuda {

// out[r][i] = silu(gate_up[r][i]) * gate_up[r][inter + i]; gate_up: [rows, 2 * inter],
// out: [rows, inter]. out must not overlap gate_up.
absl::Status SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out,
                     cudaStream_t stream);

// In place over n elements: GPT-2 "gelu_new" (tanh approximation) / exact erf GELU.
absl::Status GeluTanh(float* x, int64_t n, cudaStream_t stream);
absl::Status GeluErf(float* x, int64_t n, cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
