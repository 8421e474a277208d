// Tests for the CPU ops (kernels/ops.h) on every ISA this CPU supports, the per-ISA inner-loop
// tables, the paged KV layout (kernels/paged_kv.h) and the determinism contract (DESIGN §6):
// an output element never depends on batch shape, chunking or thread count.
#include "kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "kernels/paged_kv.h"
#include "kernels/thread_pool.h"

namespace kvrelay::kernels {

// Readable parameter values in test names and messages ("scalar"/"avx2").
void PrintTo(Isa isa, std::ostream* os) { *os << IsaName(isa); }

namespace {

// ---------------------------------------------------------------------------- helpers

std::vector<float> RandVec(std::mt19937& rng, int64_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

uint16_t ToHalf(float f, DType t) { return t == DType::kF16 ? F32ToF16(f) : F32ToBf16(f); }
float FromHalf(uint16_t h, DType t) { return t == DType::kF16 ? F16ToF32(h) : Bf16ToF32(h); }

// A tensor stored in dtype `t`, plus its exact f32 value (what the kernels actually see).
struct Stored {
  DType dtype;
  std::vector<uint8_t> bytes;
  std::vector<float> value;
  const void* data() const { return bytes.data(); }
};

Stored Store(const std::vector<float>& v, DType t) {
  Stored s{t, std::vector<uint8_t>(v.size() * DTypeSize(t)), std::vector<float>(v.size())};
  for (size_t i = 0; i < v.size(); ++i) {
    switch (t) {
      case DType::kF32:
        std::memcpy(s.bytes.data() + 4 * i, &v[i], 4);
        s.value[i] = v[i];
        break;
      case DType::kF16:
      case DType::kBF16: {
        const uint16_t h = ToHalf(v[i], t);
        std::memcpy(s.bytes.data() + 2 * i, &h, 2);
        s.value[i] = FromHalf(h, t);
        break;
      }
      case DType::kI8: {  // raw integers (the tables take int8 unscaled)
        const int8_t q =
            static_cast<int8_t>(std::lround(std::clamp(v[i] * 127.0f, -127.0f, 127.0f)));
        s.bytes[i] = static_cast<uint8_t>(q);
        s.value[i] = q;
        break;
      }
    }
  }
  return s;
}

Stored RandStored(std::mt19937& rng, int64_t n, DType t) { return Store(RandVec(rng, n), t); }

bool BitEqual(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, sizeof(float) * static_cast<size_t>(n)) == 0;
}

// Index of the first differing float, or -1.
int64_t FirstDiff(const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(a + i, b + i, sizeof(float)) != 0) return i;
  return -1;
}

// Sets the active ISA for a test and restores the previous one afterwards.
class OpsIsaTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!IsaSupported(GetParam())) {
      GTEST_SKIP() << "ISA " << IsaName(GetParam()) << " is not supported by this CPU/build";
    }
    prev_ = ActiveKernels().isa;
    ASSERT_TRUE(SetActiveIsa(GetParam()));
    restore_ = true;
    ASSERT_EQ(ActiveKernels().isa, GetParam());
  }
  void TearDown() override {
    if (restore_) SetActiveIsa(prev_);
  }

 private:
  Isa prev_ = Isa::kScalar;
  bool restore_ = false;
};

std::string IsaParamName(const ::testing::TestParamInfo<Isa>& info) { return IsaName(info.param); }

#define KVRELAY_INSTANTIATE_ISA(Suite) \
  INSTANTIATE_TEST_SUITE_P(Isa, Suite, ::testing::Values(Isa::kScalar, Isa::kAvx2), IsaParamName)

// Pools shared by the tests (creating threads per case is slow).
ThreadPool* Pool(int threads) {
  static ThreadPool* pools[9] = {};
  if (pools[threads] == nullptr) pools[threads] = new ThreadPool(threads);
  return pools[threads];
}

// ---------------------------------------------------------------------------- dispatch

TEST(OpsDispatchTest, TablesAndActiveIsa) {
  EXPECT_TRUE(IsaSupported(Isa::kScalar));
  EXPECT_EQ(KernelsFor(Isa::kScalar).isa, Isa::kScalar);
  EXPECT_STREQ(IsaName(Isa::kScalar), "scalar");
  EXPECT_STREQ(IsaName(Isa::kAvx2), "avx2");
  const Isa prev = ActiveKernels().isa;
  ASSERT_TRUE(SetActiveIsa(Isa::kScalar));
  EXPECT_EQ(ActiveKernels().isa, Isa::kScalar);
  if (IsaSupported(Isa::kAvx2)) {
    EXPECT_EQ(KernelsFor(Isa::kAvx2).isa, Isa::kAvx2);
    ASSERT_TRUE(SetActiveIsa(Isa::kAvx2));
    EXPECT_EQ(ActiveKernels().isa, Isa::kAvx2);
  } else {
    EXPECT_FALSE(SetActiveIsa(Isa::kAvx2));
    EXPECT_EQ(ActiveKernels().isa, Isa::kScalar);  // unchanged
    EXPECT_EQ(KernelsFor(Isa::kAvx2).isa, Isa::kScalar);
  }
  SetActiveIsa(prev);
}

TEST(OpsDispatchTest, DetectIsaHonoursScalarOverride) {
  const char* old = std::getenv("KVRELAY_ISA");
  const std::string saved = old ? old : "";
  setenv("KVRELAY_ISA", "scalar", 1);
  EXPECT_EQ(DetectIsa(), Isa::kScalar);
  unsetenv("KVRELAY_ISA");
  EXPECT_EQ(DetectIsa(), IsaSupported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar);
  if (old) setenv("KVRELAY_ISA", saved.c_str(), 1);
}

// ---------------------------------------------------------------------------- MatMul

// y[r][o] = sum_i x[r][i] w[o][i] (+ b[o]) in double; also returns sum |x w| per element, the
// scale of the rounding error of any summation order.
void RefMatMul(const std::vector<float>& x, int64_t rows, int64_t in, const std::vector<float>& w,
               int64_t out, const float* bias, std::vector<double>* y, std::vector<double>* mag) {
  y->assign(static_cast<size_t>(rows * out), 0.0);
  mag->assign(static_cast<size_t>(rows * out), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double s = 0, m = 0;
      for (int64_t i = 0; i < in; ++i) {
        const double p = static_cast<double>(x[r * in + i]) * w[o * in + i];
        s += p;
        m += std::fabs(p);
      }
      if (bias) {
        s += bias[o];
        m += std::fabs(bias[o]);
      }
      (*y)[r * out + o] = s;
      (*mag)[r * out + o] = m;
    }
  }
}

class OpsMatMulTest : public OpsIsaTest {};

