// CUDA ops against their CPU twins, in the style of ggml's test-backend-ops: a table of
// ops x shapes (odd sizes, several rows, special values), each run on both backends from the
// same inputs and compared element by element with a per-op tolerance
// |gpu - cpu| <= abs + rel * |cpu| (NaN must match NaN, infinities must match exactly).
// Each op's cases live in tests/gpu/parity_<op>.cc.
//
// Usage: cuda_parity_test [op-substring]   e.g. cuda_parity_test norm
// Exit: 0 all passed, 1 a failure, 77 no usable CUDA device (ctest SKIP_RETURN_CODE): the
// host-side checks (argument validation, error mapping) still run and can fail without a GPU.
#include "tests/gpu/parity.h"

#include <cstdio>
#include <cstring>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvrelay::kernels::parity {

std::vector<CaseAdder>& Adders() {
  static auto* adders = new std::vector<CaseAdder>();
  return *adders;
}
std::vector<HostChecks>& Checks() {
  static auto* checks = new std::vector<HostChecks>();
  return *checks;
}
bool RegisterCases(CaseAdder adder) {
  Adders().push_back(adder);
  return true;
}
bool RegisterHostChecks(HostChecks checks) {
  Checks().push_back(checks);
  return true;
}

std::vector<float> Uniform(std::mt19937* rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(*rng);
  return v;
}

void SprinkleSpecials(std::vector<float>* v) {
  const float kSpecials[] = {0.0f,  -0.0f,  INFINITY, -INFINITY, NAN,   1e-40f, -1e-40f,
                             88.7f, -88.7f, 1e30f,    -1e30f,    20.0f, -20.0f, 9.5f,
                             -9.5f, 3e-38f, 1e-7f,    -1e-7f,    0.5f,  -0.5f};
  const size_t n = sizeof(kSpecials) / sizeof(kSpecials[0]);
  if (v->empty()) return;
  for (size_t i = 0; i < n; ++i) (*v)[(i * 7919) % v->size()] = kSpecials[i];
}

std::vector<uint8_t> Encode(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> bytes(v.size() * DTypeSize(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::kF32) {
      std::memcpy(&bytes[i * 4], &v[i], 4);
    } else {
      const uint16_t h = t == DType::kF16 ? F32ToF16(v[i]) : F32ToBf16(v[i]);
      std::memcpy(&bytes[i * 2], &h, 2);
    }
  }
  return bytes;
}

Comparison Compare(const Outputs& o, Tolerance tol) {
  Comparison c;
  if (o.cpu.size() != o.gpu.size()) {
    c.ok = false;
    c.first_bad = absl::StrCat("size ", o.gpu.size(), " != ", o.cpu.size());
    return c;
  }
  for (size_t i = 0; i < o.cpu.size(); ++i) {
    const float a = o.cpu[i], b = o.gpu[i];
    if (std::memcmp(&a, &b, sizeof(float)) == 0) {
      ++c.bit_exact;
      continue;
    }
    bool good;
    if (std::isnan(a) || std::isnan(b)) {
      good = std::isnan(a) && std::isnan(b);
    } else if (std::isinf(a) || std::isinf(b)) {
      good = a == b;
    } else {
      const double d = std::fabs(static_cast<double>(a) - b);
      c.max_abs = std::max(c.max_abs, d);
      if (a != 0) c.max_rel = std::max(c.max_rel, d / std::fabs(a));
      good = d <= tol.abs + tol.rel * std::fabs(a);
    }
    if (!good && c.ok) {
      c.ok = false;
      c.first_bad = absl::StrFormat("[%d] cpu %.9g gpu %.9g", i, a, b);
    }
  }
  return c;
}

namespace {

constexpr int kSkip = 77;

// ---- Host-side checks (no device needed) ----

absl::Status FailingCall() {
  KVR_CUDA_RETURN_IF_ERROR(cudaErrorMemoryAllocation);
  return absl::OkStatus();
}
absl::Status FailingCublasCall() {
  KVR_CUBLAS_RETURN_IF_ERROR(CUBLAS_STATUS_INVALID_VALUE);
  return absl::OkStatus();
}

int RunHostChecks() {
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    std::printf("  host  %-60s %s\n", what.c_str(), ok ? "OK" : "FAIL");
    if (!ok) ++failures;
  };
  using absl::StatusCode;

  const absl::Status s = FailingCall();
  expect(s.code() == StatusCode::kResourceExhausted &&
             absl::StrContains(s.message(), "parity.cc:") &&
             absl::StrContains(s.message(), "cudaErrorMemoryAllocation"),
         "KVR_CUDA_RETURN_IF_ERROR -> RESOURCE_EXHAUSTED, file:line, name");
  const absl::Status b = FailingCublasCall();
  expect(b.code() == StatusCode::kInvalidArgument &&
             absl::StrContains(b.message(), "CUBLAS_STATUS_INVALID_VALUE"),
         "KVR_CUBLAS_RETURN_IF_ERROR -> INVALID_ARGUMENT, name");

  for (HostChecks checks : Checks()) checks(expect);
  return failures;
}

int Main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  std::printf("cuda_parity_test: CUDA ops vs CPU twins\n");
  const int host_failures = RunHostChecks();

  std::string why;
  const int devices = cuda::CudaDeviceCount(&why);
  if (host_failures > 0) {
    std::printf("cuda_parity_test: %d host-side check(s) FAILED\n", host_failures);
    return 1;
  }
  if (devices == 0) {
    std::printf("cuda_parity_test: no CUDA device: skipped (%s)\n", why.c_str());
    return kSkip;
  }
  // The device query must not leave an error behind for the launches below to report.
  if (cudaGetLastError() != cudaSuccess) {
    std::printf("cuda_parity_test: CudaDeviceCount left a pending CUDA error\n");
    return 1;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    std::printf("device 0: %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
  }
  cudaStream_t stream = nullptr;
  if (cudaStreamCreate(&stream) != cudaSuccess) {
    std::printf("cuda_parity_test: cudaStreamCreate failed\n");
    return 1;
  }

  std::vector<Case> cases;
  for (CaseAdder add : Adders()) add(&cases);

  int run = 0, failed = 0;
  for (const Case& c : cases) {
    if (!filter.empty() && c.op.find(filter) == std::string::npos) continue;
    ++run;
    Outputs o;
    const absl::Status st = c.run(stream, &o);
    if (!st.ok()) {
      ++failed;
      std::printf("  %-18s %-48s ERROR %s\n", c.op.c_str(), c.params.c_str(),
                  st.ToString().c_str());
      continue;
    }
    const Comparison cmp = Compare(o, c.tol);
    if (!cmp.ok) ++failed;
    std::printf("  %-18s %-48s %s  bit-exact %lld/%zu  max_abs %.3g  max_rel %.3g%s%s\n",
                c.op.c_str(), c.params.c_str(), cmp.ok ? "OK  " : "FAIL",
                static_cast<long long>(cmp.bit_exact), o.cpu.size(), cmp.max_abs, cmp.max_rel,
                cmp.ok ? "" : "  first: ", cmp.first_bad.c_str());
  }
  (void)cudaStreamDestroy(stream);
  std::printf("cuda_parity_test: %d/%d cases passed\n", run - failed, run);
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace kvrelay::kernels::parity

int main(int argc, char** argv) { return kvrelay::kernels::parity::Main(argc, argv); }
