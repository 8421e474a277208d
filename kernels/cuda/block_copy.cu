// KV block gather (pool -> contiguous staging) and scatter (staging -> pool) for a list of
// block ids (CPU twin: a memcpy per block).
//
// Grid/block: kThreads = 256 threads per block; a 2-D grid: blockIdx.y is the list entry i
// (striding by gridDim.y, grid.y = min(n, kMaxGridBlocks)), blockIdx.x * 256 + threadIdx.x the
// element e < block_bytes / W (striding by gridDim.x * 256, grid.x = min(ceil(elements /
// 256), kMaxGridBlocks)), where W is the element width: 16 bytes (uint4) when the pool base,
// the staging base and block_bytes are all multiples of 16, else 8, 4 or 1 — the widest
// that divides all three, so every access is naturally aligned. Chosen once per call on the
// host: W divides block_bytes, so there is no head or tail to handle.
// Every thread of an entry reads the same blocks[i] (one broadcast load per warp).
// Bounds: the id is checked against [0, pool_blocks) before any pool access (a bad id
// zero-fills the staging slot on gather, is skipped on scatter, and is counted by the
// entry's element-0 thread when num_bad_ids is set); e < elements and i < n guard every
// access; byte offsets are uint64 (pool sizes exceed 2^32).
// A pure copy: the bytes arrive unchanged (exact). Loads and stores are coalesced along e.
// Shared memory: none.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/block_copy.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = 256;

enum class Direction { kGather, kScatter };

template <typename V, Direction dir>
__global__ void __launch_bounds__(kThreads)
    BlockCopyKernel(const int32_t* blocks, int64_t n, int64_t pool_blocks, uint64_t elements,
                    const V* src, V* dst, int32_t* num_bad_ids) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  const uint64_t e0 = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const int64_t id = blocks[i];
    const bool bad = id < 0 || id >= pool_blocks;
    if (bad && e0 == 0 && num_bad_ids != nullptr) atomicAdd(num_bad_ids, 1);
    const uint64_t staging_off = static_cast<uint64_t>(i) * elements;
    const uint64_t pool_off = static_cast<uint64_t>(id) * elements;  // used only when !bad
    if constexpr (dir == Direction::kGather) {
      V* d = dst + staging_off;
      if (bad) {
        for (uint64_t e = e0; e < elements; e += stride) d[e] = V{};
      } else {
        const V* s = src + pool_off;
        for (uint64_t e = e0; e < elements; e += stride) d[e] = s[e];
      }
    } else {
      if (bad) continue;
      const V* s = src + staging_off;
      V* d = dst + pool_off;
      for (uint64_t e = e0; e < elements; e += stride) d[e] = s[e];
    }
  }
}

// The widest of 16, 8, 4, 1 bytes dividing both addresses and block_bytes.
int ElementWidth(const void* a, const void* b, uint64_t block_bytes) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                        static_cast<uintptr_t>(block_bytes);
  for (int w : {16, 8, 4}) {
    if (bits % w == 0) return w;
  }
  return 1;
}

template <Direction dir>
absl::Status Launch(const char* op, const void* src, void* dst, const void* pool,
                    const void* staging, int64_t pool_blocks, uint64_t block_bytes,
                    const int32_t* blocks, int64_t n, int32_t* num_bad_ids, cudaStream_t stream) {
  if (n < 0 || pool_blocks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": negative size (n ", n, ", pool_blocks ", pool_blocks, ")"));
  }
  if (n == 0 || block_bytes == 0) return absl::OkStatus();
  if (pool == nullptr || staging == nullptr || blocks == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer"));
  }
  const int w = ElementWidth(pool, staging, block_bytes);
  const uint64_t elements = block_bytes / static_cast<uint64_t>(w);
  const uint64_t blocks_x = (elements + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(std::min<uint64_t>(blocks_x, kMaxGridBlocks)),
                  static_cast<unsigned>(std::min(n, kMaxGridBlocks)));
  switch (w) {
    case 16:
      BlockCopyKernel<uint4, dir><<<grid, kThreads, 0, stream>>>(
          blocks, n, pool_blocks, elements, static_cast<const uint4*>(src),
          static_cast<uint4*>(dst), num_bad_ids);
      break;
    case 8:
      BlockCopyKernel<uint2, dir><<<grid, kThreads, 0, stream>>>(
          blocks, n, pool_blocks, elements, static_cast<const uint2*>(src),
          static_cast<uint2*>(dst), num_bad_ids);
      break;
    case 4:
      BlockCopyKernel<uint32_t, dir><<<grid, kThreads, 0, stream>>>(
          blocks, n, pool_blocks, elements, static_cast<const uint32_t*>(src),
          static_cast<uint32_t*>(dst), num_bad_ids);
      break;
    default:
      BlockCopyKernel<uint8_t, dir><<<grid, kThreads, 0, stream>>>(
          blocks, n, pool_blocks, elements, static_cast<const uint8_t*>(src),
          static_cast<uint8_t*>(dst), num_bad_ids);
      break;
  }
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status GatherBlocks(const void* pool, int64_t pool_blocks, uint64_t block_bytes,
                          const int32_t* blocks, int64_t n, void* staging, int32_t* num_bad_ids,
                          cudaStream_t stream) {
  return Launch<Direction::kGather>("cuda::GatherBlocks", pool, staging, pool, staging, pool_blocks,
                                    block_bytes, blocks, n, num_bad_ids, stream);
}

absl::Status ScatterBlocks(const void* staging, const int32_t* blocks, int64_t n,
                           uint64_t block_bytes, void* pool, int64_t pool_blocks,
                           int32_t* num_bad_ids, cudaStream_t stream) {
  return Launch<Direction::kScatter>("cuda::ScatterBlocks", staging, pool, pool, staging,
                                     pool_blocks, block_bytes, blocks, n, num_bad_ids, stream);
}

}  // namespace kvrelay::kernels::cuda
