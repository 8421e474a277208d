// Host checks of kernels/cuda/cublaslt_api: cuBLASLt loads at run time (no GPU needed) with
// every function kvrelay calls, and its status names reach the error messages.
#include <cstring>
#include <string>

#include "kernels/cuda/cublaslt_api.h"
#include "kernels/cuda/cuda_check.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

void CublasLtHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  absl::StatusOr<const cuda::CublasLtApi*> lt = cuda::LoadCublasLt();
  expect(lt.ok(), "cublaslt: libcublasLt loads with dlopen" +
                      (lt.ok() ? std::string() : ": " + std::string(lt.status().message())));
  if (!lt.ok()) return;
  const cuda::CublasLtApi& a = **lt;
  const void* fns[] = {
      reinterpret_cast<const void*>(a.Create),
      reinterpret_cast<const void*>(a.Destroy),
      reinterpret_cast<const void*>(a.GetStatusName),
      reinterpret_cast<const void*>(a.GetStatusString),
      reinterpret_cast<const void*>(a.Matmul),
      reinterpret_cast<const void*>(a.MatmulAlgoCheck),
      reinterpret_cast<const void*>(a.MatmulAlgoConfigSetAttribute),
      reinterpret_cast<const void*>(a.MatmulAlgoGetHeuristic),
      reinterpret_cast<const void*>(a.MatmulDescCreate),
      reinterpret_cast<const void*>(a.MatmulDescDestroy),
      reinterpret_cast<const void*>(a.MatmulDescSetAttribute),
      reinterpret_cast<const void*>(a.MatmulPreferenceCreate),
      reinterpret_cast<const void*>(a.MatmulPreferenceDestroy),
      reinterpret_cast<const void*>(a.MatmulPreferenceSetAttribute),
      reinterpret_cast<const void*>(a.MatrixLayoutCreate),
      reinterpret_cast<const void*>(a.MatrixLayoutDestroy),
  };
  bool all = true;
  for (const void* f : fns) all = all && f != nullptr;
  expect(all, "cublaslt: every function resolves");
  expect(&cuda::CublasLt() == *lt, "cublaslt: CublasLt() is the loaded table");
  expect(
      std::strcmp(a.GetStatusName(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED") == 0,
      "cublaslt: status names come from the library");
  // Descriptors need no device: create and destroy one through the table.
  cublasLtMatrixLayout_t layout = nullptr;
  expect(a.MatrixLayoutCreate(&layout, CUDA_R_32F, 4, 4, 4) == CUBLAS_STATUS_SUCCESS &&
             a.MatrixLayoutDestroy(layout) == CUBLAS_STATUS_SUCCESS,
         "cublaslt: a matrix layout is created and destroyed through the table");
}
KVR_PARITY_HOST_CHECKS(CublasLtHostChecks);

}  // namespace
}  // namespace kvrelay::kernels::parity