TEST_P(OpsMatMulTest, MatchesDoubleReference) {
  std::mt19937 rng(42);
  const DType wts[] = {DType::kF32, DType::kF16, DType::kBF16};
  ThreadPool* pools[] = {nullptr, Pool(1), Pool(2), Pool(3)};
  for (DType wt : wts) {
    for (int64_t in : {1, 7, 15, 16, 17, 100, 1024}) {
      for (int64_t out : {1, 3, 5, 33, 257}) {
        const Stored w = RandStored(rng, out * in, wt);
        const std::vector<float> bias = RandVec(rng, out);
        for (int64_t rows = 1; rows <= 9; ++rows) {
          const std::vector<float> x = RandVec(rng, rows * in);
          for (bool with_bias : {false, true}) {
            std::vector<double> ref, mag;
            RefMatMul(x, rows, in, w.value, out, with_bias ? bias.data() : nullptr, &ref, &mag);
            for (ThreadPool* pool : pools) {
              std::vector<float> y(static_cast<size_t>(rows * out), NAN);
              MatMul(pool, x.data(), rows, in, w.data(), wt, out, with_bias ? bias.data() : nullptr,
                     y.data());
              for (size_t e = 0; e < y.size(); ++e) {
                ASSERT_NEAR(y[e], ref[e], 1e-4 * mag[e] + 1e-6)
                    << "dtype=" << DTypeName(wt) << " in=" << in << " out=" << out
                    << " rows=" << rows << " bias=" << with_bias
                    << " threads=" << (pool ? pool->num_threads() : 0) << " elem=" << e;
              }
            }
          }
        }
      }
    }
  }
}

// The key determinism property: a row's result does not depend on what else is in the batch,
// how the batch is grouped, or how many threads split the outputs.
TEST_P(OpsMatMulTest, BatchInvariantBitIdentical) {
  std::mt19937 rng(7);
  constexpr int64_t kRows = 13;
  for (DType wt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t in : {1, 9, 16, 17, 100, 1024}) {
      for (int64_t out : {1, 5, 33, 67, 257}) {
        const Stored w = RandStored(rng, out * in, wt);
        const std::vector<float> x = RandVec(rng, kRows * in, -2.0f, 2.0f);
        const std::vector<float> bias = RandVec(rng, out);
        for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
          const std::string what = std::string("dtype=") + DTypeName(wt) +
                                   " in=" + std::to_string(in) + " out=" + std::to_string(out) +
                                   " bias=" + (b ? "1" : "0");
          std::vector<float> full(kRows * out);
          MatMul(nullptr, x.data(), kRows, in, w.data(), wt, out, b, full.data());
          // One row at a time.
          for (int64_t r = 0; r < kRows; ++r) {
            std::vector<float> one(out);
            MatMul(nullptr, x.data() + r * in, 1, in, w.data(), wt, out, b, one.data());
            ASSERT_TRUE(BitEqual(one.data(), full.data() + r * out, out))
                << what << " row " << r << " alone differs at "
                << FirstDiff(one.data(), full.data() + r * out, out);
          }
          // Groups of 4 and 5 (last group shorter), at every thread count.
          for (int64_t group : {4, 5}) {
            for (int threads : {0, 1, 2, 3, 8}) {
              std::vector<float> grouped(kRows * out, NAN);
              for (int64_t r0 = 0; r0 < kRows; r0 += group) {
                const int64_t n = std::min(group, kRows - r0);
                MatMul(threads ? Pool(threads) : nullptr, x.data() + r0 * in, n, in, w.data(), wt,
                       out, b, grouped.data() + r0 * out);
              }
              ASSERT_TRUE(BitEqual(grouped.data(), full.data(), kRows * out))
                  << what << " group=" << group << " threads=" << threads << " first diff at "
                  << FirstDiff(grouped.data(), full.data(), kRows * out);
            }
          }
          // Whole batch at every thread count.
          for (int threads : {1, 2, 3, 8}) {
            std::vector<float> par(kRows * out, NAN);
            MatMul(Pool(threads), x.data(), kRows, in, w.data(), wt, out, b, par.data());
            ASSERT_TRUE(BitEqual(par.data(), full.data(), kRows * out))
                << what << " threads=" << threads;
          }
        }
      }
    }
  }
}

KVRELAY_INSTANTIATE_ISA(OpsMatMulTest);

// ---------------------------------------------------------------------------- inner-loop tables

class OpsKernelTableTest : public OpsIsaTest {};

// matmul writes exactly y[r * ldy + o] for o in [o0, o1) and nothing else; int8 weights too.
TEST_P(OpsKernelTableTest, MatMulWritesOnlyItsRange) {
  const KernelTable& k = KernelsFor(GetParam());
  std::mt19937 rng(11);
  for (DType wt : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    const int64_t rows = 6, in = 37, out = 70, ldy = 75;
    const Stored w = RandStored(rng, out * in, wt);
    const std::vector<float> x = RandVec(rng, rows * in);
    std::vector<double> ref, mag;
    RefMatMul(x, rows, in, w.value, out, nullptr, &ref, &mag);
    for (auto [o0, o1] :
         {std::pair<int64_t, int64_t>{0, 70}, {3, 40}, {33, 34}, {5, 5}, {31, 69}}) {
      const float kSentinel = -12345.0f;
      std::vector<float> y(rows * ldy, kSentinel);
      k.matmul(x.data(), rows, in, w.data(), wt, o0, o1, y.data(), ldy);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < ldy; ++c) {
          const float got = y[r * ldy + c];
          if (c >= o0 && c < o1) {
            ASSERT_NEAR(got, ref[r * out + c], 1e-5 * mag[r * out + c] + 1e-6)
                << DTypeName(wt) << " r=" << r << " o=" << c;
          } else {
            ASSERT_EQ(got, kSentinel) << DTypeName(wt) << " wrote outside [" << o0 << "," << o1
                                      << ") at r=" << r << " c=" << c;
          }
        }
      }
    }
  }
}

TEST_P(OpsKernelTableTest, DotKvAndAxpyKvMatchReference) {
  const KernelTable& k = KernelsFor(GetParam());
  std::mt19937 rng(12);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (int64_t n : {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 64, 100, 128, 129, 256}) {
      const std::vector<float> q = RandVec(rng, n);
      const Stored v = RandStored(rng, n, t);
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < n; ++i) {
        ref += static_cast<double>(q[i]) * v.value[i];
        mag += std::fabs(static_cast<double>(q[i]) * v.value[i]);
      }
      EXPECT_NEAR(k.dot_kv(q.data(), v.data(), t, n), ref, 1e-5 * mag + 1e-7)
          << DTypeName(t) << " n=" << n;
      const float a = 0.37f;
      std::vector<float> out = RandVec(rng, n);
      const std::vector<float> before = out;
      k.axpy_kv(a, v.data(), t, n, out.data());
      for (int64_t i = 0; i < n; ++i) {
        const double want = before[i] + static_cast<double>(a) * v.value[i];
        ASSERT_NEAR(out[i], want, 1e-6 * (std::fabs(before[i]) + std::fabs(a * v.value[i])) + 1e-7)
            << DTypeName(t) << " n=" << n << " i=" << i;
      }
    }
  }
}

