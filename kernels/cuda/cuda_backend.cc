#include "kernels/cuda/cuda_backend.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/activations.cuh"
#include "kernels/cuda/checksum.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/norms.cuh"
#include "kernels/cuda/paged_attention.cuh"
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/rope_kv.cuh"
#include "kernels/cuda/rows.cuh"

// kernels/ is layer 0 and does not include common/util/status.h.
#define KVR_CB_RETURN_IF_ERROR(expr)                                        \
  do {                                                                      \
    if (absl::Status kvr_cb_s_ = (expr); !kvr_cb_s_.ok()) return kvr_cb_s_; \
  } while (0)

namespace kvrelay::kernels::cuda {
namespace {

absl::Status Bad(absl::string_view op, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", op, ": ", what));
}

// The KV pool an op is given must be device memory, and num_heads must group over its kv
// heads (the kernels check the rest of the geometry themselves).
absl::Status CheckPoolAndHeads(absl::string_view op, const PagedKvView& kv, int num_heads) {
  if (kv.memory != MemoryKind::kCuda) {
    return absl::FailedPreconditionError(absl::StrCat("cuda backend: ", op, ": the KV pool is ",
                                                      MemoryKindName(kv.memory),
                                                      " memory, not cuda memory"));
  }
  const int nkv = kv.layout.num_kv_heads;
  if (nkv <= 0 || kv.layout.head_dim <= 0 || num_heads <= 0 || num_heads % nkv != 0) {
    return Bad(op, absl::StrCat(num_heads, " query heads do not group over ", nkv, " kv heads"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int ordinal, bool split_k_decode) {
  std::string why;
  const int count = CudaDeviceCount(&why);
  if (count == 0) return absl::UnavailableError(absl::StrCat("cuda backend: no usable GPU: ", why));
  if (ordinal < 0 || ordinal >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: device ", ordinal, " outside [0, ", count, ")"));
  }
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal));
  cudaStream_t stream = nullptr;
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  void* counter = nullptr;
  if (cudaError_t err = cudaMalloc(&counter, sizeof(int32_t)); err != cudaSuccess) {
    (void)cudaStreamDestroy(stream);
    return CudaErrorToStatus(err, "cudaMalloc(counter)", __FILE__, __LINE__);
  }
  auto fail = [&](absl::Status s) {  // best-effort cleanup; `s` is the error to report
    (void)cudaFree(counter);
    (void)cudaStreamDestroy(stream);
    return s;
  };
  // On the backend's own stream: a non-blocking stream does not wait for the legacy default
  // stream that a plain cudaMemset would use.
  if (cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(int32_t), stream); err != cudaSuccess) {
    return fail(CudaErrorToStatus(err, "cudaMemsetAsync(counter)", __FILE__, __LINE__));
  }
  if (cudaError_t err = cudaStreamSynchronize(stream); err != cudaSuccess) {
    return fail(CudaErrorToStatus(err, "cudaStreamSynchronize", __FILE__, __LINE__));
  }
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create();
  if (!gemm.ok()) return fail(gemm.status());
  return std::unique_ptr<CudaBackend>(new CudaBackend(
      ordinal, split_k_decode, stream, static_cast<int32_t*>(counter), std::move(*gemm)));
}

CudaBackend::CudaBackend(int ordinal, bool split_k_decode, cudaStream_t stream, int32_t* num_bad,
                         std::unique_ptr<Gemm> gemm)
    : ordinal_(ordinal),
      split_k_decode_(split_k_decode),
      stream_(stream),
      num_bad_(num_bad),
      gemm_(std::move(gemm)) {}

CudaBackend::~CudaBackend() {
  // Best effort: nothing to report an error to. Pending work finishes before memory goes.
  (void)cudaSetDevice(ordinal_);
  (void)cudaStreamSynchronize(stream_);
  {
    absl::MutexLock lock(&mu_);
    gemm_.reset();
    if (attn_workspace_ != nullptr) (void)cudaFree(attn_workspace_);
    if (checksum_scratch_ != nullptr) (void)cudaFree(checksum_scratch_);
  }
  (void)cudaFree(num_bad_);
  (void)cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Enter() const {
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CheckBadCount() {
  int32_t bad = 0;
  KVR_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&bad, num_bad_, sizeof(bad), cudaMemcpyDeviceToHost, stream_));
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  if (bad == 0) return absl::OkStatus();
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(num_bad_, 0, sizeof(int32_t), stream_));
  return absl::InvalidArgumentError(
      absl::StrCat("cuda backend: ", bad,
                   " token ids, positions, blocks, slots or rows outside their range were "
                   "skipped by the ops queued since the last check"));
}

absl::Status CudaBackend::SynchronizeLocked() {
  KVR_CB_RETURN_IF_ERROR(Enter());
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return CheckBadCount();
}

// ---- Memory ----

absl::StatusOr<Buffer> CudaBackend::Allocate(size_t bytes) {
  if (bytes == 0) return Buffer();
  KVR_CB_RETURN_IF_ERROR(Enter());
  void* p = nullptr;
  if (cudaError_t err = cudaMalloc(&p, bytes); err != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda backend: cannot allocate ", bytes, " bytes: ", cudaGetErrorString(err)));
  }
  return Buffer::Owned(this, p, bytes);
}

void CudaBackend::Free(void* data, size_t /*bytes*/) {
  // cudaFree waits for work using the memory; an error here has nowhere to go.
  (void)cudaSetDevice(ordinal_);
  (void)cudaFree(data);
}

absl::StatusOr<Buffer> CudaBackend::UploadConstant(const void* host, size_t bytes) {
  if (bytes == 0) return Buffer();
  if (host == nullptr) return Bad("UploadConstant", "null pointer");
  absl::StatusOr<Buffer> allocated = Allocate(bytes);
  if (!allocated.ok()) return allocated.status();
  Buffer b = std::move(*allocated);
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(b.data(), host, bytes, cudaMemcpyHostToDevice, stream_));
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return b;
}

absl::Status CudaBackend::Upload(const void* host, size_t bytes, void* dst) {
  if (bytes == 0) return absl::OkStatus();
  if (host == nullptr || dst == nullptr) return Bad("Upload", "null pointer");
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  // From pageable memory: the bytes are staged before this returns, so `host` may be reused.
  KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Download(const void* src, size_t bytes, void* host) {
  if (bytes == 0) return Synchronize();
  if (src == nullptr || host == nullptr) return Bad("Download", "null pointer");
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream_));
  return SynchronizeLocked();
}

absl::Status CudaBackend::Synchronize() {
  absl::MutexLock lock(&mu_);
  return SynchronizeLocked();
}

absl::Status CudaBackend::Zero(void* dst, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (dst == nullptr) return Bad("Zero", "null pointer");
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst, 0, bytes, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::BlockChecksums(const void* base, int64_t pool_blocks,
                                         uint64_t block_bytes, absl::Span<const int32_t> blocks,
                                         uint64_t* out) {
  constexpr absl::string_view kOp = "BlockChecksums";
  if (pool_blocks < 0) return Bad(kOp, "negative size");
  if (blocks.empty()) return absl::OkStatus();
  if (base == nullptr || out == nullptr) return Bad(kOp, "null pointer");
  for (int32_t b : blocks) {  // host memory: checked here, not counted on the device
    if (b < 0 || b >= pool_blocks) {
      return Bad(kOp, absl::StrCat("block ", b, " outside the pool of ", pool_blocks));
    }
  }
  const int64_t n = static_cast<int64_t>(blocks.size());
  // Scratch: the checksums (8-byte aligned first), then the block ids.
  const size_t sums_bytes = sizeof(uint64_t) * blocks.size();
  const size_t need = sums_bytes + sizeof(int32_t) * blocks.size();
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  if (need > checksum_scratch_bytes_) {
    KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));  // queued work may read it
    if (checksum_scratch_ != nullptr) KVR_CUDA_RETURN_IF_ERROR(cudaFree(checksum_scratch_));
    checksum_scratch_ = nullptr;
    checksum_scratch_bytes_ = 0;
    KVR_CUDA_RETURN_IF_ERROR(cudaMalloc(&checksum_scratch_, need));
    checksum_scratch_bytes_ = need;
  }
  auto* d_sums = static_cast<uint64_t*>(checksum_scratch_);
  auto* d_blocks =
      reinterpret_cast<int32_t*>(static_cast<uint8_t*>(checksum_scratch_) + sums_bytes);
  KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_blocks, blocks.data(), sizeof(int32_t) * blocks.size(),
                                           cudaMemcpyHostToDevice, stream_));
  KVR_CB_RETURN_IF_ERROR(
      cuda::BlockChecksums(base, pool_blocks, block_bytes, d_blocks, n, d_sums, num_bad_, stream_));
  KVR_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out, d_sums, sums_bytes, cudaMemcpyDeviceToHost, stream_));
  return SynchronizeLocked();
}

