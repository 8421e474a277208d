// Parity cases: GEMM through cuBLASLt (kernels/cuda/gemm.cuh) vs kernels::MatMul.
//
// Reference: the CPU MatMul run on x already rounded to the weight dtype (kernels::F32ToBf16 /
// F32ToF16, the rounding of the GPU's conversion kernel), so both sides multiply the same
// values; a product of two bf16 / f16 values is exact in f32. What differs is the order of
// the f32 sums (cuBLAS's tiles and split-K vs the CPU's loop), bounded by the dot-product
// error bound of each side: |gpu - cpu| <= 2 γ_{in+1} S with γ_n = n u / (1 - n u), u = 2^-24
// and S >= every output's Σ_i |x_i w_i| + |b| (the +1: the bias add); x, w, bias are drawn from
// [-1, 1], so S = in + 1. Tensor cores may truncate inside an MMA instead of rounding, so the
// bound is doubled once more: tol.abs = 4 γ_{in+1} (in + 1), tol.rel = 0 (for f32 weights the
// products round too; γ covers it). A worst-case bound: on the CPU, scalar vs AVX2 order
// differ by ~2e-5 at in = 4096 against a bound of ~4, and the printed max_abs shows the real
// GPU error.
// Shapes with integer-valued x, w and bias make every product and partial sum exact on both
// sides (|sums| < 2^24): those are compared bit for bit and catch any layout or bounds slip
// that the error bound would hide at large in.
// Batch invariance (gemm_invariance): the same x rows computed alone and in batches of 3, 17,
// 64 and 200 rows give byte-identical y rows (no CPU involved).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/gemm.cuh"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

// v rounded to dtype t and back (what the GPU multiplies).
std::vector<float> RoundTo(const std::vector<float>& v, DType t) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    switch (t) {
      case DType::kF16:
        out[i] = F16ToF32(F32ToF16(v[i]));
        break;
      case DType::kBF16:
        out[i] = Bf16ToF32(F32ToBf16(v[i]));
        break;
      default:
        out[i] = v[i];
        break;
    }
  }
  return out;
}

// One Gemm for all cases (its plan cache is exercised across them).
absl::StatusOr<cuda::Gemm*> SharedGemm() {
  static std::unique_ptr<cuda::Gemm>* gemm = new std::unique_ptr<cuda::Gemm>();
  if (*gemm == nullptr) {
    absl::StatusOr<std::unique_ptr<cuda::Gemm>> g = cuda::Gemm::Create();
    if (!g.ok()) return g.status();
    *gemm = std::move(*g);
  }
  return gemm->get();
}

struct Shape {
  int64_t rows, in, out;
};

struct Problem {
  std::vector<float> x, w, bias;  // w as f32 values exactly representable in the dtype
};

Problem MakeProblem(const Shape& s, DType t, bool integers, uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p;
  if (integers) {
    std::uniform_int_distribution<int> small(-4, 4), b(-8, 8);
    p.x.resize(s.rows * s.in);
    p.w.resize(s.out * s.in);
    p.bias.resize(s.out);
    for (float& v : p.x) v = static_cast<float>(small(rng));
    for (float& v : p.w) v = static_cast<float>(small(rng));
    for (float& v : p.bias) v = static_cast<float>(b(rng));
  } else {
    p.x = Uniform(&rng, s.rows * s.in, -1, 1);
    p.w = RoundTo(Uniform(&rng, s.out * s.in, -1, 1), t);
    p.bias = Uniform(&rng, s.out, -1, 1);
  }
  return p;
}

// 4 γ_{in+1} (in + 1): |x|, |w|, |b| <= 1 bound every Σ_i |x_i w_i| + |b| by in + 1.
double ErrorBound(int64_t in) {
  const double n = static_cast<double>(in + 1);
  const double nu = n * 0x1.0p-24;
  return 4 * nu / (1 - nu) * n;
}