// The multi-row forms attention uses must give exactly the bytes of the single-row calls.
TEST_P(OpsKernelTableTest, RowFormsAreBitIdenticalToSingleRowCalls) {
  const KernelTable& k = KernelsFor(GetParam());
  std::mt19937 rng(13);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (int64_t n : {1, 7, 8, 12, 16, 33, 64, 128}) {
      for (int count : {1, 3, 4, 5, 8, 9, 16, 17}) {
        const int64_t pad = 5;  // rows are `n + pad` elements apart, as slots of a KV block are
        const Stored rows = RandStored(rng, (n + pad) * count, t);
        const int64_t stride = (n + pad) * static_cast<int64_t>(DTypeSize(t));
        const std::vector<float> q = RandVec(rng, n);
        std::vector<float> got(count);
        k.dot_kv_rows(q.data(), rows.data(), stride, count, t, n, got.data());
        for (int j = 0; j < count; ++j) {
          const float want =
              k.dot_kv(q.data(), static_cast<const uint8_t*>(rows.data()) + j * stride, t, n);
          ASSERT_EQ(std::memcmp(&got[j], &want, sizeof(float)), 0)
              << DTypeName(t) << " n=" << n << " count=" << count << " j=" << j;
        }
        const std::vector<float> a = RandVec(rng, count);
        std::vector<float> out_rows = RandVec(rng, n);
        std::vector<float> out_single = out_rows;
        k.axpy_kv_rows(a.data(), rows.data(), stride, count, t, n, out_rows.data());
        for (int j = 0; j < count; ++j) {
          k.axpy_kv(a[j], static_cast<const uint8_t*>(rows.data()) + j * stride, t, n,
                    out_single.data());
        }
        ASSERT_EQ(FirstDiff(out_rows.data(), out_single.data(), n), -1)
            << DTypeName(t) << " n=" << n << " count=" << count;
      }
    }
  }
}

// The tile form (several query rows against the same key rows, as tiled attention calls it)
// gives exactly the bytes of one dot_kv per (row, key) and writes nothing else.
TEST_P(OpsKernelTableTest, TileFormIsBitIdenticalToSingleCalls) {
  const KernelTable& k = KernelsFor(GetParam());
  std::mt19937 rng(14);
  const float kSentinel = -12345.0f;
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (int64_t n : {1, 7, 8, 12, 16, 33, 36, 64, 128}) {
      for (int rows : {1, 2, 3, 4, 5, 7, 8, 9, 13}) {
        for (int count : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17}) {
          const int64_t pad = 5;
          const Stored keys = RandStored(rng, (n + pad) * count, t);
          const int64_t stride = (n + pad) * static_cast<int64_t>(DTypeSize(t));
          const int64_t ldq = n + 3, ldo = count + 2;
          const std::vector<float> q = RandVec(rng, ldq * rows, -2.0f, 2.0f);
          std::vector<float> got(static_cast<size_t>(ldo) * rows, kSentinel);
          k.dot_kv_tile(q.data(), ldq, rows, keys.data(), stride, count, t, n, got.data(), ldo);
          for (int r = 0; r < rows; ++r) {
            for (int64_t j = 0; j < ldo; ++j) {
              const float g = got[r * ldo + j];
              if (j >= count) {
                ASSERT_EQ(g, kSentinel) << DTypeName(t) << " wrote r=" << r << " j=" << j;
                continue;
              }
              const float want = k.dot_kv(
                  q.data() + r * ldq, static_cast<const uint8_t*>(keys.data()) + j * stride, t, n);
              ASSERT_EQ(std::memcmp(&g, &want, sizeof(float)), 0)
                  << DTypeName(t) << " n=" << n << " rows=" << rows << " count=" << count
                  << " r=" << r << " j=" << j << ": " << g << " vs " << want;
            }
          }
        }
      }
    }
  }
}

KVRELAY_INSTANTIATE_ISA(OpsKernelTableTest);

// Scalar and AVX2 tables agree within rounding (they are not bit-identical: AVX2 uses FMA).
TEST(OpsParityTest, ScalarVsAvx2) {
  if (!IsaSupported(Isa::kAvx2)) GTEST_SKIP() << "AVX2/FMA/F16C not supported on this CPU";
  const KernelTable& s = KernelsFor(Isa::kScalar);
  const KernelTable& a = KernelsFor(Isa::kAvx2);
  ASSERT_EQ(s.isa, Isa::kScalar);
  ASSERT_EQ(a.isa, Isa::kAvx2);
  std::mt19937 rng(13);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (int64_t in : {1, 7, 16, 17, 100, 1024}) {
      const int64_t rows = 5, out = 37;
      const Stored w = RandStored(rng, out * in, t);
      const std::vector<float> x = RandVec(rng, rows * in);
      std::vector<double> ref, mag;
      RefMatMul(x, rows, in, w.value, out, nullptr, &ref, &mag);
      std::vector<float> ys(rows * out), ya(rows * out);
      s.matmul(x.data(), rows, in, w.data(), t, 0, out, ys.data(), out);
      a.matmul(x.data(), rows, in, w.data(), t, 0, out, ya.data(), out);
      for (size_t e = 0; e < ys.size(); ++e) {
        ASSERT_NEAR(ys[e], ya[e], 2e-5 * mag[e] + 1e-6) << DTypeName(t) << " in=" << in;
      }
      const Stored kv = RandStored(rng, in, t);
      double dmag = 0;
      for (int64_t i = 0; i < in; ++i) dmag += std::fabs(static_cast<double>(x[i]) * kv.value[i]);
      EXPECT_NEAR(s.dot_kv(x.data(), kv.data(), t, in), a.dot_kv(x.data(), kv.data(), t, in),
                  2e-5 * dmag + 1e-7)
          << DTypeName(t) << " n=" << in;
      std::vector<float> os = RandVec(rng, in), oa = os;
      s.axpy_kv(-0.81f, kv.data(), t, in, os.data());
      a.axpy_kv(-0.81f, kv.data(), t, in, oa.data());
      for (int64_t i = 0; i < in; ++i) {
        ASSERT_NEAR(os[i], oa[i], 1e-6 * (std::fabs(os[i]) + std::fabs(kv.value[i])) + 1e-7)
            << DTypeName(t) << " n=" << in << " i=" << i;
      }
    }
  }
}

// ---------------------------------------------------------------------------- element-wise ops

class OpsElementwiseTest : public OpsIsaTest {};

TEST_P(OpsElementwiseTest, RmsNormMatchesReference) {
  std::mt19937 rng(21);
  for (int64_t dim : {1, 7, 64, 1000}) {
    const int64_t rows = 3;
    std::vector<float> x = RandVec(rng, rows * dim, -3.0f, 3.0f);
    for (int64_t i = 0; i < dim; ++i) x[i] *= 1e-3f;  // row 0 small: eps matters
    const std::vector<float> w = RandVec(rng, dim, 0.5f, 1.5f);
    std::vector<float> y(rows * dim);
    const float eps = 1e-5f;
    RmsNorm(x.data(), w.data(), rows, dim, eps, y.data());
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[r * dim + i]) * x[r * dim + i];
      const double inv = 1.0 / std::sqrt(ss / dim + eps);
      for (int64_t i = 0; i < dim; ++i) {
        const double want = x[r * dim + i] * inv * w[i];
        ASSERT_NEAR(y[r * dim + i], want, 1e-5 * std::fabs(want) + 1e-6) << "dim=" << dim;
      }
    }
    // In place is allowed by the element-wise loop (y == x).
    std::vector<float> inplace = x;
    RmsNorm(inplace.data(), w.data(), rows, dim, eps, inplace.data());
    EXPECT_TRUE(BitEqual(inplace.data(), y.data(), rows * dim));
  }
}

