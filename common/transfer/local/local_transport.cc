#include "common/transfer/local/local_transport.h"

#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/util/status.h"

namespace kvrelay::transfer {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Everything the local transports of this process share: live pools and transports,
// and notices in flight.
struct Hub {
  absl::Mutex mu;
  absl::flat_hash_map<uint64_t, uint64_t> pools ABSL_GUARDED_BY(mu);  // base -> bytes
  absl::flat_hash_map<std::string, bool> transports ABSL_GUARDED_BY(mu);
  std::map<std::pair<std::string, uint64_t>, std::string> notices ABSL_GUARDED_BY(mu);
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
};

Hub& GetHub() {
  static Hub* hub = new Hub();
  return *hub;
}

class LocalMemory : public RegisteredMemory {
 public:
  LocalMemory(uint8_t* data, uint64_t size, bool owned, PoolDescriptor d)
      : data_(data), size_(size), owned_(owned), d_(std::move(d)) {
    absl::MutexLock l(&GetHub().mu);
    GetHub().pools[d_.base_address] = size_;
  }
  ~LocalMemory() override {
    {
      absl::MutexLock l(&GetHub().mu);
      GetHub().pools.erase(d_.base_address);
    }
    if (owned_) ::munmap(data_, size_);
  }
  uint8_t* data() const override { return data_; }
  uint64_t size() const override { return size_; }
  const PoolDescriptor& descriptor() const override { return d_; }

 private:
  uint8_t* data_;
  uint64_t size_;
  bool owned_;
  PoolDescriptor d_;
};

class LocalTransport : public KvTransport {
 public:
  LocalTransport() {
    absl::MutexLock l(&GetHub().mu);
    address_ = absl::StrCat("local/", GetHub().next_id++);
    GetHub().transports[address_] = true;
  }

  ~LocalTransport() override {
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
    }
    if (thread_.joinable()) thread_.join();
    // Whatever is left is cancelled.
    std::deque<std::shared_ptr<Job>> left;
    {
      absl::MutexLock l(&mu_);
      left.swap(queue_);
    }
    for (auto& j : left) Finish(*j, absl::CancelledError("transport shut down"));
    absl::MutexLock l(&GetHub().mu);
    GetHub().transports.erase(address_);
  }

  std::string name() const override { return "local"; }
  std::string address() const override { return address_; }