// Runs the CPU (on rounded x) and the GPU.
absl::Status RunGemm(const Shape& s, DType t, bool bias, bool integers, cudaStream_t st,
                     Outputs* o) {
  absl::StatusOr<cuda::Gemm*> gemm = SharedGemm();
  if (!gemm.ok()) return gemm.status();
  const Problem p =
      MakeProblem(s, t, integers, static_cast<uint32_t>(s.rows * 1009 + s.in * 31 + s.out));
  const std::vector<uint8_t> w = Encode(p.w, t);
  const std::vector<float> xr = RoundTo(p.x, t);
  o->cpu.assign(s.rows * s.out, 0.0f);
  MatMul(nullptr, xr.data(), s.rows, s.in, w.data(), t, s.out, bias ? p.bias.data() : nullptr,
         o->cpu.data());
  ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(p.x, st));
  ASSIGN_OR_RETURN_BUF(dw, DeviceBuffer::Upload(w, st));
  ASSIGN_OR_RETURN_BUF(db, DeviceBuffer::Upload(p.bias, st));
  ASSIGN_OR_RETURN_BUF(dy, DeviceBuffer::Alloc(sizeof(float) * o->cpu.size()));
  RETURN_IF_ERROR((*gemm)->MatMul(dx.as<float>(), s.rows, s.in, dw.as<void>(), t, s.out,
                                  bias ? db.as<float>() : nullptr, dy.as<float>(), st));
  return dy.Download(&o->gpu, st);
}

// Batch invariance (gemm.cuh): rows of one x [kBatchRows, in] computed inside batches of
// 3, 17 and 64 rows (the last rows of x, so each row sits at another position than in the
// full batch) and alone (rows = 1) must give the bytes the full kBatchRows-row call gives.
// Every call reads x from and writes y to its own cudaMalloc'd buffers, so the pointer
// alignments (part of Gemm's plan key) are the same for all. A fresh Gemm, so that
// num_fallback_plans() speaks of these shapes only: a fallback plan is not batch-invariant
// and fails the case. "cpu" holds the full batch's rows, "gpu" the same rows from the others.
constexpr int64_t kBatchRows = 200;

absl::Status RunInvariance(int64_t in, int64_t out, DType t, cudaStream_t st, Outputs* o) {
  absl::StatusOr<std::unique_ptr<cuda::Gemm>> gemm = cuda::Gemm::Create();
  if (!gemm.ok()) return gemm.status();
  const Problem p =
      MakeProblem({kBatchRows, in, out}, t, /*integers=*/false, static_cast<uint32_t>(in + out));
  const std::vector<uint8_t> w = Encode(p.w, t);
  ASSIGN_OR_RETURN_BUF(dw, DeviceBuffer::Upload(w, st));
  ASSIGN_OR_RETURN_BUF(db, DeviceBuffer::Upload(p.bias, st));
  // y of rows [first, first + rows) of x, computed as one call of that many rows.
  auto run = [&](int64_t first, int64_t rows, std::vector<float>* y) -> absl::Status {
    const std::vector<float> x(p.x.begin() + first * in, p.x.begin() + (first + rows) * in);
    ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
    ASSIGN_OR_RETURN_BUF(dy, DeviceBuffer::Alloc(sizeof(float) * rows * out));
    RETURN_IF_ERROR((*gemm)->MatMul(dx.as<float>(), rows, in, dw.as<void>(), t, out, db.as<float>(),
                                    dy.as<float>(), st));
    return dy.Download(y, st);
  };
  std::vector<float> full;
  RETURN_IF_ERROR(run(0, kBatchRows, &full));
  struct Part {
    int64_t first, rows;
  };
  const Part parts[] = {
      {kBatchRows - 3, 3}, {kBatchRows - 17, 17}, {kBatchRows - 64, 64}, {0, 1}, {1, 1}, {63, 1},
      {kBatchRows - 1, 1}};
  for (const Part& part : parts) {
    std::vector<float> y;
    RETURN_IF_ERROR(run(part.first, part.rows, &y));
    const float* want = full.data() + part.first * out;
    if (std::memcmp(y.data(), want, sizeof(float) * y.size()) != 0) {
      size_t i = 0;
      while (std::memcmp(&y[i], &want[i], sizeof(float)) == 0) ++i;
      return absl::InternalError(absl::StrFormat(
          "y[%d][%d] = %a in a batch of %d rows, %a in the batch of %d (%d of %d plans are "
          "fallbacks)",
          part.first + static_cast<int64_t>(i) / out, static_cast<int64_t>(i) % out, y[i],
          part.rows, want[i], kBatchRows, (*gemm)->num_fallback_plans(), (*gemm)->num_plans()));
    }
    o->cpu.insert(o->cpu.end(), want, want + y.size());
    o->gpu.insert(o->gpu.end(), y.begin(), y.end());
  }
  if ((*gemm)->num_fallback_plans() != 0) {
    return absl::InternalError(
        absl::StrCat((*gemm)->num_fallback_plans(), " of ", (*gemm)->num_plans(),
                     " plans fell back to a per-shape algorithm (not batch-invariant)"));
  }
  return absl::OkStatus();
}

