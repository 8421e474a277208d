#include "kernels/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace kvrelay::kernels {
namespace {

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

bool IsF16NaN(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// Exact value of an f16 bit pattern computed from the IEEE formula (independent of the code
// under test).
double F16Value(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  if (exp == 31)
    return mant ? std::numeric_limits<double>::quiet_NaN()
                : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(static_cast<double>(mant | 0x400), exp - 25);
}

// ---------------------------------------------------------------------------- names

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kI8), 1u);
  EXPECT_STREQ(DTypeName(DType::kF32), "f32");
  EXPECT_STREQ(DTypeName(DType::kF16), "f16");
  EXPECT_STREQ(DTypeName(DType::kBF16), "bf16");
  EXPECT_STREQ(DTypeName(DType::kI8), "int8");
}

TEST(DTypeTest, ParseDTypeAcceptsKnownNames) {
  struct Case {
    const char* name;
    DType want;
  };
  const Case cases[] = {
      {"f32", DType::kF32},     {"float32", DType::kF32}, {"f16", DType::kF16},
      {"float16", DType::kF16}, {"bf16", DType::kBF16},   {"bfloat16", DType::kBF16},
      {"int8", DType::kI8},
  };
  for (const Case& c : cases) {
    DType got = DType::kI8 == c.want ? DType::kF32 : DType::kI8;
    ASSERT_TRUE(ParseDType(c.name, &got)) << c.name;
    EXPECT_EQ(got, c.want) << c.name;
  }
  // Every canonical name parses back to itself.
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    DType got;
    ASSERT_TRUE(ParseDType(DTypeName(t), &got));
    EXPECT_EQ(got, t);
  }
}

TEST(DTypeTest, ParseDTypeRejectsUnknownNamesWithoutWriting) {
  for (const char* bad : {"", "F32", "f64", "float", "int4", "bf32", " f32", "f32 "}) {
    DType got = DType::kBF16;
    EXPECT_FALSE(ParseDType(bad, &got)) << "'" << bad << "'";
    EXPECT_EQ(got, DType::kBF16) << "'" << bad << "'";
  }
}

// ---------------------------------------------------------------------------- f16

TEST(DTypeTest, F16ToF32MatchesIeeeFormulaForAllPatterns) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = F16ToF32(h);
    const double want = F16Value(h);
    if (IsF16NaN(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << i;
      EXPECT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << i;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << std::hex << i;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << i;  // incl. -0
    }
  }
}

TEST(DTypeTest, F16RoundTripIsExactForAllNonNaNPatterns) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    if (IsF16NaN(h)) {
      EXPECT_TRUE(IsF16NaN(F32ToF16(F16ToF32(h)))) << std::hex << i;
      continue;
    }
    ASSERT_EQ(F32ToF16(F16ToF32(h)), h) << std::hex << i;
  }
}

TEST(DTypeTest, F32ToF16KnownValues) {
  EXPECT_EQ(F32ToF16(0.0f), 0x0000);
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F32ToF16(-2.0f), 0xc000);
  EXPECT_EQ(F32ToF16(0.5f), 0x3800);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);                  // max finite
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14)), 0x0400);     // min normal
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -24)), 0x0001);     // min subnormal
  EXPECT_EQ(F32ToF16(std::ldexp(1023.0f, -24)), 0x03ff);  // max subnormal
  EXPECT_EQ(F32ToF16(-std::ldexp(3.0f, -24)), 0x8003);
}

