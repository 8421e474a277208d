#include "common/worker/kv_tiers.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "xxhash.h"

namespace kvrelay::worker {

using kvcache::KvEvent;
using kvcache::KvTier;

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int TierIndex(KvTier t) { return t == KvTier::kHost ? 0 : 1; }

absl::Status ErrnoError(const std::string& what) {
  const int e = errno;
  const std::string msg = absl::StrCat(what, ": ", std::strerror(e));
  if (e == ENOSPC || e == EDQUOT || e == EFBIG) return absl::ResourceExhaustedError(msg);
  if (e == ENOENT) return absl::NotFoundError(msg);
  return absl::InternalError(msg);
}

absl::Status WriteAll(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(absl::StrCat("write ", path));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, void* data, size_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(absl::StrCat("read ", path));
    }
    if (r == 0) return absl::DataLossError(absl::StrCat(path, ": shorter than a KV block file"));
    p += r;
    offset += static_cast<uint64_t>(r);
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

}  // namespace

// ---- metrics ------------------------------------------------------------------------------

struct KvTierStore::Metrics {
  explicit Metrics(prometheus::Registry& r) {
    auto& blocks_f = prometheus::BuildGauge()
                         .Name("kvrelay_kv_tier_blocks")
                         .Help("KV blocks held by each lower tier of the KV cache")
                         .Register(r);
    auto& bytes_f = prometheus::BuildGauge()
                        .Name("kvrelay_kv_tier_bytes")
                        .Help("Bytes of KV held by each lower tier (block data)")
                        .Register(r);
    auto& cap_f = prometheus::BuildGauge()
                      .Name("kvrelay_kv_tier_capacity_bytes")
                      .Help("Capacity of each lower tier (--kv_host_bytes, --kv_disk_bytes)")
                      .Register(r);
    auto& off_b = prometheus::BuildCounter()
                      .Name("kvrelay_kv_tier_offload_bytes_total")
                      .Help("Bytes of KV copied down into each lower tier")
                      .Register(r);
    auto& off_s = prometheus::BuildHistogram()
                      .Name("kvrelay_kv_tier_offload_seconds")
                      .Help("Time to copy one run of KV blocks down into a tier")
                      .Register(r);
    auto& rel_b = prometheus::BuildCounter()
                      .Name("kvrelay_kv_tier_reload_bytes_total")
                      .Help("Bytes of KV copied back up into the pool from each lower tier")
                      .Register(r);
    auto& hits = prometheus::BuildCounter()
                     .Name("kvrelay_kv_tier_hits_total")
                     .Help("KV blocks reused from each lower tier instead of recomputed")
                     .Register(r);
    auto& evict = prometheus::BuildCounter()
                      .Name("kvrelay_kv_tier_evictions_total")
                      .Help("Blocks evicted from each lower tier (LRU) to make room")
                      .Register(r);
    auto& corrupt = prometheus::BuildCounter()
                        .Name("kvrelay_kv_tier_corrupt_blocks_total")
                        .Help("Blocks that failed their checksum on reload (dropped, recomputed)")
                        .Register(r);
    auto& skipped = prometheus::BuildCounter()
                        .Name("kvrelay_kv_tier_offload_skipped_total")
                        .Help(
                            "Offloads skipped: backlog (too many pool blocks waiting for their "
                            "copy), full (the tier holds only pinned blocks), write_error (e.g. "
                            "a full disk)")
                        .Register(r);
    const prometheus::Histogram::BucketBoundaries seconds = {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3,
                                                             0.01, 0.03, 0.1,  0.3,  1,    3};
    for (KvTier t : {KvTier::kHost, KvTier::kDisk}) {
      const int i = TierIndex(t);
      const std::string name = kvcache::KvTierName(t);
      blocks[i] = &blocks_f.Add({{"tier", name}});
      bytes[i] = &bytes_f.Add({{"tier", name}});
      capacity[i] = &cap_f.Add({{"tier", name}});
      offload_bytes[i] = &off_b.Add({{"tier", name}});
      offload_seconds[i] = &off_s.Add({{"tier", name}}, seconds);
      reload_bytes[i] = &rel_b.Add({{"tier", name}});
      tier_hits[i] = &hits.Add({{"tier", name}});
      evictions[i] = &evict.Add({{"tier", name}});
      corrupt_blocks[i] = &corrupt.Add({{"tier", name}});
      skipped_backlog[i] = &skipped.Add({{"tier", name}, {"reason", "backlog"}});
      skipped_full[i] = &skipped.Add({{"tier", name}, {"reason", "full"}});
    }
    skipped_write_error = &skipped.Add({{"tier", "disk"}, {"reason", "write_error"}});
    reload_seconds = &prometheus::BuildHistogram()
                          .Name("kvrelay_kv_tier_reload_seconds")
                          .Help("Time to copy one request's blocks back up into the pool")
                          .Register(r)
                          .Add({}, seconds);
    ignored_files = &prometheus::BuildCounter()
                         .Name("kvrelay_kv_tier_ignored_files_total")
                         .Help(
                             "Files in --kv_disk_dir not used: another model, dtype or block "
                             "geometry, or not a KV block")
                         .Register(r)
                         .Add({});
  }
  prometheus::Gauge* blocks[2];
  prometheus::Gauge* bytes[2];
  prometheus::Gauge* capacity[2];
  prometheus::Counter* offload_bytes[2];
  prometheus::Histogram* offload_seconds[2];
  prometheus::Counter* reload_bytes[2];
  prometheus::Counter* tier_hits[2];
  prometheus::Counter* evictions[2];
  prometheus::Counter* corrupt_blocks[2];
  prometheus::Counter* skipped_backlog[2];
  prometheus::Counter* skipped_full[2];
  prometheus::Counter* skipped_write_error;
  prometheus::Histogram* reload_seconds;
  prometheus::Counter* ignored_files;
};

