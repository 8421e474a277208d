// RoPE + paged KV write (CPU twins: kernels::Rope and kernels::WriteKv in kernels/cpu/ops.cc,
// called per token by Model::Forward).
//
// Grid/block: one CTA of kThreads = 128 threads (4 warps) per token; CTA b handles tokens
// b, b + gridDim.x, ... (grid = min(n, kMaxBlocks)).
// Per token: the CTA first fills the token's cos / sin table (head_dim / 2 pairs,
// sincosf of math::RopeAngle(float(position), inv_freq[i]): the CPU's angle bit for bit,
// CUDA's cos / sin within 2 ulp of libm's; sincosf rather than cosf + sinf because its
// large-argument reduction stays in registers, no local memory) in shared memory. Then warp w takes
// the rows w, w + 4, ... of [num_heads q heads | num_kv_heads k heads | num_kv_heads v heads] (q
// rows only when rotating; k and v rows only when the block id and slot are valid):
//  - q head: lane l rotates the pairs (x[i], x[i + half]), i = l, l + 32, ..., in place with
//    math::RopeRotatePair (each lane reads and writes only its own pairs);
//  - k head: the same rotation, the result converted to the pool dtype and stored at
//    PagedKvView::row(block, layer, 0, slot, head) (offsets from PagedKvLayout's own functions,
//    see PagedKvGeometry); k itself is not modified;
//  - v head: elements d = l, l + 32, ... converted and stored at row(block, layer, 1, ...).
//  int8 rows take two passes over the row: amax = fold of math::I8KvAbsMaxStep over the lane's
//  values, then over the 32 lanes by an xor butterfly of the same step (max is exact: any
//  order gives the CPU's value), scale = math::I8KvScale(amax) (stored by lane 0), then the
//  values are recomputed (the same operations, the same bits) and stored as
//  math::I8KvQuantize(x, scale). The rotation is recomputed rather than kept in registers, so
//  any head_dim works without local memory.
// Conversions match kernels/dtype.h bit for bit: f16 by __float2half_rn (round to nearest
// even, overflow to inf) with the CPU's NaN (sign | 0x7e00); bf16 by F32ToBf16's own integer
// rounding. Without rotation every stored byte equals the CPU's; with it they differ only
// where CUDA's cos / sin differ from libm's by an ulp.
// Every value depends only on its own token: no cross-token reduction, batch-invariant.
// Bounds: the block id and slot are checked before any pool access (a bad pair writes nothing
// and is counted); rows are guarded by i < half / d < head_dim; offsets are int64.
// Alignment: none beyond the element's own (scalar loads and stores; any head_dim, any ld).
// Shared memory: dynamic, head_dim floats (cos then sin) when rotating, else none.
// Compiled with --fmad=false: the rotation is the CPU's multiply-then-add arithmetic.
#include <cuda_fp16.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/paged_attention.cuh"
#include "kernels/cuda/rope_kv.cuh"
#include "kernels/device_math.h"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int kMaxRopeHeadDim = 4096;

struct RopeKvParams {
  PagedKvGeometry kv;
  int64_t n;
  float* q;
  int64_t ldq;
  int num_heads;
  const float* k;
  int64_t ldk;
  const float* v;
  int64_t ldv;
  const int64_t* positions;
  const int32_t* block_ids;
  const int32_t* slots;
  const float* inv_freq;  // null: no rotation
  int32_t* num_bad;
};

