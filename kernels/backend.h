// The backend the forward pass runs on (DESIGN §2, §6, §8): one small interface over
// backend-owned memory and the ops of Model::Forward, with a CPU implementation
// (kernels/cpu/cpu_backend.h) and a CUDA one (kernels/cuda/cuda_backend.h). The backend is
// chosen once at start-up (CreateBackend) and named explicitly; Model::Forward calls every
// op through it and never knows which one it has.
//
// Granularity: every op works on a whole batch of token rows per call (a decode step or a
// prefill chunk, any mix of sequences): RoPE and the K/V write of all tokens of a layer are
// one call, attention over the batch is one call. That is what a GPU wants (one launch per
// op per layer) and costs the CPU nothing.
//
// Memory: every pointer an op takes is backend memory (host memory on the CPU backend,
// device memory on CUDA), including the per-token metadata (ids, positions, block ids,
// slots, block tables), which the caller uploads once per forward pass. The KV pool is
// described by a PagedKvView whose `memory` must be the backend's memory_kind().
//
// Ordering: ops run in the order they are called (one stream per backend). An OK return
// may only mean the op was queued; an error of queued work is reported by a later call, at
// the latest by Download or Synchronize. Invalid arguments (negative sizes, null pointers
// for non-empty data, ids/blocks/slots out of range) are INVALID_ARGUMENT before anything
// is queued; an empty op (n == 0) is a no-op.
//
// Determinism: the CPU backend runs exactly the kernels::* ops (kernels/ops.h) in the order
// Model::Forward calls them, so results are bit-identical to calling those directly; a
// CUDA backend runs their twins (kernels/cuda/), whose per-element arithmetic is shared
// through kernels/device_math.h.
//
// Thread safety: all methods may be called from several threads at once (Model::Forward is
// const and may run concurrently on one model, each call on its own buffers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"
#include "kernels/paged_kv.h"
#include "kernels/thread_pool.h"

namespace kvrelay::kernels {

enum class Device { kCpu, kCuda };
const char* DeviceName(Device d);  // "cpu", "cuda"
// "cpu" or "cuda"; INVALID_ARGUMENT naming the value otherwise.
absl::StatusOr<Device> ParseDevice(absl::string_view name);

class Backend;

// Where the tokens of one forward pass sit in their sequences and in the paged KV pool.
// Built and uploaded once per pass by the caller and used by every layer. Arrays are backend
// memory; counts and bounds are host values. Sequence s < num_seqs is the token rows
// [seq_starts[s], seq_starts[s + 1]) at consecutive positions from start_positions[s]; both
// the per-token and the per-sequence form are given, so a decode kernel (one token per
// sequence) and a prefill kernel (chunks) each find what they index by.
struct TokenBatch {
  int64_t num_tokens = 0;
  const int64_t* positions = nullptr;  // [num_tokens]
  const int32_t* blocks = nullptr;     // [num_tokens]: block holding the token's K/V
  const int32_t* slots = nullptr;      // [num_tokens]: its slot in that block
  int num_seqs = 0;
  const int32_t* seq_starts = nullptr;       // [num_seqs + 1]: 0, ..., num_tokens
  const int64_t* start_positions = nullptr;  // [num_seqs]
  // [num_seqs][max_blocks_per_seq]: row s holds sequence s's blocks for positions
  // [0, its last position] (entry j: positions [j * block_size, (j + 1) * block_size)),
  // padded with -1.
  const int32_t* block_tables = nullptr;
  int64_t max_blocks_per_seq = 0;
  int64_t max_query_len = 0;  // largest seq_starts[s + 1] - seq_starts[s]
  int64_t max_context = 0;    // largest positions[t] + 1
  // How many sequences at the front of the batch have exactly one token (decode steps: the
  // engine puts them first). A GPU backend may run them through its decode attention kernel
  // (BackendOptions::cuda_split_k_decode) and the rest through its prefill kernel; the CPU
  // backend ignores it.
  int num_decode_seqs = 0;
};

// A range of backend memory, move-only. Either owned (from Backend::Allocate or a
// backend's copy of constant data; freed through its backend when the Buffer dies or is
// Reset, so it must not outlive the backend) or a view of memory someone else keeps alive
// (the CPU backend's weights: the host memory itself), never freed.
class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { Reset(); }
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  bool owned() const { return owner_ != nullptr; }
  // Frees the memory (when owned) and leaves the buffer empty.
  void Reset();

