#include "kernels/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "kernels/cpu/kernel_tables.h"

namespace kvrelay::kernels {

const char* IsaName(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

bool IsaSupported(Isa isa) {
  if (isa == Isa::kScalar) return true;
#if defined(__x86_64__)
  if (!cpu::kHaveAvx2Table) return false;
  __builtin_cpu_init();
  // clang's __builtin_cpu_supports does not know "f16c": read CPUID leaf 1 ECX.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#else
  return false;
#endif
}

Isa DetectIsa() {
  const char* env = std::getenv("KVRELAY_ISA");
  if (env != nullptr && std::strcmp(env, "scalar") == 0) return Isa::kScalar;
  return IsaSupported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
}

const KernelTable& KernelsFor(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx2 && IsaSupported(Isa::kAvx2)) return cpu::kAvx2Table;
#endif
  return cpu::kScalarTable;
}

namespace {
std::atomic<const KernelTable*> g_active{nullptr};
}  // namespace

const KernelTable& ActiveKernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = &KernelsFor(DetectIsa());
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

bool SetActiveIsa(Isa isa) {
  if (!IsaSupported(isa)) return false;
  g_active.store(&KernelsFor(isa), std::memory_order_release);
  return true;
}

void MatMul(ThreadPool* pool, const float* x, int64_t rows, int64_t in, const void* w, DType wt,
            int64_t out, const float* bias, float* y) {
  const KernelTable& k = ActiveKernels();
  auto body = [&](int64_t o0, int64_t o1) {
    k.matmul(x, rows, in, w, wt, o0, o1, y, out);
    if (bias != nullptr) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = o0; o < o1; ++o) y[r * out + o] += bias[o];
    }
  };
  if (pool == nullptr) {
    body(0, out);
  } else {
    pool->ParallelFor(out, 16, body);
  }
}

void ToF32(const void* src, DType t, int64_t n, float* out) {
  switch (t) {
    case DType::kF32:
      std::memcpy(out, src, sizeof(float) * n);
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = F16ToF32(static_cast<const uint16_t*>(src)[i]);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToF32(static_cast<const uint16_t*>(src)[i]);
      return;
    case DType::kI8:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<const int8_t*>(src)[i];
      return;
  }
}

void EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType et, int64_t dim,
                     float* out) {
  const size_t row = static_cast<size_t>(dim) * DTypeSize(et);
  for (int64_t t = 0; t < n; ++t) {
    ToF32(static_cast<const uint8_t*>(table) + row * ids[t], et, dim, out + t * dim);
  }
}

void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    float* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * w[i];
  }
}

void LayerNorm(const float* x, const float* w, const float* b, int64_t rows, int64_t dim, float eps,
               float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double mean = 0.0;
    for (int64_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= dim;
    double var = 0.0;
    for (int64_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= dim;
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    float* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] - m) * inv * w[i] + b[i];
  }
}

void AddInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void GeluTanh(float* x, int64_t n) {
  constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(kC * (v + 0.044715f * v * v * v)));
  }
}

void GeluErf(float* x, int64_t n) {
  constexpr float kInvSqrt2 = 0.7071067811865476f;
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * kInvSqrt2));
}

void Rope(float* x, int num_heads, int head_dim, int64_t position, const float* inv_freq) {
  const int half = head_dim / 2;
  const float pos = static_cast<float>(position);
  // No fixed-size cos/sin scratch (head_dim is unbounded): each frequency is applied to every
  // head in turn. Same arithmetic per element as computing the tables first.
  for (int i = 0; i < half; ++i) {
    const float angle = pos * inv_freq[i];
    const float c = std::cos(angle);
    const float s = std::sin(angle);
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + static_cast<int64_t>(h) * head_dim;
      const float a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

namespace {

void StoreRow(const float* src, int64_t n, DType t, uint8_t* dst, float* scale) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(dst)[i] = F32ToF16(src[i]);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(dst)[i] = F32ToBf16(src[i]);
      return;
    case DType::kI8: {
      // The scale comes from the finite values; +-inf saturate to +-127 and NaN stores 0
      // (a NaN must never reach the int8 conversion, which would be undefined).
      float amax = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        if (std::isfinite(src[i])) amax = std::max(amax, std::fabs(src[i]));
      }
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      // Divide rather than multiply by 1/s: for tiny amax (< ~3.7e-37) 1/s overflows to inf,
      // which would turn every nonzero element into +-127 and zeros into NaN.
      for (int64_t i = 0; i < n; ++i) {
        const float q = std::isnan(src[i]) ? 0.0f : std::nearbyint(src[i] / s);
        reinterpret_cast<int8_t*>(dst)[i] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
      }
      *scale = s;
      return;
    }
  }
}

}  // namespace