TEST(DTypeTest, F32ToF16InfNaNAndOverflow) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(F32ToF16(inf), 0x7c00);
  EXPECT_EQ(F32ToF16(-inf), 0xfc00);
  EXPECT_TRUE(IsF16NaN(F32ToF16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsF16NaN(F32ToF16(-std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload lives only in the low mantissa bits must not become inf.
  EXPECT_TRUE(IsF16NaN(F32ToF16(FromBits(0x7f800001u))));
  EXPECT_TRUE(IsF16NaN(F32ToF16(FromBits(0xff800001u))));
  // Overflow saturates to inf. 65520 is exactly halfway between 65504 (odd mantissa) and
  // the next step (2^16), so RNE rounds it up to inf; anything below stays finite.
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);
  EXPECT_EQ(F32ToF16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(F32ToF16(65519.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(1e5f), 0x7c00);
  EXPECT_EQ(F32ToF16(-1e5f), 0xfc00);
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::max()), 0xfc00);
}

TEST(DTypeTest, F32ToF16RoundsToNearestEven) {
  // Around 1.0 the f16 step is 2^-10.
  const float ulp = std::ldexp(1.0f, -10);
  EXPECT_EQ(F32ToF16(1.0f + ulp / 2), 0x3c00);                        // tie -> even (down)
  EXPECT_EQ(F32ToF16(1.0f + 3 * ulp / 2), 0x3c02);                    // tie -> even (up)
  EXPECT_EQ(F32ToF16(std::nextafter(1.0f + ulp / 2, 2.0f)), 0x3c01);  // above tie
  EXPECT_EQ(F32ToF16(std::nextafter(1.0f + ulp / 2, 0.0f)), 0x3c00);  // below tie
  EXPECT_EQ(F32ToF16(-(1.0f + 3 * ulp / 2)), 0xbc02);
  // Rounding carries into the exponent: (2 - 2^-11) is a tie between 0x3bff and 0x4000.
  EXPECT_EQ(F32ToF16(2.0f - std::ldexp(1.0f, -11)), 0x4000);
  // Subnormal ties (step 2^-24).
  const float sub = std::ldexp(1.0f, -24);
  EXPECT_EQ(F32ToF16(sub / 2), 0x0000);                        // tie between 0 and 1 -> 0
  EXPECT_EQ(F32ToF16(std::nextafter(sub / 2, 1.0f)), 0x0001);  // just above -> 1
  EXPECT_EQ(F32ToF16(std::nextafter(sub / 2, 0.0f)), 0x0000);
  EXPECT_EQ(F32ToF16(sub * 1.5f), 0x0002);  // tie 1|2 -> 2
  EXPECT_EQ(F32ToF16(sub * 2.5f), 0x0002);  // tie 2|3 -> 2
  EXPECT_EQ(F32ToF16(-sub * 2.5f), 0x8002);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -30)), 0x0000);   // underflow to zero
  EXPECT_EQ(F32ToF16(-std::ldexp(1.0f, -30)), 0x8000);  // keeps the sign
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::denorm_min()), 0x0000);
  // Largest subnormal + half step rounds to min normal (even).
  EXPECT_EQ(F32ToF16(std::ldexp(1023.5f, -24)), 0x0400);
}

// Every f32 between two adjacent f16 values rounds to the nearer one (tie -> even mantissa).
TEST(DTypeTest, F32ToF16RandomValuesRoundToNearest) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> bits;
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    const float f = FromBits(bits(rng));
    if (std::isnan(f)) continue;
    const uint16_t h = F32ToF16(f);
    const double got = F16Value(h);
    const double fd = f;
    if (std::fabs(fd) >= 65520.0) {
      ASSERT_TRUE(std::isinf(got)) << f;
      ASSERT_EQ(std::signbit(got), std::signbit(f));
      continue;
    }
    ASSERT_FALSE(std::isinf(got)) << f;
    // No neighbour of h (same sign, magnitude +-1 step) is nearer to f; ties go to even.
    const double err = std::fabs(got - fd);
    const uint16_t mag = h & 0x7fff;
    const uint16_t sign = h & 0x8000;
    for (int d : {-1, 1}) {
      if (mag + d < 0 || mag + d >= 0x7c00) continue;
      const double other = F16Value(static_cast<uint16_t>(sign | (mag + d)));
      const double other_err = std::fabs(other - fd);
      ASSERT_LE(err, other_err) << f;
      if (err == other_err) {
        ASSERT_EQ(h & 1, 0) << "tie not to even: " << f;
      }
    }
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << f;
    ++checked;
  }
  EXPECT_GT(checked, 100000);
}

