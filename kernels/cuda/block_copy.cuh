// KV block gather / scatter on the GPU for transfer staging (DESIGN §3, §4): a list of blocks
// of a pool copied into a contiguous staging buffer and back. CPU twin: one memcpy per block
// (the local transport, common/transfer/local). Pointers are device memory; the launch is
// asynchronous (a returned OK means it was queued).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvrelay::kernels::cuda {

// staging[i * block_bytes ...] = pool[blocks[i] * block_bytes ...] (block_bytes bytes) for
// i < n. The pool holds pool_blocks blocks; an id outside [0, pool_blocks) writes zeros to its
// staging slot and, when num_bad_ids (device, may be null) is set, adds 1 to *num_bad_ids.
// Any block_bytes and alignment: 16-byte vector copies when pool, staging and block_bytes are
// all multiples of 16, otherwise 8-, 4- or 1-byte elements (the widest they all allow).
// pool and staging must not overlap.
// INVALID_ARGUMENT: negative n or pool_blocks, null pointers; n == 0 or block_bytes == 0:
// no-op.
absl::Status GatherBlocks(const void* pool, int64_t pool_blocks, uint64_t block_bytes,
                          const int32_t* blocks, int64_t n, void* staging, int32_t* num_bad_ids,
                          cudaStream_t stream);

// pool[blocks[i] * block_bytes ...] = staging[i * block_bytes ...] for i < n: the inverse of
// GatherBlocks. An id outside [0, pool_blocks) is skipped (the pool is not written) and
// counted as above. Ids should be distinct: for a repeated id, which of its staging slots
// lands in the pool is unspecified.
absl::Status ScatterBlocks(const void* staging, const int32_t* blocks, int64_t n,
                           uint64_t block_bytes, void* pool, int64_t pool_blocks,
                           int32_t* num_bad_ids, cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
