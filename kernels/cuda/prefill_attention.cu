// Causal prefill attention over the paged KV cache, flash-attention style (CPU twin:
// kernels::PagedAttention in kernels/cpu/ops.cc, matched within a tolerance: the softmax here
// is online over key tiles and CUDA's expf is not libm's). FP32 on the CUDA cores (no tensor
// cores: TF32 / BF16 MMA would not stay within the CPU parity tolerance).
//
// Grid/block: one CTA of kThreads = 128 threads per (query tile, kv head g and a chunk of its
// query heads, sequence): grid = (ceil(max_query_len / tokens per tile), num_kv_heads * head
// chunks, num_seqs); a CTA loops over tiles blockIdx.x, + gridDim.x, ... of its sequence, so
// a chunk longer than max_query_len is still covered. A tile has kBlockM query rows = (token,
// head) pairs, the GQA group packed in: gc = min(group, kBlockM) heads of one kv head times
// floor(kBlockM / gc) consecutive tokens. All query heads of a kv head share the tile (ratios
// up to kBlockM), so each key tile is read from global memory once for all of them.
// kBlockM = 64 for head_dim <= 128, 32 for head_dim <= 256 (register budget); kBlockN = 32
// keys per key tile. Thread i = (ty = i / 8, tx = i % 8) owns rows ty * kTM + [0, kTM)
// (kTM = kBlockM / 16), keys tx * 4 + [0, 4) of each key tile, and output dims
// c * 32 + tx * 4 + [0, 4) for c < kHdPad / 32.
// Per key tile [kt0, kt0 + 32) of [0, last position of the tile + 1):
//  a. threads < 32 look up the key's block (table[j / block_size], slot j % block_size),
//     check it against [0, num_blocks) and keep its K row byte offset and int8 scales;
//  b. K is staged transposed ([d][key]) and V row-major ([key][d]) in shared memory as f32
//     (int8 raw), zeros past head_dim and past the last key; 4-element vector loads when
//     head_dim % 4 == 0 (16 / 8 / 4 bytes for f32 / f16 and bf16 / int8), else scalars;
//  c. S = Q K^T for the thread's kTM x 4 block: fmaf over d in increasing order, then
//     (* k scale for int8) * scale, the CPU's order; keys past the row's position are -inf;
//  d. online softmax per row: tile max over the row's 32 keys (the thread's 4, then an xor
//     tree over the 8 tx lanes), m' = max(m, tile max), alpha = expf(m - m'), p = expf(s - m')
//     (alpha = 1 and p = 0 while a row has seen no key), l = l * alpha + p0 + p1 + p2 + p3
//     (per thread), O *= alpha; p (* v scale for int8) goes to shared memory [key][row];
//  e. O += P V: for the 32 keys in increasing order, fmaf.
// Finally l is summed over the 8 tx lanes (xor tree) and out = O * (1 / l).
// Fixed reduction order: every row's result depends only on its own query, position and
// sequence: key tiles always start at key 0; a key tile the row cannot see changes nothing
// (alpha = expf(0) = 1, p = 0), so neither the tile a token lands in, nor the chunking of the
// prompt, nor the batch changes a bit of it. (Not the decode kernel's order: the same token
// through paged_attention.cu differs within the tolerance.)
// Bounds: block table entries are read only below ceil((last position + 1) / block_size),
// checked against max_blocks_per_seq; block ids are checked (a bad one reads block 0 and the
// tile's outputs are NaN); q / out rows only of the tile's valid (token, head) pairs; int64
// offsets.
// Alignment: vector loads need 16-byte aligned rows for f32 (head_dim % 4 == 0 and a 16-byte
// aligned base: checked), 8 for f16 / bf16, 4 for int8 (segments are 4-byte aligned).
// Shared memory (dynamic, f32): Q^T kHdPad x kBlockM, K^T kHdPad x 32, V 32 x kHdPad, P 32 x
// (kBlockM + 4), then 32 int64 offsets and 64 scales: 41.7 KB (head_dim 64), 74.5 KB (128),
// 103.2 KB (256): the larger two opt in with cudaFuncAttributeMaxDynamicSharedMemorySize
// (sm_80 allows 163 KB, sm_90 227 KB).
// Registers: O is kTM x (kHdPad / 8) floats per thread: 32 (64), 64 (128), 64 (256, kTM = 2).
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/paged_attention.cuh"
#include "kernels/cuda/prefill_attention.cuh"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBlockN = 32;