void WriteKv(const PagedKvView& kv, int64_t block, int slot, int layer, const float* k,
             const float* v) {
  const auto& L = kv.layout;
  for (int h = 0; h < L.num_kv_heads; ++h) {
    const int64_t off = static_cast<int64_t>(h) * L.head_dim;
    const bool i8 = L.dtype == DType::kI8;
    StoreRow(k + off, L.head_dim, L.dtype, kv.row(block, layer, 0, slot, h),
             i8 ? kv.scale(block, layer, 0, slot, h) : nullptr);
    StoreRow(v + off, L.head_dim, L.dtype, kv.row(block, layer, 1, slot, h),
             i8 ? kv.scale(block, layer, 1, slot, h) : nullptr);
  }
}

void PagedAttention(ThreadPool* pool, const PagedKvView& kv, int layer, const float* q, int64_t n,
                    const int32_t* const* block_tables, const int64_t* positions, int num_heads,
                    float scale, float* out) {
  const auto& L = kv.layout;
  const KernelTable& k = ActiveKernels();
  const int group = num_heads / L.num_kv_heads;
  const int hd = L.head_dim;
  const int bs = L.block_size;
  const bool i8 = L.dtype == DType::kI8;
  const int64_t stride = static_cast<int64_t>(L.token_bytes());  // slot to slot, same head
  auto body = [&](int64_t b, int64_t e) {
    std::vector<float> scores, weights;
    for (int64_t job = b; job < e; ++job) {
      const int64_t t = job / num_heads;
      const int h = static_cast<int>(job % num_heads);
      const int g = h / group;
      const int64_t len = positions[t] + 1;
      const int32_t* table = block_tables[t];
      const float* qv = q + (t * num_heads + h) * hd;
      scores.resize(len);
      weights.resize(len);
      // Scores, one block (a contiguous run of slots) at a time.
      for (int64_t j0 = 0; j0 < len; j0 += bs) {
        const int64_t blk = table[j0 / bs];
        const int count = static_cast<int>(std::min<int64_t>(bs, len - j0));
        k.dot_kv_rows(qv, kv.row(blk, layer, 0, 0, g), stride, count, L.dtype, hd, &scores[j0]);
        for (int j = 0; j < count; ++j) {
          if (i8) scores[j0 + j] *= *kv.scale(blk, layer, 0, j, g);
          scores[j0 + j] *= scale;
        }
      }
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) mx = std::max(mx, scores[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = std::exp(scores[j] - mx);
        sum += scores[j];
      }
      const float inv = 1.0f / sum;
      float* o = out + (t * num_heads + h) * hd;
      std::fill(o, o + hd, 0.0f);
      for (int64_t j0 = 0; j0 < len; j0 += bs) {
        const int64_t blk = table[j0 / bs];
        const int count = static_cast<int>(std::min<int64_t>(bs, len - j0));
        for (int j = 0; j < count; ++j) {
          float a = scores[j0 + j] * inv;
          if (i8) a *= *kv.scale(blk, layer, 1, j, g);
          weights[j0 + j] = a;
        }
        k.axpy_kv_rows(&weights[j0], kv.row(blk, layer, 1, 0, g), stride, count, L.dtype, hd, o);
      }
    }
  };
  if (pool == nullptr) {
    body(0, n * num_heads);
  } else {
    pool->ParallelFor(n * num_heads, 1, body);
  }
}

}  // namespace kvrelay::kernels
