#include "kernels/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/ops.h"
#include "xxhash.h"

namespace kvrelay::kernels {
namespace {

constexpr size_t kAlignment = 64;

absl::Status Bad(absl::string_view op, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("cpu backend: ", op, ": ", what));
}

absl::Status NegativeSize(absl::string_view op) { return Bad(op, "negative size"); }
absl::Status NullPointer(absl::string_view op) { return Bad(op, "null pointer"); }

// The KV pool the attention ops are given must be host memory on layer `layer`.
absl::Status CheckPool(absl::string_view op, const PagedKvView& kv, int layer) {
  if (kv.memory != MemoryKind::kHost) {
    return absl::FailedPreconditionError(absl::StrCat("cpu backend: ", op, ": the KV pool is ",
                                                      MemoryKindName(kv.memory),
                                                      " memory, not host memory"));
  }
  if (kv.base == nullptr) return NullPointer(op);
  if (layer < 0 || layer >= kv.layout.num_layers) {
    return Bad(op, absl::StrCat("layer ", layer, " outside [0, ", kv.layout.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckHeads(absl::string_view op, const PagedKvView& kv, int num_heads) {
  const int nkv = kv.layout.num_kv_heads;
  if (nkv <= 0 || kv.layout.head_dim <= 0 || num_heads <= 0 || num_heads % nkv != 0) {
    return Bad(op, absl::StrCat(num_heads, " query heads do not group over ", nkv, " kv heads"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---- Memory ----

absl::StatusOr<Buffer> CpuBackend::Allocate(size_t bytes) {
  if (bytes == 0) return Buffer();
  const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  if (rounded < bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
  }
  void* p = std::aligned_alloc(kAlignment, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
  }
  return Buffer::Owned(this, p, bytes);
}

void CpuBackend::Free(void* data, size_t /*bytes*/) { std::free(data); }

absl::StatusOr<Buffer> CpuBackend::UploadConstant(const void* host, size_t bytes) {
  if (bytes == 0) return Buffer();
  if (host == nullptr) return NullPointer("UploadConstant");
  // Host memory is this backend's memory: the caller's bytes are used in place.
  return Buffer::View(const_cast<void*>(host), bytes);
}

absl::Status CpuBackend::Upload(const void* host, size_t bytes, void* dst) {
  if (bytes == 0) return absl::OkStatus();
  if (host == nullptr || dst == nullptr) return NullPointer("Upload");
  if (host != dst) std::memcpy(dst, host, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Download(const void* src, size_t bytes, void* host) {
  if (bytes == 0) return absl::OkStatus();
  if (src == nullptr || host == nullptr) return NullPointer("Download");
  if (host != src) std::memcpy(host, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Synchronize() { return absl::OkStatus(); }

absl::Status CpuBackend::Zero(void* dst, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (dst == nullptr) return NullPointer("Zero");
  std::memset(dst, 0, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::BlockChecksums(const void* base, int64_t pool_blocks, uint64_t block_bytes,
                                        absl::Span<const int32_t> blocks, uint64_t* out) {
  constexpr absl::string_view kOp = "BlockChecksums";
  if (pool_blocks < 0) return NegativeSize(kOp);
  if (blocks.empty()) return absl::OkStatus();
  if (base == nullptr || out == nullptr) return NullPointer(kOp);
  for (int32_t b : blocks) {
    if (b < 0 || b >= pool_blocks) {
      return Bad(kOp, absl::StrCat("block ", b, " outside the pool of ", pool_blocks));
    }
  }
  const uint8_t* p = static_cast<const uint8_t*>(base);
  for (size_t i = 0; i < blocks.size(); ++i) {
    out[i] = XXH3_64bits(p + static_cast<uint64_t>(blocks[i]) * block_bytes, block_bytes);
  }
  return absl::OkStatus();
}

// ---- Ops ----

absl::Status CpuBackend::EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et,
                                         int64_t vocab, int64_t dim, float* out) {
  constexpr absl::string_view kOp = "EmbeddingGather";
  if (n < 0 || vocab < 0 || dim < 0) return NegativeSize(kOp);
  if (n == 0 || dim == 0) return absl::OkStatus();
  if (ids == nullptr || table == nullptr || out == nullptr) return NullPointer(kOp);
  if (et == DType::kI8) return Bad(kOp, "int8 tables are not supported");
  for (int64_t t = 0; t < n; ++t) {
    if (ids[t] < 0 || ids[t] >= vocab) {
      return Bad(kOp, absl::StrCat("id ", ids[t], " outside [0, ", vocab, ")"));
    }
  }
  kernels::EmbeddingGather(ids, n, table, et, dim, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddPositionEmbedding(const float* table, int64_t max_pos,
                                              const int64_t* positions, int64_t n, int64_t dim,
                                              float* x) {
  constexpr absl::string_view kOp = "AddPositionEmbedding";
  if (n < 0 || dim < 0 || max_pos < 0) return NegativeSize(kOp);
  if (n == 0 || dim == 0) return absl::OkStatus();
  if (table == nullptr || positions == nullptr || x == nullptr) return NullPointer(kOp);
  for (int64_t t = 0; t < n; ++t) {
    if (positions[t] < 0 || positions[t] >= max_pos) {
      return Bad(kOp, absl::StrCat("position ", positions[t], " outside [0, ", max_pos, ")"));
    }
  }
  for (int64_t t = 0; t < n; ++t) kernels::AddInPlace(&x[t * dim], &table[positions[t] * dim], dim);
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim,
                                 float eps, float* y) {
  constexpr absl::string_view kOp = "RmsNorm";
  if (rows < 0 || dim < 0) return NegativeSize(kOp);
  if (rows == 0 || dim == 0) return absl::OkStatus();
  if (x == nullptr || w == nullptr || y == nullptr) return NullPointer(kOp);
  kernels::RmsNorm(x, w, rows, dim, eps, y);
  return absl::OkStatus();
}

absl::Status CpuBackend::LayerNorm(const float* x, const float* w, const float* b, int64_t rows,
                                   int64_t dim, float eps, float* y) {
  constexpr absl::string_view kOp = "LayerNorm";
  if (rows < 0 || dim < 0) return NegativeSize(kOp);
  if (rows == 0 || dim == 0) return absl::OkStatus();
  if (x == nullptr || w == nullptr || b == nullptr || y == nullptr) return NullPointer(kOp);
  kernels::LayerNorm(x, w, b, rows, dim, eps, y);
  return absl::OkStatus();
}

absl::Status CpuBackend::Linear(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                                int64_t out, const float* bias, float* y) {
  constexpr absl::string_view kOp = "Linear";
  if (rows < 0 || in < 0 || out < 0) return NegativeSize(kOp);
  if (rows == 0 || out == 0) return absl::OkStatus();
  if (x == nullptr || w == nullptr || y == nullptr) return NullPointer(kOp);
  if (wt == DType::kI8) return Bad(kOp, "int8 weights are not supported");
  kernels::MatMul(pool_, x, rows, in, w, wt, out, bias, y);
  return absl::OkStatus();
}

absl::Status CpuBackend::RopeAndWriteKv(const PagedKvView& kv, int layer, const TokenBatch& batch,
                                        float* qkv, int num_heads, const float* inv_freq,
                                        float* q_out) {
  constexpr absl::string_view kOp = "RopeAndWriteKv";
  const int64_t n = batch.num_tokens;
  if (n < 0) return NegativeSize(kOp);
  if (n == 0) return absl::OkStatus();
  if (absl::Status s = CheckPool(kOp, kv, layer); !s.ok()) return s;
  if (absl::Status s = CheckHeads(kOp, kv, num_heads); !s.ok()) return s;
  const int64_t* positions = batch.positions;
  const int32_t* blocks = batch.blocks;
  const int32_t* slots = batch.slots;
  if (qkv == nullptr || positions == nullptr || blocks == nullptr || slots == nullptr ||
      q_out == nullptr) {
    return NullPointer(kOp);
  }
  const auto& L = kv.layout;
  for (int64_t t = 0; t < n; ++t) {
    if (blocks[t] < 0 || blocks[t] >= kv.num_blocks) {
      return Bad(kOp, absl::StrCat("block ", blocks[t], " outside the pool of ", kv.num_blocks));
    }
    if (slots[t] < 0 || slots[t] >= L.block_size) {
      return Bad(kOp, absl::StrCat("slot ", slots[t], " outside [0, ", L.block_size, ")"));
    }
    if (positions[t] < 0) return Bad(kOp, absl::StrCat("negative position ", positions[t]));
  }
  const int nkv = L.num_kv_heads, hd = L.head_dim;
  const int64_t q_dim = static_cast<int64_t>(num_heads) * hd;
  const int64_t qkv_dim = q_dim + 2 * static_cast<int64_t>(nkv) * hd;
  for (int64_t t = 0; t < n; ++t) {
    float* qr = &qkv[t * qkv_dim];
    float* kr = qr + q_dim;
    float* vr = kr + static_cast<int64_t>(nkv) * hd;
    if (inv_freq != nullptr) {
      kernels::Rope(qr, num_heads, hd, positions[t], inv_freq);
      kernels::Rope(kr, nkv, hd, positions[t], inv_freq);
    }
    std::memcpy(&q_out[t * q_dim], qr, sizeof(float) * q_dim);
    kernels::WriteKv(kv, blocks[t], slots[t], layer, kr, vr);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::PagedAttention(const PagedKvView& kv, int layer, const TokenBatch& batch,
                                        const float* q, int num_heads, float scale, float* out) {
  constexpr absl::string_view kOp = "PagedAttention";
  const int64_t n = batch.num_tokens;
  if (n < 0 || batch.num_seqs < 0 || batch.max_blocks_per_seq < 0) return NegativeSize(kOp);
  if (n == 0) return absl::OkStatus();
  if (absl::Status s = CheckPool(kOp, kv, layer); !s.ok()) return s;
  if (absl::Status s = CheckHeads(kOp, kv, num_heads); !s.ok()) return s;
  if (q == nullptr || out == nullptr || batch.positions == nullptr || batch.seq_starts == nullptr ||
      batch.block_tables == nullptr) {
    return NullPointer(kOp);
  }
  if (batch.seq_starts[0] != 0 || batch.seq_starts[batch.num_seqs] != n) {
    return Bad(kOp, absl::StrCat("sequences cover rows [", batch.seq_starts[0], ", ",
                                 batch.seq_starts[batch.num_seqs], "), not [0, ", n, ")"));
  }
  // kernels::PagedAttention takes one block-table pointer per token; tokens of one sequence
  // share it, which is how it finds the runs it tiles together.
  thread_local std::vector<const int32_t*> tables;
  tables.resize(static_cast<size_t>(n));
  for (int s = 0; s < batch.num_seqs; ++s) {
    const int32_t b = batch.seq_starts[s], e = batch.seq_starts[s + 1];
    if (e < b) return Bad(kOp, absl::StrCat("sequence ", s, " ends before it starts"));
    const int32_t* row = batch.block_tables + static_cast<int64_t>(s) * batch.max_blocks_per_seq;
    for (int32_t t = b; t < e; ++t) {
      if (batch.positions[t] < 0 ||
          batch.positions[t] >= batch.max_blocks_per_seq * kv.layout.block_size) {
        return Bad(kOp, absl::StrCat("position ", batch.positions[t], " outside the block table"));
      }
      tables[t] = row;
    }
  }
  kernels::PagedAttention(pool_, kv, layer, q, n, tables.data(), batch.positions, num_heads, scale,
                          out);
  return absl::OkStatus();
}

absl::Status CpuBackend::SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  constexpr absl::string_view kOp = "SiluMul";
  if (rows < 0 || inter < 0) return NegativeSize(kOp);
  if (rows == 0 || inter == 0) return absl::OkStatus();
  if (gate_up == nullptr || out == nullptr) return NullPointer(kOp);
  kernels::SiluMul(gate_up, rows, inter, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::GeluTanh(float* x, int64_t n) {
  if (n < 0) return NegativeSize("GeluTanh");
  if (n == 0) return absl::OkStatus();
  if (x == nullptr) return NullPointer("GeluTanh");
  kernels::GeluTanh(x, n);
  return absl::OkStatus();
}

absl::Status CpuBackend::GeluErf(float* x, int64_t n) {
  if (n < 0) return NegativeSize("GeluErf");
  if (n == 0) return absl::OkStatus();
  if (x == nullptr) return NullPointer("GeluErf");
  kernels::GeluErf(x, n);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddInPlace(float* x, const float* y, int64_t n) {
  if (n < 0) return NegativeSize("AddInPlace");
  if (n == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr) return NullPointer("AddInPlace");
  kernels::AddInPlace(x, y, n);
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherRows(const float* x, int64_t num_rows, int64_t dim,
                                    const int64_t* rows, int64_t n, float* out) {
  constexpr absl::string_view kOp = "GatherRows";
  if (dim < 0 || n < 0 || num_rows < 0) return NegativeSize(kOp);
  if (n == 0 || dim == 0) return absl::OkStatus();
  if (x == nullptr || rows == nullptr || out == nullptr) return NullPointer(kOp);
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || rows[i] >= num_rows) {
      return Bad(kOp, absl::StrCat("row ", rows[i], " outside [0, ", num_rows, ")"));
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(&out[i * dim], &x[rows[i] * dim], sizeof(float) * dim);
  }
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels
