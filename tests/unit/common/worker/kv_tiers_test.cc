// Tests for common/worker/kv_tiers: blocks the pool caches are copied down to host memory,
// the host tier's LRU victims go down to disk, a prompt's blocks come back up exact; the
// disk tier survives a restart, ignores other models' files, discards corrupt ones, and a
// full disk only skips offloads; cache_salt keeps tenants apart in every tier.
#include "common/worker/kv_tiers.h"

#include <sys/mount.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/kv_sequence.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::worker {
namespace {

using kvcache::KvEvent;
using kvcache::KvTier;
using ::testing::HasSubstr;

constexpr int kB = 4;  // tokens per block

kernels::PagedKvLayout Layout() {
  kernels::PagedKvLayout l;
  l.dtype = kernels::DType::kF32;
  l.num_layers = 2;
  l.block_size = kB;
  l.num_kv_heads = 2;
  l.head_dim = 64;
  return l;  // 8 KiB blocks
}

// One worker's pool, cache and (optionally) tier store, over a real CPU backend.
struct Worker {
  explicit Worker(KvTierOptions tiers, int64_t blocks = 16, std::string model_id = "m")
      : model(std::move(model_id)) {
    auto b = kernels::CreateBackend(kernels::Device::kCpu, nullptr);
    EXPECT_TRUE(b.ok()) << b.status();
    backend = *std::move(b);
    auto p = kvcache::KvPool::Create(Layout(), blocks);
    EXPECT_TRUE(p.ok()) << p.status();
    pool = *std::move(p);
    kvcache::PrefixCache::Options co;
    co.num_blocks = blocks;
    co.block_size = kB;
    co.incarnation = 7;
    auto c = kvcache::PrefixCache::Create(co);
    EXPECT_TRUE(c.ok()) << c.status();
    cache = *std::move(c);
    tiers.model_id = this->model;
    auto s = KvTierStore::Create(tiers, pool.get(), cache.get(), backend.get());
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) store = *std::move(s);
  }
  ~Worker() { store.reset(); }  // before the cache it hooks into

  uint8_t* block(int32_t b) const {
    return pool->view().base + static_cast<uint64_t>(b) * pool->layout().block_bytes();
  }
  size_t block_bytes() const { return pool->layout().block_bytes(); }

  // Computes ("prefills") `tokens` as a sequence of `salt`: every block's bytes are a
  // pattern derived from its hash, so a block that comes back must carry its own bytes.
  void Compute(const std::vector<int32_t>& tokens, const std::string& salt = "") {
    kvcache::KvSequence seq(cache.get(), kvcache::RootHash(model, salt));
    ASSERT_TRUE(seq.Reserve(static_cast<int64_t>(tokens.size())).ok());
    const std::vector<uint64_t> hashes =
        kvcache::BlockHashes(kvcache::RootHash(model, salt), tokens, kB);
    for (size_t i = 0; i < hashes.size(); ++i) Fill(seq.blocks()[i], hashes[i]);
    seq.Commit(tokens, static_cast<int64_t>(tokens.size()));
  }
  void Fill(int32_t b, uint64_t seed) const {
    uint8_t* p = block(b);
    for (size_t i = 0; i < block_bytes(); ++i) p[i] = static_cast<uint8_t>((seed >> (i % 57)) + i);
  }
  bool Holds(int32_t b, uint64_t seed) const {
    std::vector<uint8_t> want(block_bytes());
    for (size_t i = 0; i < block_bytes(); ++i) {
      want[i] = static_cast<uint8_t>((seed >> (i % 57)) + i);
    }
    return std::memcmp(want.data(), block(b), block_bytes()) == 0;
  }
  // Evicts everything cached from the pool (and scribbles over it).
  void EvictPool() {
    auto all = cache->Allocate(pool->num_blocks());
    ASSERT_TRUE(all.ok()) << all.status();
    for (int32_t b : *all) std::memset(block(b), 0xee, block_bytes());
    cache->Release(*all);
    ASSERT_EQ(cache->counts().cached, 0);
  }
  // Looks the prompt up below the pool and reloads what is found into fresh blocks;
  // checks each reloaded block carries its bytes. Returns the result.
  KvTierStore::ReloadResult Reload(const std::vector<int32_t>& tokens, const std::string& salt = "",
                                   int64_t* found = nullptr) {
    const std::vector<uint64_t> hashes =
        kvcache::BlockHashes(kvcache::RootHash(model, salt), tokens, kB);
    KvTierStore::ReloadPlan plan = store->Lookup(std::nullopt, hashes, tokens);
    if (found != nullptr) *found = plan.size();
    auto dest = cache->Allocate(plan.size());
    EXPECT_TRUE(dest.ok());
    std::vector<int32_t> blocks = *dest;
    KvTierStore::ReloadResult r = store->ReloadNow(std::move(plan), blocks);
    for (int64_t i = 0; i < r.loaded; ++i) {
      EXPECT_TRUE(Holds(blocks[i], hashes[i])) << "block " << i << " came back wrong";
    }
    cache->Release(blocks);
    return r;
  }
  // Tier events in the pool's stream so far.
  std::vector<KvEvent> TierEvents(KvTier tier) const {
    std::vector<KvEvent> out;
    for (const KvEvent& e : cache->ReadEvents(1, 1 << 20).events) {
      if (e.tier == tier) out.push_back(e);
    }
    return out;
  }

