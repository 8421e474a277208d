// SwiGLU (silu(gate) * up) and GELU (tanh and erf forms), element-wise (CPU twins:
// kernels::SiluMul / GeluTanh / GeluErf in kernels/cpu/ops.cc).
//
// Grid/block: kThreads = 256 threads per block, one element per thread per step.
//  - SiluMul: a 2-D grid; blockIdx.x * 256 + threadIdx.x is the column i < inter (striding
//    by gridDim.x * 256), blockIdx.y the row (striding by gridDim.y), so no division by inter
//    is needed and any [rows, inter] is covered: grid.x = min(ceil(inter / 256), kMaxGridBlocks),
//    grid.y = min(rows, kMaxGridBlocks).
//  - GeluTanh / GeluErf: a 1-D grid-stride loop over n, grid = min(ceil(n / 256), kMaxGridBlocks).
// Each element is independent: no reduction, no order to fix; the value is the
// kernels/device_math.h function the CPU runs (expf / tanhf / erff are CUDA's, within 2 ulp
// of the CPU's libm).
// Bounds: every access is guarded (i < inter, r < rows; i < n); indices are int64.
// Alignment: none beyond float's 4 bytes (scalar, coalesced loads and stores; any inter).
// Shared memory: none.
// Compiled with --fmad=false (kernels/cuda/CMakeLists.txt), so nvcc contracts nothing into an
// fma that the CPU computes as a multiply and an add.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/activations.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/device_math.h"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = kElementThreads;

__global__ void __launch_bounds__(kThreads)
    SiluMulKernel(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < inter;
         i += stride) {
      o[i] = math::SiluMul(g[i], u[i]);
    }
  }
}

enum class Gelu { kTanh, kErf };

template <Gelu kind>
__global__ void __launch_bounds__(kThreads) GeluKernel(float* x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    if constexpr (kind == Gelu::kTanh) {
      x[i] = math::GeluTanh(x[i]);
    } else {
      x[i] = math::GeluErf(x[i]);
    }
  }
}

template <Gelu kind>
absl::Status LaunchGelu(const char* op, float* x, int64_t n, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat(op, ": negative size ", n));
  if (n == 0) return absl::OkStatus();
  if (x == nullptr) return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer"));
  GeluKernel<kind><<<GridStrideBlocks(n), kThreads, 0, stream>>>(x, n);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status SiluMul(const float* gate_up, int64_t rows, int64_t inter, float* out,
                     cudaStream_t stream) {
  if (rows < 0 || inter < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::SiluMul: negative size (rows ", rows, ", inter ", inter, ")"));
  }
  if (rows == 0 || inter == 0) return absl::OkStatus();
  if (gate_up == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("cuda::SiluMul: null pointer");
  }
  const dim3 grid = RowColumnGrid(rows, inter);
  SiluMulKernel<<<grid, kThreads, 0, stream>>>(gate_up, rows, inter, out);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status GeluTanh(float* x, int64_t n, cudaStream_t stream) {
  return LaunchGelu<Gelu::kTanh>("cuda::GeluTanh", x, n, stream);
}

absl::Status GeluErf(float* x, int64_t n, cudaStream_t stream) {
  return LaunchGelu<Gelu::kErf>("cuda::GeluErf", x, n, stream);
}

}  // namespace kvrelay::kernels::cuda
