// CUDA ops against their CPU twins, in the style of ggml's test-backend-ops: a table of
// ops x shapes (odd sizes, several rows, special values), each run on both backends from the
// same inputs and compared element by element with a per-op tolerance
// |gpu - cpu| <= abs + rel * |cpu| (NaN must match NaN, infinities must match exactly).
//
// Usage: cuda_parity_test [op-substring]   e.g. cuda_parity_test norm
// Exit: 0 all passed, 1 a failure, 77 no usable CUDA device (ctest SKIP_RETURN_CODE): the
// host-side checks (argument validation, error mapping) still run and can fail without a GPU.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/activations.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/norms.cuh"
#include "kernels/dtype.h"
#include "kernels/ops.h"

namespace kvrelay::kernels {
namespace {

constexpr int kSkip = 77;

// ---- Device memory ----

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(o.n_) {}
  ~DeviceBuffer() {
    if (p_ != nullptr) (void)cudaFree(p_);
  }

  static absl::StatusOr<DeviceBuffer> Alloc(size_t bytes) {
    DeviceBuffer b;
    KVR_CUDA_RETURN_IF_ERROR(cudaMalloc(&b.p_, bytes == 0 ? 1 : bytes));
    b.n_ = bytes;
    return b;
  }
  template <typename T>
  static absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& v, cudaStream_t s) {
    absl::StatusOr<DeviceBuffer> b = Alloc(sizeof(T) * v.size());
    if (!b.ok()) return b.status();
    KVR_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(b->p_, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice, s));
    return b;
  }
  // Copies the whole buffer into *v (resized to fit) and waits for the stream.
  template <typename T>
  absl::Status Download(std::vector<T>* v, cudaStream_t s) const {
    v->resize(n_ / sizeof(T));
    KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v->data(), p_, n_, cudaMemcpyDeviceToHost, s));
    KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    return absl::OkStatus();
  }

  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

