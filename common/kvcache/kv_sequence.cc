#include "common/kvcache/kv_sequence.h"

#include <algorithm>
#include <optional>

#include "common/kvcache/block_hash.h"
#include "common/kvcache/kv_pool.h"
#include "common/util/status.h"

namespace kvrelay::kvcache {

KvSequence::KvSequence(PrefixCache* cache, uint64_t root) : cache_(cache), root_(root) {}

KvSequence::~KvSequence() { cache_->Release(blocks_); }

int64_t KvSequence::AcquirePrefix(absl::Span<const int32_t> prompt) {
  if (prompt.empty()) return 0;
  const int B = cache_->block_size();
  // Blocks lying entirely within prompt[0, n-1): the last token is always computed.
  ExtendBlockHashes(root_, prompt.first(prompt.size() - 1), B, &hashes_);
  blocks_ = cache_->Acquire(hashes_, prompt);
  committed_blocks_ = static_cast<int64_t>(blocks_.size());
  cached_tokens_ = committed_blocks_ * B;
  return cached_tokens_;
}

absl::Status KvSequence::Reserve(int64_t tokens) {
  const int64_t need =
      BlocksFor(tokens, cache_->block_size()) - static_cast<int64_t>(blocks_.size());
  if (need <= 0) return absl::OkStatus();
  const int32_t hint = blocks_.empty() ? -1 : blocks_.back() + 1;
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> more, cache_->Allocate(need, hint));
  blocks_.insert(blocks_.end(), more.begin(), more.end());
  return absl::OkStatus();
}

void KvSequence::Commit(absl::Span<const int32_t> tokens, int64_t computed) {
  const int B = cache_->block_size();
  computed = std::min<int64_t>(computed, static_cast<int64_t>(tokens.size()));
  const int64_t full = std::min<int64_t>(computed / B, static_cast<int64_t>(blocks_.size()));
  if (full <= committed_blocks_) return;
  ExtendBlockHashes(root_, tokens.first(static_cast<size_t>(full * B)), B, &hashes_);
  const size_t from = static_cast<size_t>(committed_blocks_);
  const size_t n = static_cast<size_t>(full - committed_blocks_);
  std::optional<uint64_t> parent;
  if (from > 0) parent = hashes_[from - 1];
  cache_->Store(parent, absl::MakeConstSpan(blocks_).subspan(from, n),
                absl::MakeConstSpan(hashes_).subspan(from, n), tokens.subspan(from * B, n * B));
  committed_blocks_ = full;
}

}  // namespace kvrelay::kvcache
