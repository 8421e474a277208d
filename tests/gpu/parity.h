// The CUDA-vs-CPU parity test's shared parts (tests/gpu/parity.cc has main): device
// buffers, inputs, the comparison, and the table of cases that every parity_<op>.cc adds
// to with KVR_PARITY_CASES / KVR_PARITY_HOST_CHECKS (no central list to edit).
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/dtype.h"

namespace kvrelay::kernels::parity {

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

std::vector<float> Uniform(std::mt19937* rng, size_t n, float lo, float hi);
// Overwrites a spread of elements with values where implementations tend to differ.
void SprinkleSpecials(std::vector<float>* v);
// v as raw elements of dtype t (f32, f16 or bf16): weight / table bytes for both backends.
std::vector<uint8_t> Encode(const std::vector<float>& v, DType t);

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

Comparison Compare(const Outputs& o, Tolerance tol);

// ---- The table ----

struct Case {
  std::string op;
  std::string params;
  Tolerance tol;
  std::function<absl::Status(cudaStream_t, Outputs*)> run;
};

// For ops whose GPU arithmetic is the CPU's, operation for operation.
constexpr Tolerance kExact{0, 0};

// Adds an op's cases to the table; runs once, before any case.
using CaseAdder = void (*)(std::vector<Case>* cases);
// Host-side checks that need no device (argument validation, error mapping): call
// expect(ok, what) per check.
using HostChecks = void (*)(const std::function<void(bool ok, const std::string& what)>& expect);
bool RegisterCases(CaseAdder adder);
bool RegisterHostChecks(HostChecks checks);

}  // namespace kvrelay::kernels::parity

#define KVR_PARITY_CONCAT_(a, b) a##b
#define KVR_PARITY_CONCAT(a, b) KVR_PARITY_CONCAT_(a, b)
// At namespace scope in a parity_<op>.cc: KVR_PARITY_CASES(AddMyOpCases);
#define KVR_PARITY_CASES(fn)                                                          \
  static const bool KVR_PARITY_CONCAT(kvr_parity_cases_, __LINE__) [[maybe_unused]] = \
      ::kvrelay::kernels::parity::RegisterCases(fn)
#define KVR_PARITY_HOST_CHECKS(fn)                                                     \
  static const bool KVR_PARITY_CONCAT(kvr_parity_checks_, __LINE__) [[maybe_unused]] = \
      ::kvrelay::kernels::parity::RegisterHostChecks(fn)
