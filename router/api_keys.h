// API keys of the public API (issue 16): the keys of --api_keys_file, checked on the
// OpenAI HTTP API (`Authorization: Bearer KEY`) and on kvrelay.v1.Generation (metadata
// `authorization: Bearer KEY`). No keys: the API is open. Comparisons take the same time
// whatever the presented key and wherever it differs; keys are never logged.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrelay::router {

class ApiKeys {
 public:
  ApiKeys() = default;
  explicit ApiKeys(std::vector<std::string> keys) : keys_(std::move(keys)) {}

  // One key per line; blank lines and lines starting with '#' are skipped, surrounding
  // whitespace trimmed. NOT_FOUND for an unreadable file, INVALID_ARGUMENT for a file
  // without keys or a key with whitespace inside (the message names the line, not the key).
  static absl::StatusOr<ApiKeys> Load(const std::string& path);

  bool empty() const { return keys_.empty(); }
  size_t size() const { return keys_.size(); }

  // Whether `authorization` ("Bearer KEY", the scheme case-insensitive) carries one of the
  // keys; true for anything when there are no keys.
  bool Allows(absl::string_view authorization) const;

 private:
  std::vector<std::string> keys_;
};

}  // namespace kvrelay::router
