// The KV blocks of one sequence (request) in a PrefixCache: reuses the longest cached
// prefix of its prompt, allocates blocks as it grows (next to its last block where it
// can), registers each block in the cache once its KV is computed and full, and
// releases everything when destroyed.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/kvcache/prefix_cache.h"

namespace kvrelay::kvcache {

class KvSequence {
 public:
  // `root` is RootHash(model id, cache_salt) of the request.
  KvSequence(PrefixCache* cache, uint64_t root);
  ~KvSequence();
  KvSequence(const KvSequence&) = delete;
  KvSequence& operator=(const KvSequence&) = delete;

  // Reuses cached leading full blocks of `prompt`, but never all of it: at least the
  // last prompt token is left to compute (its logits are needed), so a prompt of
  // exactly k full blocks reuses at most k - 1. Call once, before anything else.
  // Returns the number of reused tokens (a multiple of the block size).
  int64_t AcquirePrefix(absl::Span<const int32_t> prompt);

  // Ensures blocks for positions [0, tokens). RESOURCE_EXHAUSTED when the pool cannot
  // provide them even by eviction (blocks held by sequences are never evicted).
  absl::Status Reserve(int64_t tokens);

  // KV of tokens[0, computed) is now written: registers the newly completed full blocks
  // in the cache. `tokens` holds at least `computed` token ids of the sequence.
  void Commit(absl::Span<const int32_t> tokens, int64_t computed);

  const std::vector<int32_t>& blocks() const { return blocks_; }
  int64_t cached_tokens() const { return cached_tokens_; }
  const std::vector<uint64_t>& hashes() const { return hashes_; }

 private:
  PrefixCache* cache_;
  uint64_t root_;
  std::vector<int32_t> blocks_;
  std::vector<uint64_t> hashes_;  // chained hashes of the full blocks known so far
  int64_t committed_blocks_ = 0;  // blocks_[0, committed) are registered (or reused)
  int64_t cached_tokens_ = 0;
};

}  // namespace kvrelay::kvcache
