#include "router/api_keys.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/rpc/security.h"

namespace kvrelay::router {

absl::StatusOr<ApiKeys> ApiKeys::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--api_keys_file: cannot read ", path));
  std::vector<std::string> keys;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    const absl::string_view key = absl::StripAsciiWhitespace(line);
    if (key.empty() || key[0] == '#') continue;
    for (char c : key) {
      if (absl::ascii_isspace(static_cast<unsigned char>(c))) {
        return absl::InvalidArgumentError(
            absl::StrCat("--api_keys_file ", path, ":", n, ": a key must not contain whitespace"));
      }
    }
    keys.emplace_back(key);
  }
  if (keys.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--api_keys_file ", path, " has no keys"));
  }
  return ApiKeys(std::move(keys));
}

bool ApiKeys::Allows(absl::string_view authorization) const {
  if (keys_.empty()) return true;
  authorization = absl::StripAsciiWhitespace(authorization);
  if (authorization.size() < 7 || !absl::EqualsIgnoreCase(authorization.substr(0, 7), "bearer ")) {
    return false;
  }
  const absl::string_view presented = absl::StripAsciiWhitespace(authorization.substr(7));
  bool ok = false;
  for (const std::string& k : keys_) ok |= rpc::ConstantTimeEquals(presented, k);  // no early exit
  return ok;
}

}  // namespace kvrelay::router
