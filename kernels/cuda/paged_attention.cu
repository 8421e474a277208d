// Paged-attention decode (flash-decoding / split-K), one query token per sequence (CPU twin:
// kernels::PagedAttention in kernels/cpu/ops.cc, which it matches within a tolerance: the
// softmax here is split over partitions and CUDA's expf is not libm's).
//
// Kernel 1, PagedAttentionDecodeKernel<kHdPad, T, kRows>: one CTA per (query token t, kv head
// g and a chunk of kRows of its query heads, partition p). kRows = the next power of two of
// the GQA group (1, 2, 4, 8), capped at 8: for ratios up to 8 all query heads of a kv head are
// in one CTA, so each K and V row of the partition is read from global memory once for all of
// them (larger groups take ceil(group / 8) CTAs). Partition p covers keys
// [p * 256, min((p + 1) * 256, position + 1)): kDecodePartitionKeys is fixed, so where a
// partition starts depends only on the position. grid = (n, num_kv_heads * row chunks,
// max partitions); CTAs past their sequence's last partition exit at once.
// Block: kThreads = 64 threads (2 warps) for head_dim <= 64, else 128 (4 warps).
//  1. Scores: warp w takes keys j = j0 + w, j0 + w + kWarps, ... (the block table is read per
//     key: j / block_size, slot j % block_size). The 32 lanes split the head dim (lane l holds
//     elements [l * E, (l + 1) * E), E = kHdPad / 32, loaded as 2- or 4-element vectors when
//     head_dim == kHdPad, else element by element) and keep their slice of the kRows query
//     rows in registers. Each lane forms kRows partial dots (fmaf, in increasing element
//     order), then a fixed "transpose" reduction sums them over the 32 lanes (halving over
//     lane bits 16, 8, ... while more than one row is left, then a butterfly): 9 shuffles for
//     8 rows instead of 40. score = dot (* k scale for int8) * scale, the CPU's order.
//  2. Softmax of the partition: thread i takes row i % kRows and keys i / kRows + k * (kThreads
//     / kRows) (conflict-free, the scores are [key][row] in shared memory); max, then
//     e = expf(s - max) and the sum of e, each reduced over the lanes of a row by a fixed
//     xor tree and over the warps in increasing warp order. e is stored in place of s
//     (times the V scale for int8; the sum is of e alone).
//  3. Weighted sum of V: thread i owns dims i, i + kThreads (< head_dim) of all kRows rows and
//     adds e * v over the partition's keys in increasing key order (coalesced scalar loads:
//     a warp reads 32 consecutive elements of one V row; every V row is read once).
//  One partition (position < 256): out = acc * (1 / sum) directly. Else acc, max and sum go
//  to the workspace [token][head][partition] and kernel 2 merges them.
// Kernel 2, PagedAttentionDecodeReduceKernel: one CTA of 128 threads per (token, head),
// thread i owns dims i, i + 128; for sequences with more than one partition:
// M = max over partitions of their max (exact, any order), then in increasing partition order
// w = expf(m_p - M), L += w * l_p, acc += w * acc_p; out = acc * (1 / L). Every thread computes
// the same L by the same operations.
// Fixed reduction order: every sum above runs in an order fixed by head_dim, the GQA group
// and the token's own position: never by n, max_context, the other sequences, the grid or
// the timing. A token's output is bit-identical alone or in any batch.
// Bounds: keys past position + 1 are never read; the table row is read only below
// ceil((position + 1) / block_size) <= max_blocks_per_seq (checked); block ids are checked
// against [0, num_blocks) (a bad one reads block 0 instead and the token's output is NaN); a
// position outside [0, max_context) gives NaN without reading anything. Offsets are int64.
// Alignment: rows are 16-byte aligned for f32 / f16 / bf16 and 4-byte aligned for int8 when
// head_dim is 64, 128 or 256 and the base is 16-byte aligned (checked on the host): vector
// loads are at most 16 bytes (f32), 8 (f16 / bf16), 4 (int8). Other head dims load scalars.
// Shared memory: static, 256 * kRows scores + 256 key offsets (int64) + 256 V scales (int8
// only) + (kWarps + 2) * kRows reduction floats: at most 11.2 KB (int8, kRows = 8).
// Registers: kRows * E query floats (64 at kRows = 8, head_dim 256) + kRows * ceil(kHdPad /
// kThreads) accumulators; no spills (tools/check-cuda.sh).
// The dot products and weighted sums use explicit fmaf (--fmad=false only stops implicit
// contraction), as the CPU's AVX2 dot_kv / axpy_kv do.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/paged_attention.cuh"

