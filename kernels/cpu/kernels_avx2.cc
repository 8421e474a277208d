// AVX2 + FMA + F16C inner loops; nothing in them may run unless DetectIsa() found
// those features. With GCC the target is set by a pragma *after* the includes, so the
// header inline functions this file also instantiates (dtype conversions, std::fma …)
// stay baseline x86-64 and a weak copy of them can never smuggle AVX instructions into
// the scalar path. Other compilers get -mavx2 -mfma -mf16c for the file (CMake).
//
// Every dot product uses one 8-lane accumulator (lane l sums elements i % 8 == l in
// order of i), one fixed horizontal reduction and a scalar tail, whichever
// micro-kernel (1 or 4 rows, 1 to 8 outputs) computes it — so a result never depends
// on batch shape. Micro-kernels keep 8-12 independent accumulators in flight. Likewise
// every axpy element is one fma per row, rows in order, however the rows are grouped.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernels/cpu/kernel_tables.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace kvrelay::kernels::cpu {
namespace {

template <DType T>
inline __m256 Load8(const void* p, int64_t i) {
  if constexpr (T == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (T == DType::kBF16) {
    __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (T == DType::kF16) {
    __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_cvtph_ps(h);
  } else {
    __m128i b =
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(p) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
}

template <DType T>
inline float Load1(const void* p, int64_t i) {
  if constexpr (T == DType::kF32) return static_cast<const float*>(p)[i];
  if constexpr (T == DType::kF16) return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  if constexpr (T == DType::kBF16) return Bf16ToF32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<float>(static_cast<const int8_t*>(p)[i]);
}

inline float Reduce(__m256 a) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Reduce(a_k) for k < 8 into out[k], with the same additions in the same order (lo + hi,
// then lanes 0 + 2 and 1 + 3, then 0 + 1) done for eight accumulators at once.
// [a.lo + a.hi | b.lo + b.hi] (functions, not lambdas: a lambda does not get the
// pragma's target, and GCC warns that its __m256 return changes the ABI).
inline __m256 Halves(__m256 a, __m256 b) {
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Per 128-bit lane: [x0 + x2, x1 + x3, y0 + y2, y1 + y3]
inline __m256 Pairs(__m256 x, __m256 y) {
  return _mm256_add_ps(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
}

inline void Reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                    __m256 a7, float* out) {
  const __m256 u0 = Pairs(Halves(a0, a4), Halves(a1, a5));  // [a0: 2, a1: 2 | a4: 2, a5: 2]
  const __m256 u1 = Pairs(Halves(a2, a6), Halves(a3, a7));  // [a2: 2, a3: 2 | a6: 2, a7: 2]
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1))));
}

// Reduce(a_k) for k < 4 into out[k] (Reduce8 with each accumulator twice).
inline void Reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float* out) {
  alignas(32) float r[8];
  Reduce8(a0, a1, a2, a3, a0, a1, a2, a3, r);
  for (int k = 0; k < 4; ++k) out[k] = r[k];
}

template <DType T>
inline float Tail(const float* x, const void* w, int64_t i, int64_t n, float s) {
  for (; i < n; ++i) s += x[i] * Load1<T>(w, i);
  return s;
}

// R rows of x (length in, `ldx` floats apart) against O rows of w (`stride` bytes apart,
// starting at wb): y[r * ldy + q] for r < R, q < O.
template <DType T, int R, int O>
__attribute__((noinline)) void Block(const float* x, int64_t ldx, int64_t in, const uint8_t* wb,
                                     size_t stride, float* y, int64_t ldy) {
  __m256 acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < O; ++q) acc[r][q] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 wv[O];
    for (int q = 0; q < O; ++q) wv[q] = Load8<T>(wb + q * stride, i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
      for (int q = 0; q < O; ++q) acc[r][q] = _mm256_fmadd_ps(xv, wv[q], acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < O; ++q)
      y[r * ldy + q] = Tail<T>(x + r * ldx, wb + q * stride, i, in, Reduce(acc[r][q]));
}

template <DType T>
void MatMulT(const float* x, int64_t rows, int64_t in, const void* w, int64_t o0, int64_t o1,
             float* y, int64_t ldy) {
  // Output tiles small enough for their weights to stay in L2 across row groups.
  constexpr int64_t kTile = 48;
  const size_t rb = static_cast<size_t>(in) * DTypeSize(T);
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
    const int64_t t1 = t0 + kTile < o1 ? t0 + kTile : o1;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      int64_t o = t0;
      for (; o + 3 <= t1; o += 3)
        Block<T, 4, 3>(x + r * in, in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
      for (; o < t1; ++o) Block<T, 4, 1>(x + r * in, in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
    }
    for (; r < rows; ++r) {
      int64_t o = t0;
      for (; o + 8 <= t1; o += 8)
        Block<T, 1, 8>(x + r * in, in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
      for (; o < t1; ++o) Block<T, 1, 1>(x + r * in, in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
    }
  }
}

void MatMulAvx2(const float* x, int64_t rows, int64_t in, const void* w, DType wt, int64_t o0,
                int64_t o1, float* y, int64_t ldy) {
  return WithDType(
      wt, [&](auto t) { return MatMulT<decltype(t)::value>(x, rows, in, w, o0, o1, y, ldy); });
}

template <DType T>
float DotT(const float* q, const void* k, int64_t n) {
  float out;
  Block<T, 1, 1>(q, n, n, static_cast<const uint8_t*>(k), 0, &out, 0);
  return out;
}

// Attention's dot products: Block's arithmetic for every (row, key) pair (one 8-lane FMA
// accumulator in order of i, Reduce, Tail), with the horizontal reductions of all R * O
// (4, 8 or 12) accumulators interleaved by Reduce8 / Reduce4.
template <DType T, int R, int O>
__attribute__((noinline)) void DotBlock(const float* x, int64_t ldx, int64_t in, const uint8_t* wb,
                                        size_t stride, float* y, int64_t ldy) {
  static_assert(R * O == 4 || R * O == 8 || R * O == 12, "");
  __m256 acc[R * O];
  for (int a = 0; a < R * O; ++a) acc[a] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 wv[O];
    for (int q = 0; q < O; ++q) wv[q] = Load8<T>(wb + q * stride, i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
      for (int q = 0; q < O; ++q) acc[r * O + q] = _mm256_fmadd_ps(xv, wv[q], acc[r * O + q]);
    }
  }
  float red[R * O];
  if constexpr (R * O == 4) {
    Reduce4(acc[0], acc[1], acc[2], acc[3], red);
  } else {
    Reduce8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7], red);
    if constexpr (R * O == 12) Reduce4(acc[8], acc[9], acc[10], acc[11], red + 8);
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < O; ++q)
      y[r * ldy + q] = Tail<T>(x + r * ldx, wb + q * stride, i, in, red[r * O + q]);
}

