// Paged-attention decode on the GPU (flash-decoding): one query token per sequence against the
// paged KV cache, the CUDA twin of kernels::PagedAttention (kernels/ops.h) for decode steps.
// Also the byte geometry of one layer of a paged pool as every KV kernel in kernels/cuda
// indexes it (rope_kv.cu, prefill_attention.cu use it too).
//
// Pointers are device memory; the launch is asynchronous (a returned OK means it was queued).
// INVALID_ARGUMENT, with what was wrong, for bad shapes, null pointers, a layer outside the
// pool, a pool base not 16-byte aligned or a too-small workspace; n == 0 is a no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/paged_kv.h"

namespace kvrelay::kernels::cuda {

// ---- Geometry of one layer of a paged pool (DESIGN §3) ----

// Byte offsets of one layer's K and V in a pool laid out as kernels::PagedKvLayout says
// ([block][layer][k|v][token][kv_head][head_dim], int8 scales after each segment's data),
// taken from PagedKvLayout's own functions so that every offset is the CPU's.
struct PagedKvGeometry {
  uint8_t* base = nullptr;
  int64_t num_blocks = 0;
  int64_t block_bytes = 0;   // PagedKvLayout::block_bytes()
  int64_t k_offset = 0;      // segment_offset(0, layer, 0): the layer's K segment in a block
  int64_t v_offset = 0;      // segment_offset(0, layer, 1)
  int64_t scale_offset = 0;  // scale_offset(): int8 scales within a segment
  int64_t row_bytes = 0;     // one (token, kv head) row: head_dim * elem_bytes()
  int block_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
};

// Validates kv and layer for `op` (named in the error) and fills *g. INVALID_ARGUMENT: null
// base, a non-positive layout size or block count, a layer outside [0, num_layers), a base not
// 16-byte aligned (the kernels use 16-byte vector loads of whole rows).
absl::Status MakePagedKvGeometry(const char* op, const PagedKvView& kv, int layer,
                                 PagedKvGeometry* g);

// ---- Argument checks shared by the attention kernels ----

// head_dim limit of the attention kernels (decode and prefill).
inline constexpr int kMaxAttentionHeadDim = 256;

// A pointer argument and its name, for ValidateAttentionArgs' message.
struct NamedPointer {
  const char* name;
  const void* ptr;
};

// The checks PagedAttentionDecode and PagedPrefillAttention share, for `op` (named in every
// message), returning INVALID_ARGUMENT with what was wrong: kv and layer as
// MakePagedKvGeometry (which fills *g); num_heads a positive multiple of the pool's
// num_kv_heads; head_dim <= kMaxAttentionHeadDim; and, only when has_tokens (a call without
// query tokens needs no buffers), every one of `pointers` non-null (the message lists them all
// as "name 1" / "name 0"). The checks of each op's own arguments stay in the op.
absl::Status ValidateAttentionArgs(const char* op, const PagedKvView& kv, int layer, int num_heads,
                                   bool has_tokens, std::initializer_list<NamedPointer> pointers,
                                   PagedKvGeometry* g);

// ---- Decode ----

// Keys per split-K partition: fixed, so where partitions start depends only on the position,
// never on the batch.
inline constexpr int64_t kDecodePartitionKeys = 256;

// Device workspace bytes PagedAttentionDecode needs for n query tokens of num_heads heads of
// head_dim whose contexts (position + 1) are at most max_context keys: 0 when max_context <=
// kDecodePartitionKeys (one partition, no reduction), else n * num_heads * partitions *
// (head_dim + 2) floats. 0 for non-positive arguments.
size_t PagedAttentionDecodeWorkspaceBytes(int64_t n, int num_heads, int head_dim,
                                          int64_t max_context);

// For each query token t < n (one per sequence, e.g. a decode step): attention of its
// num_heads heads over positions [0, positions[t]] of its sequence, read from the cache
// (its own K/V must be written first), scores scaled by `scale`.
//   q, out: [n, num_heads, head_dim] f32 (may not overlap).
//   block_tables: [n, max_blocks_per_seq] int32, row t the block ids of token t's sequence
//     (entry j holds positions [j * block_size, (j + 1) * block_size)).
//   positions: [n] int64; max_context: a host-side bound, positions[t] < max_context.
//   workspace: PagedAttentionDecodeWorkspaceBytes(n, num_heads, head_dim, max_context) bytes
//     (may be null when that is 0).
// num_heads must be a multiple of the pool's num_kv_heads; head_dim <= 256; any block size,
// KV dtype f32 / f16 / bf16 / int8.
// Bounds on the device: a position outside [0, max_context), a table row too short for it,
// or a block id outside [0, num_blocks) makes that token's output NaN (nothing is read
// outside the pool); the caller validates beforehand, as Model::Forward does.
absl::Status PagedAttentionDecode(const PagedKvView& kv, int layer, const float* q, int64_t n,
                                  const int32_t* block_tables, int64_t max_blocks_per_seq,
                                  const int64_t* positions, int64_t max_context, int num_heads,
                                  float scale, float* out, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);

}  // namespace kvrelay::kernels::cuda

