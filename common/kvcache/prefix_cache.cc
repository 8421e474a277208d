#include "common/kvcache/prefix_cache.h"

#include <algorithm>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"

namespace kvrelay::kvcache {

uint64_t NewIncarnationId() {
  std::random_device rd;
  uint64_t id = 0;
  while (id == 0) id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return id;
}

absl::StatusOr<std::unique_ptr<PrefixCache>> PrefixCache::Create(const Options& options) {
  if (options.block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefix cache: block_size must be > 0, got ", options.block_size));
  }
  KVR_ASSIGN_OR_RETURN(BlockAllocator alloc, BlockAllocator::Create(options.num_blocks));
  return std::unique_ptr<PrefixCache>(new PrefixCache(options, std::move(alloc)));
}

PrefixCache::PrefixCache(const Options& options, BlockAllocator allocator)
    : block_size_(options.block_size),
      num_blocks_(options.num_blocks),
      incarnation_(options.incarnation),
      alloc_(std::move(allocator)),
      hash_(options.num_blocks, 0),
      parent_(options.num_blocks, 0),
      has_parent_(options.num_blocks, false),
      tokens_(static_cast<size_t>(options.num_blocks) * options.block_size, 0),
      log_(options.incarnation, options.event_log_capacity) {}

int64_t PrefixCache::LookupLocked(absl::Span<const uint64_t> hashes,
                                  absl::Span<const int32_t> tokens,
                                  std::vector<int32_t>* hits) const {
  const size_t B = static_cast<size_t>(block_size_);
  const size_t limit = std::min(hashes.size(), tokens.size() / B);
  size_t i = 0;
  for (; i < limit; ++i) {
    auto it = by_hash_.find(hashes[i]);
    if (it == by_hash_.end()) break;
    const int32_t b = it->second;
    const bool parent_ok = i == 0 ? !has_parent_[b] : has_parent_[b] && parent_[b] == hashes[i - 1];
    if (!parent_ok || !std::equal(tokens.begin() + i * B, tokens.begin() + (i + 1) * B,
                                  tokens_.begin() + static_cast<size_t>(b) * B)) {
      break;
    }
    if (hits != nullptr) hits->push_back(b);
  }
  return static_cast<int64_t>(i);
}

int64_t PrefixCache::Lookup(absl::Span<const uint64_t> hashes,
                            absl::Span<const int32_t> tokens) const {
  absl::ReaderMutexLock l(&mu_);
  return LookupLocked(hashes, tokens, nullptr);
}

std::vector<int32_t> PrefixCache::Acquire(absl::Span<const uint64_t> hashes,
                                          absl::Span<const int32_t> tokens) {
  absl::MutexLock l(&mu_);
  std::vector<int32_t> hits;
  LookupLocked(hashes, tokens, &hits);
  for (int32_t b : hits) alloc_.Ref(b);
  return hits;
}

void PrefixCache::Uncache(int32_t b) {
  by_hash_.erase(hash_[b]);
  alloc_.SetCached(b, false);
}

absl::StatusOr<std::vector<int32_t>> PrefixCache::Allocate(int64_t n, int32_t hint) {
  absl::MutexLock l(&mu_);
  std::vector<int32_t> evicted;
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> blocks, alloc_.Allocate(n, hint, &evicted));
  if (!evicted.empty()) {
    KvEvent e;
    e.type = KvEvent::Type::kRemoved;
    for (int32_t b : evicted) {
      e.hashes.push_back(hash_[b]);
      by_hash_.erase(hash_[b]);  // the allocator already uncached and reused it
    }
    log_.Append(std::move(e));
    evicted_ += static_cast<int64_t>(evicted.size());
  }
  return blocks;
}

void PrefixCache::Store(std::optional<uint64_t> parent, absl::Span<const int32_t> blocks,
                        absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens) {
  std::vector<StoredRun> runs;  // for the listener, called once the lock is released
  {
    absl::MutexLock l(&mu_);
    StoreLocked(parent, blocks, hashes, tokens, listener_ ? &runs : nullptr);
  }
  for (const StoredRun& r : runs) listener_(r);
}

void PrefixCache::StoreLocked(std::optional<uint64_t> parent, absl::Span<const int32_t> blocks,
                              absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens,
                              std::vector<StoredRun>* runs) {
  const size_t B = static_cast<size_t>(block_size_);
  const size_t n = std::min({blocks.size(), hashes.size(), tokens.size() / B});
  KvEvent run;  // the current run of newly cached blocks
  StoredRun stored;
  auto flush = [&] {
    if (run.hashes.empty()) return;
    run.type = KvEvent::Type::kStored;
    if (runs != nullptr) {
      stored.parent = run.parent_hash;
      stored.hashes = run.hashes;
      runs->push_back(std::move(stored));
      stored = StoredRun();
    }
    log_.Append(std::move(run));
    run = KvEvent();
  };
  std::optional<uint64_t> prev = parent;
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = blocks[i];
    const uint64_t h = hashes[i];
    if (alloc_.cached(b) || by_hash_.contains(h)) {
      flush();  // already known: the next new block starts a new run
    } else {
      if (run.hashes.empty()) run.parent_hash = prev;
      run.hashes.push_back(h);
      by_hash_.emplace(h, b);
      hash_[b] = h;
      has_parent_[b] = prev.has_value();
      parent_[b] = prev.value_or(0);
      std::copy(tokens.begin() + i * B, tokens.begin() + (i + 1) * B,
                tokens_.begin() + static_cast<size_t>(b) * B);
      alloc_.SetCached(b, true);
      if (runs != nullptr) {
        stored.blocks.push_back(b);
        stored.tokens.insert(stored.tokens.end(), tokens.begin() + i * B,
                             tokens.begin() + (i + 1) * B);
      }
    }
    prev = h;
  }
  flush();
}

