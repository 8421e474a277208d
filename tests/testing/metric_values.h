// Reading a prometheus-cpp registry back in tests.
#pragma once

#include <algorithm>
#include <map>
#include <string>

#include "prometheus/registry.h"

namespace kvrelay::testing {

// Sum over the series `name` of `registry` whose labels include `labels`: counter and
// gauge values, histogram sample counts (or sample sums with `histogram_sum`). -1 when
// there is no such series.
inline double Metric(const prometheus::Registry& registry, const std::string& name,
                     const std::map<std::string, std::string>& labels = {},
                     bool histogram_sum = false) {
  double sum = 0;
  bool found = false;
  for (const prometheus::MetricFamily& f : registry.Collect()) {
    if (f.name != name) continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      const bool match = std::all_of(labels.begin(), labels.end(), [&](const auto& want) {
        return std::any_of(m.label.begin(), m.label.end(), [&](const auto& l) {
          return l.name == want.first && l.value == want.second;
        });
      });
      if (!match) continue;
      found = true;
      if (f.type == prometheus::MetricType::Counter) sum += m.counter.value;
      if (f.type == prometheus::MetricType::Gauge) sum += m.gauge.value;
      if (f.type == prometheus::MetricType::Histogram) {
        sum +=
            histogram_sum ? m.histogram.sample_sum : static_cast<double>(m.histogram.sample_count);
      }
    }
  }
  return found ? sum : -1;
}

}  // namespace kvrelay::testing
