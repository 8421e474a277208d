// CreateBackend / ResolveDevice / BuiltWithCuda (kernels/backend.h). A file of its own, in
// library kvrelay_backend, because it is the one place that knows both backends: the CPU
// one (kvrelay_kernels) and, in a build with CUDA, the CUDA one (kvrelay_kernels_cuda, which
// itself depends on kvrelay_kernels).
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#if defined(KVRELAY_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"
#endif

namespace kvrelay::kernels {

bool BuiltWithCuda() {
#if defined(KVRELAY_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

namespace {

// Number of usable GPUs (0 in a build without CUDA); *why says why there are none.
int GpuCount(std::string* why) {
#if defined(KVRELAY_HAVE_CUDA)
  return cuda::CudaDeviceCount(why);
#else
  *why = "this build has no CUDA backend (configure with -DKVRELAY_CUDA=ON)";
  return 0;
#endif
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(Device device, ThreadPool* pool,
                                                       const BackendOptions& options) {
  switch (device) {
    case Device::kCpu:
      return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(pool));
    case Device::kCuda: {
#if defined(KVRELAY_HAVE_CUDA)
      // UNAVAILABLE, saying why, without a usable GPU.
      absl::StatusOr<std::unique_ptr<cuda::CudaBackend>> b =
          cuda::CudaBackend::Create(0, options.cuda_split_k_decode);
      if (!b.ok()) return b.status();
      return std::unique_ptr<Backend>(std::move(*b));
#else
      return absl::FailedPreconditionError(
          "this build has no CUDA backend (configure with -DKVRELAY_CUDA=ON)");
#endif
    }
  }
  return absl::InvalidArgumentError("unknown backend device");
}

absl::StatusOr<Device> ResolveDevice(absl::string_view flag, std::string* why) {
  std::string local;
  std::string& w = why != nullptr ? *why : local;
  if (flag != "auto") {
    absl::StatusOr<Device> d = ParseDevice(flag);
    if (!d.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--device must be 'auto', 'cpu' or 'cuda', got '", flag, "'"));
    }
    w = absl::StrCat("device ", DeviceName(*d), " (asked for)");
    return *d;
  }
  std::string none;
  const int gpus = GpuCount(&none);
  if (gpus > 0) {
    w = absl::StrCat("device cuda (auto: ", gpus, " GPU", gpus == 1 ? "" : "s", " found)");
    return Device::kCuda;
  }
  w = absl::StrCat("device cpu (auto: ", none, ")");
  return Device::kCpu;
}

}  // namespace kvrelay::kernels