// ---- ReloadPlan ---------------------------------------------------------------------------

KvTierStore::ReloadPlan::ReloadPlan(ReloadPlan&& o) noexcept
    : store_(std::exchange(o.store_, nullptr)), items_(std::move(o.items_)) {
  o.items_.clear();
}

KvTierStore::ReloadPlan& KvTierStore::ReloadPlan::operator=(ReloadPlan&& o) noexcept {
  if (this != &o) {
    if (store_ != nullptr) store_->Unpin(*this);
    store_ = std::exchange(o.store_, nullptr);
    items_ = std::move(o.items_);
    o.items_.clear();
  }
  return *this;
}

KvTierStore::ReloadPlan::~ReloadPlan() {
  if (store_ != nullptr) store_->Unpin(*this);
}

// ---- creation -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<KvTierStore>> KvTierStore::Create(const KvTierOptions& options,
                                                                 kvcache::KvPool* pool,
                                                                 kvcache::PrefixCache* cache,
                                                                 kernels::Backend* backend) {
  const uint64_t bb = pool->layout().block_bytes();
  int64_t host_slots = 0, disk_files = 0;
  if (options.host_bytes > 0) {
    host_slots = static_cast<int64_t>(options.host_bytes / bb);
    if (host_slots < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--kv_host_bytes ", options.host_bytes,
                                                     " holds no KV block of ", bb, " bytes"));
    }
  }
  if (!options.disk_dir.empty()) {
    kvcache::DiskBlockIdentity id{options.model_id, pool->layout()};
    const uint64_t file_bytes = kvcache::DiskBlockHeaderBytes(id) + bb;
    disk_files = static_cast<int64_t>(options.disk_bytes / file_bytes);
    if (disk_files < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--kv_disk_bytes ", options.disk_bytes, " holds no KV block file of ",
                       file_bytes, " bytes (--kv_disk_dir needs --kv_disk_bytes)"));
    }
    std::error_code ec;
    std::filesystem::create_directories(options.disk_dir, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("--kv_disk_dir ", options.disk_dir, ": ", ec.message()));
    }
  } else if (options.disk_bytes > 0) {
    return absl::InvalidArgumentError("--kv_disk_bytes needs --kv_disk_dir");
  }
  if (host_slots == 0 && disk_files == 0) {
    return absl::InvalidArgumentError("KV tiers: neither --kv_host_bytes nor --kv_disk_dir");
  }
  std::unique_ptr<KvTierStore> s(
      new KvTierStore(options, pool, cache, backend, host_slots, disk_files));
  if (disk_files > 0) {
    if (absl::Status st = s->ScanDisk(); !st.ok()) return st;
  }
  cache->SetStoreListener([raw = s.get()](const kvcache::StoredRun& run) { raw->OnStored(run); });
  return s;
}

