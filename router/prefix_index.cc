#include "router/prefix_index.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrelay::router {
namespace {

// How many blocks ahead Overlaps() prefetches. A probe into a table much larger than
// the L2 cache costs ~2 cache misses (control bytes + slot); with several probes in
// flight the loop runs at memory throughput instead of memory latency. On the bench
// machine (router_bench BM_IndexLookup, 768k hashes) no prefetch was ~1.5x slower than
// any distance in 4..32, which were within noise of each other.
constexpr size_t kPrefetchDistance = 16;

inline int32_t ToCount(size_t n) {
  return static_cast<int32_t>(std::min<size_t>(n, std::numeric_limits<int32_t>::max()));
}

inline bool TestBit(absl::Span<const uint64_t> bits, uint32_t slot) {
  const uint32_t w = slot / 64;
  return w < bits.size() && ((bits[w] >> (slot % 64)) & 1) != 0;
}

// Calls f(slot) for every set bit.
template <typename F>
inline void ForEachBit(absl::Span<const uint64_t> words, F f) {
  for (size_t w = 0; w < words.size(); ++w) {
    for (uint64_t bits = words[w]; bits != 0; bits &= bits - 1) {
      f(static_cast<uint32_t>(w * 64 + static_cast<size_t>(__builtin_ctzll(bits))));
    }
  }
}

template <typename T>
T* AllocArray(size_t n) {
  return static_cast<T*>(::operator new(n * sizeof(T)));
}

}  // namespace

// ---- OverlapResult ----------------------------------------------------------------------

void OverlapResult::Clear() {
  listed_.clear();
  num_levels_ = 0;
  max_ = 0;
}

OverlapResult::Level& OverlapResult::PushLevel(int32_t depth) {
  if (num_levels_ == static_cast<int>(levels_.size())) levels_.emplace_back();
  Level& l = levels_[num_levels_++];
  l.depth = depth;
  return l;
}

bool OverlapResult::IsListed(int slot) const {
  auto it = std::lower_bound(listed_.begin(), listed_.end(), slot,
                             [](const Listed& l, int s) { return l.slot < s; });
  return it != listed_.end() && it->slot == slot;
}

int32_t OverlapResult::Of(int slot) const {
  if (slot < 0) return 0;
  auto it = std::lower_bound(listed_.begin(), listed_.end(), slot,
                             [](const Listed& l, int s) { return l.slot < s; });
  if (it != listed_.end() && it->slot == slot) return it->overlap;
  // Levels are nested: the deepest one holding the slot is its overlap.
  for (int i = num_levels_ - 1; i >= 0; --i) {
    if (TestBit(levels_[i].bits, static_cast<uint32_t>(slot))) return levels_[i].depth;
  }
  return 0;
}

void OverlapResult::Fill(absl::Span<int32_t> out) const {
  std::fill(out.begin(), out.end(), 0);
  for (int i = 0; i < num_levels_; ++i) {  // shallow to deep: deeper levels overwrite
    const int32_t depth = levels_[i].depth;
    ForEachBit(levels_[i].bits, [&](uint32_t s) {
      if (s < out.size()) out[s] = depth;
    });
  }
  for (const Listed& l : listed_) {
    if (static_cast<size_t>(l.slot) < out.size()) out[l.slot] = l.overlap;
  }
}

// ---- HolderSet --------------------------------------------------------------------------

PrefixIndex::HolderSet::HolderSet(HolderSet&& o) noexcept : meta_(o.meta_) {
  std::memcpy(w_, o.w_, sizeof w_);
  o.meta_ = 0;
}

PrefixIndex::HolderSet& PrefixIndex::HolderSet::operator=(HolderSet&& o) noexcept {
  if (this != &o) {
    Free();
    meta_ = o.meta_;
    std::memcpy(w_, o.w_, sizeof w_);
    o.meta_ = 0;
  }
  return *this;
}