namespace kvrelay::kernels::cuda {

absl::Status MakePagedKvGeometry(const char* op, const PagedKvView& kv, int layer,
                                 PagedKvGeometry* g) {
  const PagedKvLayout& L = kv.layout;
  if (kv.base == nullptr) return absl::InvalidArgumentError(absl::StrCat(op, ": null KV pool"));
  if (L.num_layers <= 0 || L.block_size <= 0 || L.num_kv_heads <= 0 || L.head_dim <= 0 ||
      kv.num_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": bad KV pool (num_layers ", L.num_layers, ", block_size ", L.block_size,
                     ", num_kv_heads ", L.num_kv_heads, ", head_dim ", L.head_dim, ", num_blocks ",
                     kv.num_blocks, "): all must be positive"));
  }
  if (layer < 0 || layer >= L.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": layer ", layer, " outside [0, ", L.num_layers, ")"));
  }
  if (reinterpret_cast<uintptr_t>(kv.base) % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": KV pool base is not 16-byte aligned"));
  }
  g->base = kv.base;
  g->num_blocks = kv.num_blocks;
  g->block_bytes = static_cast<int64_t>(L.block_bytes());
  g->k_offset = static_cast<int64_t>(L.segment_offset(0, layer, 0));
  g->v_offset = static_cast<int64_t>(L.segment_offset(0, layer, 1));
  g->scale_offset = static_cast<int64_t>(L.scale_offset());
  g->row_bytes = static_cast<int64_t>(L.head_dim) * static_cast<int64_t>(L.elem_bytes());
  g->block_size = L.block_size;
  g->num_kv_heads = L.num_kv_heads;
  g->head_dim = L.head_dim;
  g->dtype = L.dtype;
  return absl::OkStatus();
}

absl::Status ValidateAttentionArgs(const char* op, const PagedKvView& kv, int layer, int num_heads,
                                   bool has_tokens, std::initializer_list<NamedPointer> pointers,
                                   PagedKvGeometry* g) {
  absl::Status st = MakePagedKvGeometry(op, kv, layer, g);
  if (!st.ok()) return st;
  if (num_heads <= 0 || num_heads % g->num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": num_heads ", num_heads,
                                                   " is not a positive multiple of num_kv_heads ",
                                                   g->num_kv_heads));
  }
  if (g->head_dim > kMaxAttentionHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": head_dim ", g->head_dim, " > ",
                                                   kMaxAttentionHeadDim, " is not supported"));
  }
  if (!has_tokens) return absl::OkStatus();
  bool all = true;
  for (const NamedPointer& p : pointers) all = all && p.ptr != nullptr;
  if (all) return absl::OkStatus();
  std::string which;
  for (const NamedPointer& p : pointers) {
    absl::StrAppend(&which, which.empty() ? "" : ", ", p.name, p.ptr != nullptr ? " 1" : " 0");
  }
  return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer (", which, ")"));
}