  std::string model = "m";
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<kvcache::KvPool> pool;
  std::unique_ptr<kvcache::PrefixCache> cache;
  std::unique_ptr<KvTierStore> store;
};

std::vector<int32_t> Tokens(int blocks, int32_t first = 1) {
  std::vector<int32_t> t(static_cast<size_t>(blocks) * kB);
  std::iota(t.begin(), t.end(), first);
  return t;
}

uint64_t FileBytes() {
  kvcache::DiskBlockIdentity id{"m", Layout()};
  return kvcache::DiskBlockHeaderBytes(id) + Layout().block_bytes();
}

KvTierOptions HostOnly(int64_t blocks) {
  KvTierOptions o;
  o.host_bytes = static_cast<uint64_t>(blocks) * Layout().block_bytes();
  return o;
}

KvTierOptions WithDisk(const std::string& dir, int64_t host_blocks, int64_t disk_blocks) {
  KvTierOptions o = HostOnly(host_blocks);
  o.disk_dir = dir;
  o.disk_bytes = static_cast<uint64_t>(disk_blocks) * FileBytes();
  return o;
}

int64_t Files(const std::string& dir, const std::string& ext = ".kvb") {
  int64_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    n += e.path().extension() == ext ? 1 : 0;
  }
  return n;
}

TEST(KvTiersTest, RejectsTiersThatHoldNoBlock) {
  Worker w(HostOnly(1));
  KvTierOptions o;
  o.host_bytes = 100;
  auto s = KvTierStore::Create(o, w.pool.get(), w.cache.get(), w.backend.get());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("--kv_host_bytes"));
  testing::ScopedTempDir dir;
  o = KvTierOptions();
  o.disk_dir = dir.path();
  s = KvTierStore::Create(o, w.pool.get(), w.cache.get(), w.backend.get());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("--kv_disk_bytes"));
  o = KvTierOptions();
  o.disk_bytes = 1 << 20;
  s = KvTierStore::Create(o, w.pool.get(), w.cache.get(), w.backend.get());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvTiersTest, EvictedBlocksComeBackFromHostExact) {
  Worker w(HostOnly(8));
  const std::vector<int32_t> prompt = Tokens(3);
  w.Compute(prompt);
  w.store->WaitIdle();
  EXPECT_EQ(w.store->counts(KvTier::kHost).blocks, 3);
  EXPECT_EQ(w.cache->counts().in_use, 0);  // the copies' pins are gone
  ASSERT_TRUE(w.cache->Validate().ok());
  const std::vector<KvEvent> events = w.TierEvents(KvTier::kHost);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].type, KvEvent::Type::kStored);
  EXPECT_FALSE(events[0].parent_hash.has_value());
  EXPECT_EQ(events[1].parent_hash, events[0].hashes[0]);  // the chain, block by block

  w.EvictPool();
  const KvTierStore::ReloadResult r = w.Reload(prompt);
  EXPECT_EQ(r.loaded, 3);
  EXPECT_EQ(r.from_host, 3);
  EXPECT_EQ(w.store->stats().reloaded[0], 3);
  EXPECT_EQ(w.cache->counts().in_use, 0);
  EXPECT_EQ(w.store->counts(KvTier::kHost).pinned, 0);
}