TEST_P(OpsElementwiseTest, LayerNormMatchesReference) {
  std::mt19937 rng(22);
  for (int64_t dim : {1, 7, 64, 768}) {
    const int64_t rows = 3;
    std::vector<float> x = RandVec(rng, rows * dim, -3.0f, 5.0f);
    for (int64_t i = 0; i < dim; ++i) x[i] *= 1e-3f;  // row 0 small: eps matters
    const std::vector<float> w = RandVec(rng, dim, 0.5f, 1.5f);
    const std::vector<float> b = RandVec(rng, dim);
    std::vector<float> y(rows * dim);
    const float eps = 1e-5f;
    LayerNorm(x.data(), w.data(), b.data(), rows, dim, eps, y.data());
    for (int64_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < dim; ++i) mean += x[r * dim + i];
      mean /= dim;
      for (int64_t i = 0; i < dim; ++i) var += (x[r * dim + i] - mean) * (x[r * dim + i] - mean);
      var /= dim;
      const double inv = 1.0 / std::sqrt(var + eps);
      for (int64_t i = 0; i < dim; ++i) {
        const double want = (x[r * dim + i] - mean) * inv * w[i] + b[i];
        ASSERT_NEAR(y[r * dim + i], want, 1e-5 * (std::fabs(want) + 1.0)) << "dim=" << dim;
      }
    }
  }
}

TEST_P(OpsElementwiseTest, SiluMulMatchesReference) {
  std::mt19937 rng(23);
  const int64_t rows = 4, inter = 37;
  std::vector<float> gu = RandVec(rng, rows * 2 * inter, -8.0f, 8.0f);
  gu[0] = 0.0f;
  gu[1] = 100.0f;
  gu[2] = -100.0f;
  gu[3] = -1000.0f;  // exp overflows: result must still be (-)0, not NaN
  std::vector<float> out(rows * inter);
  SiluMul(gu.data(), rows, inter, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < inter; ++i) {
      const double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      const double want = g / (1.0 + std::exp(-g)) * u;
      ASSERT_FALSE(std::isnan(out[r * inter + i])) << "r=" << r << " i=" << i;
      ASSERT_NEAR(out[r * inter + i], want, 1e-5 * std::fabs(want) + 1e-6) << "g=" << g;
    }
  }
}

TEST_P(OpsElementwiseTest, GeluTanhMatchesReference) {
  std::mt19937 rng(24);
  std::vector<float> x = RandVec(rng, 999, -6.0f, 6.0f);
  x[0] = 0.0f;
  x[1] = 20.0f;
  x[2] = -20.0f;
  std::vector<float> y = x;
  GeluTanh(y.data(), static_cast<int64_t>(y.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    const double want =
        0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    ASSERT_NEAR(y[i], want, 1e-5 * std::fabs(want) + 1e-6) << "x=" << v;
    // And it is close to the exact erf GELU (sanity check of the constants).
    ASSERT_NEAR(y[i], 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))), 2e-3) << "x=" << v;
  }
}

TEST_P(OpsElementwiseTest, GeluErfMatchesReference) {
  std::mt19937 rng(26);
  std::vector<float> x = RandVec(rng, 999, -6.0f, 6.0f);
  x[0] = 0.0f;
  x[1] = -2.7f;  // where the tanh approximation is furthest from the exact form
  std::vector<float> y = x;
  GeluErf(y.data(), static_cast<int64_t>(y.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    const double want = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    ASSERT_NEAR(y[i], want, 1e-6 * std::fabs(want) + 1e-6) << "x=" << v;
  }
  std::vector<float> t = {-2.7f};
  GeluTanh(t.data(), 1);
  EXPECT_GT(std::fabs(t[0] - y[1]), 1e-4f);  // the two forms really differ
}

TEST_P(OpsElementwiseTest, AddEmbeddingAndToF32) {
  std::mt19937 rng(25);
  std::vector<float> a = RandVec(rng, 33), b = RandVec(rng, 33), c = a;
  AddInPlace(c.data(), b.data(), 33);
  for (int i = 0; i < 33; ++i) EXPECT_EQ(c[i], a[i] + b[i]);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    const int64_t vocab = 11, dim = 9;
    const Stored table = RandStored(rng, vocab * dim, t);
    std::vector<float> all(vocab * dim);
    ToF32(table.data(), t, vocab * dim, all.data());
    EXPECT_TRUE(BitEqual(all.data(), table.value.data(), vocab * dim)) << DTypeName(t);
    const int32_t ids[] = {3, 0, 10, 3};
    std::vector<float> out(4 * dim);
    EmbeddingGather(ids, 4, table.data(), t, dim, out.data());
    for (int j = 0; j < 4; ++j) {
      EXPECT_TRUE(BitEqual(out.data() + j * dim, table.value.data() + ids[j] * dim, dim))
          << DTypeName(t) << " j=" << j;
    }
  }
}

std::vector<float> InvFreq(int head_dim, double theta = 10000.0) {
  std::vector<float> f(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i)
    f[i] = static_cast<float>(std::pow(theta, -2.0 * i / head_dim));
  return f;
}

TEST_P(OpsElementwiseTest, RopeMatchesRotateHalfReference) {
  std::mt19937 rng(26);
  for (int head_dim : {2, 8, 64, 128, 256}) {
    for (int heads : {1, 3}) {
      const std::vector<float> inv_freq = InvFreq(head_dim);
      for (int64_t pos : {1, 2, 7, 100, 4095, 32768}) {
        const std::vector<float> x = RandVec(rng, heads * head_dim);
        std::vector<float> y = x;
        Rope(y.data(), heads, head_dim, pos, inv_freq.data());
        const int half = head_dim / 2;
        for (int h = 0; h < heads; ++h) {
          const float* xv = x.data() + h * head_dim;
          const float* yv = y.data() + h * head_dim;
          for (int i = 0; i < half; ++i) {
            // The angle is formed in f32 as in HF (position * inv_freq); cos/sin in double.
            const double ang = static_cast<float>(pos) * inv_freq[i];
            const double c = std::cos(ang), s = std::sin(ang);
            const double want_lo = xv[i] * c - xv[i + half] * s;
            const double want_hi = xv[i + half] * c + xv[i] * s;
            ASSERT_NEAR(yv[i], want_lo, 2e-6) << "hd=" << head_dim << " pos=" << pos << " i=" << i;
            ASSERT_NEAR(yv[i + half], want_hi, 2e-6) << "hd=" << head_dim << " pos=" << pos;
          }
        }
      }
    }
  }
}

TEST_P(OpsElementwiseTest, RopeAtPositionZeroIsIdentity) {
  std::mt19937 rng(27);
  for (int head_dim : {2, 16, 128}) {
    const std::vector<float> inv_freq = InvFreq(head_dim);
    const std::vector<float> x = RandVec(rng, 4 * head_dim);
    std::vector<float> y = x;
    Rope(y.data(), 4, head_dim, 0, inv_freq.data());
    EXPECT_TRUE(BitEqual(x.data(), y.data(), 4 * head_dim)) << "hd=" << head_dim;
  }
}

// Large heads (> 1024) must work too (no fixed-size scratch).
TEST_P(OpsElementwiseTest, RopeLargeHeadDim) {
  std::mt19937 rng(28);
  const int head_dim = 2048, half = head_dim / 2;
  const std::vector<float> inv_freq = InvFreq(head_dim);
  const std::vector<float> x = RandVec(rng, 2 * head_dim);
  std::vector<float> y = x;
  Rope(y.data(), 2, head_dim, 5, inv_freq.data());
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < half; ++i) {
      const double ang = 5.0f * inv_freq[i];
      const float* xv = x.data() + h * head_dim;
      ASSERT_NEAR(y[h * head_dim + i], xv[i] * std::cos(ang) - xv[i + half] * std::sin(ang), 2e-6);
      ASSERT_NEAR(y[h * head_dim + i + half], xv[i + half] * std::cos(ang) + xv[i] * std::sin(ang),
                  2e-6);
    }
  }
}