  // For backends: memory that `owner` frees with its Free(data, bytes).
  static Buffer Owned(Backend* owner, void* data, size_t bytes);
  // Memory that stays valid for as long as the buffer is used; never freed by it.
  static Buffer View(void* data, size_t bytes);

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  // Where this backend's buffers live, and where the KV pool its ops use must live.
  virtual MemoryKind memory_kind() const = 0;

  // ---- Memory ----

  // `bytes` of uninitialised backend memory, 64-byte aligned (bytes == 0: an empty buffer).
  // RESOURCE_EXHAUSTED when it cannot be had.
  virtual absl::StatusOr<Buffer> Allocate(size_t bytes) = 0;
  // Read-only data used for as long as the returned buffer lives (weights, RoPE tables:
  // uploaded once at load). CPU: a view of `host` itself, no copy (`host` must outlive the
  // buffer); CUDA: a device copy.
  virtual absl::StatusOr<Buffer> UploadConstant(const void* host, size_t bytes) = 0;
  // Copies `bytes` from host memory into backend memory `dst`; `host` may be reused as soon
  // as this returns.
  virtual absl::Status Upload(const void* host, size_t bytes, void* dst) = 0;
  // Copies `bytes` of backend memory `src` to host memory once all work queued before it is
  // done; `host` holds the data when this returns OK.
  virtual absl::Status Download(const void* src, size_t bytes, void* host) = 0;
  // Waits until all queued work is done; the first error of that work, if any.
  virtual absl::Status Synchronize() = 0;
  // Zero-fills `bytes` of backend memory at `dst` (queued like an op).
  virtual absl::Status Zero(void* dst, size_t bytes) = 0;

  // ---- KV pool checksums (DESIGN §4) ----

  // out[i] = XXH3-64 (seed 0, default secret: transfer::BlockChecksums' value) of block
  // blocks[i] of the pool at `base` (pool_blocks blocks of block_bytes, backend memory), read
  // once all work queued before is done. `blocks` and `out` are host memory; out holds the
  // values when this returns OK. INVALID_ARGUMENT for a block outside [0, pool_blocks).
  virtual absl::Status BlockChecksums(const void* base, int64_t pool_blocks, uint64_t block_bytes,
                                      absl::Span<const int32_t> blocks, uint64_t* out) = 0;

  // ---- Ops of the forward pass (all pointers backend memory; rows are row-major) ----