TEST(KvTiersTest, HostVictimsGoToDiskAndComeBack) {
  testing::ScopedTempDir dir;
  Worker w(WithDisk(dir.path(), 2, 8));
  const std::vector<int32_t> prompt = Tokens(5);
  w.Compute(prompt);
  w.store->WaitIdle();
  // The host tier keeps the 2 most recent blocks; the 3 older ones went down to disk.
  EXPECT_EQ(w.store->counts(KvTier::kHost).blocks, 2);
  EXPECT_EQ(w.store->counts(KvTier::kDisk).blocks, 3);
  EXPECT_EQ(Files(dir.path()), 3);
  EXPECT_EQ(Files(dir.path(), ".tmp"), 0);
  EXPECT_EQ(w.cache->tier_blocks(KvTier::kDisk), 3);
  EXPECT_EQ(w.cache->tier_blocks(KvTier::kHost), 2);
  kvcache::KvSnapshot snap = w.cache->Snapshot();
  int64_t host = 0, disk = 0;
  for (const auto& b : snap.blocks) {
    host += b.tier == KvTier::kHost;
    disk += b.tier == KvTier::kDisk;
  }
  EXPECT_EQ(host, 2);
  EXPECT_EQ(disk, 3);

  w.EvictPool();
  const KvTierStore::ReloadResult r = w.Reload(prompt);
  EXPECT_EQ(r.loaded, 5);
  EXPECT_EQ(r.from_disk, 3);
  EXPECT_EQ(r.from_host, 2);
  w.store->WaitIdle();
  EXPECT_EQ(w.store->stats().corrupt, 0);
}

TEST(KvTiersTest, DiskOnlyTierSurvivesARestart) {
  testing::ScopedTempDir dir;
  const std::vector<int32_t> prompt = Tokens(4);
  {
    KvTierOptions o = WithDisk(dir.path(), 0, 8);
    o.host_bytes = 0;
    Worker w(o);
    w.Compute(prompt);
    w.store->WaitIdle();
    EXPECT_EQ(Files(dir.path()), 4);
  }
  KvTierOptions o = WithDisk(dir.path(), 0, 8);
  o.host_bytes = 0;
  Worker again(o);  // a new incarnation: nothing in its pool
  EXPECT_EQ(again.cache->counts().cached, 0);
  EXPECT_EQ(again.store->counts(KvTier::kDisk).blocks, 4);
  EXPECT_EQ(again.TierEvents(KvTier::kDisk).size(), 4u);  // the router learns them
  const KvTierStore::ReloadResult r = again.Reload(prompt);
  EXPECT_EQ(r.loaded, 4);
  EXPECT_EQ(r.from_disk, 4);
}

TEST(KvTiersTest, RestartKeepsTheMostRecentFilesThatFit) {
  testing::ScopedTempDir dir;
  {
    KvTierOptions o = WithDisk(dir.path(), 0, 8);
    o.host_bytes = 0;
    Worker w(o);
    w.Compute(Tokens(6));
    w.store->WaitIdle();
  }
  KvTierOptions o = WithDisk(dir.path(), 0, 3);
  o.host_bytes = 0;
  Worker again(o);
  EXPECT_EQ(again.store->counts(KvTier::kDisk).blocks, 3);
  EXPECT_EQ(Files(dir.path()), 3);
}