KVRELAY_INSTANTIATE_ISA(OpsElementwiseTest);

// ---------------------------------------------------------------------------- paged KV layout

TEST(OpsPagedKvLayoutTest, SegmentAndBlockArithmetic) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    PagedKvLayout L;
    L.dtype = t;
    L.num_layers = 3;
    L.block_size = 4;
    L.num_kv_heads = 2;
    L.head_dim = 8;
    const size_t es = DTypeSize(t);
    EXPECT_EQ(L.elem_bytes(), es);
    EXPECT_EQ(L.token_bytes(), 2 * 8 * es);
    EXPECT_EQ(L.data_bytes(), 4 * 2 * 8 * es);
    const size_t scales = t == DType::kI8 ? 4 * 2 * sizeof(float) : 0;  // [token][kv_head] f32
    EXPECT_EQ(L.scale_bytes(), scales);
    const size_t seg = 4 * 2 * 8 * es + scales;
    EXPECT_EQ(L.segment_bytes(), seg);
    EXPECT_EQ(L.block_bytes(), seg * 2 * 3);
    for (int64_t b : {0, 1, 5}) {
      for (int layer = 0; layer < 3; ++layer) {
        for (int kv = 0; kv < 2; ++kv) {
          EXPECT_EQ(L.segment_offset(b, layer, kv), b * seg * 6 + (layer * 2 + kv) * seg)
              << DTypeName(t);
        }
      }
    }
    // Row and scale addresses: [token][kv_head][head_dim] data, then [token][kv_head] scales.
    std::vector<uint8_t> mem(L.block_bytes() * 6);
    PagedKvView view{L, mem.data(), 6};
    EXPECT_EQ(view.row(2, 1, 1, 3, 1) - mem.data(),
              static_cast<ptrdiff_t>(2 * seg * 6 + 3 * seg + (3 * 2 + 1) * 8 * es));
    if (t == DType::kI8) {
      EXPECT_EQ(reinterpret_cast<uint8_t*>(view.scale(2, 1, 1, 3, 1)) - mem.data(),
                static_cast<ptrdiff_t>(2 * seg * 6 + 3 * seg + 4 * 2 * 8 + (3 * 2 + 1) * 4));
    }
  }
}

// Rows (and int8 scales) of all (block, layer, k|v, slot, head) tile the pool exactly: every byte
// belongs to exactly one of them, so a run of blocks is one self-contained byte range.
TEST(OpsPagedKvLayoutTest, RowsTileThePoolExactly) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    PagedKvLayout L;
    L.dtype = t;
    L.num_layers = 2;
    L.block_size = 3;
    L.num_kv_heads = 3;
    L.head_dim = 4;
    const int64_t blocks = 4;
    std::vector<uint8_t> mem(L.block_bytes() * blocks);
    std::vector<int> owner(mem.size(), 0);
    PagedKvView view{L, mem.data(), blocks};
    auto mark = [&](const uint8_t* p, size_t n) {
      ASSERT_GE(p, mem.data());
      const size_t off = static_cast<size_t>(p - mem.data());
      ASSERT_LE(off + n, owner.size());
      for (size_t i = 0; i < n; ++i) ++owner[off + i];
    };
    for (int64_t b = 0; b < blocks; ++b)
      for (int l = 0; l < L.num_layers; ++l)
        for (int kv = 0; kv < 2; ++kv)
          for (int s = 0; s < L.block_size; ++s)
            for (int h = 0; h < L.num_kv_heads; ++h) {
              mark(view.row(b, l, kv, s, h), L.head_dim * L.elem_bytes());
              if (t == DType::kI8) mark(reinterpret_cast<uint8_t*>(view.scale(b, l, kv, s, h)), 4);
            }
    for (size_t i = 0; i < owner.size(); ++i)
      ASSERT_EQ(owner[i], 1) << DTypeName(t) << " byte " << i;
  }
}

// A pool of `blocks` blocks filled with 0xff (NaN for float dtypes), so reading an unwritten
// slot poisons a result.
struct TestPool {
  std::vector<uint8_t> mem;
  PagedKvView view;
  TestPool(const PagedKvLayout& L, int64_t blocks)
      : mem(L.block_bytes() * blocks, 0xff), view{L, nullptr, blocks} {
    view.base = mem.data();
  }
};

// Value of element i of a stored row (dequantized for int8).
float ReadKv(const PagedKvView& kv, int64_t block, int layer, int which, int slot, int head,
             int i) {
  const uint8_t* p = kv.row(block, layer, which, slot, head);
  switch (kv.layout.dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return F16ToF32(h);
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return Bf16ToF32(h);
    }
    case DType::kI8: {
      float s;
      std::memcpy(&s, kv.scale(block, layer, which, slot, head), 4);
      return static_cast<int8_t>(p[i]) * s;
    }
  }
  return NAN;
}

TEST(OpsWriteKvTest, RoundTripPerDType) {
  std::mt19937 rng(31);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    PagedKvLayout L;
    L.dtype = t;
    L.num_layers = 2;
    L.block_size = 4;
    L.num_kv_heads = 3;
    L.head_dim = 10;
    TestPool pool(L, 3);
    const int width = L.num_kv_heads * L.head_dim;
    // Write every (block, slot, layer) with its own values.
    std::vector<std::vector<float>> ks, vs;
    for (int64_t b = 0; b < 3; ++b)
      for (int s = 0; s < L.block_size; ++s)
        for (int l = 0; l < L.num_layers; ++l) {
          ks.push_back(RandVec(rng, width, -4.0f, 4.0f));
          vs.push_back(RandVec(rng, width, -4.0f, 4.0f));
          WriteKv(pool.view, b, s, l, ks.back().data(), vs.back().data());
        }
    size_t idx = 0;
    for (int64_t b = 0; b < 3; ++b)
      for (int s = 0; s < L.block_size; ++s)
        for (int l = 0; l < L.num_layers; ++l, ++idx)
          for (int which = 0; which < 2; ++which) {
            const std::vector<float>& src = which == 0 ? ks[idx] : vs[idx];
            for (int h = 0; h < L.num_kv_heads; ++h) {
              float amax = 0;
              for (int i = 0; i < L.head_dim; ++i)
                amax = std::max(amax, std::fabs(src[h * L.head_dim + i]));
              for (int i = 0; i < L.head_dim; ++i) {
                const float want = src[h * L.head_dim + i];
                const float got = ReadKv(pool.view, b, l, which, s, h, i);
                switch (t) {
                  case DType::kF32:
                    ASSERT_EQ(std::memcmp(&got, &want, 4), 0);
                    break;
                  case DType::kF16:
                    ASSERT_EQ(got, F16ToF32(F32ToF16(want)));
                    ASSERT_LE(std::fabs(got - want), std::ldexp(std::fabs(want), -11) + 1e-7f);
                    break;
                  case DType::kBF16:
                    ASSERT_EQ(got, Bf16ToF32(F32ToBf16(want)));
                    ASSERT_LE(std::fabs(got - want), std::ldexp(std::fabs(want), -8));
                    break;
                  case DType::kI8: {
                    const float scale = *pool.view.scale(b, l, which, s, h);
                    ASSERT_FLOAT_EQ(scale, amax / 127.0f);
                    ASSERT_LE(std::fabs(got - want), scale / 2 * (1 + 1e-5f))
                        << "b=" << b << " s=" << s << " l=" << l << " kv=" << which << " h=" << h;
                    break;
                  }
                }
              }
            }
          }
  }
}