KvTierStore::KvTierStore(const KvTierOptions& options, kvcache::KvPool* pool,
                         kvcache::PrefixCache* cache, kernels::Backend* backend, int64_t host_slots,
                         int64_t disk_files)
    : options_(options),
      pool_(pool),
      cache_(cache),
      backend_(backend),
      block_bytes_(pool->layout().block_bytes()),
      host_slots_(host_slots),
      disk_files_(disk_files),
      identity_{options.model_id, pool->layout()},
      header_bytes_(kvcache::DiskBlockHeaderBytes(identity_)),
      max_pending_(options.max_pending_offload_blocks > 0
                       ? options.max_pending_offload_blocks
                       : std::max<int64_t>(1, pool->num_blocks() / 4)),
      registry_(options.metrics ? options.metrics : std::make_shared<prometheus::Registry>()),
      metrics_(std::make_unique<Metrics>(*registry_)),
      scratch_(block_bytes_) {
  if (host_slots > 0) {
    arena_.reset(new uint8_t[static_cast<size_t>(host_slots) * block_bytes_]);
  }
  {
    absl::MutexLock l(&mu_);
    host_.capacity = host_slots;
    disk_.capacity = disk_files;
    free_slots_.reserve(static_cast<size_t>(host_slots));
    for (int64_t i = host_slots - 1; i >= 0; --i) free_slots_.push_back(static_cast<int32_t>(i));
    UpdateGauges();
  }
  metrics_->capacity[0]->Set(static_cast<double>(host_slots * block_bytes_));
  metrics_->capacity[1]->Set(static_cast<double>(disk_files) *
                             static_cast<double>(header_bytes_ + block_bytes_));
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "kvr-kv-tiers");
    Loop();
  });
}

KvTierStore::~KvTierStore() {
  cache_->SetStoreListener(nullptr);
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
}

std::string KvTierStore::PathOf(uint64_t hash) const {
  return absl::StrCat(options_.disk_dir, "/", kvcache::DiskBlockFileName(hash));
}

absl::Status KvTierStore::ScanDisk() {
  struct Found {
    int64_t mtime_ns;
    uint64_t hash;
    kvcache::DiskBlockHeader header;
  };
  std::vector<Found> found;
  int64_t ignored = 0;
  DIR* dir = ::opendir(options_.disk_dir.c_str());
  if (dir == nullptr) return ErrnoError(absl::StrCat("--kv_disk_dir ", options_.disk_dir));
  std::string header(header_bytes_, '\0');
  while (dirent* d = ::readdir(dir)) {
    const std::string name = d->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = absl::StrCat(options_.disk_dir, "/", name);
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) {
      ::unlink(path.c_str());  // a write cut short by a crash
      continue;
    }
    const std::optional<uint64_t> hash = kvcache::ParseDiskBlockFileName(name);
    if (!hash.has_value()) {
      ++ignored;
      continue;
    }
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      ++ignored;
      continue;
    }
    struct stat st {};
    bool ok = ::fstat(fd, &st) == 0 &&
              static_cast<uint64_t>(st.st_size) == header_bytes_ + block_bytes_ &&
              ReadAll(fd, header.data(), header.size(), 0, path).ok();
    ::close(fd);
    absl::StatusOr<kvcache::DiskBlockHeader> h;
    if (ok) {
      h = kvcache::DecodeDiskBlockHeader(identity_, header);
      ok = h.ok() && h->hash == *hash;
    }
    if (!ok) {
      ++ignored;  // another model's or geometry's block, or not ours: left alone
      continue;
    }
    found.push_back({static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
                     *hash, *std::move(h)});
  }
  ::closedir(dir);
  std::sort(found.begin(), found.end(),
            [](const Found& a, const Found& b) { return a.mtime_ns < b.mtime_ns; });
  std::vector<std::string> unlink;
  {
    absl::MutexLock l(&mu_);
    // The most recently used files win when there are more than the tier holds.
    const size_t keep = std::min<size_t>(found.size(), static_cast<size_t>(disk_.capacity));
    for (size_t i = 0; i < found.size() - keep; ++i) unlink.push_back(PathOf(found[i].hash));
    for (size_t i = found.size() - keep; i < found.size(); ++i) {
      Found& f = found[i];
      Entry e;
      e.parent = f.header.parent;
      e.tokens = std::move(f.header.tokens);
      e.checksum = f.header.checksum;
      disk_.lru.push_back(f.hash);
      e.lru = std::prev(disk_.lru.end());
      disk_.map.emplace(f.hash, std::move(e));
    }
    stats_.ignored_files += ignored;
    UpdateGauges();
    for (size_t i = found.size() - keep; i < found.size(); ++i) {
      RecordEvent(KvTier::kDisk, KvEvent::Type::kStored, found[i].header.parent, found[i].hash);
    }
  }
  for (const std::string& p : unlink) ::unlink(p.c_str());
  metrics_->ignored_files->Increment(static_cast<double>(ignored));
  return absl::OkStatus();
}

