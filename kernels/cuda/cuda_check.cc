#include "kernels/cuda/cuda_check.h"

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cublaslt_api.h"

namespace kvrelay::kernels::cuda {
namespace {

absl::StatusCode CodeFor(cudaError_t err) {
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::StatusCode::kResourceExhausted;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorInvalidDevice:
      return absl::StatusCode::kInvalidArgument;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return absl::StatusCode::kUnavailable;
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
      // Built for other architectures (CMAKE_CUDA_ARCHITECTURES) than this GPU's.
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

absl::StatusCode CodeFor(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::StatusCode::kResourceExhausted;
    case CUBLAS_STATUS_INVALID_VALUE:
      return absl::StatusCode::kInvalidArgument;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return absl::StatusCode::kUnimplemented;
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

}  // namespace

absl::Status CudaErrorToStatus(cudaError_t err, const char* expr, const char* file, int line) {
  return absl::Status(CodeFor(err),
                      absl::StrCat(file, ":", line, ": ", expr, ": ", cudaGetErrorName(err), " (",
                                   cudaGetErrorString(err), ")"));
}

absl::Status CublasErrorToStatus(cublasStatus_t st, const char* expr, const char* file, int line) {
  // The names come from cuBLASLt itself, which is loaded at run time (cublaslt_api.h).
  absl::StatusOr<const CublasLtApi*> lt = LoadCublasLt();
  const std::string name =
      lt.ok() ? absl::StrCat((*lt)->GetStatusName(st), " (", (*lt)->GetStatusString(st), ")")
              : absl::StrCat("cublasStatus_t ", static_cast<int>(st));
  return absl::Status(CodeFor(st), absl::StrCat(file, ":", line, ": ", expr, ": ", name));
}

int CudaDeviceCount(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    // The failed call is also the thread's "last error": clear it, or the next
    // cudaGetLastError() after a kernel launch would report it. (When the runtime cannot
    // initialise at all, e.g. no driver, every call keeps returning the error regardless.)
    (void)cudaGetLastError();
    if (why != nullptr) *why = absl::StrCat(cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    return 0;
  }
  if (n <= 0) {
    if (why != nullptr) *why = "the driver reports no CUDA device";
    return 0;
  }
  return n;
}

}  // namespace kvrelay::kernels::cuda
