// The block-hash scheme is a wire format: workers and the router (possibly of
// different builds) must agree on it. The golden values below were computed by this
// code and cross-checked with Debian's python3-xxhash (xxh3_64_intdigest over
// struct.pack("<16I", ...) with seed = parent); they must never change silently.
#include "common/kvcache/block_hash.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "xxhash.h"

namespace kvrelay::kvcache {
namespace {

std::vector<int32_t> GoldenTokens() {
  std::vector<int32_t> t;
  for (int i = 0; i < 40; ++i) t.push_back(i * 1000 + 7);
  t[5] = 128000;
  t[17] = 0x7fffffff;
  return t;
}

TEST(BlockHashTest, GoldenRoots) {
  EXPECT_EQ(RootHash("", ""), 0x21e150a986589bf7ull);
  EXPECT_EQ(RootHash("meta-llama/Llama-3.2-1B", ""), 0x219ab5e78590e0aeull);
  EXPECT_EQ(RootHash("meta-llama/Llama-3.2-1B", "tenant-a"), 0x593d3e9f02c0fdc0ull);
}

TEST(BlockHashTest, GoldenChains) {
  // 40 tokens, block size 16: two full blocks; the 8-token tail has no hash.
  EXPECT_EQ(BlockHashes(RootHash("meta-llama/Llama-3.2-1B", ""), GoldenTokens(), 16),
            (std::vector<uint64_t>{0x63961deb19f179a1ull, 0x4355e22daed63d83ull}));
  EXPECT_EQ(BlockHashes(RootHash("gpt2", "s"), {50256, 1, 2, 3, 4, 5, 6, 7}, 4),
            (std::vector<uint64_t>{0xa22b7dd8b329b300ull, 0xade82f3159bd3a08ull}));
}

TEST(BlockHashTest, IsXxh3OfLittleEndianTokensSeededWithTheParent) {
  const std::vector<int32_t> t = GoldenTokens();
  const uint64_t root = RootHash("m", "salt");
  unsigned char le[64];
  for (int i = 0; i < 16; ++i) {
    const uint32_t v = static_cast<uint32_t>(t[i]);
    for (int k = 0; k < 4; ++k) le[4 * i + k] = static_cast<unsigned char>(v >> (8 * k));
  }
  const uint64_t h0 = XXH3_64bits_withSeed(le, sizeof(le), root);
  EXPECT_EQ(ChainHash(root, absl::MakeConstSpan(t).first(16)), h0);
  EXPECT_EQ(BlockHashes(root, t, 16)[0], h0);
  EXPECT_EQ(BlockHashes(root, t, 16)[1], ChainHash(h0, absl::MakeConstSpan(t).subspan(16, 16)));
  // The root spells out its fields with their lengths.
  std::string buf = "kvrelay/block-hash/v1";
  const uint64_t one = 1, four = 4;
  buf.append(reinterpret_cast<const char*>(&one), 8).append("m");
  buf.append(reinterpret_cast<const char*>(&four), 8).append("salt");
  EXPECT_EQ(root, XXH3_64bits_withSeed(buf.data(), buf.size(), 0));
}

TEST(BlockHashTest, OnlyFullBlocksAreHashed) {
  const std::vector<int32_t> t = GoldenTokens();
  EXPECT_TRUE(BlockHashes(1, absl::MakeConstSpan(t).first(15), 16).empty());
  EXPECT_EQ(BlockHashes(1, absl::MakeConstSpan(t).first(16), 16).size(), 1u);
  EXPECT_EQ(BlockHashes(1, absl::MakeConstSpan(t).first(31), 16).size(), 1u);
  EXPECT_EQ(BlockHashes(1, t, 1).size(), 40u);
  EXPECT_TRUE(BlockHashes(1, t, 0).empty());  // no block size, no blocks
}

TEST(BlockHashTest, ExtendContinuesTheChain) {
  const std::vector<int32_t> t = GoldenTokens();
  const uint64_t root = RootHash("m", "");
  std::vector<uint64_t> h;
  ExtendBlockHashes(root, absl::MakeConstSpan(t).first(10), 4, &h);
  EXPECT_EQ(h.size(), 2u);
  ExtendBlockHashes(root, t, 4, &h);
  EXPECT_EQ(h, BlockHashes(root, t, 4));
}

TEST(BlockHashTest, SaltModelAndPrefixSeparateChains) {
  const std::vector<int32_t> t = GoldenTokens();
  const auto base = BlockHashes(RootHash("m", ""), t, 8);
  // Different salt or model: no block hash in common.
  for (const auto& other :
       {BlockHashes(RootHash("m", "x"), t, 8), BlockHashes(RootHash("m2", ""), t, 8)}) {
    for (uint64_t h : other) EXPECT_EQ(std::count(base.begin(), base.end(), h), 0);
  }
  // Field boundaries matter: ("ab", "c") is not ("a", "bc").
  EXPECT_NE(RootHash("ab", "c"), RootHash("a", "bc"));
  // A change in block 0 changes every later hash; a change in block 2 leaves 0 and 1.
  std::vector<int32_t> t2 = t;
  t2[0] += 1;
  const auto h2 = BlockHashes(RootHash("m", ""), t2, 8);
  for (size_t i = 0; i < base.size(); ++i) EXPECT_NE(h2[i], base[i]) << i;
  std::vector<int32_t> t3 = t;
  t3[17] = 5;
  const auto h3 = BlockHashes(RootHash("m", ""), t3, 8);
  EXPECT_EQ(h3[0], base[0]);
  EXPECT_EQ(h3[1], base[1]);
  EXPECT_NE(h3[2], base[2]);
}

}  // namespace
}  // namespace kvrelay::kvcache
