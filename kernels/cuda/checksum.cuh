// Per-block KV checksums on the GPU: the CUDA twin of transfer::BlockChecksums
// (common/transfer/checksum.h, DESIGN §4): XXH3_64bits (default secret, seed 0) of each listed
// block's bytes, bit-identical to libxxhash's. Pointers are device memory; the launch is
// asynchronous (a returned OK means it was queued).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvrelay::kernels::cuda {

// out[i] = XXH3_64bits(base + id * block_bytes, block_bytes) with id = blocks[i], or id = i when
// blocks is null (a contiguous staging buffer of n blocks), for i < n. base holds pool_blocks
// blocks; an id outside [0, pool_blocks) writes 0 and, when num_bad_ids (device, may be null)
// is set, adds 1 to *num_bad_ids. Any block_bytes (0 included) and any base alignment: 8-byte
// aligned blocks are read with 64-bit loads, others byte by byte.
// INVALID_ARGUMENT: negative n or pool_blocks, null base / out; n == 0: no-op.
absl::Status BlockChecksums(const void* base, int64_t pool_blocks, uint64_t block_bytes,
                            const int32_t* blocks, int64_t n, uint64_t* out, int32_t* num_bad_ids,
                            cudaStream_t stream);

namespace internal {
// The kernel's own XXH3 code (the per-lane stripe sums, the per-1024-byte scramble chain, the
// tail and the merge, in the kernel's decomposition) run serially on the host, so the port can
// be checked against libxxhash without a GPU (tests/gpu/parity_checksum.cc).
uint64_t Xxh3_64HostModel(const void* data, uint64_t len);
}  // namespace internal

}  // namespace kvrelay::kernels::cuda