void* PrefixIndex::HolderSet::heap() const {
  void* p;
  std::memcpy(&p, &w_[1], sizeof p);
  return p;
}

void PrefixIndex::HolderSet::SetHeap(void* p, uint32_t capacity) {
  w_[0] = capacity;
  std::memcpy(&w_[1], &p, sizeof p);
}

void PrefixIndex::HolderSet::Free() {
  if (mode() != kInlineMode) ::operator delete(heap());
  meta_ = 0;
}

absl::Span<const uint32_t> PrefixIndex::HolderSet::slots() const {
  if (mode() == kInlineMode) return absl::Span<const uint32_t>(w_, size());
  if (mode() == kArray) return absl::Span<const uint32_t>(static_cast<uint32_t*>(heap()), size());
  return {};
}

absl::Span<const uint64_t> PrefixIndex::HolderSet::bits() const {
  if (mode() != kBitmap) return {};
  return absl::Span<const uint64_t>(static_cast<uint64_t*>(heap()), capacity());
}

template <typename F>
void PrefixIndex::HolderSet::ForEach(F f) const {
  if (mode() == kBitmap) {
    ForEachBit(bits(), f);
  } else {
    for (uint32_t s : slots()) f(s);
  }
}

size_t PrefixIndex::HolderSet::HeapBytes() const {
  switch (mode()) {
    case kArray:
      return capacity() * sizeof(uint32_t);
    case kBitmap:
      return capacity() * sizeof(uint64_t);
    default:
      return 0;
  }
}

bool PrefixIndex::HolderSet::Contains(uint32_t slot) const {
  if (mode() == kBitmap) return TestBit(bits(), slot);
  const absl::Span<const uint32_t> s = slots();
  return std::binary_search(s.begin(), s.end(), slot);
}

void PrefixIndex::HolderSet::ToBitmap(uint32_t words) {
  uint32_t top = 0;
  ForEach([&](uint32_t s) { top = std::max(top, s); });
  const uint32_t n_words = std::max(words, top / 64 + 1);
  uint64_t* b = AllocArray<uint64_t>(n_words);
  std::memset(b, 0, n_words * sizeof(uint64_t));
  ForEach([&](uint32_t s) { b[s / 64] |= uint64_t{1} << (s % 64); });
  const uint32_t n = size();
  Free();
  SetHeap(b, n_words);
  SetMeta(kBitmap, n);
}

void PrefixIndex::HolderSet::ToArray() {
  const uint32_t n = size();
  if (n <= kInline) {
    uint32_t tmp[kInline];
    uint32_t k = 0;
    ForEach([&](uint32_t s) { tmp[k++] = s; });
    Free();
    std::memcpy(w_, tmp, sizeof tmp);
    SetMeta(kInlineMode, n);
    return;
  }
  const uint32_t cap = std::max<uint32_t>(n + n / 2, 2 * kInline);
  uint32_t* a = AllocArray<uint32_t>(cap);
  uint32_t k = 0;
  ForEach([&](uint32_t s) { a[k++] = s; });
  Free();
  SetHeap(a, cap);
  SetMeta(kArray, n);
}

