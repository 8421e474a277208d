// Chained block hashes (DESIGN §3): the identity of a block of KV is the hash of its
// tokens chained onto the hash of every block before it, under a root that names
// the model and the request's cache_salt. Pure functions shared by workers (their
// prefix caches) and the router (its global index). The scheme is fixed by golden
// vectors in block_hash_test.cc; changing it invalidates every index.
//
//   root = XXH3_64bits_withSeed("kvrelay/block-hash/v1" || u64le(|model_id|) || model_id
//                               || u64le(|cache_salt|) || cache_salt, seed = 0)
//   h[0] = XXH3_64bits_withSeed(u32le(tokens[0..B)), seed = root)
//   h[i] = XXH3_64bits_withSeed(u32le(tokens[iB..(i+1)B)), seed = h[i-1])
//
// Only full blocks are hashed; a trailing partial block has no hash.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvrelay::kvcache {

// The chain's root. Different model ids or salts give unrelated chains.
uint64_t RootHash(absl::string_view model_id, absl::string_view cache_salt);

// Hash of one block of tokens chained onto `parent` (the root or the previous block's hash).
uint64_t ChainHash(uint64_t parent, absl::Span<const int32_t> block_tokens);

// Hashes of the full blocks of `tokens`: tokens.size() / block_size of them.
std::vector<uint64_t> BlockHashes(uint64_t root, absl::Span<const int32_t> tokens, int block_size);

// Appends to *hashes the hashes of the full blocks of `tokens` that it does not hold
// yet (continuing the chain from its last element, or from root when empty).
void ExtendBlockHashes(uint64_t root, absl::Span<const int32_t> tokens, int block_size,
                       std::vector<uint64_t>* hashes);

}  // namespace kvrelay::kvcache
