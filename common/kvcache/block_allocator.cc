#include "common/kvcache/block_allocator.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvrelay::kvcache {

absl::StatusOr<BlockAllocator> BlockAllocator::Create(int64_t num_blocks) {
  if (num_blocks <= 0 || num_blocks > std::numeric_limits<int32_t>::max() - 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block allocator: num_blocks must be in [1, 2^31 - 2], got ", num_blocks));
  }
  return BlockAllocator(static_cast<int32_t>(num_blocks));
}

BlockAllocator::BlockAllocator(int32_t num_blocks)
    : num_blocks_(num_blocks),
      refcount_(num_blocks, 0),
      cached_(num_blocks, false),
      prev_(num_blocks + 1, num_blocks),
      next_(num_blocks + 1, num_blocks) {
  runs_.emplace(0, num_blocks);
  by_len_.emplace(num_blocks, 0);
  free_ = num_blocks;
}

BlockCounts BlockAllocator::counts() const {
  BlockCounts c;
  c.total = num_blocks_;
  c.free = free_;
  c.in_use = in_use_;
  c.cached_free = cached_free_;
  return c;
}

void BlockAllocator::LruPushBack(int32_t b) {
  const int32_t s = num_blocks_, last = prev_[s];
  prev_[b] = last;
  next_[b] = s;
  next_[last] = b;
  prev_[s] = b;
}

void BlockAllocator::LruRemove(int32_t b) {
  next_[prev_[b]] = next_[b];
  prev_[next_[b]] = prev_[b];
  prev_[b] = next_[b] = num_blocks_;
}

std::vector<int32_t> BlockAllocator::LruOrder() const {
  std::vector<int32_t> out;
  for (int32_t b = next_[num_blocks_]; b != num_blocks_; b = next_[b]) out.push_back(b);
  return out;
}

void BlockAllocator::AddFree(int32_t b) {
  int32_t start = b, len = 1;
  auto next = runs_.find(b + 1);
  if (next != runs_.end()) {
    len += next->second;
    by_len_.erase({next->second, next->first});
    runs_.erase(next);
  }
  auto it = runs_.lower_bound(b);
  if (it != runs_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == b) {
      start = prev->first;
      len += prev->second;
      by_len_.erase({prev->second, prev->first});
      runs_.erase(prev);
    }
  }
  runs_.emplace(start, len);
  by_len_.emplace(len, start);
  ++free_;
}

void BlockAllocator::TakeFromRun(int32_t start, int32_t k) {
  auto it = runs_.find(start);
  const int32_t len = it->second;
  by_len_.erase({len, start});
  runs_.erase(it);
  if (k < len) {
    runs_.emplace(start + k, len - k);
    by_len_.emplace(len - k, start + k);
  }
  for (int32_t b = start; b < start + k; ++b) refcount_[b] = 1;
  free_ -= k;
  in_use_ += k;
}

absl::StatusOr<std::vector<int32_t>> BlockAllocator::Allocate(int64_t n, int32_t hint,
                                                              std::vector<int32_t>* evicted) {
  if (n < 0) return absl::InvalidArgumentError("block allocator: negative block count");
  if (n > free_ + cached_free_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "kv cache: need ", n, " blocks; ", free_, " free and ", cached_free_, " evictable of ",
        num_blocks_, " (", in_use_, " in use by running sequences)"));
  }
  while (free_ < n) {  // evict only what this allocation needs
    const int32_t b = next_[num_blocks_];
    LruRemove(b);
    cached_[b] = false;
    --cached_free_;
    AddFree(b);
    if (evicted != nullptr) evicted->push_back(b);
  }
  std::vector<int32_t> out;
  out.reserve(n);
  auto take = [&](int32_t start, int32_t k) {
    TakeFromRun(start, k);
    for (int32_t b = start; b < start + k; ++b) out.push_back(b);
  };
  int32_t want = static_cast<int32_t>(n);
  if (want > 0 && hint >= 0) {
    auto it = runs_.find(hint);
    if (it != runs_.end()) {
      const int32_t k = std::min(want, it->second);
      take(hint, k);
      want -= k;
    }
  }
  if (want > 0) {
    auto fit = by_len_.lower_bound({want, std::numeric_limits<int32_t>::min()});
    if (fit != by_len_.end()) {
      take(fit->second, want);
      want = 0;
    }
  }
  while (want > 0) {  // no run holds the rest: longest runs first, fewest pieces
    const auto longest = *by_len_.rbegin();
    const int32_t k = std::min(want, longest.first);
    take(longest.second, k);
    want -= k;
  }
  return out;
}