void PrefixIndex::HolderSet::Insert(uint32_t slot, uint32_t words) {
  const uint32_t n = size();
  switch (mode()) {
    case kInlineMode: {
      if (n < kInline) {
        uint32_t i = n;
        while (i > 0 && w_[i - 1] > slot) {
          w_[i] = w_[i - 1];
          --i;
        }
        w_[i] = slot;
        SetMeta(kInlineMode, n + 1);
        return;
      }
      // Full: move to a heap array, then insert there.
      uint32_t* a = AllocArray<uint32_t>(2 * kInline);
      std::memcpy(a, w_, kInline * sizeof(uint32_t));
      SetHeap(a, 2 * kInline);
      SetMeta(kArray, n);
      break;
    }
    case kBitmap: {
      uint64_t* b = static_cast<uint64_t*>(heap());
      if (slot / 64 >= capacity()) {
        const uint32_t n_words = std::max(words, slot / 64 + 1);
        uint64_t* nb = AllocArray<uint64_t>(n_words);
        std::memcpy(nb, b, capacity() * sizeof(uint64_t));
        std::memset(nb + capacity(), 0, (n_words - capacity()) * sizeof(uint64_t));
        ::operator delete(b);
        b = nb;
        SetHeap(b, n_words);
      }
      b[slot / 64] |= uint64_t{1} << (slot % 64);
      SetMeta(kBitmap, n + 1);
      return;
    }
    case kArray:
      break;
  }
  // Array mode. A bitmap over the slots in use is smaller once 4 bytes per holder
  // exceed 8 bytes per word.
  if (n + 1 > 2 * words) {
    ToBitmap(words);
    Insert(slot, words);
    return;
  }
  uint32_t* a = static_cast<uint32_t*>(heap());
  if (n == capacity()) {
    const uint32_t cap = std::max<uint32_t>(2 * capacity(), 2 * kInline);
    uint32_t* na = AllocArray<uint32_t>(cap);
    std::memcpy(na, a, n * sizeof(uint32_t));
    ::operator delete(a);
    a = na;
    SetHeap(a, cap);
  }
  uint32_t* pos = std::lower_bound(a, a + n, slot);
  std::memmove(pos + 1, pos, static_cast<size_t>(a + n - pos) * sizeof(uint32_t));
  *pos = slot;
  SetMeta(kArray, n + 1);
}

void PrefixIndex::HolderSet::Erase(uint32_t slot, uint32_t words) {
  const uint32_t n = size();
  switch (mode()) {
    case kInlineMode: {
      uint32_t i = 0;
      while (i < n && w_[i] != slot) ++i;
      if (i == n) return;
      for (; i + 1 < n; ++i) w_[i] = w_[i + 1];
      SetMeta(kInlineMode, n - 1);
      return;
    }
    case kBitmap: {
      uint64_t* b = static_cast<uint64_t*>(heap());
      if (slot / 64 >= capacity() || ((b[slot / 64] >> (slot % 64)) & 1) == 0) return;
      b[slot / 64] &= ~(uint64_t{1} << (slot % 64));
      SetMeta(kBitmap, n - 1);
      // Back to an array once it would be half the bitmap's size (the gap to the
      // conversion point keeps a set near it from flipping on every change).
      if (n - 1 < words) ToArray();
      return;
    }
    case kArray: {
      uint32_t* a = static_cast<uint32_t*>(heap());
      uint32_t* pos = std::lower_bound(a, a + n, slot);
      if (pos == a + n || *pos != slot) return;
      std::memmove(pos, pos + 1, static_cast<size_t>(a + n - pos - 1) * sizeof(uint32_t));
      SetMeta(kArray, n - 1);
      if (n - 1 <= kInline || (n - 1) * 4 < capacity()) ToArray();  // inline again, or shrink
      return;
    }
  }
}

// ---- PrefixIndex ------------------------------------------------------------------------

PrefixIndex::PrefixIndex(int max_workers) : max_workers_(std::max(1, max_workers)) {}

absl::Status PrefixIndex::CheckSlot(int slot) const {
  if (slot < 0 || slot >= max_workers_) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker slot ", slot, " out of range [0, ", max_workers_, ")"));
  }
  return absl::OkStatus();
}

