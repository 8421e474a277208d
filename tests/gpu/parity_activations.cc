// Parity cases: SwiGLU and GELU.
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/activations.cuh"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

// CUDA's expf/tanhf/erff are within 2 ulp of libm's.
constexpr Tolerance kActTol{1e-6, 1e-5};

void AddActivationCases(std::vector<Case>* cases) {
  struct SwiShape {
    int64_t rows, inter;
    float range;
    bool specials;
  };
  const SwiShape swi[] = {{1, 1, 5, false},      {3, 7, 5, false},     {5, 1001, 10, false},
                          {2, 11008, 10, false}, {130, 33, 10, false}, {4, 257, 100, true}};
  for (const SwiShape& s : swi) {
    cases->push_back(
        {"swiglu",
         absl::StrFormat("rows=%d,inter=%d,x=[-%g,%g]%s", s.rows, s.inter, s.range, s.range,
                         s.specials ? ",specials" : ""),
         kActTol, [s](cudaStream_t st, Outputs* o) -> absl::Status {
           std::mt19937 rng(static_cast<uint32_t>(s.rows * 17 + s.inter));
           auto gu = Uniform(&rng, s.rows * 2 * s.inter, -s.range, s.range);
           if (s.specials) SprinkleSpecials(&gu);
           o->cpu.resize(s.rows * s.inter);
           SiluMul(gu.data(), s.rows, s.inter, o->cpu.data());
           ASSIGN_OR_RETURN_BUF(dgu, DeviceBuffer::Upload(gu, st));
           ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * o->cpu.size()));
           RETURN_IF_ERROR(cuda::SiluMul(dgu.as<float>(), s.rows, s.inter, dout.as<float>(), st));
           return dout.Download(&o->gpu, st);
         }});
  }
  struct GeluShape {
    int64_t n;
    float range;
    bool specials;
  };
  const GeluShape gelu[] = {
      {1, 3, false}, {7, 3, false}, {1000, 10, false}, {100003, 10, false}, {4099, 100, true}};
  for (const GeluShape& s : gelu) {
    for (bool erf : {false, true}) {
      cases->push_back({erf ? "gelu_erf" : "gelu_tanh",
                        absl::StrFormat("n=%d,x=[-%g,%g]%s", s.n, s.range, s.range,
                                        s.specials ? ",specials" : ""),
                        kActTol, [s, erf](cudaStream_t st, Outputs* o) -> absl::Status {
                          std::mt19937 rng(static_cast<uint32_t>(s.n));
                          auto x = Uniform(&rng, s.n, -s.range, s.range);
                          if (s.specials) SprinkleSpecials(&x);
                          ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
                          o->cpu = x;
                          if (erf) {
                            GeluErf(o->cpu.data(), s.n);
                            RETURN_IF_ERROR(cuda::GeluErf(dx.as<float>(), s.n, st));
                          } else {
                            GeluTanh(o->cpu.data(), s.n);
                            RETURN_IF_ERROR(cuda::GeluTanh(dx.as<float>(), s.n, st));
                          }
                          return dx.Download(&o->gpu, st);
                        }});
    }
  }
}

// A [vocab, dim] table of dtype t holding the f32 values `v` rounded to t.
void ActivationHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  auto code = [](const absl::Status& s) { return s.code(); };
  using absl::StatusCode;
  float* bogus = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced on these paths
  expect(code(cuda::SiluMul(bogus, 2, -3, bogus, nullptr)) == StatusCode::kInvalidArgument,
         "SiluMul inter < 0 -> INVALID_ARGUMENT");
  expect(cuda::SiluMul(nullptr, 0, 5, nullptr, nullptr).ok(), "SiluMul rows == 0 -> OK");
  expect(code(cuda::GeluTanh(nullptr, 5, nullptr)) == StatusCode::kInvalidArgument,
         "GeluTanh null -> INVALID_ARGUMENT");
  expect(cuda::GeluErf(nullptr, 0, nullptr).ok(), "GeluErf n == 0 -> OK");
}

}  // namespace
KVR_PARITY_CASES(AddActivationCases);
KVR_PARITY_HOST_CHECKS(ActivationHostChecks);
}  // namespace kvrelay::kernels::parity
