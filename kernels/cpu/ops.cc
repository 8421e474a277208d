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
#include "kernels/device_math.h"

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
    for (int64_t i = 0; i < dim; ++i) ss += math::RmsNormSquare(xr[i]);
    const float inv = math::RmsNormInvRms(ss, dim, eps);
    float* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = math::RmsNormApply(xr[i], inv, w[i]);
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
    for (int64_t i = 0; i < dim; ++i) var += math::LayerNormSquaredDeviation(xr[i], mean);
    var /= dim;
    const float inv = math::LayerNormInvStd(var, eps);
    const float m = static_cast<float>(mean);
    float* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = math::LayerNormApply(xr[i], m, inv, w[i], b[i]);
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
    for (int64_t i = 0; i < inter; ++i) o[i] = math::SiluMul(g[i], u[i]);
  }
}

void GeluTanh(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = math::GeluTanh(x[i]);
}

void GeluErf(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = math::GeluErf(x[i]);
}

void Rope(float* x, int num_heads, int head_dim, int64_t position, const float* inv_freq) {
  const int half = head_dim / 2;
  const float pos = static_cast<float>(position);
  // No fixed-size cos/sin scratch (head_dim is unbounded): each frequency is applied to every
  // head in turn. Same arithmetic per element as computing the tables first.
  for (int i = 0; i < half; ++i) {
    const float angle = math::RopeAngle(pos, inv_freq[i]);
    const float c = std::cos(angle);
    const float s = std::sin(angle);
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + static_cast<int64_t>(h) * head_dim;
      math::RopeRotatePair(v[i], v[i + half], c, s, &v[i], &v[i + half]);
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
      // (see kernels/device_math.h).
      float amax = 0.0f;
      for (int64_t i = 0; i < n; ++i) amax = math::I8KvAbsMaxStep(amax, src[i]);
      const float s = math::I8KvScale(amax);
      for (int64_t i = 0; i < n; ++i)
        reinterpret_cast<int8_t*>(dst)[i] = math::I8KvQuantize(src[i], s);
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

namespace {

// Query rows (token, head) per attention tile: K/V blocks are read once per tile, and the
// tile's scores (rows x context floats) should stay in L2.
constexpr int kAttnTileRows = 32;

// The largest of s[0, n) that is not NaN (-inf if none): the value of the sequential fold
// mx = std::max(mx, s[j]) from mx = -inf, computed in 8 independent lanes (max is exact, so
// the grouping cannot change the value; only the sign of a zero maximum may differ, and
// exp(s[j] - mx) is the same for mx = +0 and -0).
inline float MaxOf(const float* s, int64_t n) {
  float m[8];
  for (float& x : m) x = -INFINITY;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) m[l] = std::max(m[l], s[j + l]);
  float mx = -INFINITY;
  for (float x : m) mx = std::max(mx, x);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

struct AttnArgs {
  const PagedKvView* kv;
  int layer;
  const float* q;
  const int32_t* const* block_tables;
  const int64_t* positions;
  int num_heads;
  float scale;
  float* out;
};

// Attention of query tokens [t0, t1) (one block table) for the query heads of kv head g.
// Row r = (t0 + r / group, g * group + r % group). Per row, exactly the operations of
// attending it alone: scores in key order (dot, int8 scale, softmax scale), max, exp and sum
// in key order, then the weighted sum of V in key order, one block at a time. Only the loops
// are interchanged (key block outside, rows inside) so each block is loaded once per tile.
struct AttnTile {
  std::vector<float> qbuf, scores, weights;
  std::vector<int64_t> len;
  std::vector<float> inv;

  void Run(const KernelTable& k, const AttnArgs& a, int64_t t0, int64_t t1, int g) {
    const PagedKvView& kv = *a.kv;
    const auto& L = kv.layout;
    const int group = a.num_heads / L.num_kv_heads;
    const int hd = L.head_dim;
    const int bs = L.block_size;
    const bool i8 = L.dtype == DType::kI8;
    const int nkv = L.num_kv_heads;
    const int64_t stride = static_cast<int64_t>(L.token_bytes());  // slot to slot, same head
    const int rows = static_cast<int>(t1 - t0) * group;
    const int32_t* table = a.block_tables[t0];

    // Query rows side by side, and each row's context length.
    qbuf.resize(static_cast<size_t>(rows) * hd);
    len.resize(rows);
    int64_t max_len = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int r0 = static_cast<int>(t - t0) * group;
      std::memcpy(&qbuf[static_cast<size_t>(r0) * hd], a.q + (t * a.num_heads + g * group) * hd,
                  sizeof(float) * group * hd);
      for (int i = 0; i < group; ++i) len[r0 + i] = a.positions[t] + 1;
      max_len = std::max(max_len, a.positions[t] + 1);
    }
    const int64_t ld = max_len;  // scores row stride
    scores.resize(static_cast<size_t>(rows) * ld);
    weights.resize(bs);
    inv.resize(rows);
    // Keys of block [j0, j0 + bs) that row r sees (<= 0: none).
    auto count = [&](int r, int64_t j0) {
      return static_cast<int>(std::min<int64_t>(bs, len[r] - j0));
    };

    // Scores, one block at a time for all rows: runs of rows that see the same number of
    // keys of the block go to the tile kernel together.
    for (int64_t j0 = 0; j0 < max_len; j0 += bs) {
      const int64_t blk = table[j0 / bs];
      const uint8_t* kb = kv.row(blk, a.layer, 0, 0, g);
      for (int r = 0; r < rows;) {
        const int c = count(r, j0);
        int r1 = r + 1;
        while (r1 < rows && count(r1, j0) == c) ++r1;
        if (c > 0) {
          k.dot_kv_tile(&qbuf[static_cast<size_t>(r) * hd], hd, r1 - r, kb, stride, c, L.dtype, hd,
                        &scores[r * ld + j0], ld);
          for (int i = r; i < r1; ++i) {
            float* s = &scores[i * ld + j0];
            if (i8) {
              const float* ks = kv.scale(blk, a.layer, 0, 0, g);  // slot j at ks[j * nkv]
              for (int j = 0; j < c; ++j) s[j] *= ks[j * nkv];
            }
            for (int j = 0; j < c; ++j) s[j] *= a.scale;
          }
        }
        r = r1;
      }
    }
    // Softmax of each row over its own keys.
    for (int r = 0; r < rows; ++r) {
      float* s = &scores[r * ld];
      const int64_t n = len[r];
      const float mx = MaxOf(s, n);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      inv[r] = 1.0f / sum;
    }
    // Weighted sum of V, one block at a time for all rows.
    auto out_row = [&](int r) {
      const int64_t t = t0 + r / group;
      return a.out + (t * a.num_heads + g * group + r % group) * hd;
    };
    for (int r = 0; r < rows; ++r) std::fill(out_row(r), out_row(r) + hd, 0.0f);
    for (int64_t j0 = 0; j0 < max_len; j0 += bs) {
      const int64_t blk = table[j0 / bs];
      const uint8_t* vb = kv.row(blk, a.layer, 1, 0, g);
      for (int r = 0; r < rows; ++r) {
        const int c = count(r, j0);
        if (c <= 0) continue;
        const float* s = &scores[r * ld + j0];
        for (int j = 0; j < c; ++j) weights[j] = s[j] * inv[r];
        if (i8) {
          const float* vs = kv.scale(blk, a.layer, 1, 0, g);
          for (int j = 0; j < c; ++j) weights[j] *= vs[j * nkv];
        }
        k.axpy_kv_rows(weights.data(), vb, stride, c, L.dtype, hd, out_row(r));
      }
    }
  }
};

}  // namespace

void PagedAttention(ThreadPool* pool, const PagedKvView& kv, int layer, const float* q, int64_t n,
                    const int32_t* const* block_tables, const int64_t* positions, int num_heads,
                    float scale, float* out) {
  const KernelTable& k = ActiveKernels();
  const int nkv = kv.layout.num_kv_heads;
  const int group = num_heads / nkv;
  const int64_t max_tokens = std::max(1, kAttnTileRows / group);
  // Tiles: runs of consecutive tokens with the same block table, each run cut into
  // near-equal tiles of at most max_tokens tokens. The tiling never changes a result.
  std::vector<int64_t> tiles;  // tile i is tokens [tiles[i], tiles[i + 1])
  for (int64_t t = 0; t < n;) {
    int64_t e = t + 1;
    while (e < n && block_tables[e] == block_tables[t]) ++e;
    const int64_t pieces = (e - t + max_tokens - 1) / max_tokens;
    for (int64_t p = 0; p < pieces; ++p) tiles.push_back(t + (e - t) * p / pieces);
    t = e;
  }
  tiles.push_back(n);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()) - 1;
  const AttnArgs args{&kv, layer, q, block_tables, positions, num_heads, scale, out};
  auto body = [&](int64_t b, int64_t e) {
    AttnTile tile;
    for (int64_t job = b; job < e; ++job) {
      const int64_t i = job / nkv;
      tile.Run(k, args, tiles[i], tiles[i + 1], static_cast<int>(job % nkv));
    }
  };
  if (pool == nullptr) {
    body(0, num_tiles * nkv);
  } else {
    pool->ParallelFor(num_tiles * nkv, 1, body);
  }
}

}  // namespace kvrelay::kernels
