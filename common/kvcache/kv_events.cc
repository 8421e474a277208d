#include "common/kvcache/kv_events.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvrelay::kvcache {

const char* KvTierName(KvTier tier) {
  switch (tier) {
    case KvTier::kPool:
      return "pool";
    case KvTier::kHost:
      return "host";
    case KvTier::kDisk:
      return "disk";
  }
  return "?";
}

std::string DebugString(const KvEvent& e) {
  const std::string tier = e.tier == KvTier::kPool ? "" : absl::StrCat(KvTierName(e.tier), " ");
  switch (e.type) {
    case KvEvent::Type::kStored:
      return absl::StrCat("#", e.seq, " ", tier, "stored(",
                          e.parent_hash ? absl::StrCat(*e.parent_hash) : std::string("root"), ", [",
                          absl::StrJoin(e.hashes, ","), "])");
    case KvEvent::Type::kRemoved:
      return absl::StrCat("#", e.seq, " ", tier, "removed([", absl::StrJoin(e.hashes, ","), "])");
    case KvEvent::Type::kCleared:
      return absl::StrCat("#", e.seq, " cleared");
  }
  return "?";
}

KvEventLog::KvEventLog(uint64_t incarnation, size_t capacity)
    : incarnation_(incarnation), capacity_(std::max<size_t>(1, capacity)) {}

uint64_t KvEventLog::Append(KvEvent event) {
  event.seq = next_seq_++;
  if (events_.size() == capacity_) events_.pop_front();
  events_.push_back(std::move(event));
  return events_.back().seq;
}

KvEventBatch KvEventLog::Read(uint64_t from_seq, size_t max_events) const {
  KvEventBatch batch;
  batch.incarnation = incarnation_;
  const uint64_t oldest = next_seq_ - events_.size();
  if (from_seq < oldest || from_seq > next_seq_ || from_seq == 0) {
    batch.need_snapshot = true;
    batch.next_seq = from_seq;
    return batch;
  }
  const size_t first = static_cast<size_t>(from_seq - oldest);
  const size_t n = std::min(max_events, events_.size() - first);
  batch.events.assign(events_.begin() + first, events_.begin() + first + n);
  batch.next_seq = from_seq + n;
  return batch;
}

bool KvEventReplica::Apply(const KvEventBatch& batch) {
  if (batch.need_snapshot || !synced_ || batch.incarnation != incarnation_) return false;
  if (!batch.events.empty() && batch.events.front().seq != next_seq_) return false;
  for (size_t i = 1; i < batch.events.size(); ++i) {
    if (batch.events[i].seq != batch.events[i - 1].seq + 1) return false;
  }
  for (const KvEvent& e : batch.events) {
    next_seq_ = e.seq + 1;
    if (e.tier != KvTier::kPool) continue;
    switch (e.type) {
      case KvEvent::Type::kStored:
        hashes_.insert(e.hashes.begin(), e.hashes.end());
        break;
      case KvEvent::Type::kRemoved:
        for (uint64_t h : e.hashes) hashes_.erase(h);
        break;
      case KvEvent::Type::kCleared:
        hashes_.clear();
        break;
    }
  }
  return true;
}

void KvEventReplica::ApplySnapshot(const KvSnapshot& snapshot) {
  hashes_.clear();
  for (const CachedBlockInfo& b : snapshot.blocks) {
    if (b.tier == KvTier::kPool) hashes_.insert(b.hash);
  }
  incarnation_ = snapshot.incarnation;
  next_seq_ = snapshot.seq + 1;
  synced_ = true;
}

}  // namespace kvrelay::kvcache