template <DType T>
void DotRowsT(const float* q, const void* k, int64_t stride, int count, int64_t n, float* out) {
  const uint8_t* kb = static_cast<const uint8_t*>(k);
  int j = 0;
  for (; j + 8 <= count; j += 8) DotBlock<T, 1, 8>(q, n, n, kb + j * stride, stride, out + j, 0);
  for (; j + 4 <= count; j += 4) DotBlock<T, 1, 4>(q, n, n, kb + j * stride, stride, out + j, 0);
  for (; j < count; ++j) Block<T, 1, 1>(q, n, n, kb + j * stride, stride, out + j, 0);
}

// Query rows in groups of 4 against 3 key rows at a time (12 accumulators, each key vector
// loaded once for 4 queries); leftover rows one at a time. Same per-dot arithmetic as DotT.
template <DType T>
void DotTileT(const float* q, int64_t ldq, int rows, const void* k, int64_t stride, int count,
              int64_t n, float* out, int64_t ldo) {
  const uint8_t* kb = static_cast<const uint8_t*>(k);
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* qr = q + r * ldq;
    float* o = out + r * ldo;
    int j = 0;
    for (; j + 3 <= count; j += 3)
      DotBlock<T, 4, 3>(qr, ldq, n, kb + j * stride, stride, o + j, ldo);
    for (; j < count; ++j) DotBlock<T, 4, 1>(qr, ldq, n, kb + j * stride, stride, o + j, ldo);
  }
  for (; r < rows; ++r) DotRowsT<T>(q + r * ldq, k, stride, count, n, out + r * ldo);
}

