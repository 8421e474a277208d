// The transfer descriptor decoder (issue 17): DecodeDescriptor on any text; what it
// accepts encodes and decodes back to the same descriptor.
#include <cstdint>
#include <string>

#include "common/transfer/kv_transport.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  auto d = kvrelay::transfer::DecodeDescriptor(in);
  if (!d.ok()) return 0;
  auto again = kvrelay::transfer::DecodeDescriptor(kvrelay::transfer::EncodeDescriptor(*d));
  if (!again.ok() || again->rkey != d->rkey || again->peer_address != d->peer_address ||
      again->base_address != d->base_address || again->bytes != d->bytes ||
      again->num_blocks != d->num_blocks || again->block_bytes != d->block_bytes ||
      again->memory_type != d->memory_type || again->transport != d->transport) {
    __builtin_trap();
  }
  return 0;
}
