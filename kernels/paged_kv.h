// Geometry of the paged KV pool (DESIGN §3): block-major
//   [block][layer][k|v][token][kv_head][head_dim]
// For int8 KV each (block, layer, k|v) segment is followed (at the next 4-byte
// boundary) by its per-token,
// per-head f32 scales [token][kv_head], so a run of consecutive blocks is still
// one contiguous byte range holding everything needed to use it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace kvrelay::kernels {

struct PagedKvLayout {
  DType dtype = DType::kF32;
  int num_layers = 0;
  int block_size = 16;
  int num_kv_heads = 0;
  int head_dim = 0;

  size_t elem_bytes() const { return DTypeSize(dtype); }
  // Bytes of one token's K (or V) for one layer, all kv heads (data only).
  size_t token_bytes() const { return static_cast<size_t>(num_kv_heads) * head_dim * elem_bytes(); }
  size_t data_bytes() const { return token_bytes() * block_size; }
  size_t scale_bytes() const {
    return dtype == DType::kI8 ? sizeof(float) * block_size * num_kv_heads : 0;
  }
  // Scales start at a 4-byte aligned offset after the data.
  size_t scale_offset() const {
    return scale_bytes() == 0 ? data_bytes() : (data_bytes() + 3) / 4 * 4;
  }
  // One (block, layer, k|v) segment: data then scales.
  size_t segment_bytes() const { return scale_offset() + scale_bytes(); }
  size_t block_bytes() const { return segment_bytes() * 2 * num_layers; }
  size_t segment_offset(int64_t block, int layer, int kv) const {
    return static_cast<size_t>(block) * block_bytes() +
           (static_cast<size_t>(layer) * 2 + kv) * segment_bytes();
  }
};

// Where a pool's memory lives: host memory, or CUDA device memory. The pool's transfer
// descriptor carries the same (transfer::MemoryType, DESIGN §4); the forward pass runs only on
// a backend whose memory is of this kind (Backend::memory_kind()).
enum class MemoryKind { kHost = 0, kCuda = 1 };
inline const char* MemoryKindName(MemoryKind k) { return k == MemoryKind::kCuda ? "cuda" : "host"; }

// A view of one pool's memory.
struct PagedKvView {
  PagedKvLayout layout;
  uint8_t* base = nullptr;
  int64_t num_blocks = 0;
  MemoryKind memory = MemoryKind::kHost;  // where `base` points

  // Start of the row for (block, layer, kv, slot, kv_head).
  uint8_t* row(int64_t block, int layer, int kv, int slot, int head) const {
    return base + layout.segment_offset(block, layer, kv) +
           (static_cast<size_t>(slot) * layout.num_kv_heads + head) * layout.head_dim *
               layout.elem_bytes();
  }
  // int8 only: the scale of (block, layer, kv, slot, kv_head).
  float* scale(int64_t block, int layer, int kv, int slot, int head) const {
    return reinterpret_cast<float*>(base + layout.segment_offset(block, layer, kv) +
                                    layout.scale_offset()) +
           static_cast<size_t>(slot) * layout.num_kv_heads + head;
  }
};

}  // namespace kvrelay::kernels
