// Matrix multiply on the GPU through cuBLASLt: the CUDA twin of kernels::MatMul
// (kernels/ops.h), y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ bias[out]), with f32 x / y / bias
// and f32, f16 or bf16 weights. Pointers are device memory; calls are asynchronous on the
// given stream (a returned OK means the work was queued).
//
// Numerics (see gemm.cu): for f16 / bf16 weights x is first rounded to the weight dtype
// (round to nearest even, as kernels::F32ToF16 / F32ToBf16) and the products are accumulated
// in f32 (CUBLAS_COMPUTE_32F); for f32 weights the multiply is plain FP32 (never TF32). The
// summation order is cuBLAS's, not the CPU's: results agree with the CPU run on the same
// rounded x within the f32 dot-product error bound, not bit for bit.
// Batch invariance (DESIGN §6): a row's output does not depend on the other rows of the call
// or on their number: one algorithm configuration, split-K off, serves every rows of a
// (weight dtype, in, out, alignment of w, x and y), so each output element is summed in the
// same order whatever the batch. Exception: a rows for which that configuration does not
// apply runs cuBLASLt's per-shape choice instead, and such rows are NOT batch-invariant;
// Gemm::num_fallback_plans() counts those shapes (0 means every call so far was invariant).
// The alignments are part of the key: pointers of another alignment may run another
// configuration (x's counts for f32 weights only: 16-bit weights read x from Gemm's own
// conversion buffer; cudaMalloc'd buffers are 256-byte aligned).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace kvrelay::kernels::cuda {

// What Gemm::MatMul checks before touching the device (exposed for callers that validate
// ahead, and for the host-side tests): INVALID_ARGUMENT for negative sizes, int8 weights,
// null pointers (x, w, y; bias may be null) when rows * out > 0, and pointers not aligned to
// their element size.
absl::Status ValidateGemmArgs(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                              int64_t out, const float* bias, const float* y);

// One cuBLASLt handle, its workspace, the buffer x is converted into, the algorithm fixed for
// each (dtype, in, out, alignment) seen, and a plan per (dtype, rows, in, out, alignment)
// seen (descriptors and the algorithm it runs), cached so a shape is planned once. Bound to
// the device current at Create.
// Not thread-safe: the workspace and the conversion buffer are shared by all calls, so use
// one Gemm per stream, or order the streams yourself.
class Gemm {
 public:
  // cuBLAS's recommendation for Hopper (enough for every split-K scheme); 4 MiB suffice on
  // Ampere.
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;
  // The rows count the algorithm of a (dtype, in, out, alignment) is chosen for (cuBLASLt's
  // heuristic asked for this shape, split-K then forced off); every rows then runs it.
  static constexpr int64_t kPlanningRows = 64;

  // UNAVAILABLE without a CUDA device; RESOURCE_EXHAUSTED when the workspace cannot be
  // allocated.
  static absl::StatusOr<std::unique_ptr<Gemm>> Create(
      size_t workspace_bytes = kDefaultWorkspaceBytes);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // y = x · wᵀ (+ bias): x [rows, in] f32, w [out, in] (row-major) of dtype wt (f32, f16, bf16),
  // bias [out] f32 or null, y [rows, out] f32. rows == 0 or out == 0: no-op; in == 0: y = bias
  // (or 0). The first call for a (dtype, in, out, alignment) fixes its algorithm (cuBLASLt's
  // heuristic at kPlanningRows rows, split-K off); the first call for each rows checks that it
  // applies there (else falls back, see num_fallback_plans). UNIMPLEMENTED if cuBLASLt offers
  // no algorithm at all; growing the conversion buffer synchronises the stream.
  absl::Status MatMul(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                      int64_t out, const float* bias, float* y, cudaStream_t stream);

  // Number of cached plans (one per distinct dtype, shape and alignment).
  size_t num_plans() const;
  // How many of those plans do not run their (dtype, in, out, alignment)'s fixed algorithm
  // (it did not apply to their rows): calls of those shapes are NOT batch-invariant, their
  // rows may differ in the last bits from the same rows in a batch of another size.
  size_t num_fallback_plans() const;

 private:
  struct Impl;
  explicit Gemm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvrelay::kernels::cuda