absl::Status PrefixIndex::Store(int slot, absl::Span<const uint64_t> hashes, Tier tier) {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  if (static_cast<size_t>(slot) >= by_slot_.size()) {
    by_slot_.resize(slot + 1);
    tier_count_.resize(slot + 1, {0, 0, 0});
  }
  words_ = std::max<uint32_t>(words_, static_cast<uint32_t>(slot) / 64 + 1);
  auto& mine = by_slot_[slot];
  const uint8_t bit = static_cast<uint8_t>(1u << tier);
  mine.reserve(mine.size() + hashes.size());
  for (uint64_t h : hashes) {
    // The per-slot table decides "new for this slot", so the shared table is only touched
    // for blocks that change it.
    auto [it, inserted] = mine.try_emplace(h, 0);
    if ((it->second & bit) != 0) continue;
    it->second |= bit;
    ++tier_count_[slot][tier];
    if (inserted) {
      holders_[h].Insert(static_cast<uint32_t>(slot), words_);
      ++held_;
    }
  }
  return absl::OkStatus();
}

void PrefixIndex::DropFromHolders(int slot, uint64_t hash) {
  auto it = holders_.find(hash);
  if (it == holders_.end()) return;  // unreachable while by_slot_ and holders_ agree
  it->second.Erase(static_cast<uint32_t>(slot), words_);
  if (it->second.empty()) holders_.erase(it);
}

absl::Status PrefixIndex::Remove(int slot, absl::Span<const uint64_t> hashes, Tier tier) {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  if (static_cast<size_t>(slot) >= by_slot_.size()) return absl::OkStatus();
  auto& mine = by_slot_[slot];
  const uint8_t bit = static_cast<uint8_t>(1u << tier);
  for (uint64_t h : hashes) {
    auto it = mine.find(h);
    if (it == mine.end() || (it->second & bit) == 0) continue;
    --tier_count_[slot][tier];
    it->second &= static_cast<uint8_t>(~bit);
    if (it->second == 0) {
      mine.erase(it);
      DropFromHolders(slot, h);
      --held_;
    }
  }
  return absl::OkStatus();
}

absl::Status PrefixIndex::ClearTier(int slot, Tier tier) {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  if (static_cast<size_t>(slot) >= by_slot_.size()) return absl::OkStatus();
  if (tier_count_[slot][tier] == static_cast<int64_t>(by_slot_[slot].size())) {
    bool only = true;  // every block is in this tier: is it in no other?
    for (int t = 0; t < kNumTiers; ++t) only = only && (t == tier || tier_count_[slot][t] == 0);
    if (only) return ClearWorker(slot);
  }
  std::vector<uint64_t> in_tier;
  const uint8_t bit = static_cast<uint8_t>(1u << tier);
  for (const auto& [h, mask] : by_slot_[slot]) {
    if ((mask & bit) != 0) in_tier.push_back(h);
  }
  return Remove(slot, in_tier, tier);
}

absl::Status PrefixIndex::ClearWorker(int slot) {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  if (static_cast<size_t>(slot) >= by_slot_.size()) return absl::OkStatus();
  auto& mine = by_slot_[slot];
  for (const auto& [h, mask] : mine) DropFromHolders(slot, h);
  held_ -= static_cast<int64_t>(mine.size());
  // Swap with a fresh table rather than clear(): a restarted worker may come back with a
  // much smaller cache, and clear() would keep the old capacity allocated.
  absl::flat_hash_map<uint64_t, uint8_t>().swap(mine);
  tier_count_[slot] = {0, 0, 0};
  return absl::OkStatus();
}

absl::Status PrefixIndex::ReplaceWorker(int slot, absl::Span<const uint64_t> pool,
                                        absl::Span<const uint64_t> host,
                                        absl::Span<const uint64_t> disk) {
  if (absl::Status s = ClearWorker(slot); !s.ok()) return s;
  (void)Store(slot, pool, kPool);
  (void)Store(slot, host, kHost);
  return Store(slot, disk, kDisk);
}

int64_t PrefixIndex::blocks(int slot) const {
  if (slot < 0 || static_cast<size_t>(slot) >= by_slot_.size()) return 0;
  return static_cast<int64_t>(by_slot_[slot].size());
}

int64_t PrefixIndex::tier_blocks(int slot, Tier tier) const {
  if (slot < 0 || static_cast<size_t>(slot) >= by_slot_.size()) return 0;
  return tier_count_[slot][tier];
}

