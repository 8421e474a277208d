#include "common/worker/kv_pool_metrics.h"

#include <string>

namespace kvrelay::worker {

KvPoolMetrics::KvPoolMetrics(prometheus::Registry& registry, const char* holder) {
  auto& blocks = prometheus::BuildGauge()
                     .Name("kvrelay_kv_blocks")
                     .Help(std::string("KV pool blocks by state: free, in_use (held by ") + holder +
                           "), cached_free (unused but reusable from the prefix cache)")
                     .Register(registry);
  free_ = &blocks.Add({{"state", "free"}});
  in_use_ = &blocks.Add({{"state", "in_use"}});
  cached_free_ = &blocks.Add({{"state", "cached_free"}});
  evictions_ = &prometheus::BuildCounter()
                    .Name("kvrelay_kv_evictions_total")
                    .Help(
                        "Cached KV blocks evicted (least recently used first) to make room "
                        "for new ones")
                    .Register(registry)
                    .Add({});
}

void KvPoolMetrics::Update(const kvcache::PrefixCacheCounts& counts) {
  absl::MutexLock l(&mu_);  // counts read on two threads may arrive out of order
  free_->Set(static_cast<double>(counts.free));
  in_use_->Set(static_cast<double>(counts.in_use));
  cached_free_->Set(static_cast<double>(counts.cached_free));
  if (counts.evicted > evicted_seen_) {  // a stale read never counts twice
    evictions_->Increment(static_cast<double>(counts.evicted - evicted_seen_));
    evicted_seen_ = counts.evicted;
  }
}

}  // namespace kvrelay::worker
