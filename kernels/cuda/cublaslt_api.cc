#include "kernels/cuda/cublaslt_api.h"

#include <dlfcn.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace kvrelay::kernels::cuda {
namespace {

struct Loaded {
  absl::Status status;
  CublasLtApi api{};
};

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn* fn, std::string* missing) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (*fn == nullptr) absl::StrAppend(missing, missing->empty() ? "" : ", ", name);
  return *fn != nullptr;
}

Loaded Load() {
  Loaded l;
  const std::string soname = absl::StrCat("libcublasLt.so.", CUBLAS_VER_MAJOR);
  void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
  std::string error = lib == nullptr ? dlerror() : "";
#if defined(KVRELAY_CUDA_LIBRARY_DIR)
  if (lib == nullptr) {
    const std::string path = absl::StrCat(KVRELAY_CUDA_LIBRARY_DIR, "/", soname);
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) absl::StrAppend(&error, "; ", dlerror());
  }
#endif
  if (lib == nullptr) {
    l.status = absl::UnavailableError(absl::StrCat("cannot load ", soname, ": ", error));
    return l;
  }
  // Never dlclose'd: the API stays valid for the life of the process.
  std::string missing;
  CublasLtApi& a = l.api;
  Resolve(lib, "cublasLtCreate", &a.Create, &missing);
  Resolve(lib, "cublasLtDestroy", &a.Destroy, &missing);
  Resolve(lib, "cublasLtGetStatusName", &a.GetStatusName, &missing);
  Resolve(lib, "cublasLtGetStatusString", &a.GetStatusString, &missing);
  Resolve(lib, "cublasLtMatmul", &a.Matmul, &missing);
  Resolve(lib, "cublasLtMatmulAlgoCheck", &a.MatmulAlgoCheck, &missing);
  Resolve(lib, "cublasLtMatmulAlgoConfigSetAttribute", &a.MatmulAlgoConfigSetAttribute, &missing);
  Resolve(lib, "cublasLtMatmulAlgoGetHeuristic", &a.MatmulAlgoGetHeuristic, &missing);
  Resolve(lib, "cublasLtMatmulDescCreate", &a.MatmulDescCreate, &missing);
  Resolve(lib, "cublasLtMatmulDescDestroy", &a.MatmulDescDestroy, &missing);
  Resolve(lib, "cublasLtMatmulDescSetAttribute", &a.MatmulDescSetAttribute, &missing);
  Resolve(lib, "cublasLtMatmulPreferenceCreate", &a.MatmulPreferenceCreate, &missing);
  Resolve(lib, "cublasLtMatmulPreferenceDestroy", &a.MatmulPreferenceDestroy, &missing);
  Resolve(lib, "cublasLtMatmulPreferenceSetAttribute", &a.MatmulPreferenceSetAttribute, &missing);
  Resolve(lib, "cublasLtMatrixLayoutCreate", &a.MatrixLayoutCreate, &missing);
  Resolve(lib, "cublasLtMatrixLayoutDestroy", &a.MatrixLayoutDestroy, &missing);
  if (!missing.empty()) {
    l.status = absl::UnavailableError(absl::StrCat(soname, " lacks ", missing));
  }
  return l;
}

const Loaded& Once() {
  static const Loaded* loaded = new Loaded(Load());  // thread-safe, never destroyed
  return *loaded;
}

}  // namespace

absl::StatusOr<const CublasLtApi*> LoadCublasLt() {
  const Loaded& l = Once();
  if (!l.status.ok()) return l.status;
  return &l.api;
}

const CublasLtApi& CublasLt() { return Once().api; }

}  // namespace kvrelay::kernels::cuda