PrefixIndex::TierSplit PrefixIndex::Split(int slot, absl::Span<const uint64_t> prompt_hashes,
                                          int32_t overlap) const {
  TierSplit out;
  overlap = std::max<int32_t>(0, std::min<int32_t>(overlap, ToCount(prompt_hashes.size())));
  if (slot < 0 || static_cast<size_t>(slot) >= by_slot_.size()) return out;
  if (tier_count_[slot][kHost] == 0 && tier_count_[slot][kDisk] == 0) {
    out.pool = overlap;  // nothing below the pool: no probe
    return out;
  }
  const auto& mine = by_slot_[slot];
  for (int32_t i = 0; i < overlap; ++i) {
    auto it = mine.find(prompt_hashes[i]);
    const uint8_t mask = it == mine.end() ? 0 : it->second;
    if (mask & (1u << kPool)) {
      ++out.pool;
    } else if (mask & (1u << kHost)) {
      ++out.host;
    } else {
      ++out.disk;
    }
  }
  return out;
}

void PrefixIndex::Overlaps(absl::Span<const uint64_t> prompt_hashes, OverlapResult* r) const {
  r->Clear();
  const size_t n = prompt_hashes.size();
  if (n == 0 || holders_.empty()) return;
  const size_t warm = std::min(n, kPrefetchDistance);
  for (size_t i = 0; i < warm; ++i) holders_.prefetch(prompt_hashes[i]);
  const auto end = holders_.end();
  const auto first = holders_.find(prompt_hashes[0]);
  if (first == end) return;

  const uint32_t W = words_;
  // Below this many candidates, following them one by one (a bit test or a search per
  // candidate and block) is cheaper than ANDing W-word bitmaps per block.
  const size_t sparse_max = std::max<size_t>(8, W / 4);
  // The candidates still matching: a bitmap (dense) or a sorted list (sparse).
  std::vector<uint64_t>& alive = r->alive_;
  std::vector<uint32_t>& cand = r->cand_;
  std::vector<uint32_t>& next = r->next_;
  cand.clear();
  bool dense = first->second.is_bitmap() && first->second.size() > sparse_max;
  if (dense) {
    const absl::Span<const uint64_t> b = first->second.bits();
    alive.assign(W, 0);
    std::copy(b.begin(), b.begin() + std::min<size_t>(b.size(), W), alive.begin());
  } else {
    first->second.ForEach([&](uint32_t s) { cand.push_back(s); });
  }

  // Block i is looked up at step i; step n is the end of the prompt (nobody holds it).
  // A candidate that does not hold block i has overlap i.
  size_t i = 1;
  for (; i <= n; ++i) {
    if (i + kPrefetchDistance < n) holders_.prefetch(prompt_hashes[i + kPrefetchDistance]);
    const HolderSet* h = nullptr;
    if (i < n) {
      const auto it = holders_.find(prompt_hashes[i]);
      if (it != end) h = &it->second;
    }
    if (dense) {
      if (h != nullptr && h->is_bitmap()) {
        const absl::Span<const uint64_t> b = h->bits();
        uint64_t dropped = 0;
        for (uint32_t w = 0; w < W; ++w) dropped |= alive[w] & ~(w < b.size() ? b[w] : 0);
        if (dropped == 0) continue;  // every candidate holds block i
        // Some drop out here: everyone still matching holds blocks 0..i-1.
        OverlapResult::Level& level = r->PushLevel(ToCount(i));
        level.bits.assign(alive.begin(), alive.end());
        size_t count = 0;
        for (uint32_t w = 0; w < W; ++w) {
          alive[w] &= w < b.size() ? b[w] : 0;
          count += static_cast<size_t>(__builtin_popcountll(alive[w]));
        }
        if (count == 0) break;
        if (count <= sparse_max) {
          dense = false;
          ForEachBit(alive, [&](uint32_t s) { cand.push_back(s); });
        }
      } else {
        // Few (or no) holders: the survivors are among them.
        OverlapResult::Level& level = r->PushLevel(ToCount(i));
        level.bits.assign(alive.begin(), alive.end());
        if (h != nullptr) {
          h->ForEach([&](uint32_t s) {
            if (TestBit(alive, s)) cand.push_back(s);
          });
        }
        dense = false;
        if (cand.empty()) break;
      }
      continue;
    }
    // Sparse: keep the candidates that hold block i.
    next.clear();
    const int32_t pos = ToCount(i);
    if (h == nullptr) {
      for (uint32_t s : cand) r->listed_.push_back({static_cast<int32_t>(s), pos});
    } else if (h->is_bitmap()) {
      const absl::Span<const uint64_t> b = h->bits();
      for (uint32_t s : cand) {
        if (TestBit(b, s)) {
          next.push_back(s);
        } else {
          r->listed_.push_back({static_cast<int32_t>(s), pos});
        }
      }
    } else {
      const absl::Span<const uint32_t> hs = h->slots();
      if (cand.size() * 8 < hs.size()) {
        for (uint32_t s : cand) {
          if (std::binary_search(hs.begin(), hs.end(), s)) {
            next.push_back(s);
          } else {
            r->listed_.push_back({static_cast<int32_t>(s), pos});
          }
        }
      } else {  // both sorted: merge
        size_t k = 0;
        for (uint32_t s : cand) {
          while (k < hs.size() && hs[k] < s) ++k;
          if (k < hs.size() && hs[k] == s) {
            next.push_back(s);
          } else {
            r->listed_.push_back({static_cast<int32_t>(s), pos});
          }
        }
      }
    }
    cand.swap(next);
    if (cand.empty()) break;
  }
  r->max_ = ToCount(std::min(i, n));
  std::sort(r->listed_.begin(), r->listed_.end(),
            [](const OverlapResult::Listed& a, const OverlapResult::Listed& b) {
              return a.slot < b.slot;
            });
}