// ---- Ops: host-side checks, then the kernel on the stream ----

absl::Status CudaBackend::EmbeddingGather(const int32_t* ids, int64_t n, const void* table,
                                          DType et, int64_t vocab, int64_t dim, float* out) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::EmbeddingGather(ids, n, table, et, vocab, dim, out, num_bad_, stream_);
}

absl::Status CudaBackend::AddPositionEmbedding(const float* table, int64_t max_pos,
                                               const int64_t* positions, int64_t n, int64_t dim,
                                               float* x) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::AddPositionEmbedding(table, max_pos, positions, n, dim, x, num_bad_, stream_);
}

absl::Status CudaBackend::RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim,
                                  float eps, float* y) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::RmsNorm(x, w, rows, dim, eps, y, stream_);
}

absl::Status CudaBackend::LayerNorm(const float* x, const float* w, const float* b, int64_t rows,
                                    int64_t dim, float eps, float* y) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::LayerNorm(x, w, b, rows, dim, eps, y, stream_);
}

absl::Status CudaBackend::Linear(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                                 int64_t out, const float* bias, float* y) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return gemm_->MatMul(x, rows, in, w, wt, out, bias, y, stream_);
}

absl::Status CudaBackend::RopeAndWriteKv(const PagedKvView& kv, int layer, const TokenBatch& batch,
                                         float* qkv, int num_heads, const float* inv_freq,
                                         float* q_out) {
  constexpr absl::string_view kOp = "RopeAndWriteKv";
  const int64_t n = batch.num_tokens;
  if (n < 0) return Bad(kOp, "negative size");
  if (n == 0) return absl::OkStatus();
  KVR_CB_RETURN_IF_ERROR(CheckPoolAndHeads(kOp, kv, num_heads));
  if (qkv == nullptr || q_out == nullptr) return Bad(kOp, "null pointer");
  const int64_t hd = kv.layout.head_dim, nkv = kv.layout.num_kv_heads;
  const int64_t q_dim = num_heads * hd, kv_dim = nkv * hd;
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  // q is rotated in place inside the fused rows, then copied out densely.
  KVR_CB_RETURN_IF_ERROR(RopeWriteKv(kv, layer, n, qkv, qkv_dim, num_heads, qkv + q_dim, qkv_dim,
                                     qkv + q_dim + kv_dim, qkv_dim, batch.positions, batch.blocks,
                                     batch.slots, inv_freq, num_bad_, stream_));
  KVR_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(q_out, sizeof(float) * q_dim, qkv,
                                             sizeof(float) * qkv_dim, sizeof(float) * q_dim, n,
                                             cudaMemcpyDeviceToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::PagedAttention(const PagedKvView& kv, int layer, const TokenBatch& batch,
                                         const float* q, int num_heads, float scale, float* out) {
  constexpr absl::string_view kOp = "PagedAttention";
  const int64_t n = batch.num_tokens;
  if (n < 0 || batch.num_seqs < 0 || batch.max_blocks_per_seq < 0) {
    return Bad(kOp, "negative size");
  }
  if (n == 0) return absl::OkStatus();
  KVR_CB_RETURN_IF_ERROR(CheckPoolAndHeads(kOp, kv, num_heads));
  if (batch.num_decode_seqs < 0 || batch.num_decode_seqs > batch.num_seqs ||
      batch.num_decode_seqs > n) {
    return Bad(kOp, absl::StrCat(batch.num_decode_seqs, " decode sequences in a batch of ",
                                 batch.num_seqs, " sequences and ", n, " tokens"));
  }
  // Without split-K decode every sequence goes through the prefill kernel (see the header).
  const int decode = split_k_decode_ ? batch.num_decode_seqs : 0;
  if (q == nullptr || out == nullptr || batch.positions == nullptr || batch.seq_starts == nullptr ||
      batch.start_positions == nullptr || batch.block_tables == nullptr) {
    return Bad(kOp, "null pointer");
  }
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  const int hd = kv.layout.head_dim;
  if (decode > 0) {
    // Sequences [0, decode) are rows [0, decode), one token each: flash-decoding.
    if (batch.max_context <= 0) return Bad(kOp, "max_context not set");
    const size_t need =
        PagedAttentionDecodeWorkspaceBytes(decode, num_heads, hd, batch.max_context);
    if (need > attn_workspace_bytes_) {
      // The old workspace may still be read by queued work: drain before freeing it.
      KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      if (attn_workspace_ != nullptr) KVR_CUDA_RETURN_IF_ERROR(cudaFree(attn_workspace_));
      attn_workspace_ = nullptr;
      attn_workspace_bytes_ = 0;
      if (cudaError_t err = cudaMalloc(&attn_workspace_, need); err != cudaSuccess) {
        attn_workspace_ = nullptr;
        (void)cudaGetLastError();
        return absl::ResourceExhaustedError(
            absl::StrCat("cuda backend: cannot allocate ", need, " bytes of attention workspace"));
      }
      attn_workspace_bytes_ = need;
    }
    KVR_CB_RETURN_IF_ERROR(PagedAttentionDecode(
        kv, layer, q, decode, batch.block_tables, batch.max_blocks_per_seq, batch.positions,
        batch.max_context, num_heads, scale, out, attn_workspace_, attn_workspace_bytes_, stream_));
  }
  if (decode < batch.num_seqs) {
    // The remaining sequences: chunks, through the tiled prefill kernel. Their seq_starts are
    // absolute rows of q / out, which the kernel indexes from the base pointers.
    KVR_CB_RETURN_IF_ERROR(PagedPrefillAttention(
        kv, layer, q, batch.num_seqs - decode, batch.seq_starts + decode,
        batch.start_positions + decode, batch.block_tables + decode * batch.max_blocks_per_seq,
        batch.max_blocks_per_seq, batch.max_query_len, num_heads, scale, out, stream_));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::SiluMul(gate_up, rows, inter, out, stream_);
}

absl::Status CudaBackend::GeluTanh(float* x, int64_t n) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::GeluTanh(x, n, stream_);
}

absl::Status CudaBackend::GeluErf(float* x, int64_t n) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::GeluErf(x, n, stream_);
}

absl::Status CudaBackend::AddInPlace(float* x, const float* y, int64_t n) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::AddInPlace(x, y, n, stream_);
}

absl::Status CudaBackend::GatherRows(const float* x, int64_t num_rows, int64_t dim,
                                     const int64_t* rows, int64_t n, float* out) {
  absl::MutexLock lock(&mu_);
  KVR_CB_RETURN_IF_ERROR(Enter());
  return cuda::GatherRows(x, num_rows, dim, rows, n, out, num_bad_, stream_);
}

}  // namespace kvrelay::kernels::cuda
