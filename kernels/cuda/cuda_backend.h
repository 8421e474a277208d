// The CUDA backend (kernels/backend.h): the forward pass's ops as the kernels of
// kernels/cuda/ on one GPU, in order on one CUDA stream.
//
// Memory: buffers are cudaMalloc'd device memory (256-byte aligned); weights are copied to
// the device once (UploadConstant); the KV pool the attention ops take must be device memory
// (PagedKvView::memory == kCuda), e.g. from UCX's allocator (common/transfer) or Allocate.
// Upload copies from pageable host memory (the source may be reused on return); Download
// waits for all queued work.
//
// Ops are queued asynchronously. Arguments checkable on the host are checked before queueing
// (INVALID_ARGUMENT); data the host cannot see (ids, positions, block ids, slots, rows in
// device memory) is bounds-checked by the kernels, which skip the bad element and count it
// in one device counter: the next Download or Synchronize reports a non-zero count as
// INVALID_ARGUMENT (and resets it). Model::Forward validates all of these on the host first,
// so the counter only catches a caller that did not.
//
// Kernels per op: EmbeddingGather (embedding.cu), AddPositionEmbedding / AddInPlace /
// GatherRows (rows.cu), RmsNorm / LayerNorm (norms.cu), Linear (gemm.cu, cuBLASLt, one
// algorithm per weight shape whatever the row count), RopeAndWriteKv (rope_kv.cu, then a
// strided copy of q), PagedAttention (prefill_attention.cu; with split_k_decode, the batch's
// leading one-token sequences, TokenBatch::num_decode_seqs, go to paged_attention.cu's
// flash-decoding kernel instead), SiluMul / GeluTanh / GeluErf (activations.cu).
//
// Determinism: each kernel gives a token the same bits whatever else is in the batch (fixed
// reduction orders; see each kernel's header), and the prefill attention kernel gives the
// same bits however a sequence is cut into chunks, one-token decode steps included. So by
// default a token's result does not depend on how it was served (prefilled here, reused from
// the cache, decoded). With split_k_decode the decode kernel, which reduces in another order,
// serves decode steps: a token computed as a decode step and the same token inside a prefill
// chunk may then differ in the last bits.
//
// Thread safety: every method may be called from several threads; launches are serialised
// by a mutex (they share the stream, the GEMM plans and the attention workspace).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"

namespace kvrelay::kernels::cuda {

class Gemm;  // kernels/cuda/gemm.cuh

class CudaBackend final : public Backend {
 public:
  // A backend on CUDA device `ordinal` (of those CUDA_VISIBLE_DEVICES leaves) with a stream
  // of its own. UNAVAILABLE without a usable device; INVALID_ARGUMENT for an ordinal out of
  // range.
  // split_k_decode: BackendOptions::cuda_split_k_decode.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int ordinal = 0,
                                                             bool split_k_decode = false);
  ~CudaBackend() override;

  int ordinal() const { return ordinal_; }
  cudaStream_t stream() const { return stream_; }

  Device device() const override { return Device::kCuda; }
  MemoryKind memory_kind() const override { return MemoryKind::kCuda; }

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
  CudaBackend(int ordinal, bool split_k_decode, cudaStream_t stream, int32_t* num_bad,
              std::unique_ptr<Gemm> gemm);
  void Free(void* data, size_t bytes) override;

  // Makes the backend's device current on the calling thread (CUDA's current device is per
  // thread).
  absl::Status Enter() const;
  // After the stream has drained: INVALID_ARGUMENT if the kernels counted bad elements since
  // the last check (and resets the count).
  absl::Status CheckBadCount() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SynchronizeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int ordinal_;
  const bool split_k_decode_;
  const cudaStream_t stream_;
  int32_t* const num_bad_;  // device counter the kernels add skipped elements to
  absl::Mutex mu_;
  std::unique_ptr<Gemm> gemm_ ABSL_GUARDED_BY(mu_);
  void* attn_workspace_ ABSL_GUARDED_BY(mu_) = nullptr;  // decode attention's split-K partials
  size_t attn_workspace_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  void* checksum_scratch_ ABSL_GUARDED_BY(mu_) = nullptr;  // BlockChecksums' ids and sums
  size_t checksum_scratch_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrelay::kernels::cuda
