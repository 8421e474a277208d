// The CPU backend: the kernels::* ops of kernels/ops.h (one dispatch table, AVX2 or
// scalar) on host memory, Linear and PagedAttention parallel on a thread pool. Each op is
// the same kernels::* calls, in the same order, that the forward pass made before the
// Backend interface existed: results are bit-identical to calling them directly.
//
// Buffers are host memory; constant uploads (weights) are views of the caller's memory, so
// loading a model on this backend copies nothing. Nothing is asynchronous: Synchronize has
// nothing to wait for.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/thread_pool.h"

namespace kvrelay::kernels {

class CpuBackend final : public Backend {
 public:
  // `pool` runs Linear and PagedAttention (null: the calling thread) and must outlive this.
  explicit CpuBackend(ThreadPool* pool) : pool_(pool) {}

  ThreadPool* pool() const { return pool_; }

  Device device() const override { return Device::kCpu; }
  MemoryKind memory_kind() const override { return MemoryKind::kHost; }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override;
  absl::StatusOr<Buffer> UploadConstant(const void* host, size_t bytes) override;
  absl::Status Upload(const void* host, size_t bytes, void* dst) override;
  absl::Status Download(const void* src, size_t bytes, void* host) override;
  absl::Status Synchronize() override;
  absl::Status Zero(void* dst, size_t bytes) override;
  absl::Status BlockChecksums(const void* base, int64_t pool_blocks, uint64_t block_bytes,
                              absl::Span<const int32_t> blocks, uint64_t* out) override;

  absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et,
                               int64_t vocab, int64_t dim, float* out) override;
  absl::Status AddPositionEmbedding(const float* table, int64_t max_pos, const int64_t* positions,
                                    int64_t n, int64_t dim, float* x) override;
  absl::Status RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                       float* y) override;
  absl::Status LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim,
                         float eps, float* y) override;
  absl::Status Linear(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                      int64_t out, const float* bias, float* y) override;
  absl::Status RopeAndWriteKv(const PagedKvView& kv, int layer, const TokenBatch& batch, float* qkv,
                              int num_heads, const float* inv_freq, float* q_out) override;
  absl::Status PagedAttention(const PagedKvView& kv, int layer, const TokenBatch& batch,
                              const float* q, int num_heads, float scale, float* out) override;
  absl::Status SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out) override;
  absl::Status GeluTanh(float* x, int64_t n) override;
  absl::Status GeluErf(float* x, int64_t n) override;
  absl::Status AddInPlace(float* x, const float* y, int64_t n) override;
  absl::Status GatherRows(const float* x, int64_t num_rows, int64_t dim, const int64_t* rows,
                          int64_t n, float* out) override;

 private:
  void Free(void* data, size_t bytes) override;

  ThreadPool* const pool_;
};

}  // namespace kvrelay::kernels
