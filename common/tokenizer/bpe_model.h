// The BPE model of a Hugging Face tokenizer.json ("model": {"type": "BPE", ...}).
// Internal to the tokenizer library (exposed for tests).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"

namespace kvrelay::tokenizer {

class BpeModel {
 public:
  // Parses the "model" object. Supports vocab, merges ("a b" strings or ["a","b"]
  // pairs), unk_token, fuse_unk, byte_fallback ("<0xAB>" tokens) and ignore_merges.
  // continuing_subword_prefix / end_of_word_suffix must be null or empty.
  // dropout is ignored (encoding is deterministic).
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& model);

  // Appends the ids of one pre-token. Thread-safe; results for short words are
  // cached (bounded).
  void Encode(absl::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(absl::string_view token) const;
  // Null when the id is not in the vocabulary.
  const std::string* IdToToken(int32_t id) const;
  // Largest id in the vocabulary, -1 when empty.
  int32_t max_id() const { return static_cast<int32_t>(id_to_token_.size()) - 1; }
  size_t cache_size_for_test() const;

  static constexpr size_t kMaxCacheEntries = 50000;
  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr int32_t kMaxId = 1 << 24;

 private:
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  BpeModel() = default;
  void EncodeUncached(absl::string_view word, std::vector<int32_t>* ids) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::optional<std::string>> id_to_token_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_ids_{};  // -1 when "<0xAB>" is missing

  mutable absl::Mutex mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrelay::tokenizer