#define ASSIGN_OR_RETURN_BUF(lhs, expr)           \
  absl::StatusOr<DeviceBuffer> lhs##_or = (expr); \
  if (!lhs##_or.ok()) return lhs##_or.status();   \
  DeviceBuffer lhs = std::move(*lhs##_or)

#define RETURN_IF_ERROR(expr)        \
  do {                               \
    const absl::Status st_ = (expr); \
    if (!st_.ok()) return st_;       \
  } while (0)

// ---- Inputs ----

std::vector<float> Uniform(std::mt19937* rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(*rng);
  return v;
}

// Overwrites a spread of elements with values where implementations tend to differ.
void SprinkleSpecials(std::vector<float>* v) {
  const float kSpecials[] = {0.0f,  -0.0f,  INFINITY, -INFINITY, NAN,   1e-40f, -1e-40f,
                             88.7f, -88.7f, 1e30f,    -1e30f,    20.0f, -20.0f, 9.5f,
                             -9.5f, 3e-38f, 1e-7f,    -1e-7f,    0.5f,  -0.5f};
  const size_t n = sizeof(kSpecials) / sizeof(kSpecials[0]);
  if (v->empty()) return;
  for (size_t i = 0; i < n; ++i) (*v)[(i * 7919) % v->size()] = kSpecials[i];
}

// ---- Comparison ----

struct Tolerance {
  double abs;
  double rel;
};

struct Outputs {
  std::vector<float> cpu, gpu;
};

struct Comparison {
  bool ok = true;
  int64_t bit_exact = 0;
  double max_abs = 0, max_rel = 0;
  std::string first_bad;
};

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

// ---- The table ----

struct Case {
  std::string op;
  std::string params;
  Tolerance tol;
  std::function<absl::Status(cudaStream_t, Outputs*)> run;
};

// Norms reduce in double on both sides: only a different rounding of the double sum can move
// 1/rms by an ulp. Activations: CUDA's expf/tanhf/erff are within 2 ulp of libm's.
constexpr Tolerance kNormTol{1e-6, 1e-6};
constexpr Tolerance kActTol{1e-6, 1e-5};
constexpr Tolerance kExact{0, 0};

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
std::vector<uint8_t> EncodeTable(const std::vector<float>& v, DType t) {
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

void AddEmbeddingCases(std::vector<Case>* cases) {
  struct Shape {
    int64_t vocab, dim, n;
  };
  const Shape shapes[] = {{10, 1, 3}, {100, 33, 17}, {1000, 4097, 5}, {50, 256, 300}};
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (const Shape& s : shapes) {
      cases->push_back(
          {"embedding",
           absl::StrFormat("%s,vocab=%d,dim=%d,n=%d", DTypeName(t), s.vocab, s.dim, s.n), kExact,
           [s, t](cudaStream_t st, Outputs* o) -> absl::Status {
             std::mt19937 rng(static_cast<uint32_t>(s.vocab + s.dim + s.n));
             const auto values = Uniform(&rng, s.vocab * s.dim, -70000, 70000);
             const std::vector<uint8_t> table = EncodeTable(values, t);
             std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(s.vocab - 1));
             std::vector<int32_t> ids(s.n);
             for (int32_t& id : ids) id = pick(rng);
             ids.back() = static_cast<int32_t>(s.vocab - 1);  // the last row
             o->cpu.resize(s.n * s.dim);
             EmbeddingGather(ids.data(), s.n, table.data(), t, s.dim, o->cpu.data());
             ASSIGN_OR_RETURN_BUF(dids, DeviceBuffer::Upload(ids, st));
             ASSIGN_OR_RETURN_BUF(dtable, DeviceBuffer::Upload(table, st));
             ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * o->cpu.size()));
             RETURN_IF_ERROR(cuda::EmbeddingGather(dids.as<int32_t>(), s.n, dtable.as<void>(), t,
                                                   s.vocab, s.dim, dout.as<float>(), nullptr, st));
             return dout.Download(&o->gpu, st);
           }});
    }
  }
  // Out-of-range ids: zero rows, counted; the other rows as the CPU gathers them.
  cases->push_back({"embedding_bad_ids", "f32,vocab=20,dim=40,ids={3,-1,20,19,2147483647,0}",
                    kExact, [](cudaStream_t st, Outputs* o) -> absl::Status {
                      const int64_t vocab = 20, dim = 40;
                      std::mt19937 rng(5);
                      const auto table = Uniform(&rng, vocab * dim, -1, 1);
                      const std::vector<int32_t> ids = {3, -1, 20, 19, 2147483647, 0};
                      const int64_t n = static_cast<int64_t>(ids.size());
                      o->cpu.assign(n * dim, 0.0f);
                      for (int64_t t = 0; t < n; ++t) {
                        if (ids[t] >= 0 && ids[t] < vocab) {
                          EmbeddingGather(&ids[t], 1, table.data(), DType::kF32, dim,
                                          &o->cpu[t * dim]);
                        }
                      }
                      ASSIGN_OR_RETURN_BUF(dids, DeviceBuffer::Upload(ids, st));
                      ASSIGN_OR_RETURN_BUF(dtable, DeviceBuffer::Upload(table, st));
                      ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * n * dim));
                      ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
                      RETURN_IF_ERROR(cuda::EmbeddingGather(
                          dids.as<int32_t>(), n, dtable.as<float>(), DType::kF32, vocab, dim,
                          dout.as<float>(), dbad.as<int32_t>(), st));
                      std::vector<int32_t> bad;
                      RETURN_IF_ERROR(dbad.Download(&bad, st));
                      if (bad.size() != 1 || bad[0] != 3) {
                        return absl::InternalError(
                            absl::StrCat("bad-id count ", bad.empty() ? -1 : bad[0], ", want 3"));
                      }
                      return dout.Download(&o->gpu, st);
                    }});
}

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
  auto code = [](const absl::Status& s) { return s.code(); };
  using absl::StatusCode;
  float* bogus = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced on these paths

  const absl::Status s = FailingCall();
  expect(s.code() == StatusCode::kResourceExhausted &&
             absl::StrContains(s.message(), "cuda_parity_test.cc:") &&
             absl::StrContains(s.message(), "cudaErrorMemoryAllocation"),
         "KVR_CUDA_RETURN_IF_ERROR -> RESOURCE_EXHAUSTED, file:line, name");
  const absl::Status b = FailingCublasCall();
  expect(b.code() == StatusCode::kInvalidArgument &&
             absl::StrContains(b.message(), "CUBLAS_STATUS_INVALID_VALUE"),
         "KVR_CUBLAS_RETURN_IF_ERROR -> INVALID_ARGUMENT, name");

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
  expect(code(cuda::SiluMul(bogus, 2, -3, bogus, nullptr)) == StatusCode::kInvalidArgument,
         "SiluMul inter < 0 -> INVALID_ARGUMENT");
  expect(cuda::SiluMul(nullptr, 0, 5, nullptr, nullptr).ok(), "SiluMul rows == 0 -> OK");
  expect(code(cuda::GeluTanh(nullptr, 5, nullptr)) == StatusCode::kInvalidArgument,
         "GeluTanh null -> INVALID_ARGUMENT");
  expect(cuda::GeluErf(nullptr, 0, nullptr).ok(), "GeluErf n == 0 -> OK");
  int32_t* ids = reinterpret_cast<int32_t*>(uintptr_t{64});
  expect(code(cuda::EmbeddingGather(ids, 2, bogus, DType::kI8, 4, 4, bogus, nullptr, nullptr)) ==
             StatusCode::kInvalidArgument,
         "EmbeddingGather int8 table -> INVALID_ARGUMENT");
  expect(code(cuda::EmbeddingGather(ids, 2, bogus, DType::kF32, -4, 4, bogus, nullptr, nullptr)) ==
             StatusCode::kInvalidArgument,
         "EmbeddingGather vocab < 0 -> INVALID_ARGUMENT");
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
  AddNormCases(&cases);
  AddActivationCases(&cases);
  AddEmbeddingCases(&cases);

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
}  // namespace kvrelay::kernels

int main(int argc, char** argv) { return kvrelay::kernels::Main(argc, argv); }
