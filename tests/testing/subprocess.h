// A child process with pipes to its stdin and stdout, for integration tests that drive
// a real peer process line by line. Reads are bounded in time; the destructor kills
// and reaps the child, so a failing test never leaves a process behind.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace kvrelay::testing {

class Subprocess {
 public:
  // Starts argv[0] (a path) with the current environment plus `env` ("NAME=value").
  // stderr is inherited. Empty optional if it cannot start.
  static std::optional<Subprocess> Start(const std::vector<std::string>& argv,
                                         const std::vector<std::string>& env = {});
  Subprocess(Subprocess&& o) noexcept;
  Subprocess& operator=(Subprocess&&) = delete;
  ~Subprocess();

  pid_t pid() const { return pid_; }
  bool WriteLine(const std::string& line);
  // The next line of stdout (without '\n'); nullopt at EOF or when none arrives in time.
  std::optional<std::string> ReadLine(absl::Duration timeout);
  void Kill(int signal);
  // Waits for the child to exit; its wait status, or nullopt on timeout.
  std::optional<int> Wait(absl::Duration timeout);

 private:
  Subprocess() = default;
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1;
  bool reaped_ = false;
  std::string buffer_;
};

// Path of a binary built next to the running test binary (both live in build/bin).
std::string SiblingBinary(const std::string& name);

}  // namespace kvrelay::testing