namespace {

constexpr int64_t kP = kDecodePartitionKeys;
constexpr int kReduceThreads = 128;

int64_t NumPartitions(int64_t max_context) { return (max_context + kP - 1) / kP; }

struct DecodeParams {
  PagedKvGeometry kv;
  const float* q;
  const int32_t* tables;
  int64_t max_blocks;
  const int64_t* positions;
  int64_t max_context;
  int num_heads;
  int group;       // num_heads / num_kv_heads
  int row_chunks;  // ceil(group / kRows)
  float scale;
  float* out;
  int64_t max_parts;  // partitions of max_context; the workspace's partition stride
  float* ws_m;        // [n][num_heads][max_parts]
  float* ws_l;        // [n][num_heads][max_parts]
  float* ws_acc;      // [n][num_heads][max_parts][head_dim]
};

// True when the token's position and table row are usable (else its output is NaN).
__device__ __forceinline__ bool PositionOk(const DecodeParams& p, int64_t pos) {
  return pos >= 0 && pos < p.max_context && pos / p.kv.block_size < p.max_blocks;
}

// Sums v[r] (r < R, one partial per lane) over the 32 lanes of a warp. Returns the total of
// row *row in every lane, where *row is given by lane bits 4, 3, ...: first halves the rows
// over lane bits 16, 8, ... (a lane keeps one half and adds its partner's partials of it),
// then sums over the remaining lane bits by a butterfly. The order of additions for each row
// is fixed; lanes holding the same row get the same bits (a + b == b + a).
template <int R>
__device__ __forceinline__ float TransposeReduce(float (&v)[R], int lane, int* row) {
  int r0 = 0;
  int offset = 16;
#pragma unroll
  for (int half = R / 2; half >= 1; half /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
    if (upper) r0 += half;
    offset /= 2;
  }
#pragma unroll
  for (int o = 32 / R / 2; o >= 1; o /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
  *row = r0;
  return v[0];
}

// Threads per decode CTA: two warps for head_dim 64 (one element per thread in step 3), else 4.
template <int kHdPad>
struct DecodeThreads {
  static constexpr int value = kHdPad == 64 ? 64 : 128;
};

template <int kHdPad, DType T, int kRows>
__global__ void __launch_bounds__(DecodeThreads<kHdPad>::value)
    PagedAttentionDecodeKernel(const DecodeParams p) {
  constexpr int kThreads = DecodeThreads<kHdPad>::value;
  constexpr int kWarps = kThreads / 32;
  constexpr int kE = kHdPad / 32;                           // QK elements per lane
  constexpr int kVec = kE < 4 ? kE : 4;                     // elements per vector load
  constexpr int kDpt = (kHdPad + kThreads - 1) / kThreads;  // PV dims per thread
  constexpr bool kI8 = T == DType::kI8;
  static_assert(32 % kRows == 0 && kRows <= 8, "kRows is 1, 2, 4 or 8");

  __shared__ __align__(16) float s_p[kP * kRows];  // scores, then e (* v scale): [key][row]
  __shared__ int64_t s_koff[kP];                   // K row byte offset of each key
  __shared__ float s_vscale[kI8 ? kP : 1];
  __shared__ float s_red[kWarps][kRows];
  __shared__ float s_m[kRows], s_l[kRows];
  __shared__ int s_bad;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t t = blockIdx.x;
  const int kvh = blockIdx.y / p.row_chunks;
  const int chunk = blockIdx.y % p.row_chunks;
  const int head0 = kvh * p.group + chunk * kRows;
  const int rows = min(kRows, p.group - chunk * kRows);
  const int64_t part = blockIdx.z;
  const int hd = p.kv.head_dim;
  const int64_t pos = p.positions[t];
  const int64_t nparts = (pos + kP) / kP;  // partitions of pos + 1 keys

  if (!PositionOk(p, pos)) {
    if (part == 0) {
      for (int i = tid; i < rows * hd; i += kThreads) {
        p.out[(t * p.num_heads + head0 + i / hd) * hd + i % hd] = kv_device::QuietNaN();
      }
    }
    return;
  }
  if (part >= nparts) return;  // uniform over the CTA: before any barrier
  const int64_t j0 = part * kP;
  const int nj = static_cast<int>(min(kP, pos + 1 - j0));
  const int32_t* table = p.tables + t * p.max_blocks;
  if (tid == 0) s_bad = 0;

  // Query rows (zeros past head_dim and for rows past the group).
  const bool vec = hd == kHdPad;
  float qr[kRows][kE];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float* qrow = p.q + (t * p.num_heads + head0 + r) * hd;
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int d = lane * kE + e;
      qr[r][e] = (r < rows && d < hd) ? qrow[d] : 0.0f;
    }
  }
  __syncthreads();  // s_bad

