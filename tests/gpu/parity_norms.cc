// Parity cases: RMSNorm and LayerNorm.
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/norms.cuh"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

// Norms reduce in double on both sides: only a different rounding of the double sum can move
// 1/rms by an ulp.
constexpr Tolerance kNormTol{1e-6, 1e-6};

void AddNormCases(std::vector<Case>* cases) {
  struct Shape {
    int64_t rows, dim;
    float lo, hi, eps;
  };
  const Shape shapes[] = {{1, 1, -1, 1, 1e-5f},       {3, 7, -1, 1, 1e-5f},
                          {5, 64, -2, 2, 1e-6f},      {4, 255, -1, 1, 1e-5f},
                          {7, 1000, -3, 3, 1e-5f},    {2, 4097, -1, 1, 1e-6f},
                          {300, 33, -1, 1, 1e-5f},    {3, 8193, -1e20f, 1e20f, 1e-5f},
                          {6, 771, 99.0f, 101.0f, 0}, {2, 129, -1e-20f, 1e-20f, 1e-5f}};
  for (const Shape& s : shapes) {
    const std::string params =
        absl::StrFormat("rows=%d,dim=%d,x=[%g,%g],eps=%g", s.rows, s.dim, s.lo, s.hi, s.eps);
    for (bool layer : {false, true}) {
      cases->push_back(
          {layer ? "layer_norm" : "rms_norm", params, kNormTol,
           [s, layer](cudaStream_t st, Outputs* o) -> absl::Status {
             std::mt19937 rng(static_cast<uint32_t>(s.rows * 131 + s.dim));
             const auto x = Uniform(&rng, s.rows * s.dim, s.lo, s.hi);
             const auto w = Uniform(&rng, s.dim, -2, 2);
             const auto b = Uniform(&rng, s.dim, -1, 1);
             o->cpu.resize(x.size());
             ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
             ASSIGN_OR_RETURN_BUF(dw, DeviceBuffer::Upload(w, st));
             ASSIGN_OR_RETURN_BUF(db, DeviceBuffer::Upload(b, st));
             ASSIGN_OR_RETURN_BUF(dy, DeviceBuffer::Alloc(sizeof(float) * x.size()));
             if (layer) {
               LayerNorm(x.data(), w.data(), b.data(), s.rows, s.dim, s.eps, o->cpu.data());
               RETURN_IF_ERROR(cuda::LayerNorm(dx.as<float>(), dw.as<float>(), db.as<float>(),
                                               s.rows, s.dim, s.eps, dy.as<float>(), st));
             } else {
               RmsNorm(x.data(), w.data(), s.rows, s.dim, s.eps, o->cpu.data());
               RETURN_IF_ERROR(cuda::RmsNorm(dx.as<float>(), dw.as<float>(), s.rows, s.dim, s.eps,
                                             dy.as<float>(), st));
             }
             return dy.Download(&o->gpu, st);
           }});
    }
    // In place (y == x) must give the same result.
    cases->push_back(
        {"rms_norm_in_place", params, kNormTol, [s](cudaStream_t st, Outputs* o) -> absl::Status {
           std::mt19937 rng(static_cast<uint32_t>(s.rows * 7 + s.dim));
           const auto x = Uniform(&rng, s.rows * s.dim, s.lo, s.hi);
           const auto w = Uniform(&rng, s.dim, -2, 2);
           o->cpu.resize(x.size());
           RmsNorm(x.data(), w.data(), s.rows, s.dim, s.eps, o->cpu.data());
           ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
           ASSIGN_OR_RETURN_BUF(dw, DeviceBuffer::Upload(w, st));
           RETURN_IF_ERROR(cuda::RmsNorm(dx.as<float>(), dw.as<float>(), s.rows, s.dim, s.eps,
                                         dx.as<float>(), st));
           return dx.Download(&o->gpu, st);
         }});
  }
  // Batch invariance on the GPU itself (DESIGN §6): row r of a 300-row call is bit-identical
  // to the same row normalised alone ("cpu" holds the single-row GPU result here).
  for (bool layer : {false, true}) {
    cases->push_back(
        {layer ? "layer_norm_batch_invariant" : "rms_norm_batch_invariant",
         "rows=300,dim=1031,row=123", kExact, [layer](cudaStream_t st, Outputs* o) -> absl::Status {
           const int64_t rows = 300, dim = 1031, r = 123;
           std::mt19937 rng(11);
           const auto x = Uniform(&rng, rows * dim, -3, 3);
           const auto w = Uniform(&rng, dim, -2, 2);
           const auto b = Uniform(&rng, dim, -1, 1);
           const std::vector<float> row(x.begin() + r * dim, x.begin() + (r + 1) * dim);
           ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
           ASSIGN_OR_RETURN_BUF(drow, DeviceBuffer::Upload(row, st));
           ASSIGN_OR_RETURN_BUF(dw, DeviceBuffer::Upload(w, st));
           ASSIGN_OR_RETURN_BUF(db, DeviceBuffer::Upload(b, st));
           if (layer) {
             RETURN_IF_ERROR(cuda::LayerNorm(dx.as<float>(), dw.as<float>(), db.as<float>(), rows,
                                             dim, 1e-5f, dx.as<float>(), st));
             RETURN_IF_ERROR(cuda::LayerNorm(drow.as<float>(), dw.as<float>(), db.as<float>(), 1,
                                             dim, 1e-5f, drow.as<float>(), st));
           } else {
             RETURN_IF_ERROR(cuda::RmsNorm(dx.as<float>(), dw.as<float>(), rows, dim, 1e-5f,
                                           dx.as<float>(), st));
             RETURN_IF_ERROR(cuda::RmsNorm(drow.as<float>(), dw.as<float>(), 1, dim, 1e-5f,
                                           drow.as<float>(), st));
           }
           std::vector<float> all;
           RETURN_IF_ERROR(dx.Download(&all, st));
           RETURN_IF_ERROR(drow.Download(&o->cpu, st));
           o->gpu.assign(all.begin() + r * dim, all.begin() + (r + 1) * dim);
           return absl::OkStatus();
         }});
  }
}

void NormHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  auto code = [](const absl::Status& s) { return s.code(); };
  using absl::StatusCode;
  float* bogus = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced on these paths
  expect(code(cuda::RmsNorm(bogus, bogus, -1, 8, 1e-5f, bogus, nullptr)) ==
             StatusCode::kInvalidArgument,
         "RmsNorm rows < 0 -> INVALID_ARGUMENT");
  expect(code(cuda::RmsNorm(nullptr, bogus, 2, 8, 1e-5f, bogus, nullptr)) ==
             StatusCode::kInvalidArgument,
         "RmsNorm null x -> INVALID_ARGUMENT");
  expect(cuda::RmsNorm(nullptr, nullptr, 0, 8, 1e-5f, nullptr, nullptr).ok(),
         "RmsNorm rows == 0 -> OK, nothing launched");
  expect(code(cuda::LayerNorm(bogus, bogus, nullptr, 2, 8, 1e-5f, bogus, nullptr)) ==
             StatusCode::kInvalidArgument,
         "LayerNorm null b -> INVALID_ARGUMENT");
}

}  // namespace
KVR_PARITY_CASES(AddNormCases);
KVR_PARITY_HOST_CHECKS(NormHostChecks);
}  // namespace kvrelay::kernels::parity