void DotKvTileAvx2(const float* q, int64_t ldq, int rows, const void* k, int64_t stride, int count,
                   DType kt, int64_t n, float* out, int64_t ldo) {
  return WithDType(kt, [&](auto t) {
    return DotTileT<decltype(t)::value>(q, ldq, rows, k, stride, count, n, out, ldo);
  });
}

void DotKvRowsAvx2(const float* q, const void* k, int64_t stride, int count, DType kt, int64_t n,
                   float* out) {
  return WithDType(
      kt, [&](auto t) { return DotRowsT<decltype(t)::value>(q, k, stride, count, n, out); });
}

float DotKvAvx2(const float* q, const void* k, DType kt, int64_t n) {
  return WithDType(kt, [&](auto t) { return DotT<decltype(t)::value>(q, k, n); });
}

template <DType T>
void AxpyT(float a, const void* v, int64_t n, float* out) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(va, Load8<T>(v, i), _mm256_loadu_ps(out + i)));
  }
  for (; i < n; ++i) out[i] = std::fma(a, Load1<T>(v, i), out[i]);
}

// out[i, i + 8W) += a[j] * row j for j < count, the W vectors kept in registers across the
// rows (W independent FMA chains).
template <DType T, int W>
inline void AxpyRowsChunk(const float* a, const uint8_t* vb, int64_t stride, int count, int64_t i,
                          float* out) {
  __m256 acc[W];
  for (int c = 0; c < W; ++c) acc[c] = _mm256_loadu_ps(out + i + 8 * c);
  for (int j = 0; j < count; ++j) {
    const __m256 va = _mm256_set1_ps(a[j]);
    const uint8_t* row = vb + j * stride;
    for (int c = 0; c < W; ++c) acc[c] = _mm256_fmadd_ps(va, Load8<T>(row, i + 8 * c), acc[c]);
  }
  for (int c = 0; c < W; ++c) _mm256_storeu_ps(out + i + 8 * c, acc[c]);
}

// Same per-element arithmetic as `count` successive AxpyT calls (one fma per row, rows in
// order), with `out` kept in registers across the rows.
template <DType T>
void AxpyRowsT(const float* a, const void* v, int64_t stride, int count, int64_t n, float* out) {
  const uint8_t* vb = static_cast<const uint8_t*>(v);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) AxpyRowsChunk<T, 8>(a, vb, stride, count, i, out);
  for (; i + 32 <= n; i += 32) AxpyRowsChunk<T, 4>(a, vb, stride, count, i, out);
  for (; i + 8 <= n; i += 8) AxpyRowsChunk<T, 1>(a, vb, stride, count, i, out);
  for (; i < n; ++i) {
    float acc = out[i];
    for (int j = 0; j < count; ++j) acc = std::fma(a[j], Load1<T>(vb + j * stride, i), acc);
    out[i] = acc;
  }
}

void AxpyKvRowsAvx2(const float* a, const void* v, int64_t stride, int count, DType vt, int64_t n,
                    float* out) {
  return WithDType(
      vt, [&](auto t) { return AxpyRowsT<decltype(t)::value>(a, v, stride, count, n, out); });
}

void AxpyKvAvx2(float a, const void* v, DType vt, int64_t n, float* out) {
  return WithDType(vt, [&](auto t) { return AxpyT<decltype(t)::value>(a, v, n, out); });
}

}  // namespace

const KernelTable kAvx2Table = {Isa::kAvx2,     &MatMulAvx2,     &DotKvAvx2,    &AxpyKvAvx2,
                                &DotKvRowsAvx2, &AxpyKvRowsAvx2, &DotKvTileAvx2};
const bool kHaveAvx2Table = true;

}  // namespace kvrelay::kernels::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
