// Test-only fault injection in the KV transfer path (issue 17's fault suite). Compiled in
// only with KVRELAY_FAULT_INJECTION (CMake option of the same name, on with the tests,
// off in the images); without it every hook is a constant no-op.
//
// KVRELAY_FAULT_CORRUPT_KV=N (environment of a decode worker): one byte of every Nth
// received remote prefill is flipped before its checksums are verified, as corruption on
// the way would; the checksum must catch it and the blocks must never be decoded.
#pragma once

#include <cstdint>

namespace kvrelay::transfer::fault {

// Whether the received transfer now arriving should be corrupted.
bool CorruptNextReceivedTransfer();

// Whether this build has the hooks (a test can tell a hook that did nothing from one
// that is not there).
constexpr bool kCompiledIn =
#ifdef KVRELAY_FAULT_INJECTION
    true;
#else
    false;
#endif

}  // namespace kvrelay::transfer::fault