// Writing one token touches exactly its K and V rows (and scales) and nothing else.
TEST(OpsWriteKvTest, TouchesOnlyItsSlot) {
  std::mt19937 rng(32);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    PagedKvLayout L;
    L.dtype = t;
    L.num_layers = 3;
    L.block_size = 5;
    L.num_kv_heads = 2;
    L.head_dim = 8;
    TestPool pool(L, 4);
    const std::vector<uint8_t> before = pool.mem;
    const int64_t block = 2;
    const int slot = 3, layer = 1;
    const std::vector<float> k = RandVec(rng, 16, 1.0f, 2.0f), v = RandVec(rng, 16, 1.0f, 2.0f);
    WriteKv(pool.view, block, slot, layer, k.data(), v.data());
    std::vector<bool> expected(pool.mem.size(), false);
    const auto base = pool.mem.data();
    for (int which = 0; which < 2; ++which)
      for (int h = 0; h < 2; ++h) {
        const size_t off = pool.view.row(block, layer, which, slot, h) - base;
        for (size_t i = 0; i < L.head_dim * L.elem_bytes(); ++i) expected[off + i] = true;
        if (t == DType::kI8) {
          const size_t soff =
              reinterpret_cast<uint8_t*>(pool.view.scale(block, layer, which, slot, h)) - base;
          for (size_t i = 0; i < 4; ++i) expected[soff + i] = true;
        }
      }
    for (size_t i = 0; i < pool.mem.size(); ++i) {
      if (!expected[i]) {
        ASSERT_EQ(pool.mem[i], before[i]) << DTypeName(t) << " stray write at byte " << i;
      }
    }
    // And the data went where DESIGN §3 says: [block][layer][k|v][token][kv_head][head_dim].
    const size_t seg = L.segment_bytes();
    const size_t k_off =
        block * L.block_bytes() + (layer * 2 + 0) * seg + (slot * 2 + 1) * 8 * L.elem_bytes();
    const size_t v_off =
        block * L.block_bytes() + (layer * 2 + 1) * seg + (slot * 2 + 1) * 8 * L.elem_bytes();
    if (t == DType::kF32) {
      EXPECT_EQ(std::memcmp(base + k_off, k.data() + 8, 32), 0);
      EXPECT_EQ(std::memcmp(base + v_off, v.data() + 8, 32), 0);
    }
  }
}

TEST(OpsWriteKvTest, Int8ZeroAndTinyRows) {
  PagedKvLayout L;
  L.dtype = DType::kI8;
  L.num_layers = 1;
  L.block_size = 2;
  L.num_kv_heads = 1;
  L.head_dim = 4;
  TestPool pool(L, 1);
  const float zeros[4] = {0, 0, 0, 0};
  WriteKv(pool.view, 0, 0, 0, zeros, zeros);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(ReadKv(pool.view, 0, 0, 0, 0, 0, i), 0.0f);
    EXPECT_EQ(ReadKv(pool.view, 0, 0, 1, 0, 0, i), 0.0f);
  }
  EXPECT_TRUE(std::isfinite(*pool.view.scale(0, 0, 0, 0, 0)));
  // Tiny magnitudes (amax / 127 is subnormal, 1 / scale would overflow f32) still quantize
  // proportionally.
  for (float mag : {1e-30f, 1e-37f, 1e-38f}) {
    const float x[4] = {mag, mag / 2, 0.0f, -mag};
    WriteKv(pool.view, 0, 1, 0, x, x);
    const int8_t* q = reinterpret_cast<const int8_t*>(pool.view.row(0, 0, 0, 1, 0));
    EXPECT_EQ(q[0], 127) << mag;
    EXPECT_NEAR(q[1], 64, 1) << mag;
    EXPECT_EQ(q[2], 0) << mag;
    EXPECT_EQ(q[3], -127) << mag;
  }
}

TEST(OpsWriteKvTest, Int8NonFiniteValuesAreDefined) {
  PagedKvLayout L;
  L.dtype = DType::kI8;
  L.num_layers = 1;
  L.block_size = 1;
  L.num_kv_heads = 1;
  L.head_dim = 4;
  TestPool pool(L, 1);
  const float x[4] = {INFINITY, -INFINITY, NAN, 0.5f};
  WriteKv(pool.view, 0, 0, 0, x, x);
  const int8_t* q = reinterpret_cast<const int8_t*>(pool.view.row(0, 0, 0, 0, 0));
  EXPECT_EQ(q[0], 127);
  EXPECT_EQ(q[1], -127);
  EXPECT_EQ(q[2], 0);
  EXPECT_EQ(q[3], 127);  // the scale comes from the finite values only
  EXPECT_FLOAT_EQ(*pool.view.scale(0, 0, 0, 0, 0), 0.5f / 127.0f);
}

// ---------------------------------------------------------------------------- PagedAttention

struct AttnCase {
  DType dtype;
  int kv_heads;
  int group;  // num_heads / kv_heads (1 = MHA)
  int block_size;
  int head_dim;
};

std::string CaseName(const AttnCase& c) {
  return std::string(DTypeName(c.dtype)) + " kvh=" + std::to_string(c.kv_heads) +
         " group=" + std::to_string(c.group) + " bs=" + std::to_string(c.block_size) +
         " hd=" + std::to_string(c.head_dim);
}

// Sequences written into scattered, non-contiguous blocks of a shared pool.
struct AttnFixture {
  PagedKvLayout layout;
  std::unique_ptr<TestPool> pool;
  int num_heads = 0;
  static constexpr int kLayer = 1;  // attend on layer 1 of 2, so the layer offset matters
  std::vector<int64_t> seq_len;
  std::vector<std::vector<int32_t>> tables;
  // Original f32 K/V per sequence [pos][kv_head * head_dim].
  std::vector<std::vector<std::vector<float>>> k, v;
  // Query tokens: sequence, position and q [num_heads * head_dim].
  std::vector<int> q_seq;
  std::vector<int64_t> q_pos;
  std::vector<float> q;