template <int kHdPad>
struct Cfg {
  static constexpr int kBlockM = kHdPad <= 128 ? 64 : 32;
  static constexpr int kTM = kBlockM / 16;  // rows per thread
  static constexpr int kChunks = kHdPad / 32;
  static constexpr int kPStride = kBlockM + 4;
  // Offsets in floats.
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kHdPad * kBlockM;
  static constexpr int kV = kK + kHdPad * kBlockN;
  static constexpr int kP = kV + kBlockN * kHdPad;
  static constexpr int kEnd = kP + kBlockN * kPStride;  // then int64 offsets, k and v scales
  static constexpr size_t kSmemBytes =
      sizeof(float) * kEnd + kBlockN * (sizeof(int64_t) + 2 * sizeof(float));
  static_assert(kEnd % 4 == 0, "16-byte aligned offsets");
};

struct PrefillParams {
  PagedKvGeometry kv;
  const float* q;
  float* out;
  const int32_t* seq_starts;
  const int64_t* start_pos;
  const int32_t* tables;
  int64_t max_blocks;
  int num_heads;
  int group;        // num_heads / num_kv_heads
  int gc;           // heads per tile: min(group, kBlockM)
  int head_chunks;  // ceil(group / gc)
  int tokens_per_tile;
  float scale;
};