  // 1. Scores.
  for (int jj = warp; jj < nj; jj += kWarps) {
    const int64_t j = j0 + jj;
    const int64_t lb = j / p.kv.block_size;
    const int slot = static_cast<int>(j - lb * p.kv.block_size);
    int64_t blk = table[lb];
    if (blk < 0 || blk >= p.kv.num_blocks) {
      s_bad = 1;
      blk = 0;
    }
    const int64_t koff = kv_device::RowOffset(p.kv, p.kv.k_offset, blk, slot, kvh);
    const uint8_t* krow = p.kv.base + koff;
    float kf[kE];
    if (vec) {
#pragma unroll
      for (int e = 0; e < kE; e += kVec) kv_device::LoadVec<T, kVec>(krow, lane * kE + e, kf + e);
    } else {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const int d = lane * kE + e;
        kf[e] = d < hd ? kv_device::LoadElem<T>(krow, d) : 0.0f;
      }
    }
    float part_dot[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float a = 0.0f;
#pragma unroll
      for (int e = 0; e < kE; ++e) a = fmaf(qr[r][e], kf[e], a);
      part_dot[r] = a;
    }
    int row;
    float s = TransposeReduce<kRows>(part_dot, lane, &row);
    if (lane % (32 / kRows) == 0) {
      if constexpr (kI8) s *= *kv_device::ScalePtr(p.kv, p.kv.k_offset, blk, slot, kvh);
      s *= p.scale;
      s_p[jj * kRows + row] = s;
    }
    if (lane == 0) {
      s_koff[jj] = koff;
      if constexpr (kI8) s_vscale[jj] = *kv_device::ScalePtr(p.kv, p.kv.v_offset, blk, slot, kvh);
    }
  }
  __syncthreads();

  // 2. Softmax of the partition, per row.
  constexpr int kPerRow = kThreads / kRows;  // threads per row
  const int my_row = tid % kRows;
  float m = -INFINITY;
  for (int jj = tid / kRows; jj < nj; jj += kPerRow) m = fmaxf(m, s_p[jj * kRows + my_row]);
#pragma unroll
  for (int o = 16; o >= kRows; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane < kRows) s_red[warp][lane] = m;
  __syncthreads();
  m = s_red[0][my_row];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_red[w][my_row]);
  __syncthreads();  // s_red is reused
  float l = 0.0f;
  for (int jj = tid / kRows; jj < nj; jj += kPerRow) {
    const float e = expf(s_p[jj * kRows + my_row] - m);
    l += e;
    if constexpr (kI8) {
      s_p[jj * kRows + my_row] = e * s_vscale[jj];
    } else {
      s_p[jj * kRows + my_row] = e;
    }
  }
#pragma unroll
  for (int o = 16; o >= kRows; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
  if (lane < kRows) s_red[warp][lane] = l;
  __syncthreads();
  if (tid < kRows) {
    float sum = s_red[0][tid];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += s_red[w][tid];
    s_l[tid] = sum;
    s_m[tid] = m;  // tid < kRows: my_row == tid
  }
  __syncthreads();

  // 3. Weighted sum of V in key order.
  float acc[kRows][kDpt];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int i = 0; i < kDpt; ++i) acc[r][i] = 0.0f;
  }
  const int64_t v_minus_k = p.kv.v_offset - p.kv.k_offset;
#pragma unroll 2
  for (int jj = 0; jj < nj; ++jj) {
    const uint8_t* vrow = p.kv.base + s_koff[jj] + v_minus_k;
    float w[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) w[r] = s_p[jj * kRows + r];
#pragma unroll
    for (int i = 0; i < kDpt; ++i) {
      const int d = tid + i * kThreads;
      if (d < hd) {
        const float v = kv_device::LoadElem<T>(vrow, d);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r][i] = fmaf(w[r], v, acc[r][i]);
      }
    }
  }

  const bool bad = s_bad != 0;
  if (nparts == 1) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const float inv = bad ? kv_device::QuietNaN() : 1.0f / s_l[r];
      float* orow = p.out + (t * p.num_heads + head0 + r) * hd;
