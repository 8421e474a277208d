// Embedding gather on the GPU: the CUDA twin of kernels::EmbeddingGather (kernels/ops.h),
// plus the table's row count (ids are bounds-checked on the device) and a stream. Pointers
// are device memory. The launch is asynchronous: a returned OK means it was queued.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvrelay::kernels::cuda {

// out[t][:] = f32(table[ids[t]][:]) for t < n; table: [vocab, dim] of dtype et (f32, f16 or
// bf16: exact conversions, so the result equals the CPU's bit for bit), out: [n, dim] f32.
// An id outside [0, vocab) writes a row of zeros and, when num_bad_ids (device, may be null)
// is set, adds 1 to *num_bad_ids per such token: the caller validates ids beforehand, this
// only keeps a bad id from reading outside the table.
// INVALID_ARGUMENT: negative sizes, null pointers, int8 tables; n == 0 or dim == 0: no-op.
absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et,
                             int64_t vocab, int64_t dim, float* out, int32_t* num_bad_ids,
                             cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