template <int N>
__device__ __forceinline__ void LoadShared(const float* p, float* out) {
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x, out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// Elements [d4, d4 + 4) of a row (zeros at and past hd).
template <DType T>
__device__ __forceinline__ void LoadFour(const uint8_t* row, int d4, int hd, bool vec, float* x) {
  if (vec) {
    kv_device::LoadVec<T, 4>(row, d4, x);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = d4 + e < hd ? kv_device::LoadElem<T>(row, d4 + e) : 0.0f;
  }
}

template <int kHdPad, DType T>
__global__ void __launch_bounds__(kThreads) PagedPrefillAttentionKernel(const PrefillParams p) {
  using C = Cfg<kHdPad>;
  constexpr int kBlockM = C::kBlockM;
  constexpr int kTM = C::kTM;
  constexpr int kD4 = kHdPad / 4;
  constexpr bool kI8 = T == DType::kI8;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* q_s = smem + C::kQ;  // [d][row]
  float* k_s = smem + C::kK;  // [d][key]
  float* v_s = smem + C::kV;  // [key][d]
  float* p_s = smem + C::kP;  // [key][row], stride kPStride
  int64_t* koff_s = reinterpret_cast<int64_t*>(smem + C::kEnd);
  float* ks_s = reinterpret_cast<float*>(koff_s + kBlockN);
  float* vs_s = ks_s + kBlockN;
  __shared__ int s_bad;

  const int tid = threadIdx.x;
  const int tx = tid % 8;
  const int ty = tid / 8;
  const int s = blockIdx.z;
  const int kvh = blockIdx.y / p.head_chunks;
  const int hc = blockIdx.y % p.head_chunks;
  const int head0 = kvh * p.group + hc * p.gc;
  const int gcount = min(p.gc, p.group - hc * p.gc);
  const int64_t tok_begin = p.seq_starts[s];
  const int64_t qlen = p.seq_starts[s + 1] - tok_begin;
  const int64_t start = p.start_pos[s];
  const int hd = p.kv.head_dim;
  const int bs = p.kv.block_size;
  const bool vec = hd % 4 == 0;
  const int32_t* table = p.tables + static_cast<int64_t>(s) * p.max_blocks;
  const int64_t v_minus_k = p.kv.v_offset - p.kv.k_offset;

  for (int64_t tile = blockIdx.x; tile * p.tokens_per_tile < qlen; tile += gridDim.x) {
    const int64_t token0 = tile * p.tokens_per_tile;
    const int ntok = static_cast<int>(min(static_cast<int64_t>(p.tokens_per_tile), qlen - token0));
    const int64_t pos0 = start + token0;
    const int64_t kv_len = pos0 + ntok;  // keys of the tile's last token
    // Row r = (token r / gc, head head0 + r % gc) of the tile.
    auto out_row = [&](int r) {
      const int tok = r / p.gc;
      return p.out + ((tok_begin + token0 + tok) * p.num_heads + head0 + (r - tok * p.gc)) * hd;
    };
    auto row_valid = [&](int r) { return r / p.gc < ntok && r % p.gc < gcount; };

    if (start < 0 || (kv_len - 1) / bs >= p.max_blocks) {  // uniform over the CTA
      for (int i = tid; i < kBlockM * hd; i += kThreads) {
        if (row_valid(i / hd)) out_row(i / hd)[i % hd] = kv_device::QuietNaN();
      }
      continue;
    }
    __syncthreads();  // the previous tile is done with shared memory
    if (tid == 0) s_bad = 0;
    for (int idx = tid; idx < kHdPad * kBlockM; idx += kThreads) {
      const int r = idx % kBlockM;
      const int d = idx / kBlockM;
      float v = 0.0f;
      if (d < hd && row_valid(r)) {
        const int tok = r / p.gc;
        v = p.q[((tok_begin + token0 + tok) * p.num_heads + head0 + (r - tok * p.gc)) * hd + d];
      }
      q_s[d * kBlockM + r] = v;
    }

    int64_t qpos[kTM];  // -1: not a row of this tile (sees no key)
    float m[kTM], l[kTM], o[kTM][kHdPad / 8];
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int r = ty * kTM + i;
      qpos[i] = row_valid(r) ? pos0 + r / p.gc : -1;
      m[i] = -INFINITY;
      l[i] = 0.0f;
#pragma unroll
      for (int c = 0; c < kHdPad / 8; ++c) o[i][c] = 0.0f;
    }

    for (int64_t kt0 = 0; kt0 < kv_len; kt0 += kBlockN) {
      __syncthreads();  // Q / s_bad written; the previous key tile's V and P reads are done
      // a. Key rows.
      if (tid < kBlockN) {
        const int64_t j = kt0 + tid;
        int64_t off = -1;
        float ks = 0.0f, vs = 0.0f;
        if (j < kv_len) {
          const int64_t lb = j / bs;
          const int slot = static_cast<int>(j - lb * bs);
          int64_t blk = table[lb];
          if (blk < 0 || blk >= p.kv.num_blocks) {
            s_bad = 1;
            blk = 0;
          }
          off = kv_device::RowOffset(p.kv, p.kv.k_offset, blk, slot, kvh);
          if constexpr (kI8) {
            ks = *kv_device::ScalePtr(p.kv, p.kv.k_offset, blk, slot, kvh);
            vs = *kv_device::ScalePtr(p.kv, p.kv.v_offset, blk, slot, kvh);
          }
        }
        koff_s[tid] = off;
        ks_s[tid] = ks;
        vs_s[tid] = vs;
      }
      __syncthreads();
      // b. K^T and V to shared memory.
      for (int idx = tid; idx < kD4 * kBlockN; idx += kThreads) {
        const int key = idx % kBlockN;  // a warp: 32 keys, conflict-free stores
        const int d4 = idx / kBlockN * 4;
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const int64_t off = koff_s[key];
        if (off >= 0 && d4 < hd) LoadFour<T>(p.kv.base + off, d4, hd, vec, x);
#pragma unroll
        for (int e = 0; e < 4; ++e) k_s[(d4 + e) * kBlockN + key] = x[e];
      }
      for (int idx = tid; idx < kD4 * kBlockN; idx += kThreads) {
        const int key = idx / kD4;
        const int d4 = idx % kD4 * 4;  // a warp: consecutive dims of a row, coalesced
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const int64_t off = koff_s[key];
        if (off >= 0 && d4 < hd) LoadFour<T>(p.kv.base + off + v_minus_k, d4, hd, vec, x);
        *reinterpret_cast<float4*>(&v_s[key * kHdPad + d4]) = make_float4(x[0], x[1], x[2], x[3]);
      }
      __syncthreads();

      // c. Scores.
      float sc[kTM][4];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) sc[i][jj] = 0.0f;
      }
#pragma unroll 4
      for (int d = 0; d < hd; ++d) {
        float qv[kTM], kv[4];
        LoadShared<kTM>(&q_s[d * kBlockM + ty * kTM], qv);
        LoadShared<4>(&k_s[d * kBlockN + tx * 4], kv);
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) sc[i][jj] = fmaf(qv[i], kv[jj], sc[i][jj]);
        }
      }

      // d. Online softmax.
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        float mt = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int key = tx * 4 + jj;
          float x = sc[i][jj];
          if constexpr (kI8) x *= ks_s[key];
          x *= p.scale;
          if (kt0 + key > qpos[i]) x = -INFINITY;
          sc[i][jj] = x;
          mt = fmaxf(mt, x);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 4));
        const float m_new = fmaxf(m[i], mt);
        float alpha = 1.0f;
        if (m_new == -INFINITY) {
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) sc[i][jj] = 0.0f;
        } else {
          alpha = expf(m[i] - m_new);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) sc[i][jj] = expf(sc[i][jj] - m_new);
        }
        m[i] = m_new;
        float li = l[i] * alpha;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) li += sc[i][jj];
        l[i] = li;
#pragma unroll
        for (int c = 0; c < kHdPad / 8; ++c) o[i][c] *= alpha;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int key = tx * 4 + jj;
          float w = sc[i][jj];
          if constexpr (kI8) w *= vs_s[key];
          p_s[key * C::kPStride + ty * kTM + i] = w;
        }
      }
      __syncthreads();

      // e. O += P V.
