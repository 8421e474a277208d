// cuBLASLt, loaded at run time (dlopen) instead of linked.
//
// Why: libcublasLt carries ~94 KB of thread-local storage. Linked into a binary it becomes
// part of the static TLS block every thread of the process must fit beside its stack, and
// libraries that start threads with small fixed stacks then fail to start them: civetweb
// (prometheus-cpp's /metrics server, 100 KB stacks) refuses to start in every worker binary
// built with CUDA, even on a machine that never uses a GPU. Loaded with dlopen, its TLS is
// allocated per thread on first use, and only in processes that run GEMMs on a GPU.
//
// Every function kvrelay calls is a pointer here with cuBLASLt's own signature (types and
// constants still come from <cublasLt.h>); call them as `CublasLt().Matmul(...)` after
// LoadCublasLt() returned OK (cuda::Gemm::Create does).
#pragma once

#include <cublasLt.h>

#include "absl/status/statusor.h"

namespace kvrelay::kernels::cuda {

struct CublasLtApi {
  decltype(&cublasLtCreate) Create;
  decltype(&cublasLtDestroy) Destroy;
  decltype(&cublasLtGetStatusName) GetStatusName;
  decltype(&cublasLtGetStatusString) GetStatusString;
  decltype(&cublasLtMatmul) Matmul;
  decltype(&cublasLtMatmulAlgoCheck) MatmulAlgoCheck;
  decltype(&cublasLtMatmulAlgoConfigSetAttribute) MatmulAlgoConfigSetAttribute;
  decltype(&cublasLtMatmulAlgoGetHeuristic) MatmulAlgoGetHeuristic;
  decltype(&cublasLtMatmulDescCreate) MatmulDescCreate;
  decltype(&cublasLtMatmulDescDestroy) MatmulDescDestroy;
  decltype(&cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute;
  decltype(&cublasLtMatmulPreferenceCreate) MatmulPreferenceCreate;
  decltype(&cublasLtMatmulPreferenceDestroy) MatmulPreferenceDestroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) MatmulPreferenceSetAttribute;
  decltype(&cublasLtMatrixLayoutCreate) MatrixLayoutCreate;
  decltype(&cublasLtMatrixLayoutDestroy) MatrixLayoutDestroy;
};

// Loads libcublasLt.so.<CUBLAS_VER_MAJOR> once (the dynamic loader's search path, then the
// CUDA toolkit's library folder this build found) and resolves every function. UNAVAILABLE
// naming the library and the loader's error when that fails (the result is remembered).
absl::StatusOr<const CublasLtApi*> LoadCublasLt();

// The loaded API; only valid after LoadCublasLt() returned OK.
const CublasLtApi& CublasLt();

}  // namespace kvrelay::kernels::cuda