  // out[t][:] = f32(table[ids[t]][:]) for t < n; table: [vocab][dim] of dtype et (f32, f16,
  // bf16); out: [n][dim]. INVALID_ARGUMENT for an id outside [0, vocab).
  virtual absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et,
                                       int64_t vocab, int64_t dim, float* out) = 0;
  // x[t][:] += table[positions[t]][:] for t < n (learned positions, GPT-2); table:
  // [max_pos][dim] f32. INVALID_ARGUMENT for a position outside [0, max_pos).
  virtual absl::Status AddPositionEmbedding(const float* table, int64_t max_pos,
                                            const int64_t* positions, int64_t n, int64_t dim,
                                            float* x) = 0;
  // y[r] = RMSNorm(x[r]) * w, x, y: [rows][dim]; y may equal x.
  virtual absl::Status RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                               float* y) = 0;
  // y[r] = LayerNorm(x[r]) * w + b (biased variance); y may equal x.
  virtual absl::Status LayerNorm(const float* x, const float* w, const float* b, int64_t rows,
                                 int64_t dim, float eps, float* y) = 0;
  // y = x · wᵀ (+ bias): x: [rows][in] f32, w: [out][in] of dtype wt (f32, f16, bf16),
  // bias: [out] f32 or null, y: [rows][out], not overlapping x.
  virtual absl::Status Linear(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                              int64_t out, const float* bias, float* y) = 0;
  // For every token t of `batch` in one layer: qkv[t] is [q: num_heads][k: kv_heads]
  // [v: kv_heads] heads of head_dim (kv_heads, head_dim from kv.layout). Rotates q and k by
  // RoPE at positions[t] (rotate-half; inv_freq: head_dim / 2 entries; null: no rotation, as
  // GPT-2), copies q to q_out[t] ([num_tokens][num_heads][head_dim]) and writes k and v into
  // slot slots[t] of block blocks[t] of `layer`, converted to the pool dtype (int8: per-head
  // scale). qkv's contents are unspecified afterwards. INVALID_ARGUMENT for a block outside
  // the pool or a slot outside [0, block_size).
  virtual absl::Status RopeAndWriteKv(const PagedKvView& kv, int layer, const TokenBatch& batch,
                                      float* qkv, int num_heads, const float* inv_freq,
                                      float* q_out) = 0;
  // Causal attention of the batch's query tokens over the paged cache (their own K/V already
  // written by RopeAndWriteKv): token t attends to positions [0, positions[t]] of its
  // sequence. q, out: [num_tokens][num_heads][head_dim]; num_heads a multiple of kv_heads.
  // Block tables are validated by the caller.
  virtual absl::Status PagedAttention(const PagedKvView& kv, int layer, const TokenBatch& batch,
                                      const float* q, int num_heads, float scale, float* out) = 0;
  // out[r][i] = silu(gate_up[r][i]) * gate_up[r][inter + i]; gate_up: [rows][2 * inter].
  virtual absl::Status SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out) = 0;
  // In place over n elements: GPT-2 "gelu_new" (tanh approximation) / exact erf GELU.
  virtual absl::Status GeluTanh(float* x, int64_t n) = 0;
  virtual absl::Status GeluErf(float* x, int64_t n) = 0;
  // x[i] += y[i] for i < n (the residual add).
  virtual absl::Status AddInPlace(float* x, const float* y, int64_t n) = 0;
  // out[i][:] = x[rows[i]][:] for i < n; x: [num_rows][dim] (the rows that want logits).
  // INVALID_ARGUMENT for a row outside [0, num_rows).
  virtual absl::Status GatherRows(const float* x, int64_t num_rows, int64_t dim,
                                  const int64_t* rows, int64_t n, float* out) = 0;

 private:
  friend class Buffer;
  // Releases memory this backend handed out as an owned Buffer.
  virtual void Free(void* data, size_t bytes) = 0;
};

// ---- Choosing a backend (kernels/create_backend.cc, library kvrelay_backend: it links the
// CUDA backend when the build has one) ----

struct BackendOptions {
  // CUDA: run decode tokens (TokenBatch::num_decode_seqs) through the split-K flash-decoding
  // kernel, faster at long contexts and small batches. Off (the default), every token goes
  // through the prefill kernel, so a token's bits never depend on whether it was computed in
  // a decode step or inside a prefill chunk (reused KV == recomputed KV, as on the CPU).
  bool cuda_split_k_decode = false;
};

// The backend for `device`. kCpu: the CPU ops on `pool` (null: on the calling thread; the
// pool must outlive the backend). kCuda: the CUDA backend on device 0 (the first of
// CUDA_VISIBLE_DEVICES); FAILED_PRECONDITION in a build without CUDA, UNAVAILABLE (saying
// why) when no usable GPU is found.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(Device device, ThreadPool* pool,
                                                       const BackendOptions& options = {});

// Whether this build has CUDA (KVRELAY_HAVE_CUDA): says nothing of a GPU being present.
bool BuiltWithCuda();

// What `--device` means: "cpu" or "cuda" as ParseDevice; "auto" (the default of every
// binary) is cuda when this build has CUDA and a GPU is found, else cpu. `why`, when set,
// receives one line saying what was chosen and why (for the start-up log).
absl::StatusOr<Device> ResolveDevice(absl::string_view flag, std::string* why = nullptr);

}  // namespace kvrelay::kernels
