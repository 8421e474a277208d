// Portable inner loops: the fallback for CPUs without AVX2/FMA/F16C and the
// reference the AVX2 loops are tested against.
#include <cstdint>

#include "kernels/cpu/kernel_tables.h"
#include "kernels/device_math.h"

namespace kvrelay::kernels::cpu {
namespace {

template <DType T>
inline float Load(const void* p, int64_t i) {
  if constexpr (T == DType::kF32) return static_cast<const float*>(p)[i];
  if constexpr (T == DType::kF16) return F16ToF32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (T == DType::kBF16) return Bf16ToF32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (T == DType::kI8) return math::I8KvDequantize(static_cast<const int8_t*>(p)[i]);
  return 0.0f;
}

// 16 partial sums (lane l gets elements i with i % 16 == l), summed pairwise at the end.
template <DType T>
inline float Dot(const float* x, const void* w, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += x[i + l] * Load<T>(w, i + l);
  }
  for (int l = 0; l < 8; ++l) acc[l] += acc[l + 8];
  for (int l = 0; l < 4; ++l) acc[l] += acc[l + 4];
  float s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  for (; i < n; ++i) s += x[i] * Load<T>(w, i);
  return s;
}

template <DType T>
void MatMulT(const float* x, int64_t rows, int64_t in, const void* w, int64_t o0, int64_t o1,
             float* y, int64_t ldy) {
  const size_t esz = DTypeSize(T);
  for (int64_t o = o0; o < o1; ++o) {
    const void* wr = static_cast<const uint8_t*>(w) + static_cast<size_t>(o) * in * esz;
    for (int64_t r = 0; r < rows; ++r) y[r * ldy + o] = Dot<T>(x + r * in, wr, in);
  }
}

void MatMulScalar(const float* x, int64_t rows, int64_t in, const void* w, DType wt, int64_t o0,
                  int64_t o1, float* y, int64_t ldy) {
  return WithDType(
      wt, [&](auto t) { return MatMulT<decltype(t)::value>(x, rows, in, w, o0, o1, y, ldy); });
}

float DotKvScalar(const float* q, const void* k, DType kt, int64_t n) {
  return WithDType(kt, [&](auto t) { return Dot<decltype(t)::value>(q, k, n); });
}

template <DType T>
void AxpyT(float a, const void* v, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] += a * Load<T>(v, i);
}

void AxpyKvScalar(float a, const void* v, DType vt, int64_t n, float* out) {
  return WithDType(vt, [&](auto t) { return AxpyT<decltype(t)::value>(a, v, n, out); });
}

void DotKvRowsScalar(const float* q, const void* k, int64_t stride, int count, DType kt, int64_t n,
                     float* out) {
  for (int j = 0; j < count; ++j)
    out[j] = DotKvScalar(q, static_cast<const uint8_t*>(k) + j * stride, kt, n);
}

void AxpyKvRowsScalar(const float* a, const void* v, int64_t stride, int count, DType vt, int64_t n,
                      float* out) {
  for (int j = 0; j < count; ++j)
    AxpyKvScalar(a[j], static_cast<const uint8_t*>(v) + j * stride, vt, n, out);
}

void DotKvTileScalar(const float* q, int64_t ldq, int rows, const void* k, int64_t stride,
                     int count, DType kt, int64_t n, float* out, int64_t ldo) {
  for (int r = 0; r < rows; ++r)
    DotKvRowsScalar(q + r * ldq, k, stride, count, kt, n, out + r * ldo);
}

}  // namespace

const KernelTable kScalarTable = {Isa::kScalar,    &MatMulScalar,    &DotKvScalar,
                                  &AxpyKvScalar,   &DotKvRowsScalar, &AxpyKvRowsScalar,
                                  &DotKvTileScalar};

}  // namespace kvrelay::kernels::cpu