  AttnFixture(const AttnCase& c, std::mt19937& rng) {
    layout.dtype = c.dtype;
    layout.num_layers = 2;
    layout.block_size = c.block_size;
    layout.num_kv_heads = c.kv_heads;
    layout.head_dim = c.head_dim;
    num_heads = c.kv_heads * c.group;
    const int bs = c.block_size;
    seq_len = {1, static_cast<int64_t>(bs) + 1, 3 * static_cast<int64_t>(bs) + 2, 37};
    int64_t blocks = 0;
    for (int64_t n : seq_len) blocks += (n + bs - 1) / bs;
    blocks += 5;  // unused blocks stay poisoned
    pool = std::make_unique<TestPool>(layout, blocks);
    std::vector<int32_t> ids(blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    size_t next = 0;
    const int width = c.kv_heads * c.head_dim;
    for (size_t s = 0; s < seq_len.size(); ++s) {
      tables.emplace_back();
      for (int64_t j = 0; j < (seq_len[s] + bs - 1) / bs; ++j) tables[s].push_back(ids[next++]);
      k.emplace_back();
      v.emplace_back();
      for (int64_t p = 0; p < seq_len[s]; ++p) {
        k[s].push_back(RandVec(rng, width, -2.0f, 2.0f));
        v[s].push_back(RandVec(rng, width, -2.0f, 2.0f));
        const int32_t blk = tables[s][p / bs];
        const int slot = static_cast<int>(p % bs);
        // Layer 0 gets unrelated values: reading the wrong layer would be caught.
        const std::vector<float> other = RandVec(rng, width, -50.0f, 50.0f);
        WriteKv(pool->view, blk, slot, 0, other.data(), other.data());
        WriteKv(pool->view, blk, slot, kLayer, k[s][p].data(), v[s][p].data());
      }
    }
    // Queries: every position of every sequence (covers 0, block boundaries and the last).
    for (size_t s = 0; s < seq_len.size(); ++s)
      for (int64_t p = 0; p < seq_len[s]; ++p) {
        q_seq.push_back(static_cast<int>(s));
        q_pos.push_back(p);
      }
    q = RandVec(rng, static_cast<int64_t>(q_seq.size()) * num_heads * c.head_dim, -2.0f, 2.0f);
  }

  int64_t n() const { return static_cast<int64_t>(q_seq.size()); }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(layout.head_dim)); }

  // Runs PagedAttention over query tokens [t0, t1) in one call.
  void Run(ThreadPool* tp, int64_t t0, int64_t t1, float* out) const {
    std::vector<const int32_t*> bt;
    for (int64_t t = t0; t < t1; ++t) bt.push_back(tables[q_seq[t]].data());
    PagedAttention(tp, pool->view, kLayer, q.data() + t0 * num_heads * layout.head_dim, t1 - t0,
                   bt.data(), q_pos.data() + t0, num_heads, scale(), out);
  }

  // Naive attention on contiguous K/V in double. `stored` uses the values as the cache holds
  // them (after f16/bf16/int8 rounding) instead of the original f32 inputs.
  std::vector<double> Reference(bool stored) const {
    const int hd = layout.head_dim, group = num_heads / layout.num_kv_heads;
    std::vector<double> out(static_cast<size_t>(n()) * num_heads * hd);
    for (int64_t t = 0; t < n(); ++t) {
      const int s = q_seq[t];
      const int64_t len = q_pos[t] + 1;
      for (int h = 0; h < num_heads; ++h) {
        const int g = h / group;
        auto kval = [&](int64_t j, int i) -> double {
          if (!stored) return k[s][j][g * hd + i];
          return ReadKv(pool->view, tables[s][j / layout.block_size], kLayer, 0,
                        static_cast<int>(j % layout.block_size), g, i);
        };
        auto vval = [&](int64_t j, int i) -> double {
          if (!stored) return v[s][j][g * hd + i];
          return ReadKv(pool->view, tables[s][j / layout.block_size], kLayer, 1,
                        static_cast<int>(j % layout.block_size), g, i);
        };
        const float* qv = q.data() + (t * num_heads + h) * hd;
        std::vector<double> sc(len);
        double mx = -INFINITY;
        for (int64_t j = 0; j < len; ++j) {
          double d = 0;
          for (int i = 0; i < hd; ++i) d += qv[i] * kval(j, i);
          sc[j] = d * scale();
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (double& x : sc) sum += (x = std::exp(x - mx));
        double* o = out.data() + (t * num_heads + h) * hd;
        for (int64_t j = 0; j < len; ++j)
          for (int i = 0; i < hd; ++i) o[i] += sc[j] / sum * vval(j, i);
      }
    }
    return out;
  }
};

std::vector<AttnCase> AttnCases() {
  std::vector<AttnCase> cases;
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8})
    for (int group : {1, 4})
      for (int bs : {1, 4, 16})
        for (int hd : {16, 12}) cases.push_back({t, group == 1 ? 3 : 2, group, bs, hd});
  return cases;
}

class OpsPagedAttentionTest : public OpsIsaTest {};

TEST_P(OpsPagedAttentionTest, MatchesNaiveReference) {
  std::mt19937 rng(41);
  for (const AttnCase& c : AttnCases()) {
    AttnFixture f(c, rng);
    std::vector<float> out(f.q.size(), NAN);
    f.Run(nullptr, 0, f.n(), out.data());
    // f32 KV: against the original inputs. Other dtypes: against what the cache holds, tightly,
    // and against the original inputs loosely (quantisation error).
    const std::vector<double> ref = f.Reference(/*stored=*/c.dtype != DType::kF32);
    const double tol = c.dtype == DType::kF32 ? 1e-5 : 2e-5;
    const std::vector<double> orig = f.Reference(/*stored=*/false);
    const double loose = c.dtype == DType::kF32 ? 1e-5 : c.dtype == DType::kF16 ? 5e-3 : 5e-2;
    for (size_t e = 0; e < out.size(); ++e) {
      const int64_t t = static_cast<int64_t>(e) / (f.num_heads * c.head_dim);
      ASSERT_NEAR(out[e], ref[e], tol)
          << CaseName(c) << " seq=" << f.q_seq[t] << " pos=" << f.q_pos[t] << " elem=" << e;
      ASSERT_NEAR(out[e], orig[e], loose) << CaseName(c) << " (vs unquantised)";
    }
  }
}

TEST_P(OpsPagedAttentionTest, OneCallEqualsPerTokenCallsAndThreadCounts) {
  std::mt19937 rng(43);
  for (const AttnCase& c : AttnCases()) {
    AttnFixture f(c, rng);
    const int64_t per_tok = static_cast<int64_t>(f.num_heads) * c.head_dim;
    std::vector<float> all(f.q.size(), NAN);
    f.Run(nullptr, 0, f.n(), all.data());
    std::vector<float> single(f.q.size(), NAN);
    for (int64_t t = 0; t < f.n(); ++t) f.Run(nullptr, t, t + 1, single.data() + t * per_tok);
    ASSERT_TRUE(BitEqual(all.data(), single.data(), static_cast<int64_t>(all.size())))
        << CaseName(c) << " first diff " << FirstDiff(all.data(), single.data(), all.size());
    // Odd chunking of the token set.
    std::vector<float> chunked(f.q.size(), NAN);
    for (int64_t t0 = 0; t0 < f.n(); t0 += 7) {
      const int64_t t1 = std::min(f.n(), t0 + 7);
      f.Run(nullptr, t0, t1, chunked.data() + t0 * per_tok);
    }
    ASSERT_TRUE(BitEqual(all.data(), chunked.data(), static_cast<int64_t>(all.size())))
        << CaseName(c);
    for (int threads : {1, 2, 3, 8}) {
      std::vector<float> par(f.q.size(), NAN);
      f.Run(Pool(threads), 0, f.n(), par.data());
      ASSERT_TRUE(BitEqual(all.data(), par.data(), static_cast<int64_t>(all.size())))
          << CaseName(c) << " threads=" << threads;
    }
  }
}

