// The KV pool's Prometheus series, the same on prefill and decode workers:
// kvrelay_kv_blocks{state} (free / in_use / cached_free) and
// kvrelay_kv_evictions_total (cached blocks evicted to make room; with the router's
// predicted vs delivered hit rate it tells an eviction from a routing miss).
#pragma once

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/kvcache/prefix_cache.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace kvrelay::worker {

class KvPoolMetrics {
 public:
  // Adds the families to `registry`; `holder` names what holds in-use blocks in the
  // help text ("sequences", "jobs").
  KvPoolMetrics(prometheus::Registry& registry, const char* holder);

  // Sets the gauges from `counts` and adds the evictions since the last call. Any thread.
  void Update(const kvcache::PrefixCacheCounts& counts) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  prometheus::Gauge* free_;
  prometheus::Gauge* in_use_;
  prometheus::Gauge* cached_free_;
  prometheus::Counter* evictions_;
  absl::Mutex mu_;
  int64_t evicted_seen_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrelay::worker