// ---- Device-side helpers shared by the KV kernels (nvcc only) ----
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvrelay::kernels::cuda::kv_device {

// What an attention kernel writes for a token whose position or block table is out of range
// (a quiet NaN, so the caller's bad input cannot pass for a result).
__device__ __forceinline__ float QuietNaN() { return __int_as_float(0x7fc00000); }

// Byte offset (from base) of the (block, slot, kv head) row of the layer's K (kv_offset =
// g.k_offset) or V (g.v_offset): PagedKvView::row.
__device__ __forceinline__ int64_t RowOffset(const PagedKvGeometry& g, int64_t kv_offset,
                                             int64_t block, int slot, int head) {
  return block * g.block_bytes + kv_offset +
         (static_cast<int64_t>(slot) * g.num_kv_heads + head) * g.row_bytes;
}
// int8 only: the row's scale, PagedKvView::scale.
__device__ __forceinline__ float* ScalePtr(const PagedKvGeometry& g, int64_t kv_offset,
                                           int64_t block, int slot, int head) {
  return reinterpret_cast<float*>(g.base + block * g.block_bytes + kv_offset + g.scale_offset) +
         static_cast<int64_t>(slot) * g.num_kv_heads + head;
}

// Element d of a row of dtype T as f32 (int8: the raw value, kernels::math::I8KvDequantize).
// Exact conversions, as the CPU's.
template <DType T>
__device__ __forceinline__ float LoadElem(const uint8_t* row, int d) {
  if constexpr (T == DType::kF32) {
    return reinterpret_cast<const float*>(row)[d];
  } else if constexpr (T == DType::kF16) {
    return __half2float(reinterpret_cast<const __half*>(row)[d]);
  } else if constexpr (T == DType::kBF16) {
    return __uint_as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[d]) << 16);
  } else {
    return static_cast<float>(reinterpret_cast<const int8_t*>(row)[d]);
  }
}

__device__ __forceinline__ void Bf16x2(uint32_t u, float* out) {
  out[0] = __uint_as_float(u << 16);
  out[1] = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void I8x4(uint32_t u, float* out) {
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = static_cast<float>(static_cast<int8_t>(u >> (8 * e)));
}

// Elements [d, d + N) of a row as f32 with one load of N * sizeof(T) bytes (N = 1, 2 or 4);
// row + d * sizeof(T) must be aligned to that size.
template <DType T, int N>
__device__ __forceinline__ void LoadVec(const uint8_t* row, int d, float* out) {
  static_assert(N == 1 || N == 2 || N == 4, "vectors of 1, 2 or 4 elements");
  if constexpr (N == 1) {
    out[0] = LoadElem<T>(row, d);
  } else if constexpr (T == DType::kF32) {
    const float* p = reinterpret_cast<const float*>(row) + d;
    if constexpr (N == 4) {
      const float4 v = *reinterpret_cast<const float4*>(p);
      out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    } else {
      const float2 v = *reinterpret_cast<const float2*>(p);
      out[0] = v.x, out[1] = v.y;
    }
  } else if constexpr (T == DType::kF16) {
    const __half2* p = reinterpret_cast<const __half2*>(reinterpret_cast<const __half*>(row) + d);
    if constexpr (N == 4) {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
      out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
    } else {
      const float2 a = __half22float2(*p);
      out[0] = a.x, out[1] = a.y;
    }
  } else if constexpr (T == DType::kBF16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + d;
    if constexpr (N == 4) {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      Bf16x2(u.x, out);
      Bf16x2(u.y, out + 2);
    } else {
      Bf16x2(*reinterpret_cast<const uint32_t*>(p), out);
    }
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(row) + d;
    if constexpr (N == 4) {
      I8x4(*reinterpret_cast<const uint32_t*>(p), out);
    } else {
      const uint32_t u = *reinterpret_cast<const uint16_t*>(p);
      out[0] = static_cast<float>(static_cast<int8_t>(u));
      out[1] = static_cast<float>(static_cast<int8_t>(u >> 8));
    }
  }
}

}  // namespace kvrelay::kernels::cuda::kv_device
#endif  // __CUDACC__
