#include "kernels/backend.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrelay::kernels {

const char* DeviceName(Device d) { return d == Device::kCuda ? "cuda" : "cpu"; }

absl::StatusOr<Device> ParseDevice(absl::string_view name) {
  if (name == "cpu") return Device::kCpu;
  if (name == "cuda") return Device::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("backend must be 'cpu' or 'cuda', got '", name, "'"));
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

}  // namespace kvrelay::kernels