// ---- bookkeeping (under mu_) ---------------------------------------------------------------

void KvTierStore::RecordEvent(KvTier tier, KvEvent::Type type, std::optional<uint64_t> parent,
                              uint64_t hash) {
  (void)cache_->RecordTierEvent(tier, type, parent, absl::MakeConstSpan(&hash, 1));
}

void KvTierStore::Touch(Tier& t, Entry& e) { t.lru.splice(t.lru.end(), t.lru, e.lru); }

void KvTierStore::Erase(KvTier which, uint64_t hash, std::vector<std::string>* unlink) {
  Tier& t = tier(which);
  auto it = t.map.find(hash);
  if (it == t.map.end()) return;
  if (which == KvTier::kHost) {
    free_slots_.push_back(it->second.slot);
  } else if (unlink != nullptr) {
    unlink->push_back(PathOf(hash));
  }
  if (it->second.pins > 0) t.pinned -= 1;
  t.lru.erase(it->second.lru);
  t.map.erase(it);
  RecordEvent(which, KvEvent::Type::kRemoved, std::nullopt, hash);
}

std::optional<uint64_t> KvTierStore::Victim(const Tier& t) const {
  for (uint64_t h : t.lru) {
    if (t.map.at(h).pins == 0) return h;
  }
  return std::nullopt;
}

void KvTierStore::UpdateGauges() {
  const int64_t n[2] = {static_cast<int64_t>(host_.map.size()),
                        static_cast<int64_t>(disk_.map.size())};
  for (int i = 0; i < 2; ++i) {
    metrics_->blocks[i]->Set(static_cast<double>(n[i]));
    metrics_->bytes[i]->Set(static_cast<double>(n[i]) * static_cast<double>(block_bytes_));
  }
}

KvTierCounts KvTierStore::counts(KvTier t) const {
  absl::MutexLock l(&mu_);
  const Tier& x = t == KvTier::kHost ? host_ : disk_;
  KvTierCounts c;
  if (t == KvTier::kPool) return c;
  c.blocks = static_cast<int64_t>(x.map.size());
  c.capacity_blocks = x.capacity;
  c.pinned = x.pinned;
  return c;
}

KvTierStats KvTierStore::stats() const {
  absl::MutexLock l(&mu_);
  return stats_;
}

// ---- offload ------------------------------------------------------------------------------

