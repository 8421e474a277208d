// Shared helpers for the benchmark binaries (not part of the default test set).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvrelay::bench {

inline double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// memcpy bandwidth (bytes copied per second) over `bytes`-sized buffers, best of `reps`.
inline double MemcpyBandwidth(size_t bytes = size_t{512} << 20, int reps = 5) {
  std::vector<uint8_t> a(bytes, 1), b(bytes, 2);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = NowSeconds();
    std::memcpy(b.data(), a.data(), bytes);
    const double t = NowSeconds() - t0;
    if (t < best) best = t;
    a[r] = b[bytes - 1 - r];  // keep the copies observable
  }
  return static_cast<double>(bytes) / best;
}

}  // namespace kvrelay::bench
