#include "kernels/backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/cpu_backend.h"

namespace kvrelay::kernels {

const char* DeviceName(Device d) { return d == Device::kCuda ? "cuda" : "cpu"; }

absl::StatusOr<Device> ParseDevice(absl::string_view name) {
  if (name == "cpu") return Device::kCpu;
  if (name == "cuda") return Device::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("backend must be 'cpu' or 'cuda', got '", name, "'"));
}

bool BuiltWithCuda() {
#if defined(KVRELAY_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

Buffer::Buffer(Buffer&& o) noexcept
    : owner_(std::exchange(o.owner_, nullptr)),
      data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)) {}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void Buffer::Reset() {
  if (owner_ != nullptr && data_ != nullptr) owner_->Free(data_, bytes_);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

Buffer Buffer::Owned(Backend* owner, void* data, size_t bytes) {
  Buffer b;
  b.owner_ = owner;
  b.data_ = data;
  b.bytes_ = bytes;
  return b;
}

Buffer Buffer::View(void* data, size_t bytes) {
  Buffer b;
  b.data_ = data;
  b.bytes_ = bytes;
  return b;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(Device device, ThreadPool* pool) {
  switch (device) {
    case Device::kCpu:
      return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(pool));
    case Device::kCuda:
#if defined(KVRELAY_HAVE_CUDA)
      return absl::UnimplementedError(
          "cuda backend: not implemented yet. kernels/cuda has RMSNorm, LayerNorm, SwiGLU, GELU "
          "and the embedding gather; missing: the Backend class (memory, upload/download, "
          "stream), GEMM with bias (cuBLASLt), RoPE + paged K/V write, paged attention, "
          "position-embedding add, residual add and the row gather");
#else
      return absl::FailedPreconditionError(
          "this build has no CUDA backend (configure with -DKVRELAY_CUDA=ON)");
#endif
  }
  return absl::InvalidArgumentError("unknown backend device");
}

}  // namespace kvrelay::kernels