#if defined(__x86_64__)
__attribute__((target("f16c"))) float HardwareF16ToF32(uint16_t h) { return _cvtsh_ss(h); }
__attribute__((target("f16c"))) uint16_t HardwareF32ToF16(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
#endif

TEST(DTypeTest, MatchesF16cHardware) {
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;  // clang lacks __builtin_cpu_supports("f16c")
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0 || (ecx & bit_F16C) == 0) {
    GTEST_SKIP() << "CPU has no F16C";
  }
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float sw = F16ToF32(h), hw = HardwareF16ToF32(h);
    if (IsF16NaN(h)) {
      EXPECT_TRUE(std::isnan(sw) && std::isnan(hw)) << std::hex << i;
    } else {
      ASSERT_EQ(Bits(sw), Bits(hw)) << std::hex << i;
    }
  }
  std::mt19937 rng(99);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 500000; ++i) {
    const float f = FromBits(bits(rng));
    const uint16_t sw = F32ToF16(f), hw = HardwareF32ToF16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(IsF16NaN(sw) && IsF16NaN(hw));
    } else {
      ASSERT_EQ(sw, hw) << f << " bits " << std::hex << Bits(f);
    }
  }
  // Also values in the f16 range specifically (uniform bits rarely land there).
  std::uniform_real_distribution<float> small(-70000.0f, 70000.0f);
  for (int i = 0; i < 200000; ++i) {
    const float f = small(rng) * std::ldexp(1.0f, -static_cast<int>(bits(rng) % 40));
    ASSERT_EQ(F32ToF16(f), HardwareF32ToF16(f)) << f;
  }
#else
  GTEST_SKIP() << "not x86-64";
#endif
}

// ---------------------------------------------------------------------------- bf16

TEST(DTypeTest, Bf16ExactForRepresentableValues) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = Bf16ToF32(h);
    ASSERT_EQ(Bits(f), i << 16);
    const bool nan = (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0;
    if (nan) {
      const uint16_t back = F32ToBf16(f);
      EXPECT_TRUE((back & 0x7f80) == 0x7f80 && (back & 0x7f) != 0) << std::hex << i;
    } else {
      ASSERT_EQ(F32ToBf16(f), h) << std::hex << i;  // incl. subnormals, +-0, +-inf
    }
  }
}

TEST(DTypeTest, F32ToBf16RoundsToNearestEven) {
  // bf16 keeps the top 16 bits; the dropped half is the rounding remainder.
  EXPECT_EQ(F32ToBf16(FromBits(0x3f800000u)), 0x3f80);
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(F32ToBf16(FromBits(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808001u)), 0x3f81);  // above tie
  EXPECT_EQ(F32ToBf16(FromBits(0x3f807fffu)), 0x3f80);  // below tie
  EXPECT_EQ(F32ToBf16(FromBits(0xbf818000u)), 0xbf82);
  // Carry into the exponent.
  EXPECT_EQ(F32ToBf16(FromBits(0x3fffffffu)), 0x4000);
  // Subnormals round like everything else.
  EXPECT_EQ(F32ToBf16(FromBits(0x00018000u)), 0x0002);
  EXPECT_EQ(F32ToBf16(FromBits(0x00008000u)), 0x0000);
  EXPECT_EQ(F32ToBf16(FromBits(0x00008001u)), 0x0001);
  // Values beyond the largest bf16 (+ half step) overflow to inf, as RNE says.
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(F32ToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(F32ToBf16(-std::numeric_limits<float>::max()), 0xff80);
}

TEST(DTypeTest, F32ToBf16InfAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(F32ToBf16(inf), 0x7f80);
  EXPECT_EQ(F32ToBf16(-inf), 0xff80);
  // NaNs with payload only in the dropped bits must stay NaN (not become inf).
  for (uint32_t b : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f80ffffu}) {
    const uint16_t h = F32ToBf16(FromBits(b));
    EXPECT_TRUE(std::isnan(Bf16ToF32(h))) << std::hex << b;
    EXPECT_EQ(h & 0x8000, (b >> 16) & 0x8000) << std::hex << b;
  }
}

TEST(DTypeTest, F32ToBf16RandomValuesRoundToNearest) {
  std::mt19937 rng(4321);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 500000; ++i) {
    const uint32_t b = bits(rng);
    const float f = FromBits(b);
    if (std::isnan(f)) continue;
    const uint16_t h = F32ToBf16(f);
    // Reference: truncate, then decide by the dropped 16 bits.
    uint32_t want = b >> 16;
    const uint32_t rem = b & 0xffffu;
    if (rem > 0x8000u || (rem == 0x8000u && (want & 1))) ++want;
    ASSERT_EQ(h, static_cast<uint16_t>(want)) << std::hex << b;
  }
}

}  // namespace
}  // namespace kvrelay::kernels