void PrefixCache::Ref(absl::Span<const int32_t> blocks) {
  absl::MutexLock l(&mu_);
  for (int32_t b : blocks) alloc_.Ref(b);
}

void PrefixCache::SetStoreListener(StoreListener listener) { listener_ = std::move(listener); }

absl::Status PrefixCache::RecordTierEvent(KvTier tier, KvEvent::Type type,
                                          std::optional<uint64_t> parent,
                                          absl::Span<const uint64_t> hashes) {
  if (tier == KvTier::kPool || type == KvEvent::Type::kCleared) {
    return absl::InvalidArgumentError(
        "prefix cache: tier events are stored/removed events of the host or disk tier");
  }
  if (hashes.empty()) return absl::OkStatus();
  absl::MutexLock l(&mu_);
  auto& held = tier_blocks_[static_cast<int>(tier)];
  KvEvent e;
  e.type = type;
  e.tier = tier;
  if (type == KvEvent::Type::kStored) {
    e.parent_hash = parent;
    std::optional<uint64_t> prev = parent;
    for (uint64_t h : hashes) {
      held[h] = prev;
      prev = h;
    }
  } else {
    for (uint64_t h : hashes) held.erase(h);
  }
  e.hashes.assign(hashes.begin(), hashes.end());
  log_.Append(std::move(e));
  return absl::OkStatus();
}

int64_t PrefixCache::tier_blocks(KvTier tier) const {
  absl::ReaderMutexLock l(&mu_);
  if (tier == KvTier::kPool) return static_cast<int64_t>(by_hash_.size());
  return static_cast<int64_t>(tier_blocks_[static_cast<int>(tier)].size());
}

void PrefixCache::Release(absl::Span<const int32_t> blocks) {
  absl::MutexLock l(&mu_);
  alloc_.Release(blocks);
}

void PrefixCache::Clear() {
  absl::MutexLock l(&mu_);
  std::vector<int32_t> cached;
  cached.reserve(by_hash_.size());
  for (const auto& [h, b] : by_hash_) cached.push_back(b);
  for (int32_t b : cached) Uncache(b);
  KvEvent e;
  e.type = KvEvent::Type::kCleared;
  log_.Append(std::move(e));
}

PrefixCacheCounts PrefixCache::counts() const {
  absl::ReaderMutexLock l(&mu_);
  PrefixCacheCounts c;
  static_cast<BlockCounts&>(c) = alloc_.counts();
  c.cached = static_cast<int64_t>(by_hash_.size());
  c.evicted = evicted_;
  return c;
}

KvEventBatch PrefixCache::ReadEvents(uint64_t from_seq, size_t max_events) const {
  absl::ReaderMutexLock l(&mu_);
  return log_.Read(from_seq, max_events);
}

uint64_t PrefixCache::last_event_seq() const {
  absl::ReaderMutexLock l(&mu_);
  return log_.last_seq();
}

KvSnapshot PrefixCache::Snapshot() const {
  absl::ReaderMutexLock l(&mu_);
  KvSnapshot s;
  s.incarnation = incarnation_;
  s.seq = log_.last_seq();
  s.blocks.reserve(by_hash_.size());
  for (const auto& [h, b] : by_hash_) {
    CachedBlockInfo info;
    info.hash = h;
    if (has_parent_[b]) info.parent_hash = parent_[b];
    s.blocks.push_back(info);
  }
  for (KvTier tier : {KvTier::kHost, KvTier::kDisk}) {
    for (const auto& [h, parent] : tier_blocks_[static_cast<int>(tier)]) {
      CachedBlockInfo info;
      info.hash = h;
      info.parent_hash = parent;
      info.tier = tier;
      s.blocks.push_back(info);
    }
  }
  return s;
}

absl::Status PrefixCache::Validate() const {
  absl::ReaderMutexLock l(&mu_);
  KVR_RETURN_IF_ERROR(alloc_.Validate());
  int64_t cached = 0;
  for (int32_t b = 0; b < alloc_.num_blocks(); ++b) {
    if (!alloc_.cached(b)) continue;
    ++cached;
    auto it = by_hash_.find(hash_[b]);
    if (it == by_hash_.end() || it->second != b) {
      return absl::InternalError(absl::StrCat("cached block ", b, " not indexed by its hash"));
    }
  }
  if (cached != static_cast<int64_t>(by_hash_.size())) {
    return absl::InternalError(absl::StrCat("hash index holds ", by_hash_.size(),
                                            " blocks, allocator marks ", cached, " cached"));
  }
  return absl::OkStatus();
}

}  // namespace kvrelay::kvcache