#pragma unroll 2
      for (int key = 0; key < kBlockN; ++key) {
        float pr[kTM];
        LoadShared<kTM>(&p_s[key * C::kPStride + ty * kTM], pr);
#pragma unroll
        for (int c = 0; c < C::kChunks; ++c) {
          float v[4];
          LoadShared<4>(&v_s[key * kHdPad + c * 32 + tx * 4], v);
#pragma unroll
          for (int i = 0; i < kTM; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[i][c * 4 + e] = fmaf(pr[i], v[e], o[i][c * 4 + e]);
          }
        }
      }
    }

    const bool bad = s_bad != 0;
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      float lt = l[i];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      lt += __shfl_xor_sync(0xffffffffu, lt, 4);
      if (qpos[i] < 0) continue;
      const float inv = bad ? kv_device::QuietNaN() : 1.0f / lt;
      float* orow = out_row(ty * kTM + i);
#pragma unroll
      for (int c = 0; c < C::kChunks; ++c) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = c * 32 + tx * 4 + e;
          if (d < hd) orow[d] = o[i][c * 4 + e] * inv;
        }
      }
    }
  }
}

template <int kHdPad, DType T>
absl::Status Launch(const PrefillParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem = Cfg<kHdPad>::kSmemBytes;
  auto* kernel = &PagedPrefillAttentionKernel<kHdPad, T>;
  if (smem > 48 * 1024) {
    KVR_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <int kHdPad>
absl::Status LaunchDType(DType t, const PrefillParams& p, dim3 grid, cudaStream_t stream) {
  switch (t) {
    case DType::kF32:
      return Launch<kHdPad, DType::kF32>(p, grid, stream);
    case DType::kF16:
      return Launch<kHdPad, DType::kF16>(p, grid, stream);
    case DType::kBF16:
      return Launch<kHdPad, DType::kBF16>(p, grid, stream);
    case DType::kI8:
      return Launch<kHdPad, DType::kI8>(p, grid, stream);
  }
  return absl::InvalidArgumentError("cuda::PagedPrefillAttention: unknown KV dtype");
}

}  // namespace

absl::Status PagedPrefillAttention(const PagedKvView& kv, int layer, const float* q, int num_seqs,
                                   const int32_t* seq_starts, const int64_t* start_positions,
                                   const int32_t* block_tables, int64_t max_blocks_per_seq,
                                   int64_t max_query_len, int num_heads, float scale, float* out,
                                   cudaStream_t stream) {
  constexpr const char* kOp = "cuda::PagedPrefillAttention";
  if (num_seqs < 0 || max_query_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": negative size (num_seqs ", num_seqs,
                                                   ", max_query_len ", max_query_len, ")"));
  }
  PagedKvGeometry g;
  const absl::Status st = ValidateAttentionArgs(kOp, kv, layer, num_heads,
                                                /*has_tokens=*/num_seqs > 0 && max_query_len > 0,
                                                {{"q", q},
                                                 {"seq_starts", seq_starts},
                                                 {"start_positions", start_positions},
                                                 {"block_tables", block_tables},
                                                 {"out", out}},
                                                &g);
  if (!st.ok()) return st;
  if (max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": max_blocks_per_seq ", max_blocks_per_seq, " must be positive"));
  }
  if (num_seqs > kMaxGridBlocks) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": num_seqs ", num_seqs, " > ", kMaxGridBlocks, " per call"));
  }
  if (num_seqs == 0 || max_query_len == 0) return absl::OkStatus();

  PrefillParams p;
  p.kv = g;
  p.q = q;
  p.out = out;
  p.seq_starts = seq_starts;
  p.start_pos = start_positions;
  p.tables = block_tables;
  p.max_blocks = max_blocks_per_seq;
  p.num_heads = num_heads;
  p.group = num_heads / g.num_kv_heads;
  p.scale = scale;
  const int block_m = g.head_dim <= 128 ? Cfg<128>::kBlockM : Cfg<256>::kBlockM;
  p.gc = std::min(p.group, block_m);
  p.head_chunks = (p.group + p.gc - 1) / p.gc;
  p.tokens_per_tile = block_m / p.gc;
  if (static_cast<int64_t>(g.num_kv_heads) * p.head_chunks > kMaxGridBlocks) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": num_heads ", num_heads, " too large for the grid"));
  }
  const int64_t tiles = (max_query_len + p.tokens_per_tile - 1) / p.tokens_per_tile;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, int64_t{1} << 30)),
                  static_cast<unsigned>(g.num_kv_heads * p.head_chunks),
                  static_cast<unsigned>(num_seqs));
  if (g.head_dim <= 64) return LaunchDType<64>(g.dtype, p, grid, stream);
  if (g.head_dim <= 128) return LaunchDType<128>(g.dtype, p, grid, stream);
  return LaunchDType<256>(g.dtype, p, grid, stream);
}

}  // namespace kvrelay::kernels::cuda
