// Temporary folders for hermetic tests, under ::testing::TempDir().
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "common/util/file.h"
#include "gtest/gtest.h"

namespace kvrelay::testing {

// A fresh, unique folder "<TempDir>/<prefix>XXXXXX" that lives until the process ends.
inline std::string MakeTempDir(const std::string& prefix) {
  std::string base = ::testing::TempDir();
  if (base.empty()) base = "/tmp/";
  std::string templ = JoinPath(base, prefix + "XXXXXX");
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp failed for " << templ;
    return templ;
  }
  return buf.data();
}

// A fresh folder removed (with its contents) at scope exit.
class ScopedTempDir {
 public:
  explicit ScopedTempDir(const std::string& prefix = "kvr_test_") : path_(MakeTempDir(prefix)) {}
  ~ScopedTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScopedTempDir(const ScopedTempDir&) = delete;
  ScopedTempDir& operator=(const ScopedTempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return JoinPath(path_, name); }

 private:
  std::string path_;
};

}  // namespace kvrelay::testing