  absl::StatusOr<std::unique_ptr<RegisteredMemory>> AllocatePool(uint64_t block_bytes,
                                                                 int64_t num_blocks,
                                                                 MemoryType type) override {
    if (type != MemoryType::kHost) return absl::UnimplementedError("local transport: host only");
    if (block_bytes == 0 || num_blocks <= 0) {
      return absl::InvalidArgumentError("local transport: empty pool");
    }
    const uint64_t bytes = block_bytes * static_cast<uint64_t>(num_blocks);
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(absl::StrCat("local transport: cannot map ", bytes));
    }
    return Make(static_cast<uint8_t*>(p), block_bytes, num_blocks, true);
  }

  absl::StatusOr<std::unique_ptr<RegisteredMemory>> RegisterPool(void* base, uint64_t block_bytes,
                                                                 int64_t num_blocks,
                                                                 MemoryType type) override {
    if (type != MemoryType::kHost) return absl::UnimplementedError("local transport: host only");
    if (base == nullptr || block_bytes == 0 || num_blocks <= 0) {
      return absl::InvalidArgumentError("local transport: empty pool");
    }
    return Make(static_cast<uint8_t*>(base), block_bytes, num_blocks, false);
  }

  absl::StatusOr<TransferId> Write(const RegisteredMemory& src, const PoolDescriptor& dst,
                                   std::vector<WriteRange> ranges, const TransferOptions& options,
                                   TransferCallback done) override {
    if (dst.transport != "local") {
      return absl::InvalidArgumentError(
          absl::StrCat("local transport: descriptor is for transport '", dst.transport, "'"));
    }
    if (options.chunk_bytes == 0 || options.max_in_flight <= 0) {
      return absl::InvalidArgumentError("transfer: chunk_bytes and max_in_flight must be > 0");
    }
    KVR_RETURN_IF_ERROR(ValidateRanges(ranges, src.size(), dst.bytes));
    {
      absl::MutexLock l(&GetHub().mu);
      auto it = GetHub().pools.find(dst.base_address);
      if (it == GetHub().pools.end() || it->second < dst.bytes) {
        return absl::UnavailableError("local transport: destination pool is gone");
      }
    }
    auto job = std::make_shared<Job>();
    job->src = src.data();
    job->dst = dst;
    job->ranges = std::move(ranges);
    job->options = options;
    job->done = std::move(done);
    job->start = Now();
    job->deadline = job->start + absl::ToDoubleSeconds(options.timeout);
    job->stats.ranges = static_cast<int64_t>(job->ranges.size());
    job->stats.transport = "memcpy";
    absl::MutexLock l(&mu_);
    job->id = next_id_++;
    queue_.push_back(job);
    active_[job->id] = job;
    if (!thread_.joinable()) {
      thread_ = std::thread([this] { Run(); });
      pthread_setname_np(thread_.native_handle(), "kvr-local-xfer");
    }
    return job->id;
  }

  bool Cancel(TransferId id) override {
    std::shared_ptr<Job> job;
    {
      absl::MutexLock l(&mu_);
      auto it = active_.find(id);
      if (it == active_.end()) return false;
      job = it->second;
      job->cancelled = true;
      // Not started yet: finish here, nothing was written.
      for (auto q = queue_.begin(); q != queue_.end(); ++q) {
        if ((*q)->id == id) {
          queue_.erase(q);
          active_.erase(id);
          break;
        }
      }
      if (active_.count(id) != 0) return true;  // the copy thread stops at the next chunk
    }
    Finish(*job, absl::CancelledError("transfer cancelled"));
    return true;
  }

  absl::Status Flush(const PoolDescriptor& dst, absl::Duration timeout) override {
    absl::MutexLock l(&mu_);
    auto idle = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return active_.empty(); };
    if (!mu_.AwaitWithTimeout(absl::Condition(&idle), timeout)) {
      return absl::DeadlineExceededError("flush: transfers still running at the timeout");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> WaitNotice(const std::string& sender_address, uint64_t tag,
                                         absl::Duration timeout) override {
    Hub& hub = GetHub();
    absl::MutexLock l(&hub.mu);
    const auto key = std::make_pair(address_, tag);
    auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(hub.mu) {
      return hub.notices.count(key) != 0 || hub.transports.count(sender_address) == 0;
    };
    if (!hub.mu.AwaitWithTimeout(absl::Condition(&ready), timeout)) {
      return absl::DeadlineExceededError(absl::StrCat("no notice ", tag, " from ", sender_address,
                                                      " within ", absl::FormatDuration(timeout)));
    }
    auto it = hub.notices.find(key);
    if (it == hub.notices.end()) {
      return absl::UnavailableError(absl::StrCat("peer ", sender_address, " is gone"));
    }
    std::string payload = std::move(it->second);
    hub.notices.erase(it);
    return payload;
  }

 private:
  struct Job {
    TransferId id = 0;
    const uint8_t* src = nullptr;
    PoolDescriptor dst;
    std::vector<WriteRange> ranges;
    TransferOptions options;
    TransferCallback done;
    TransferStats stats;
    double start = 0, deadline = 0;
    size_t issued_ranges = 0;  // ranges[0, issued) were (partly) copied
    std::atomic<bool> cancelled{false};
  };

  absl::StatusOr<std::unique_ptr<RegisteredMemory>> Make(uint8_t* p, uint64_t block_bytes,
                                                         int64_t num_blocks, bool owned) {
    PoolDescriptor d;
    d.transport = "local";
    d.peer_address = address_;
    d.base_address = reinterpret_cast<uint64_t>(p);
    d.bytes = block_bytes * static_cast<uint64_t>(num_blocks);
    d.block_bytes = block_bytes;
    d.num_blocks = num_blocks;
    return std::unique_ptr<RegisteredMemory>(new LocalMemory(p, d.bytes, owned, d));
  }

  void Finish(Job& job, absl::Status status) {
    TransferResult r;
    r.status = std::move(status);
    job.stats.seconds = Now() - job.start;
    r.stats = job.stats;
    if (!r.status.ok()) {
      r.maybe_written.assign(job.ranges.begin(), job.ranges.begin() + job.issued_ranges);
    }
    if (job.done) job.done(std::move(r));
  }

  // Copies one job chunk by chunk; returns its final status.
  absl::Status Copy(Job& job) {
    Hub& hub = GetHub();
    for (const WriteRange& r : job.ranges) {
      ++job.issued_ranges;
      for (uint64_t off = 0; off < r.length; off += job.options.chunk_bytes) {
        if (job.cancelled) return absl::CancelledError("transfer cancelled");
        if (Now() > job.deadline) {
          return absl::DeadlineExceededError(absl::StrCat(
              "transfer did not complete within ", absl::FormatDuration(job.options.timeout)));
        }
        const uint64_t n = std::min(job.options.chunk_bytes, r.length - off);
        absl::MutexLock l(&hub.mu);  // the destination cannot go away mid-copy
        auto it = hub.pools.find(job.dst.base_address);
        if (it == hub.pools.end()) return absl::UnavailableError("destination pool is gone");
        std::memcpy(reinterpret_cast<uint8_t*>(job.dst.base_address) + r.dst_offset + off,
                    job.src + r.src_offset + off, n);
        job.stats.bytes += n;
        ++job.stats.puts;
      }
    }
    if (job.options.notice_tag != 0) {
      absl::MutexLock l(&hub.mu);
      if (hub.transports.count(job.dst.peer_address) == 0) {
        return absl::UnavailableError("receiver transport is gone");
      }
      hub.notices[{job.dst.peer_address, job.options.notice_tag}] = job.options.notice;
    }
    return absl::OkStatus();
  }

  void Run() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        absl::MutexLock l(&mu_);
        auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); };
        mu_.Await(absl::Condition(&ready));
        if (stop_) return;
        job = queue_.front();
        queue_.pop_front();
      }
      absl::Status s = Copy(*job);
      {
        absl::MutexLock l(&mu_);
        active_.erase(job->id);
      }
      Finish(*job, s);
    }
  }

  std::string address_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  TransferId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<std::shared_ptr<Job>> queue_ ABSL_GUARDED_BY(mu_);
  std::map<TransferId, std::shared_ptr<Job>> active_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace

std::unique_ptr<KvTransport> NewLocalTransport() { return std::make_unique<LocalTransport>(); }

}  // namespace kvrelay::transfer