TEST(KvTiersTest, FilesOfAnotherModelOrGeometryAreIgnored) {
  testing::ScopedTempDir dir;
  {
    KvTierOptions o = WithDisk(dir.path(), 0, 8);
    o.host_bytes = 0;
    Worker other(o, 16, "another-model");
    other.Compute(Tokens(3));
    other.store->WaitIdle();
  }
  std::ofstream(dir.path() + "/notes.txt") << "not a block";
  std::ofstream(dir.path() + "/00000000000000ab.kvb") << "short";
  KvTierOptions o = WithDisk(dir.path(), 0, 8);
  o.host_bytes = 0;
  Worker w(o);
  EXPECT_EQ(w.store->counts(KvTier::kDisk).blocks, 0);
  EXPECT_EQ(w.store->stats().ignored_files, 5);
  EXPECT_EQ(Files(dir.path()), 4);  // left alone: another worker may still use them
}

TEST(KvTiersTest, CorruptDiskBlockIsDiscardedAndRecomputed) {
  testing::ScopedTempDir dir;
  KvTierOptions o = WithDisk(dir.path(), 0, 8);
  o.host_bytes = 0;
  Worker w(o);
  const std::vector<int32_t> prompt = Tokens(3);
  w.Compute(prompt);
  w.store->WaitIdle();
  w.EvictPool();
  // Flip one data byte of the second block's file.
  const std::vector<uint64_t> hashes = kvcache::BlockHashes(kvcache::RootHash("m", ""), prompt, kB);
  const std::string path = dir.path() + "/" + kvcache::DiskBlockFileName(hashes[1]);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(FileBytes() - 10));
    char c;
    f.get(c);
    f.seekp(static_cast<std::streamoff>(FileBytes() - 10));
    f.put(static_cast<char>(c ^ 0x40));
  }
  const KvTierStore::ReloadResult r = w.Reload(prompt);
  EXPECT_EQ(r.loaded, 1);  // the first block; the corrupt one and the rest are recomputed
  EXPECT_EQ(w.store->stats().corrupt, 1);
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_EQ(w.store->counts(KvTier::kDisk).blocks, 2);
  const std::vector<KvEvent> events = w.TierEvents(KvTier::kDisk);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().type, KvEvent::Type::kRemoved);
  EXPECT_EQ(events.back().hashes, std::vector<uint64_t>{hashes[1]});
  // Asked again, the tier offers only the intact first block.
  int64_t found = 0;
  w.Reload(prompt, "", &found);
  EXPECT_EQ(found, 1);
}