void KvTierStore::OnStored(const kvcache::StoredRun& run) {
  if (run.blocks.empty()) return;
  const int64_t n = static_cast<int64_t>(run.blocks.size());
  {
    absl::MutexLock l(&mu_);
    if (stop_) return;
    // Blocks that came back up from a tier (a reload's commit) are still below: nothing
    // to pin or copy, only their recency to refresh.
    Tier& t = tier(host_slots_ > 0 ? KvTier::kHost : KvTier::kDisk);
    if (std::all_of(run.hashes.begin(), run.hashes.end(),
                    [&](uint64_t h) { return t.map.contains(h); })) {
      for (uint64_t h : run.hashes) Touch(t, t.map.find(h)->second);
      return;
    }
    if (pending_pool_blocks_ > 0 && pending_pool_blocks_ + n > max_pending_) {
      stats_.skipped += n;
      metrics_->skipped_backlog[host_slots_ > 0 ? 0 : 1]->Increment(static_cast<double>(n));
      return;
    }
    pending_pool_blocks_ += n;
  }
  // Still held by the caller of Store: safe to pin before its reference goes.
  cache_->Ref(run.blocks);
  absl::MutexLock l(&mu_);
  offloads_.push_back(OffloadJob{run});
}

void KvTierStore::RunOffload(OffloadJob& job) {
  const kvcache::StoredRun& run = job.run;
  const size_t B = static_cast<size_t>(pool_->layout().block_size);
  const double t0 = Now();
  std::optional<uint64_t> parent = run.parent;
  int64_t copied = 0;
  const bool to_host = host_slots_ > 0;
  for (size_t i = 0; i < run.blocks.size(); ++i) {
    const uint64_t h = run.hashes[i];
    Entry meta;
    meta.parent = parent;
    meta.tokens.assign(run.tokens.begin() + i * B, run.tokens.begin() + (i + 1) * B);
    parent = h;
    bool present = false;
    {
      absl::MutexLock l(&mu_);
      Tier& t = tier(to_host ? KvTier::kHost : KvTier::kDisk);
      auto it = t.map.find(h);
      if (it != t.map.end()) {  // already below (an earlier copy of this block)
        Touch(t, it->second);
        present = true;
      }
    }
    const uint8_t* src = pool_->view().base + static_cast<uint64_t>(run.blocks[i]) * block_bytes_;
    if (!present) {
      absl::Status st = backend_->Download(src, block_bytes_, scratch_.data());
      if (st.ok()) {
        meta.checksum = XXH3_64bits(scratch_.data(), block_bytes_);
        copied += (to_host ? PutHost(h, meta, scratch_.data()) : PutDisk(h, meta, scratch_.data()))
                      ? 1
                      : 0;
      } else {
        std::fprintf(stderr, "kv tiers: copying block %d down failed: %s\n", run.blocks[i],
                     st.ToString().c_str());
      }
    }
    cache_->Release(absl::MakeConstSpan(&run.blocks[i], 1));
    absl::MutexLock l(&mu_);
    --pending_pool_blocks_;
  }
  if (copied > 0 && to_host) metrics_->offload_seconds[0]->Observe(Now() - t0);
}

bool KvTierStore::PutHost(uint64_t hash, const Entry& meta, const uint8_t* data) {
  int32_t slot = -1;
  std::optional<uint64_t> victim;
  Entry victim_meta;
  {
    absl::MutexLock l(&mu_);
    if (auto it = host_.map.find(hash); it != host_.map.end()) {
      Touch(host_, it->second);
      return true;
    }
    if (free_slots_.empty()) {
      victim = Victim(host_);
      if (!victim.has_value()) {
        ++stats_.skipped;
        metrics_->skipped_full[0]->Increment();
        return false;
      }
      victim_meta = host_.map.at(*victim);
      Erase(KvTier::kHost, *victim, nullptr);  // its slot goes to the free list
      metrics_->evictions[0]->Increment();
    }
    slot = free_slots_.back();
    free_slots_.pop_back();
  }
  uint8_t* dst = arena_.get() + static_cast<uint64_t>(slot) * block_bytes_;
  // The slot is ours alone now (off the free list): demote its old block to disk first.
  if (victim.has_value() && disk_files_ > 0) PutDisk(*victim, victim_meta, dst);
  std::memcpy(dst, data, block_bytes_);
  absl::MutexLock l(&mu_);
  Entry e = meta;
  e.slot = slot;
  e.pins = 0;
  host_.lru.push_back(hash);
  e.lru = std::prev(host_.lru.end());
  host_.map.emplace(hash, std::move(e));
  ++stats_.offloaded[0];
  metrics_->offload_bytes[0]->Increment(static_cast<double>(block_bytes_));
  UpdateGauges();
  RecordEvent(KvTier::kHost, KvEvent::Type::kStored, meta.parent, hash);
  return true;
}