void AddGemmCases(std::vector<Case>* cases) {
  const Shape shapes[] = {{1, 1, 1},       {3, 17, 5},       {7, 33, 31},
                          {2, 255, 129},   {17, 1, 9},       {64, 256, 1000},
                          {5, 4096, 4096}, {129, 4097, 257}, {1, 2048, 32001}};
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (const Shape& s : shapes) {
      for (bool bias : {false, true}) {
        const double bound = ErrorBound(s.in);
        cases->push_back({"gemm",
                          absl::StrFormat("%s,rows=%d,in=%d,out=%d,%s", DTypeName(t), s.rows, s.in,
                                          s.out, bias ? "bias" : "no-bias"),
                          Tolerance{bound, 0}, [s, t, bias](cudaStream_t st, Outputs* o) {
                            return RunGemm(s, t, bias, /*integers=*/false, st, o);
                          }});
      }
    }
  }
  // Exact arithmetic on both sides: bit-identical.
  const Shape int_shapes[] = {{3, 17, 5}, {33, 1023, 65}, {1, 4096, 4097}, {130, 129, 131}};
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (const Shape& s : int_shapes) {
      cases->push_back({"gemm_exact",
                        absl::StrFormat("%s,rows=%d,in=%d,out=%d,bias,int-valued", DTypeName(t),
                                        s.rows, s.in, s.out),
                        kExact, [s, t](cudaStream_t st, Outputs* o) {
                          return RunGemm(s, t, /*bias=*/true, /*integers=*/true, st, o);
                        }});
    }
  }
  // in == 0: y = bias.
  cases->push_back(
      {"gemm_exact", "bf16,rows=3,in=0,out=7,bias", kExact, [](cudaStream_t st, Outputs* o) {
         return RunGemm({3, 0, 7}, DType::kBF16, true, false, st, o);
       }});
  // Batch invariance, bit for bit (x, w, bias from [-1, 1]: the sums round, so any change of
  // order would show).
  const std::pair<int64_t, int64_t> inv_shapes[] = {{255, 129}, {1024, 3000}, {4096, 4096}};
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (const auto& [in, out] : inv_shapes) {
      cases->push_back({"gemm_invariance",
                        absl::StrFormat("%s,in=%d,out=%d,rows=1/3/17/64 vs %d", DTypeName(t), in,
                                        out, kBatchRows),
                        kExact, [in = in, out = out, t](cudaStream_t st, Outputs* o) {
                          return RunInvariance(in, out, t, st, o);
                        }});
    }
  }
  // Determinism: the cached plan gives the same bits again ("cpu" holds the first GPU run).
  cases->push_back({"gemm_repeat", "bf16,rows=9,in=1000,out=300,bias,twice", kExact,
                    [](cudaStream_t st, Outputs* o) -> absl::Status {
                      absl::StatusOr<cuda::Gemm*> gemm = SharedGemm();
                      if (!gemm.ok()) return gemm.status();
                      const Shape s{9, 1000, 300};
                      const Problem p = MakeProblem(s, DType::kBF16, false, 77);
                      const std::vector<uint8_t> w = Encode(p.w, DType::kBF16);
                      ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(p.x, st));
                      ASSIGN_OR_RETURN_BUF(dw, DeviceBuffer::Upload(w, st));
                      ASSIGN_OR_RETURN_BUF(db, DeviceBuffer::Upload(p.bias, st));
                      ASSIGN_OR_RETURN_BUF(dy, DeviceBuffer::Alloc(sizeof(float) * s.rows * s.out));
                      const size_t plans = (*gemm)->num_plans();
                      for (std::vector<float>* out : {&o->cpu, &o->gpu}) {
                        RETURN_IF_ERROR((*gemm)->MatMul(dx.as<float>(), s.rows, s.in, dw.as<void>(),
                                                        DType::kBF16, s.out, db.as<float>(),
                                                        dy.as<float>(), st));
                        RETURN_IF_ERROR(dy.Download(out, st));
                      }
                      if ((*gemm)->num_plans() != plans + 1) {
                        return absl::InternalError(absl::StrCat("expected one new plan, have ",
                                                                (*gemm)->num_plans(), " (was ",
                                                                plans, ")"));
                      }
                      return absl::OkStatus();
                    }});
}

void GemmHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  using absl::StatusCode;
  auto code = [](const absl::Status& s) { return s.code(); };
  // Never dereferenced on these paths.
  auto* f = reinterpret_cast<float*>(uintptr_t{256});
  const void* w = reinterpret_cast<const void*>(uintptr_t{256});
  const void* odd = reinterpret_cast<const void*>(uintptr_t{257});
  expect(cuda::ValidateGemmArgs(f, 3, 8, w, DType::kBF16, 5, nullptr, f).ok(),
         "ValidateGemmArgs bf16, no bias -> OK");
  expect(code(cuda::ValidateGemmArgs(f, -1, 8, w, DType::kF32, 5, nullptr, f)) ==
             StatusCode::kInvalidArgument,
         "ValidateGemmArgs rows < 0 -> INVALID_ARGUMENT");
  expect(code(cuda::ValidateGemmArgs(f, 3, 8, w, DType::kI8, 5, nullptr, f)) ==
             StatusCode::kInvalidArgument,
         "ValidateGemmArgs int8 weights -> INVALID_ARGUMENT");
  expect(code(cuda::ValidateGemmArgs(nullptr, 3, 8, w, DType::kF16, 5, nullptr, f)) ==
             StatusCode::kInvalidArgument,
         "ValidateGemmArgs null x -> INVALID_ARGUMENT");
  expect(code(cuda::ValidateGemmArgs(f, 3, 8, odd, DType::kBF16, 5, nullptr, f)) ==
             StatusCode::kInvalidArgument,
         "ValidateGemmArgs misaligned bf16 w -> INVALID_ARGUMENT");
  expect(code(cuda::ValidateGemmArgs(f, 3, 8, w, DType::kF32, 5,
                                     reinterpret_cast<const float*>(uintptr_t{258}), f)) ==
             StatusCode::kInvalidArgument,
         "ValidateGemmArgs misaligned bias -> INVALID_ARGUMENT");
  expect(cuda::ValidateGemmArgs(nullptr, 0, 8, nullptr, DType::kF32, 5, nullptr, nullptr).ok(),
         "ValidateGemmArgs rows == 0 -> OK (no-op)");
  expect(cuda::ValidateGemmArgs(nullptr, 3, 0, nullptr, DType::kF32, 5, nullptr, f).ok(),
         "ValidateGemmArgs in == 0 needs no x / w -> OK");
  if (cuda::CudaDeviceCount() == 0) {
    const absl::StatusOr<std::unique_ptr<cuda::Gemm>> g = cuda::Gemm::Create();
    expect(!g.ok() && g.status().code() == StatusCode::kUnavailable,
           "Gemm::Create without a device -> UNAVAILABLE");
  }
}

}  // namespace
KVR_PARITY_CASES(AddGemmCases);
KVR_PARITY_HOST_CHECKS(GemmHostChecks);
}  // namespace kvrelay::kernels::parity