// The token at position p sees exactly positions [0, p]: changing K/V of later positions (here:
// overwriting them with huge values) does not change its output.
TEST_P(OpsPagedAttentionTest, IsCausal) {
  std::mt19937 rng(44);
  AttnFixture f({DType::kF32, 2, 4, 4, 16}, rng);
  const int64_t per_tok = static_cast<int64_t>(f.num_heads) * 16;
  std::vector<float> before(f.q.size());
  f.Run(nullptr, 0, f.n(), before.data());
  const int s = 3;  // the longest sequence
  const int64_t cut = 10;
  const std::vector<float> big(2 * 16, 1e3f);
  for (int64_t p = cut + 1; p < f.seq_len[s]; ++p)
    WriteKv(f.pool->view, f.tables[s][p / 4], static_cast<int>(p % 4), AttnFixture::kLayer,
            big.data(), big.data());
  std::vector<float> after(f.q.size());
  f.Run(nullptr, 0, f.n(), after.data());
  for (int64_t t = 0; t < f.n(); ++t) {
    if (f.q_seq[t] != s) continue;
    const bool same = BitEqual(before.data() + t * per_tok, after.data() + t * per_tok, per_tok);
    if (f.q_pos[t] <= cut) {
      EXPECT_TRUE(same) << "pos " << f.q_pos[t];
    } else {
      EXPECT_FALSE(same) << "pos " << f.q_pos[t];
    }
  }
}

// PagedAttention as it was before query tiling: one (token, head) at a time, every K/V block of
// the sequence re-read for each. The tiled kernel must reproduce it bit for bit.
void PerQueryAttention(const KernelTable& k, const PagedKvView& kv, int layer, const float* q,
                       int64_t n, const int32_t* const* block_tables, const int64_t* positions,
                       int num_heads, float scale, float* out) {
  const auto& L = kv.layout;
  const int group = num_heads / L.num_kv_heads;
  const int hd = L.head_dim;
  const int bs = L.block_size;
  const bool i8 = L.dtype == DType::kI8;
  const int64_t stride = static_cast<int64_t>(L.token_bytes());
  std::vector<float> scores, weights;
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < num_heads; ++h) {
      const int g = h / group;
      const int64_t len = positions[t] + 1;
      const int32_t* table = block_tables[t];
      const float* qv = q + (t * num_heads + h) * hd;
      scores.assign(len, 0.0f);
      weights.assign(len, 0.0f);
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
  }
}

// One call mixing prefill chunks (1..70 new tokens behind 0..~90 cached ones, so tiles
// straddle block ends and every causal boundary), a chunk with positions out of order, a
// sequence whose tokens come in two separate runs, and single decode tokens; scattered block
// tables; unwritten slots stay poisoned (NaN). Tiled == per-query reference, memcmp-equal,
// for every KV dtype, GQA ratio 1/2/4, block size 1/4/16, head_dim 32/36/64/128 and thread
// count.
TEST_P(OpsPagedAttentionTest, TiledEqualsPerQueryReferenceBitExact) {
  const KernelTable& kt = KernelsFor(GetParam());
  std::mt19937 rng(45);
  int cases = 0;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (int group : {1, 2, 4}) {
      for (int bs : {1, 4, 16}) {
        for (int hd : {32, 36, 64, 128}) {
          PagedKvLayout L;
          L.dtype = dt;
          L.num_layers = 2;
          L.block_size = bs;
          L.num_kv_heads = 2;
          L.head_dim = hd;
          const int num_heads = L.num_kv_heads * group;
          const std::string what = CaseName({dt, L.num_kv_heads, group, bs, hd});
          // Sequences: (cached, new). The last two are decode steps.
          std::uniform_int_distribution<int> fresh_d(1, 70), cached_d(0, 90);
          std::vector<std::pair<int64_t, int64_t>> seqs;
          seqs.push_back({0, fresh_d(rng)});              // a prompt's first chunk
          seqs.push_back({cached_d(rng), 70});            // longest chunk behind a prefix
          seqs.push_back({cached_d(rng), fresh_d(rng)});  // positions shuffled below
          seqs.push_back({cached_d(rng), fresh_d(rng)});  // split into two runs below
          seqs.push_back({cached_d(rng), 1});
          seqs.push_back({static_cast<int64_t>(bs) * 3 - 1, 1});  // last slot of a block
          int64_t blocks = 0;
          for (auto [c, f] : seqs) blocks += (c + f + bs - 1) / bs;
          blocks += 3;
          TestPool pool(L, blocks);
          std::vector<int32_t> ids(blocks);
          std::iota(ids.begin(), ids.end(), 0);
          std::shuffle(ids.begin(), ids.end(), rng);
          std::vector<std::vector<int32_t>> tables(seqs.size());
          size_t next = 0;
          const int width = L.num_kv_heads * hd;
          for (size_t s = 0; s < seqs.size(); ++s) {
            const int64_t len = seqs[s].first + seqs[s].second;
            for (int64_t j = 0; j < (len + bs - 1) / bs; ++j) tables[s].push_back(ids[next++]);
            for (int64_t p = 0; p < len; ++p) {
              const std::vector<float> kk = RandVec(rng, width, -3.0f, 3.0f);
              const std::vector<float> vv = RandVec(rng, width, -2.0f, 2.0f);
              WriteKv(pool.view, tables[s][p / bs], static_cast<int>(p % bs), AttnFixture::kLayer,
                      kk.data(), vv.data());
            }
          }
          // Query tokens: (sequence, position), in call order.
          std::vector<std::pair<int, int64_t>> toks;
          auto run = [&](int s, int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) toks.push_back({s, p});
          };
          const auto& s3 = seqs[3];
          run(4, seqs[4].first, seqs[4].first + 1);
          run(0, 0, seqs[0].second);
          run(3, s3.first, s3.first + s3.second / 2);
          run(1, seqs[1].first, seqs[1].first + 70);
          {
            const size_t b = toks.size();
            run(2, seqs[2].first, seqs[2].first + seqs[2].second);
            std::shuffle(toks.begin() + b, toks.end(), rng);
          }
          run(5, seqs[5].first, seqs[5].first + 1);
          run(3, s3.first + s3.second / 2, s3.first + s3.second);
          const int64_t n = static_cast<int64_t>(toks.size());
          std::vector<const int32_t*> bt;
          std::vector<int64_t> pos;
          for (auto [s, p] : toks) {
            bt.push_back(tables[s].data());
            pos.push_back(p);
          }
          const std::vector<float> q = RandVec(rng, n * num_heads * hd, -2.0f, 2.0f);
          const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
          const size_t size = static_cast<size_t>(n) * num_heads * hd;
          std::vector<float> want(size, NAN);
          PerQueryAttention(kt, pool.view, AttnFixture::kLayer, q.data(), n, bt.data(), pos.data(),
                            num_heads, scale, want.data());
          for (int threads : {0, 2, 3}) {
            std::vector<float> got(size, NAN);
            PagedAttention(threads ? Pool(threads) : nullptr, pool.view, AttnFixture::kLayer,
                           q.data(), n, bt.data(), pos.data(), num_heads, scale, got.data());
            const int64_t d = FirstDiff(got.data(), want.data(), static_cast<int64_t>(size));
            ASSERT_EQ(d, -1) << what << " threads=" << threads << " token " << d / (num_heads * hd)
                             << " (seq " << toks[d / (num_heads * hd)].first << " pos "
                             << toks[d / (num_heads * hd)].second << ") head " << d / hd % num_heads
                             << ": " << got[d] << " vs " << want[d];
            for (float x : got) ASSERT_TRUE(std::isfinite(x)) << what;
          }
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 4 * 3 * 3 * 4);
}

KVRELAY_INSTANTIATE_ISA(OpsPagedAttentionTest);

}  // namespace
}  // namespace kvrelay::kernels