bool KvTierStore::PutDisk(uint64_t hash, const Entry& meta, const uint8_t* data) {
  const double t0 = Now();
  std::vector<std::string> unlink;
  {
    absl::MutexLock l(&mu_);
    if (auto it = disk_.map.find(hash); it != disk_.map.end()) {
      Touch(disk_, it->second);
      return true;
    }
    while (static_cast<int64_t>(disk_.map.size()) >= disk_.capacity) {
      const std::optional<uint64_t> v = Victim(disk_);
      if (!v.has_value()) {
        ++stats_.skipped;
        metrics_->skipped_full[1]->Increment();
        return false;
      }
      Erase(KvTier::kDisk, *v, &unlink);
      metrics_->evictions[1]->Increment();
    }
    UpdateGauges();
  }
  for (const std::string& p : unlink) ::unlink(p.c_str());
  if (absl::Status st = WriteBlockFile(hash, meta, data); !st.ok()) {
    absl::MutexLock l(&mu_);
    ++stats_.skipped;
    ++stats_.write_errors;
    metrics_->skipped_write_error->Increment();
    if (!write_error_logged_) {  // once: a full disk would otherwise log every block
      write_error_logged_ = true;
      std::fprintf(stderr, "kv tiers: disk tier write failed, offload skipped: %s\n",
                   st.ToString().c_str());
    }
    return false;
  }
  absl::MutexLock l(&mu_);
  Entry e = meta;
  e.slot = -1;
  e.pins = 0;
  disk_.lru.push_back(hash);
  e.lru = std::prev(disk_.lru.end());
  disk_.map.emplace(hash, std::move(e));
  ++stats_.offloaded[1];
  metrics_->offload_bytes[1]->Increment(static_cast<double>(block_bytes_));
  metrics_->offload_seconds[1]->Observe(Now() - t0);
  UpdateGauges();
  RecordEvent(KvTier::kDisk, KvEvent::Type::kStored, meta.parent, hash);
  return true;
}

absl::Status KvTierStore::WriteBlockFile(uint64_t hash, const Entry& meta, const uint8_t* data) {
  kvcache::DiskBlockHeader h;
  h.hash = hash;
  h.parent = meta.parent;
  h.tokens = meta.tokens;
  h.checksum = meta.checksum;
  absl::StatusOr<std::string> header = kvcache::EncodeDiskBlockHeader(identity_, h);
  if (!header.ok()) return header.status();
  const std::string path = PathOf(hash);
  const std::string tmp = absl::StrCat(path, ".tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(absl::StrCat("create ", tmp));
  absl::Status st = WriteAll(fd, header->data(), header->size(), tmp);
  if (st.ok()) st = WriteAll(fd, data, block_bytes_, tmp);
  if (::close(fd) != 0 && st.ok()) st = ErrnoError(absl::StrCat("close ", tmp));
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = ErrnoError(absl::StrCat("rename ", tmp));
  }
  if (!st.ok()) ::unlink(tmp.c_str());
  return st;
}

