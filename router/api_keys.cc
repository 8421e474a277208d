#include "router/api_keys.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvrelay::router {

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Runs over the longer length so that neither a prefix match nor the key's length
  // shows in the time beyond the lengths themselves.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

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
  for (const std::string& k : keys_) ok |= ConstantTimeEquals(presented, k);  // no early exit
  return ok;
}

}  // namespace kvrelay::router
