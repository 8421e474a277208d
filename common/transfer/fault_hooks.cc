#include "common/transfer/fault_hooks.h"

#ifdef KVRELAY_FAULT_INJECTION
#include <atomic>
#include <cstdlib>
#endif

namespace kvrelay::transfer::fault {

bool CorruptNextReceivedTransfer() {
#ifdef KVRELAY_FAULT_INJECTION
  static const long every = [] {
    const char* v = std::getenv("KVRELAY_FAULT_CORRUPT_KV");
    return v != nullptr ? std::strtol(v, nullptr, 10) : 0L;
  }();
  static std::atomic<long> seen{0};
  return every > 0 && ++seen % every == 0;
#else
  return false;
#endif
}

}  // namespace kvrelay::transfer::fault