absl::Status KvTierStore::ReadBlockFile(uint64_t hash, const Entry& meta, uint8_t* data) {
  const std::string path = PathOf(hash);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::DataLossError(absl::StrCat(path, ": ", std::strerror(errno)));
  std::string header(header_bytes_, '\0');
  absl::Status st = ReadAll(fd, header.data(), header.size(), 0, path);
  if (st.ok()) st = ReadAll(fd, data, block_bytes_, header_bytes_, path);
  ::close(fd);
  if (!st.ok()) return absl::DataLossError(st.message());
  absl::StatusOr<kvcache::DiskBlockHeader> h = kvcache::DecodeDiskBlockHeader(identity_, header);
  if (!h.ok()) return absl::DataLossError(absl::StrCat(path, ": ", h.status().message()));
  if (h->hash != hash || h->parent != meta.parent || h->tokens != meta.tokens ||
      h->checksum != meta.checksum) {
    return absl::DataLossError(absl::StrCat(path, ": not the block indexed under its name"));
  }
  if (XXH3_64bits(data, block_bytes_) != h->checksum) {
    return absl::DataLossError(absl::StrCat(path, ": block data fails its checksum"));
  }
  return absl::OkStatus();
}

// ---- lookup and reload ----------------------------------------------------------------------

KvTierStore::ReloadPlan KvTierStore::Lookup(std::optional<uint64_t> parent,
                                            absl::Span<const uint64_t> hashes,
                                            absl::Span<const int32_t> tokens) {
  ReloadPlan plan;
  plan.store_ = this;
  const size_t B = static_cast<size_t>(pool_->layout().block_size);
  const size_t limit = std::min(hashes.size(), tokens.size() / B);
  absl::MutexLock l(&mu_);
  for (size_t i = 0; i < limit; ++i) {
    const uint64_t h = hashes[i];
    const std::optional<uint64_t> want_parent = i == 0 ? parent : hashes[i - 1];
    bool hit = false;
    for (KvTier which : {KvTier::kHost, KvTier::kDisk}) {
      Tier& t = tier(which);
      auto it = t.map.find(h);
      if (it == t.map.end()) continue;
      Entry& e = it->second;
      if (e.parent != want_parent ||
          !std::equal(tokens.begin() + i * B, tokens.begin() + (i + 1) * B, e.tokens.begin())) {
        continue;
      }
      if (e.pins++ == 0) ++t.pinned;
      plan.items_.push_back({which, h});
      hit = true;
      break;
    }
    if (!hit) break;
  }
  return plan;
}

void KvTierStore::Unpin(const ReloadPlan& plan) {
  absl::MutexLock l(&mu_);
  for (const ReloadPlan::Item& item : plan.items_) {
    Tier& t = tier(item.tier);
    auto it = t.map.find(item.hash);
    if (it == t.map.end()) continue;  // dropped as corrupt meanwhile
    if (--it->second.pins == 0) --t.pinned;
  }
}

void KvTierStore::Reload(ReloadPlan plan, std::vector<int32_t> dest,
                         std::function<void(const ReloadResult&)> done) {
  absl::MutexLock l(&mu_);
  reloads_.push_back(ReloadJob{std::move(plan), std::move(dest), std::move(done)});
}

KvTierStore::ReloadResult KvTierStore::ReloadNow(ReloadPlan plan, std::vector<int32_t> dest) {
  ReloadResult out;
  absl::Notification n;
  Reload(std::move(plan), std::move(dest), [&](const ReloadResult& r) {
    out = r;
    n.Notify();
  });
  n.WaitForNotification();
  return out;
}

