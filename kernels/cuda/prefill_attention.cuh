// Causal prefill attention over the paged KV cache on the GPU (flash-attention style): the
// CUDA twin of kernels::PagedAttention (kernels/ops.h) for chunks of consecutive query tokens
// of one or more sequences. Pointers are device memory; the launch is asynchronous (a
// returned OK means it was queued). INVALID_ARGUMENT, with what was wrong, for bad shapes,
// null pointers, a layer outside the pool or a pool base not 16-byte aligned (the checks it
// shares with the decode kernel: ValidateAttentionArgs in paged_attention.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"

namespace kvrelay::kernels::cuda {

// Sequence s < num_seqs has the query tokens q rows [seq_starts[s], seq_starts[s + 1]) at
// positions start_positions[s], start_positions[s] + 1, ...; each attends to positions
// [0, its own] of its sequence, all read from the cache (the chunk's own K/V must be written
// first, e.g. by cuda::RopeWriteKv), scores scaled by `scale`.
//   q, out: [num_tokens, num_heads, head_dim] f32 (may not overlap), num_tokens =
//     seq_starts[num_seqs].
//   seq_starts: [num_seqs + 1] int32, non-decreasing: rows of q / out, from any first row (the
//     CUDA backend passes the sequences after a batch's decode ones); start_positions: [num_seqs].
//   block_tables: [num_seqs, max_blocks_per_seq] int32, row s the block ids of sequence s.
//   max_query_len: a host-side bound on seq_starts[s + 1] - seq_starts[s]; it only sizes the
//     grid (longer chunks are still computed in full, by fewer CTAs).
// num_heads must be a multiple of the pool's num_kv_heads; head_dim <= 256 (64 and 128 have
// their own kernels; others run padded to 64, 128 or 256); any block size and chunk length;
// KV dtype f32 / f16 / bf16 / int8.
// Bounds on the device: a negative start position, a table row too short for the chunk's
// last position, or a block id outside [0, num_blocks) makes the affected tokens' outputs NaN
// (nothing is read outside the pool); the caller validates beforehand, as Model::Forward does.
absl::Status PagedPrefillAttention(const PagedKvView& kv, int layer, const float* q, int num_seqs,
                                   const int32_t* seq_starts, const int64_t* start_positions,
                                   const int32_t* block_tables, int64_t max_blocks_per_seq,
                                   int64_t max_query_len, int num_heads, float scale, float* out,
                                   cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