// A disk that fills up: writes fail (ENOSPC), the offloads are skipped and counted, and
// nothing fails for the caller.
TEST(KvTiersTest, FullDiskSkipsOffloads) {
  testing::ScopedTempDir dir;
  // 3 pages: room for one 8 KiB block file and not two.
  if (::geteuid() != 0 || ::mount("tmpfs", dir.path().c_str(), "tmpfs", 0, "size=12k") != 0) {
    GTEST_SKIP() << "needs to mount a small tmpfs (root): " << std::strerror(errno);
  }
  struct Unmount {
    std::string p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{dir.path()};
  {
    KvTierOptions o = WithDisk(dir.path(), 0, 64);  // the tier believes it has room
    o.host_bytes = 0;
    Worker w(o);
    const std::vector<int32_t> prompt = Tokens(4);
    w.Compute(prompt);
    w.store->WaitIdle();
    const KvTierStats st = w.store->stats();
    EXPECT_EQ(st.offloaded[1], 1);
    EXPECT_EQ(st.write_errors, 3);
    EXPECT_EQ(st.skipped, 3);
    EXPECT_EQ(w.store->counts(KvTier::kDisk).blocks, 1);
    EXPECT_EQ(Files(dir.path()), 1);
    EXPECT_EQ(Files(dir.path(), ".tmp"), 0);  // partial writes removed
    EXPECT_EQ(w.cache->counts().in_use, 0);
    w.EvictPool();
    EXPECT_EQ(w.Reload(prompt).loaded, 1);
  }
}

TEST(KvTiersTest, CacheSaltIsolatesTenantsInEveryTier) {
  testing::ScopedTempDir dir;
  const std::vector<int32_t> prompt = Tokens(4);
  {
    Worker w(WithDisk(dir.path(), 2, 8));
    w.Compute(prompt, "tenant-a");
    w.store->WaitIdle();
    w.EvictPool();
    int64_t found = -1;
    EXPECT_EQ(w.Reload(prompt, "tenant-b", &found).loaded, 0);
    EXPECT_EQ(found, 0);
    EXPECT_EQ(w.Reload(prompt, "", &found).loaded, 0);
    EXPECT_EQ(w.Reload(prompt, "tenant-a", &found).loaded, 4);
  }
  Worker again(WithDisk(dir.path(), 2, 8));  // from disk, after a restart
  int64_t found = -1;
  EXPECT_EQ(again.Reload(prompt, "tenant-b", &found).loaded, 0);
  EXPECT_EQ(found, 0);
  EXPECT_GT(again.Reload(prompt, "tenant-a", &found).loaded, 0);
}

TEST(KvTiersTest, SameHashOtherTokensIsAMiss) {
  Worker w(HostOnly(8));
  const std::vector<int32_t> prompt = Tokens(2);
  w.Compute(prompt);
  w.store->WaitIdle();
  std::vector<int32_t> other = prompt;
  other[kB + 1] += 1000;  // the second block differs; its hash is taken from the first prompt
  const std::vector<uint64_t> hashes = kvcache::BlockHashes(kvcache::RootHash("m", ""), prompt, kB);
  KvTierStore::ReloadPlan plan = w.store->Lookup(std::nullopt, hashes, other);
  EXPECT_EQ(plan.size(), 1);  // exact reuse: tokens must match, not only hashes
  plan = KvTierStore::ReloadPlan();
  EXPECT_EQ(w.store->counts(KvTier::kHost).pinned, 0);  // dropping a plan unpins
}

// Offloads beyond the backlog limit are skipped, never queued without bound. The store's
// thread is held inside a reload's callback, so the offloads wait deterministically.
TEST(KvTiersTest, BacklogBeyondTheLimitIsSkipped) {
  KvTierOptions o = HostOnly(8);
  o.max_pending_offload_blocks = 2;
  Worker w(o);
  absl::Notification in_callback, release;
  w.store->Reload(KvTierStore::ReloadPlan(), {}, [&](const KvTierStore::ReloadResult&) {
    in_callback.Notify();
    release.WaitForNotification();
  });
  in_callback.WaitForNotification();
  w.Compute(Tokens(2, 1));    // 2 blocks pending: at the limit
  w.Compute(Tokens(1, 500));  // over it: skipped
  EXPECT_EQ(w.store->stats().skipped, 1);
  EXPECT_EQ(w.cache->counts().in_use, 2);  // pinned for their copies
  release.Notify();
  w.store->WaitIdle();
  EXPECT_EQ(w.store->counts(KvTier::kHost).blocks, 2);
  EXPECT_EQ(w.cache->counts().in_use, 0);
}

TEST(KvTiersTest, StoppingDropsQueuedOffloadsAndUnpins) {
  Worker w(HostOnly(8));
  absl::Notification in_callback, release;
  w.store->Reload(KvTierStore::ReloadPlan(), {}, [&](const KvTierStore::ReloadResult&) {
    in_callback.Notify();
    release.WaitForNotification();
  });
  in_callback.WaitForNotification();
  w.Compute(Tokens(3));
  EXPECT_EQ(w.cache->counts().in_use, 3);
  std::thread stopper([&] { w.store.reset(); });
  release.Notify();
  stopper.join();
  EXPECT_EQ(w.cache->counts().in_use, 0);
  EXPECT_TRUE(w.cache->Validate().ok());
}

}  // namespace
}  // namespace kvrelay::worker