void KvTierStore::RunReload(ReloadJob& job) {
  const double t0 = Now();
  ReloadResult r;
  const auto& items = job.plan.items_;
  std::vector<std::string> unlink;
  for (size_t i = 0; i < items.size() && i < job.dest.size(); ++i) {
    const ReloadPlan::Item& item = items[i];
    Entry meta;
    const uint8_t* src = nullptr;
    {
      absl::MutexLock l(&mu_);
      Tier& t = tier(item.tier);
      auto it = t.map.find(item.hash);
      if (it == t.map.end()) break;  // dropped (corrupt) since the lookup
      meta.parent = it->second.parent;
      meta.tokens = it->second.tokens;
      meta.checksum = it->second.checksum;
      if (item.tier == KvTier::kHost) {
        src = arena_.get() + static_cast<uint64_t>(it->second.slot) * block_bytes_;
      }
      Touch(t, it->second);
    }
    absl::Status st;
    if (item.tier == KvTier::kHost) {
      // Pinned: only this thread writes slots, and never a pinned one.
      if (XXH3_64bits(src, block_bytes_) != meta.checksum) {
        st = absl::DataLossError("host tier block fails its checksum");
      }
    } else {
      st = ReadBlockFile(item.hash, meta, scratch_.data());
      src = scratch_.data();
    }
    if (absl::IsDataLoss(st)) {
      std::fprintf(stderr, "kv tiers: %s block %016llx dropped: %s\n",
                   kvcache::KvTierName(item.tier), static_cast<unsigned long long>(item.hash),
                   st.ToString().c_str());
      absl::MutexLock l(&mu_);
      ++stats_.corrupt;
      metrics_->corrupt_blocks[TierIndex(item.tier)]->Increment();
      Erase(item.tier, item.hash, &unlink);
      UpdateGauges();
      break;  // this block and the ones after it are recomputed
    }
    uint8_t* dst = pool_->view().base + static_cast<uint64_t>(job.dest[i]) * block_bytes_;
    st = backend_->Upload(src, block_bytes_, dst);
    if (!st.ok()) {
      std::fprintf(stderr, "kv tiers: copying a block up failed: %s\n", st.ToString().c_str());
      break;
    }
    ++r.loaded;
    if (item.tier == KvTier::kHost) {
      ++r.from_host;
    } else {
      ++r.from_disk;
      ::utimensat(AT_FDCWD, PathOf(item.hash).c_str(), nullptr, 0);  // LRU order on restart
      // Hot again: keep a copy in the host tier too (the copy up is already queued).
      if (host_slots_ > 0) PutHost(item.hash, meta, scratch_.data());
    }
  }
  if (!backend_->Synchronize().ok()) r.loaded = 0;  // a failed copy: recompute everything
  for (const std::string& p : unlink) ::unlink(p.c_str());
  r.seconds = Now() - t0;
  {
    absl::MutexLock l(&mu_);
    stats_.reloaded[0] += r.from_host;
    stats_.reloaded[1] += r.from_disk;
  }
  metrics_->tier_hits[0]->Increment(static_cast<double>(r.from_host));
  metrics_->tier_hits[1]->Increment(static_cast<double>(r.from_disk));
  metrics_->reload_bytes[0]->Increment(static_cast<double>(r.from_host * block_bytes_));
  metrics_->reload_bytes[1]->Increment(static_cast<double>(r.from_disk * block_bytes_));
  metrics_->reload_seconds->Observe(r.seconds);
  job.plan = ReloadPlan();  // unpins
  job.done(r);
}

// ---- the thread ---------------------------------------------------------------------------

void KvTierStore::Loop() {
  for (;;) {
    std::optional<ReloadJob> reload;
    std::optional<OffloadJob> offload;
    {
      absl::MutexLock l(&mu_);
      auto news = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !reloads_.empty() || !offloads_.empty();
      };
      mu_.Await(absl::Condition(&news));
      if (!reloads_.empty()) {  // a request waits for these: first
        reload.emplace(std::move(reloads_.front()));
        reloads_.pop_front();
      } else if (stop_) {
        break;
      } else {
        offload.emplace(std::move(offloads_.front()));
        offloads_.pop_front();
      }
      ++busy_;
    }
    if (reload.has_value()) RunReload(*reload);
    if (offload.has_value()) RunOffload(*offload);
    absl::MutexLock l(&mu_);
    --busy_;
  }
  // Stopping: queued offloads are dropped, their pool blocks unpinned.
  std::deque<OffloadJob> left;
  {
    absl::MutexLock l(&mu_);
    left.swap(offloads_);
    for (const OffloadJob& j : left)
      pending_pool_blocks_ -= static_cast<int64_t>(j.run.blocks.size());
  }
  for (const OffloadJob& j : left) cache_->Release(j.run.blocks);
}

void KvTierStore::WaitIdle() {
  absl::MutexLock l(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return reloads_.empty() && offloads_.empty() && busy_ == 0;
  };
  mu_.Await(absl::Condition(&idle));
}

}  // namespace kvrelay::worker