void PrefixIndex::Overlaps(absl::Span<const uint64_t> prompt_hashes,
                           absl::Span<int32_t> out) const {
  thread_local OverlapResult r;
  Overlaps(prompt_hashes, &r);
  r.Fill(out);
}

int32_t PrefixIndex::Overlap(int slot, absl::Span<const uint64_t> prompt_hashes) const {
  if (slot < 0 || static_cast<size_t>(slot) >= by_slot_.size()) return 0;
  // The slot's own set answers "does it hold h" with a smaller table than holders_.
  const auto& mine = by_slot_[slot];  // (keys: blocks held in any tier)
  if (mine.empty()) return 0;
  size_t i = 0;
  while (i < prompt_hashes.size() && mine.contains(prompt_hashes[i])) ++i;
  return ToCount(i);
}

int32_t PrefixIndex::MaxOverlap(absl::Span<const uint64_t> prompt_hashes) const {
  thread_local OverlapResult r;
  Overlaps(prompt_hashes, &r);
  return r.max();
}

size_t PrefixIndex::MemoryBytes() const {
  // A SwissTable holds capacity slots plus one control byte each (and a group's worth
  // of cloned control bytes).
  constexpr size_t kGroup = 16;
  size_t bytes = sizeof(*this);
  bytes += holders_.capacity() * (sizeof(std::pair<const uint64_t, HolderSet>) + 1) + kGroup;
  for (const auto& [hash, set] : holders_) bytes += set.HeapBytes();
  bytes += by_slot_.capacity() * sizeof(absl::flat_hash_map<uint64_t, uint8_t>) +
           tier_count_.capacity() * sizeof(tier_count_[0]);
  for (const auto& s : by_slot_) {
    if (s.capacity() > 0) {
      bytes += s.capacity() * (sizeof(std::pair<const uint64_t, uint8_t>) + 1) + kGroup;
    }
  }
  return bytes;
}

}  // namespace kvrelay::router
