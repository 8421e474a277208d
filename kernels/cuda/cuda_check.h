// Every CUDA runtime and cuBLAS(Lt) call in kvrelay goes through one of these macros, which
// turn a failure into an absl::Status naming the call, the file:line and the CUDA error:
//
//   KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
//   KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().Matmul(...));  // cuBLASLt: kernels/cuda/cublaslt_api.h
//   MyKernel<<<grid, block, 0, stream>>>(...);
//   KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());  // launch errors (bad config, no device)
//
// Codes: out of memory -> RESOURCE_EXHAUSTED, invalid value/config -> INVALID_ARGUMENT, no
// driver or device -> UNAVAILABLE, everything else (incl. sticky kernel faults) -> INTERNAL.
//
// Host-only header: includable from .cc files compiled by the C++ compiler.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <string>

#include "absl/status/status.h"

namespace kvrelay::kernels::cuda {

// "<file>:<line>: <expr>: <cudaErrorName> (<description>)" with a status code chosen from err.
absl::Status CudaErrorToStatus(cudaError_t err, const char* expr, const char* file, int line);
absl::Status CublasErrorToStatus(cublasStatus_t st, const char* expr, const char* file, int line);

// Number of CUDA devices this process can use: 0 (never an abort or exception) when the
// driver is missing or too old, there is no device, or CUDA_VISIBLE_DEVICES hides them all.
// When the count is 0 and `why` is not null, *why says which.
int CudaDeviceCount(std::string* why = nullptr);
inline bool CudaAvailable() { return CudaDeviceCount() > 0; }

}  // namespace kvrelay::kernels::cuda

#define KVR_CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                   \
    const cudaError_t kvr_cuda_err_ = (expr);                                            \
    if (kvr_cuda_err_ != cudaSuccess) {                                                  \
      return ::kvrelay::kernels::cuda::CudaErrorToStatus(kvr_cuda_err_, #expr, __FILE__, \
                                                         __LINE__);                      \
    }                                                                                    \
  } while (0)

#define KVR_CUBLAS_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                      \
    const cublasStatus_t kvr_cublas_st_ = (expr);                                           \
    if (kvr_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                          \
      return ::kvrelay::kernels::cuda::CublasErrorToStatus(kvr_cublas_st_, #expr, __FILE__, \
                                                           __LINE__);                       \
    }                                                                                       \
  } while (0)
