// CPU ops and the one dispatch table that picks their vectorised inner loops at
// run time (AVX2+FMA+F16C when the CPU has them, a portable scalar path otherwise).
//
// Determinism (DESIGN §6): every output element is computed by one fixed sequence
// of operations that depends only on its own inputs — never on how many rows are
// in the batch, how a prompt is chunked, or how work is split across threads.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/paged_kv.h"
#include "kernels/thread_pool.h"

namespace kvrelay::kernels {

enum class Isa { kScalar, kAvx2 };
const char* IsaName(Isa isa);

// Inner loops, one set per ISA.
struct KernelTable {
  Isa isa;
  // y[r * ldy + o] = dot(x[r * in ...], w[o * in ...]) for r in [0, rows), o in [o0, o1).
  // w is row-major [out][in] of dtype wt (f32, f16 or bf16).
  void (*matmul)(const float* x, int64_t rows, int64_t in, const void* w, DType wt, int64_t o0,
                 int64_t o1, float* y, int64_t ldy);
  // dot(q, k) where k is n elements of dtype kt (int8 values are raw, unscaled).
  float (*dot_kv)(const float* q, const void* k, DType kt, int64_t n);
  // out[i] += a * v[i] where v is n elements of dtype vt (int8 raw; fold the scale into a).
  void (*axpy_kv)(float a, const void* v, DType vt, int64_t n, float* out);
  // out[j] = dot_kv(q, k + j * stride, kt, n) for j < count, bit-identical to the single calls.
  void (*dot_kv_rows)(const float* q, const void* k, int64_t stride, int count, DType kt, int64_t n,
                      float* out);
  // for j < count: axpy_kv(a[j], v + j * stride, vt, n, out), bit-identical to the single calls.
  void (*axpy_kv_rows)(const float* a, const void* v, int64_t stride, int count, DType vt,
                       int64_t n, float* out);
  // out[r * ldo + j] = dot_kv(q + r * ldq, k + j * stride, kt, n) for r < rows, j < count:
  // several query rows against the same key rows (each key row loaded once for all of them),
  // bit-identical to the single calls.
  void (*dot_kv_tile)(const float* q, int64_t ldq, int rows, const void* k, int64_t stride,
                      int count, DType kt, int64_t n, float* out, int64_t ldo);
};

// Best table this CPU supports; KVRELAY_ISA=scalar|avx2 in the environment overrides.
Isa DetectIsa();
bool IsaSupported(Isa isa);
const KernelTable& KernelsFor(Isa isa);
// The process-wide active table (DetectIsa() unless SetActiveIsa was called).
const KernelTable& ActiveKernels();
// For tests and benchmarks. Returns false (and changes nothing) if unsupported.
bool SetActiveIsa(Isa isa);

// ---- Ops (scalar element-wise code is shared by all ISAs) ----

// y = x · wᵀ (+ bias), x: [rows, in] f32, w: [out, in], y: [rows, out]. Parallel over out.
void MatMul(ThreadPool* pool, const float* x, int64_t rows, int64_t in, const void* w, DType wt,
            int64_t out, const float* bias, float* y);

// Copies rows `ids` of an embedding table [vocab, dim] (dtype et) into out [n, dim] f32.
void EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et, int64_t dim,
                     float* out);
// Converts n elements of dtype t to f32.
void ToF32(const void* src, DType t, int64_t n, float* out);

void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y);
void LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim, float eps,
               float* y);
// x += y
void AddInPlace(float* x, const float* y, int64_t n);
// out[r][i] = silu(gate_up[r][i]) * gate_up[r][inter + i]; gate_up is [rows, 2*inter].
void SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out);
// GPT-2 "gelu_new" (tanh approximation), in place.
void GeluTanh(float* x, int64_t n);
// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (HF "gelu"), in place.
void GeluErf(float* x, int64_t n);

// Rotary position embedding (rotate-half convention, as HF Llama) applied in place to
// `num_heads` heads of `head_dim` for one token at `position`. inv_freq has head_dim/2 entries.
void Rope(float* x, int num_heads, int head_dim, int64_t position, const float* inv_freq);

// Writes one token's K and V (num_kv_heads * head_dim f32 each) into slot `slot` of block
// `block`, layer `layer`, converting to the pool dtype (int8: per-head scale = max|x| / 127).
void WriteKv(const PagedKvView& kv, int64_t block, int slot, int layer, const float* k,
             const float* v);

// Causal attention over the paged cache for a set of query tokens.
// Query token t belongs to a sequence with block table `block_tables[t]` and sits at
// position `positions[t]`; it attends to positions [0, positions[t]] of that sequence,
// all read from the cache (so the current token's K/V must be written first).
// q: [n, num_heads, head_dim]; out: [n, num_heads, head_dim].
//
// Consecutive tokens with the same block table pointer (one sequence's prefill chunk) are
// processed in tiles, together with all query heads that share a KV head, so each K/V block
// is read once per tile rather than once per (token, head). Each output element is still
// computed by the same operations in the same order as attending that (token, head) alone:
// tiling only interleaves independent per-query loops. Parallel over (tile, kv head).
void PagedAttention(ThreadPool* pool, const PagedKvView& kv, int layer, const float* q, int64_t n,
                    const int32_t* const* block_tables, const int64_t* positions, int num_heads,
                    float scale, float* out);

}  // namespace kvrelay::kernels