// kernels::F32ToF16 (kernels/dtype.cc): round to nearest even, overflow to inf, NaN ->
// sign | 0x7e00.
__device__ __forceinline__ uint16_t ToF16(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7e00u);
  return __half_as_ushort(__float2half_rn(x));
}
// kernels::F32ToBf16 (kernels/dtype.h), the same integer arithmetic.
__device__ __forceinline__ uint16_t ToBf16(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

template <DType T>
__device__ __forceinline__ void Store(uint8_t* row, int d, float x) {
  if constexpr (T == DType::kF32) {
    reinterpret_cast<float*>(row)[d] = x;
  } else if constexpr (T == DType::kF16) {
    reinterpret_cast<uint16_t*>(row)[d] = ToF16(x);
  } else {
    static_assert(T == DType::kBF16, "int8 rows are stored by StoreRow");
    reinterpret_cast<uint16_t*>(row)[d] = ToBf16(x);
  }
}

// Calls fn(d, x) for the row's values that this lane owns: the rotated pairs i, i + half
// (i = lane, lane + 32, ...) when cs is set, else the elements d = lane, lane + 32, ...
template <typename Fn>
__device__ __forceinline__ void ForEachValue(const float* src, int hd, const float* cs, int lane,
                                             Fn&& fn) {
  if (cs != nullptr) {
    const int half = hd / 2;
    for (int i = lane; i < half; i += 32) {
      float a, b;
      math::RopeRotatePair(src[i], src[i + half], cs[i], cs[half + i], &a, &b);
      fn(i, a);
      fn(i + half, b);
    }
  } else {
    for (int d = lane; d < hd; d += 32) fn(d, src[d]);
  }
}

// One (token, kv head) row of K or V into the pool: WriteKv's StoreRow.
template <DType T>
__device__ __forceinline__ void StoreRow(const float* src, int hd, const float* cs, int lane,
                                         uint8_t* dst, float* scale) {
  if constexpr (T == DType::kI8) {
    float amax = 0.0f;
    ForEachValue(src, hd, cs, lane, [&](int, float x) { amax = math::I8KvAbsMaxStep(amax, x); });
#pragma unroll
    for (int o = 16; o >= 1; o /= 2) {
      amax = math::I8KvAbsMaxStep(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    }
    const float s = math::I8KvScale(amax);
    if (lane == 0) *scale = s;
    int8_t* out = reinterpret_cast<int8_t*>(dst);
    ForEachValue(src, hd, cs, lane, [&](int d, float x) { out[d] = math::I8KvQuantize(x, s); });
  } else {
    ForEachValue(src, hd, cs, lane, [&](int d, float x) { Store<T>(dst, d, x); });
  }
}

template <DType T>
__global__ void __launch_bounds__(kThreads) RopeWriteKvKernel(const RopeKvParams p) {
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int hd = p.kv.head_dim;
  const int half = hd / 2;
  const int nkv = p.kv.num_kv_heads;
  const bool rope = p.inv_freq != nullptr;
  const float* table = rope ? cs : nullptr;
  for (int64_t t = blockIdx.x; t < p.n; t += gridDim.x) {
    if (rope) {
      const float pos = static_cast<float>(p.positions[t]);
      for (int i = tid; i < half; i += kThreads) {
        const float angle = math::RopeAngle(pos, p.inv_freq[i]);
        float c, sn;
        sincosf(angle, &sn, &c);
        cs[i] = c;
        cs[half + i] = sn;
      }
    }
    __syncthreads();
    const int64_t blk = p.block_ids[t];
    const int slot = p.slots[t];
    const bool ok = blk >= 0 && blk < p.kv.num_blocks && slot >= 0 && slot < p.kv.block_size;
    if (!ok && tid == 0 && p.num_bad != nullptr) atomicAdd(p.num_bad, 1);
    const int qrows = rope ? p.num_heads : 0;
    const int rows = qrows + (ok ? 2 * nkv : 0);
    for (int r = warp; r < rows; r += kWarps) {
      if (r < qrows) {
        float* x = p.q + t * p.ldq + static_cast<int64_t>(r) * hd;
        for (int i = lane; i < half; i += 32) {
          math::RopeRotatePair(x[i], x[i + half], cs[i], cs[half + i], &x[i], &x[i + half]);
        }
        continue;
      }
      const int kvsel = (r - qrows) / nkv;  // 0: K, 1: V
      const int h = (r - qrows) - kvsel * nkv;
      const int64_t seg = kvsel == 0 ? p.kv.k_offset : p.kv.v_offset;
      const float* src = kvsel == 0 ? p.k + t * p.ldk + static_cast<int64_t>(h) * hd
                                    : p.v + t * p.ldv + static_cast<int64_t>(h) * hd;
      uint8_t* dst = p.kv.base + kv_device::RowOffset(p.kv, seg, blk, slot, h);
      StoreRow<T>(src, hd, kvsel == 0 ? table : nullptr, lane, dst,
                  kv_device::ScalePtr(p.kv, seg, blk, slot, h));
    }
    __syncthreads();  // the cos / sin table is refilled for the next token
  }
}

}  // namespace

absl::Status RopeWriteKv(const PagedKvView& kv, int layer, int64_t n, float* q, int64_t ldq,
                         int num_heads, const float* k, int64_t ldk, const float* v, int64_t ldv,
                         const int64_t* positions, const int32_t* block_ids, const int32_t* slots,
                         const float* inv_freq, int32_t* num_bad, cudaStream_t stream) {
  constexpr const char* kOp = "cuda::RopeWriteKv";
  if (n < 0 || num_heads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": negative size (n ", n, ", num_heads ", num_heads, ")"));
  }
  PagedKvGeometry g;
  absl::Status st = MakePagedKvGeometry(kOp, kv, layer, &g);
  if (!st.ok()) return st;
  const bool rope = inv_freq != nullptr;
  if (g.head_dim > kMaxRopeHeadDim || (rope && g.head_dim % 2 != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": head_dim ", g.head_dim,
                                                   rope ? " must be even and" : " must be",
                                                   " <= ", kMaxRopeHeadDim));
  }
  const int64_t kv_width = static_cast<int64_t>(g.num_kv_heads) * g.head_dim;
  const int64_t q_width = static_cast<int64_t>(num_heads) * g.head_dim;
  if (ldk < kv_width || ldv < kv_width || (rope && ldq < q_width)) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": row stride below the row width (ldq ",
                                                   ldq, " for ", q_width, ", ldk ", ldk,
                                                   " and ldv ", ldv, " for ", kv_width, ")"));
  }
  if (n == 0) return absl::OkStatus();
  if (k == nullptr || v == nullptr || positions == nullptr || block_ids == nullptr ||
      slots == nullptr || (rope && num_heads > 0 && q == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": null pointer (q ", q != nullptr, ", k ", k != nullptr, ", v ",
                     v != nullptr, ", positions ", positions != nullptr, ", block_ids ",
                     block_ids != nullptr, ", slots ", slots != nullptr, ")"));
  }
  RopeKvParams p;
  p.kv = g;
  p.n = n;
  p.q = q;
  p.ldq = ldq;
  p.num_heads = num_heads;
  p.k = k;
  p.ldk = ldk;
  p.v = v;
  p.ldv = ldv;
  p.positions = positions;
  p.block_ids = block_ids;
  p.slots = slots;
  p.inv_freq = inv_freq;
  p.num_bad = num_bad;
  const unsigned blocks = static_cast<unsigned>(std::min(n, kMaxBlocks));
  const size_t smem = rope ? sizeof(float) * g.head_dim : 0;
  switch (g.dtype) {
    case DType::kF32:
      RopeWriteKvKernel<DType::kF32><<<blocks, kThreads, smem, stream>>>(p);
      break;
    case DType::kF16:
      RopeWriteKvKernel<DType::kF16><<<blocks, kThreads, smem, stream>>>(p);
      break;
    case DType::kBF16:
      RopeWriteKvKernel<DType::kBF16><<<blocks, kThreads, smem, stream>>>(p);
      break;
    case DType::kI8:
      RopeWriteKvKernel<DType::kI8><<<blocks, kThreads, smem, stream>>>(p);
      break;
  }
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels::cuda
