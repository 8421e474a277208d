// AVX2 + FMA + F16C inner loops; nothing in them may run unless DetectIsa() found
// those features. With GCC the target is set by a pragma *after* the includes, so the
// header inline functions this file also instantiates (dtype conversions, std::fma …)
// stay baseline x86-64 and a weak copy of them can never smuggle AVX instructions into
// the scalar path. Other compilers get -mavx2 -mfma -mf16c for the file (CMake).
//
// Every dot product uses one 8-lane accumulator (lane l sums elements i % 8 == l in
// order of i), one fixed horizontal reduction and a scalar tail, whichever
// micro-kernel (1 or 4 rows, 1 to 8 outputs) computes it — so a result never depends
// on batch shape. Micro-kernels keep 8-12 independent accumulators in flight.
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

template <DType T>
inline float Tail(const float* x, const void* w, int64_t i, int64_t n, float s) {
  for (; i < n; ++i) s += x[i] * Load1<T>(w, i);
  return s;
}

// R rows of x (length in, contiguous) against O rows of w (`stride` bytes apart,
// starting at wb): y[r * ldy + q] for r < R, q < O.
template <DType T, int R, int O>
__attribute__((noinline)) void Block(const float* x, int64_t in, const uint8_t* wb, size_t stride,
                                     float* y, int64_t ldy) {
  __m256 acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < O; ++q) acc[r][q] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 wv[O];
    for (int q = 0; q < O; ++q) wv[q] = Load8<T>(wb + q * stride, i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * in + i);
      for (int q = 0; q < O; ++q) acc[r][q] = _mm256_fmadd_ps(xv, wv[q], acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < O; ++q)
      y[r * ldy + q] = Tail<T>(x + r * in, wb + q * stride, i, in, Reduce(acc[r][q]));
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
        Block<T, 4, 3>(x + r * in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
      for (; o < t1; ++o) Block<T, 4, 1>(x + r * in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
    }
    for (; r < rows; ++r) {
      int64_t o = t0;
      for (; o + 8 <= t1; o += 8)
        Block<T, 1, 8>(x + r * in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
      for (; o < t1; ++o) Block<T, 1, 1>(x + r * in, in, wb + o * rb, rb, y + r * ldy + o, ldy);
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
  Block<T, 1, 1>(q, n, static_cast<const uint8_t*>(k), 0, &out, 0);
  return out;
}

template <DType T>
void DotRowsT(const float* q, const void* k, int64_t stride, int count, int64_t n, float* out) {
  const uint8_t* kb = static_cast<const uint8_t*>(k);
  int j = 0;
  for (; j + 8 <= count; j += 8) Block<T, 1, 8>(q, n, kb + j * stride, stride, out + j, 0);
  for (; j + 4 <= count; j += 4) Block<T, 1, 4>(q, n, kb + j * stride, stride, out + j, 0);
  for (; j < count; ++j) Block<T, 1, 1>(q, n, kb + j * stride, stride, out + j, 0);
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

// Same per-element arithmetic as `count` successive AxpyT calls, with `out` kept in
// registers across the rows.
template <DType T>
void AxpyRowsT(const float* a, const void* v, int64_t stride, int count, int64_t n, float* out) {
  const uint8_t* vb = static_cast<const uint8_t*>(v);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_loadu_ps(out + i);
    for (int j = 0; j < count; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(a[j]), Load8<T>(vb + j * stride, i), acc);
    _mm256_storeu_ps(out + i, acc);
  }
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

const KernelTable kAvx2Table = {Isa::kAvx2,  &MatMulAvx2,    &DotKvAvx2,
                                &AxpyKvAvx2, &DotKvRowsAvx2, &AxpyKvRowsAvx2};
const bool kHaveAvx2Table = true;

}  // namespace kvrelay::kernels::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