#pragma unroll
      for (int i = 0; i < kDpt; ++i) {
        const int d = tid + i * kThreads;
        if (d < hd) orow[d] = acc[r][i] * inv;
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    const int64_t slot = (t * p.num_heads + head0 + r) * p.max_parts + part;
    float* arow = p.ws_acc + slot * hd;
#pragma unroll
    for (int i = 0; i < kDpt; ++i) {
      const int d = tid + i * kThreads;
      if (d < hd) arow[d] = acc[r][i];
    }
    if (tid == 0) {
      p.ws_m[slot] = s_m[r];
      p.ws_l[slot] = bad ? kv_device::QuietNaN() : s_l[r];
    }
  }
}

__global__ void __launch_bounds__(kReduceThreads)
    PagedAttentionDecodeReduceKernel(const DecodeParams p) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int64_t pos = p.positions[t];
  if (!PositionOk(p, pos)) return;  // kernel 1 wrote NaN
  const int64_t nparts = (pos + kP) / kP;
  if (nparts <= 1) return;  // kernel 1 wrote the output
  const int hd = p.kv.head_dim;
  const int64_t base = (t * p.num_heads + h) * p.max_parts;
  float mx = -INFINITY;
  for (int64_t i = 0; i < nparts; ++i) mx = fmaxf(mx, p.ws_m[base + i]);
  constexpr int kDpt = kMaxAttentionHeadDim / kReduceThreads;
  float acc[kDpt] = {};
  float sum = 0.0f;
  for (int64_t i = 0; i < nparts; ++i) {
    const float w = expf(p.ws_m[base + i] - mx);
    sum = fmaf(w, p.ws_l[base + i], sum);
    const float* a = p.ws_acc + (base + i) * hd;
#pragma unroll
    for (int k = 0; k < kDpt; ++k) {
      const int d = threadIdx.x + k * kReduceThreads;
      if (d < hd) acc[k] = fmaf(w, a[d], acc[k]);
    }
  }
  const float inv = 1.0f / sum;
  float* orow = p.out + (t * p.num_heads + h) * hd;
#pragma unroll
  for (int k = 0; k < kDpt; ++k) {
    const int d = threadIdx.x + k * kReduceThreads;
    if (d < hd) orow[d] = acc[k] * inv;
  }
}

template <int kHdPad, DType T, int kRows>
void LaunchDecode(const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  PagedAttentionDecodeKernel<kHdPad, T, kRows>
      <<<grid, DecodeThreads<kHdPad>::value, 0, stream>>>(p);
}

template <int kHdPad, DType T>
void LaunchDecodeRows(int rows, const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  switch (rows) {
    case 1:
      return LaunchDecode<kHdPad, T, 1>(p, grid, stream);
    case 2:
      return LaunchDecode<kHdPad, T, 2>(p, grid, stream);
    case 4:
      return LaunchDecode<kHdPad, T, 4>(p, grid, stream);
    default:
      return LaunchDecode<kHdPad, T, 8>(p, grid, stream);
  }
}

template <int kHdPad>
void LaunchDecodeDType(DType t, int rows, const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  switch (t) {
    case DType::kF32:
      return LaunchDecodeRows<kHdPad, DType::kF32>(rows, p, grid, stream);
    case DType::kF16:
      return LaunchDecodeRows<kHdPad, DType::kF16>(rows, p, grid, stream);
    case DType::kBF16:
      return LaunchDecodeRows<kHdPad, DType::kBF16>(rows, p, grid, stream);
    case DType::kI8:
      return LaunchDecodeRows<kHdPad, DType::kI8>(rows, p, grid, stream);
  }
}

}  // namespace

size_t PagedAttentionDecodeWorkspaceBytes(int64_t n, int num_heads, int head_dim,
                                          int64_t max_context) {
  if (n <= 0 || num_heads <= 0 || head_dim <= 0 || max_context <= kP) return 0;
  return sizeof(float) * static_cast<size_t>(n) * static_cast<size_t>(num_heads) *
         static_cast<size_t>(NumPartitions(max_context)) * (static_cast<size_t>(head_dim) + 2);
}

absl::Status PagedAttentionDecode(const PagedKvView& kv, int layer, const float* q, int64_t n,
                                  const int32_t* block_tables, int64_t max_blocks_per_seq,
                                  const int64_t* positions, int64_t max_context, int num_heads,
                                  float scale, float* out, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  constexpr const char* kOp = "cuda::PagedAttentionDecode";
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat(kOp, ": negative n (", n, ")"));
  PagedKvGeometry g;
  const absl::Status st = ValidateAttentionArgs(
      kOp, kv, layer, num_heads, /*has_tokens=*/n > 0,
      {{"q", q}, {"block_tables", block_tables}, {"positions", positions}, {"out", out}}, &g);
  if (!st.ok()) return st;
  if (max_context <= 0 || NumPartitions(max_context) > kMaxGridBlocks) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": max_context ", max_context,
                                                   " outside [1, ", kMaxGridBlocks * kP, "]"));
  }
  const int64_t blocks_needed = (max_context + g.block_size - 1) / g.block_size;
  if (max_blocks_per_seq < blocks_needed) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": max_blocks_per_seq ", max_blocks_per_seq, " < ", blocks_needed,
                     " blocks of ", g.block_size, " needed for max_context ", max_context));
  }
  if (n == 0) return absl::OkStatus();
  const size_t need = PagedAttentionDecodeWorkspaceBytes(n, num_heads, g.head_dim, max_context);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": workspace of ", workspace == nullptr ? 0 : workspace_bytes, " bytes, ",
                     need, " needed (PagedAttentionDecodeWorkspaceBytes)"));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": n ", n, " > 2^31 - 1"));
  }

  const int group = num_heads / g.num_kv_heads;
  int rows = 1;
  while (rows < group && rows < 8) rows *= 2;
  const int row_chunks = (group + rows - 1) / rows;
  if (num_heads > kMaxGridBlocks ||
      static_cast<int64_t>(g.num_kv_heads) * row_chunks > kMaxGridBlocks) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": num_heads ", num_heads, " too large for the grid"));
  }
  const int64_t max_parts = NumPartitions(max_context);
  DecodeParams p;
  p.kv = g;
  p.q = q;
  p.tables = block_tables;
  p.max_blocks = max_blocks_per_seq;
  p.positions = positions;
  p.max_context = max_context;
  p.num_heads = num_heads;
  p.group = group;
  p.row_chunks = row_chunks;
  p.scale = scale;
  p.out = out;
  p.max_parts = max_parts;
  float* ws = static_cast<float*>(workspace);
  const size_t per = static_cast<size_t>(n) * static_cast<size_t>(num_heads) * max_parts;
  p.ws_m = need > 0 ? ws : nullptr;
  p.ws_l = need > 0 ? ws + per : nullptr;
  p.ws_acc = need > 0 ? ws + 2 * per : nullptr;

  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(g.num_kv_heads * row_chunks),
                  static_cast<unsigned>(max_parts));
  if (g.head_dim <= 64) {
    LaunchDecodeDType<64>(g.dtype, rows, p, grid, stream);
  } else if (g.head_dim <= 128) {
    LaunchDecodeDType<128>(g.dtype, rows, p, grid, stream);
  } else {
    LaunchDecodeDType<256>(g.dtype, rows, p, grid, stream);
  }
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (max_parts > 1) {
    PagedAttentionDecodeReduceKernel<<<dim3(static_cast<unsigned>(n),
                                            static_cast<unsigned>(num_heads)),
                                       kReduceThreads, 0, stream>>>(p);
    KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels::cuda
