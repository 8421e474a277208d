// RoPE fused with the write of K and V into the paged KV cache on the GPU: for a batch of
// tokens, the CUDA twin of what Model::Forward (common/model/model.cc) does per token with
// the CPU ops (kernels/ops.h):
//   kernels::Rope(q, num_heads, ...); kernels::Rope(k, num_kv_heads, ...);
//   kernels::WriteKv(kv, block, slot, layer, k, v);
// Pointers are device memory; the launch is asynchronous (a returned OK means it was queued).
// INVALID_ARGUMENT, with what was wrong, for bad shapes, null pointers, a layer outside the
// pool, a pool base not 16-byte aligned; n == 0 is a no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"

namespace kvrelay::kernels::cuda {

// For each token t < n at position positions[t]:
//  - when inv_freq is set (Llama family: [head_dim / 2] f32, e.g. common/model's
//    RopeInvFreq with Llama-3 scaling folded in), rotates its num_heads query heads in place
//    (q + t * ldq) and its num_kv_heads key heads (k + t * ldk, not modified) by RoPE
//    (rotate-half, kernels/device_math.h); inv_freq null: no rotation (GPT-2), q untouched
//    (and may be null);
//  - writes the (rotated) key heads and the value heads (v + t * ldv) into slot slots[t] of
//    block block_ids[t], layer `layer`, converted to the pool dtype (int8: per (token, kv
//    head) scale = max |finite x| / 127, as kernels::WriteKv).
// The q / k / v rows may be the parts of one fused QKV row (ldq = ldk = ldv = its width).
// head_dim must be even when rotating, and <= 4096.
// On the device a block id outside [0, num_blocks) or a slot outside [0, block_size) writes
// nothing for that token (its q is still rotated) and, when num_bad (device, may be null) is
// set, adds 1 to *num_bad.
absl::Status RopeWriteKv(const PagedKvView& kv, int layer, int64_t n, float* q, int64_t ldq,
                         int num_heads, const float* k, int64_t ldk, const float* v, int64_t ldv,
                         const int64_t* positions, const int32_t* block_ids, const int32_t* slots,
                         const float* inv_freq, int32_t* num_bad, cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda
