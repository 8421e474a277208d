// Small file helpers returning absl::Status with the path in every message.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvrelay {

// Reads a whole file. NOT_FOUND when it does not exist.
absl::StatusOr<std::string> ReadFile(const std::string& path);
// Writes (replaces) a whole file.
absl::Status WriteFile(const std::string& path, const std::string& contents);
bool FileExists(const std::string& path);
bool IsDirectory(const std::string& path);
// Creates a directory and its parents (like mkdir -p).
absl::Status MakeDirs(const std::string& path);
std::string JoinPath(const std::string& a, const std::string& b);
// Last component of a path, ignoring trailing slashes ("/m/llama/" -> "llama").
std::string BaseName(const std::string& path);

// A read-only memory mapping of a whole file. Movable, not copyable.
class MappedFile {
 public:
  static absl::StatusOr<MappedFile> Open(const std::string& path);
  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const char* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  const char* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace kvrelay
