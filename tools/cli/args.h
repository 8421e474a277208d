// Command-line parsing for the kvrelay CLI subcommands: `--name value`,
// `--name=value`, boolean `--name`, and repeatable flags (`--prompt a --prompt b`,
// which absl flags cannot express). Unknown flags and bad values are errors that
// name the flag.
#pragma once

#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrelay::cli {

class Args {
 public:
  enum class Kind { kString, kInt, kFloat, kBool };
  // Declares a flag (name without dashes). `repeatable` flags keep every value.
  Args& Flag(const std::string& name, Kind kind, const std::string& help, bool repeatable = false);
  // An integer flag whose values must lie in [min, max] (checked by Parse).
  Args& IntFlag(const std::string& name, long long min, long long max, const std::string& help,
                bool repeatable = false);

  // Parses argv[first..argc). Positional arguments are an error.
  absl::Status Parse(int argc, char** argv, int first);

  bool Has(const std::string& name) const;
  std::string GetString(const std::string& name, const std::string& def) const;
  std::vector<std::string> GetAll(const std::string& name) const;
  // Values were type-checked during Parse.
  long long GetInt(const std::string& name, long long def) const;
  double GetFloat(const std::string& name, double def) const;
  bool GetBool(const std::string& name) const;

  // "  --name  help" lines.
  std::string Help() const;

 private:
  struct Spec {
    Kind kind;
    std::string help;
    bool repeatable;
    long long min = std::numeric_limits<long long>::min();
    long long max = std::numeric_limits<long long>::max();
  };
  std::vector<std::string> order_;
  std::map<std::string, Spec> specs_;
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace kvrelay::cli