void BlockAllocator::Ref(int32_t b) {
  if (refcount_[b] == 0) {
    if (cached_[b]) {
      LruRemove(b);
      --cached_free_;
    } else {  // a free block named by id: cut it out of its run
      auto it = std::prev(runs_.upper_bound(b));
      const int32_t start = it->first, len = it->second;
      by_len_.erase({len, start});
      runs_.erase(it);
      if (b > start) {
        runs_.emplace(start, b - start);
        by_len_.emplace(b - start, start);
      }
      if (b + 1 < start + len) {
        runs_.emplace(b + 1, start + len - b - 1);
        by_len_.emplace(start + len - b - 1, b + 1);
      }
      --free_;
    }
    ++in_use_;
  }
  ++refcount_[b];
}

void BlockAllocator::Release(absl::Span<const int32_t> blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const int32_t b = *it;
    if (--refcount_[b] > 0) continue;
    --in_use_;
    if (cached_[b]) {
      LruPushBack(b);
      ++cached_free_;
    } else {
      AddFree(b);
    }
  }
}

void BlockAllocator::SetCached(int32_t b, bool cached) {
  if (cached_[b] == cached) return;
  cached_[b] = cached;
  if (!cached && refcount_[b] == 0) {
    LruRemove(b);
    --cached_free_;
    AddFree(b);
  }
}

absl::Status BlockAllocator::Validate() const {
  auto fail = [](auto... parts) { return absl::InternalError(absl::StrCat(parts...)); };
  std::vector<bool> is_free(num_blocks_, false);
  int64_t free_count = 0;
  int32_t prev_end = -2;
  for (const auto& [start, len] : runs_) {
    if (len <= 0 || start < 0 || start + len > num_blocks_) return fail("bad run ", start);
    if (start <= prev_end) return fail("runs overlap or touch at ", start);
    if (by_len_.count({len, start}) == 0) return fail("run ", start, " missing by length");
    for (int32_t b = start; b < start + len; ++b) is_free[b] = true;
    free_count += len;
    prev_end = start + len;
  }
  if (by_len_.size() != runs_.size()) return fail("run indexes differ in size");
  std::vector<bool> in_lru(num_blocks_, false);
  int64_t lru_count = 0;
  for (int32_t b = next_[num_blocks_]; b != num_blocks_; b = next_[b]) {
    if (b < 0 || b >= num_blocks_ || in_lru[b]) return fail("LRU list broken at ", b);
    if (prev_[next_[b]] != b) return fail("LRU links inconsistent at ", b);
    in_lru[b] = true;
    if (++lru_count > num_blocks_) return fail("LRU list loops");
  }
  int64_t in_use = 0, cached_free = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) {
    if (refcount_[b] < 0) return fail("block ", b, " has refcount ", refcount_[b]);
    const bool used = refcount_[b] > 0;
    const bool cf = !used && cached_[b];
    const bool fr = !used && !cached_[b];
    if (used) ++in_use;
    if (cf) ++cached_free;
    if (is_free[b] != fr) return fail("block ", b, " free-run membership wrong");
    if (in_lru[b] != cf) return fail("block ", b, " LRU membership wrong");
  }
  if (free_count != free_ || in_use != in_use_ || cached_free != cached_free_) {
    return fail("counts differ: free ", free_, "/", free_count, " in use ", in_use_, "/", in_use,
                " cached-free ", cached_free_, "/", cached_free);
  }
  if (free_ + in_use_ + cached_free_ != num_blocks_) return fail("counts do not sum to total");
  return absl::OkStatus();
}

}  // namespace kvrelay::kvcache
