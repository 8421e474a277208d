#include "common/transfer/ucx/ucx_transport.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/util/status.h"

namespace kvrelay::transfer {

std::string TransportFromEpInfo(const std::string& info) {
  // Lane lines look like
  //   #   lane[0]:  1:tcp/lo.0 md[1]  -> md[1]/tcp/sysdev[255] am am_bw#0 keepalive wireup
  std::string rma, am;
  size_t pos = 0;
  while ((pos = info.find("lane[", pos)) != std::string::npos) {
    const size_t eol = std::min(info.find('\n', pos), info.size());
    const std::string line = info.substr(pos, eol - pos);
    pos = eol;
    const size_t colon = line.find("]:");
    if (colon == std::string::npos) continue;
    const size_t rsc = line.find(':', colon + 2);  // "<rsc index>:<transport>/<device>"
    const size_t slash = rsc == std::string::npos ? rsc : line.find('/', rsc);
    if (slash == std::string::npos) continue;
    const std::string tl = line.substr(rsc + 1, slash - rsc - 1);
    if (rma.empty() && line.find(" rma_bw") != std::string::npos) rma = tl;
    if (am.empty() && line.find(" am") != std::string::npos) am = tl;
  }
  return !rma.empty() ? rma : am;
}

bool HasSharedMemoryTransport(const std::string& context_info) {
  // Resource lines look like
  //   #      resource 4  :  md 3  dev 3  flags -- posix/memory
  size_t pos = 0;
  while ((pos = context_info.find("resource ", pos)) != std::string::npos) {
    const size_t eol = std::min(context_info.find('\n', pos), context_info.size());
    const std::string line = context_info.substr(pos, eol - pos);
    pos = eol;
    const size_t dashes = line.find("-- ");
    if (dashes == std::string::npos) continue;
    const std::string tl = line.substr(dashes + 3, line.find('/', dashes) - dashes - 3);
    for (const char* shm : {"posix", "sysv", "cma", "xpmem", "knem"}) {
      if (tl == shm) return true;
    }
  }
  return false;
}

namespace {

constexpr unsigned kNoticeAmId = 17;
// How often a same-host peer's process is checked while puts are being issued.
constexpr double kAliveCheckSeconds = 0.001;
constexpr char kAddressMagic[] = "kvr-ucx1";

// Who a transport is: its UCX worker address plus the identity of its process
// (boot id, pid namespace, pid). Peers on the same host and in the same pid namespace
// are watched through their process (pidfd) instead of UCX's peer-failure mode,
// which rules out the shared-memory transports (see GetPeer).
struct PeerIdentity {
  std::string ucx_address;
  std::string boot_id;
  uint64_t pid_ns = 0;
  int32_t pid = 0;
};

void PutU64(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

bool GetU64(absl::string_view* in, uint64_t* v) {
  if (in->size() < 8) return false;
  *v = 0;
  for (int i = 0; i < 8; ++i)
    *v |= static_cast<uint64_t>(static_cast<uint8_t>((*in)[i])) << (8 * i);
  in->remove_prefix(8);
  return true;
}

std::string EncodeIdentity(const PeerIdentity& id) {
  std::string out(kAddressMagic);
  PutU64(id.boot_id.size(), &out);
  out += id.boot_id;
  PutU64(id.pid_ns, &out);
  PutU64(static_cast<uint64_t>(static_cast<uint32_t>(id.pid)), &out);
  PutU64(id.ucx_address.size(), &out);
  out += id.ucx_address;
  return out;
}

absl::StatusOr<PeerIdentity> DecodeIdentity(absl::string_view in) {
  const auto bad = absl::InvalidArgumentError("ucx: malformed peer address");
  if (!absl::ConsumePrefix(&in, kAddressMagic)) return bad;
  PeerIdentity id;
  uint64_t n = 0, pid = 0;
  if (!GetU64(&in, &n) || in.size() < n) return bad;
  id.boot_id = std::string(in.substr(0, n));
  in.remove_prefix(n);
  if (!GetU64(&in, &id.pid_ns) || !GetU64(&in, &pid) || !GetU64(&in, &n) || in.size() != n) {
    return bad;
  }
  id.pid = static_cast<int32_t>(pid);
  id.ucx_address = std::string(in);
  return id;
}

PeerIdentity SelfIdentity() {
  PeerIdentity id;
  if (FILE* f = ::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    char buf[64] = {0};
    if (::fgets(buf, sizeof(buf), f) != nullptr) id.boot_id = buf;
    ::fclose(f);
    while (!id.boot_id.empty() && id.boot_id.back() == '\n') id.boot_id.pop_back();
  }
  char link[128] = {0};
  const ssize_t n = ::readlink("/proc/self/ns/pid", link, sizeof(link) - 1);  // "pid:[4026531836]"
  if (n > 0) {
    const std::string s(link, n);
    const size_t open = s.find('[');
    if (open != std::string::npos)
      (void)absl::SimpleAtoi(s.substr(open + 1, s.size() - open - 2), &id.pid_ns);
  }
  id.pid = static_cast<int32_t>(::getpid());
  return id;
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

absl::Status FromUcs(ucs_status_t s, absl::string_view what) {
  const std::string msg = absl::StrCat(what, ": ", ucs_status_string(s));
  switch (s) {
    case UCS_OK:
      return absl::OkStatus();
    case UCS_ERR_CANCELED:
      return absl::CancelledError(msg);
    case UCS_ERR_TIMED_OUT:
      return absl::DeadlineExceededError(msg);
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_IO_ERROR:
      return absl::UnavailableError(msg);
    case UCS_ERR_NO_MEMORY:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

class UcxTransport;

class UcxMemory : public RegisteredMemory {
 public:
  UcxMemory(UcxTransport* owner, ucp_mem_h memh, uint8_t* data, uint64_t size, PoolDescriptor d)
      : owner_(owner), memh_(memh), data_(data), size_(size), d_(std::move(d)) {}
  ~UcxMemory() override;
  uint8_t* data() const override { return data_; }
  uint64_t size() const override { return size_; }
  const PoolDescriptor& descriptor() const override { return d_; }
  const UcxTransport* owner() const { return owner_; }
  ucp_mem_h memh() const { return memh_; }

 private:
  UcxTransport* owner_;
  ucp_mem_h memh_;
  uint8_t* data_;
  uint64_t size_;
  PoolDescriptor d_;
};

struct Peer;

// One transfer; lives on the progress thread until no UCX request refers to it.
struct Xfer {
  TransferId id = 0;
  Peer* peer = nullptr;
  std::string peer_address;
  std::string rkey_bytes;
  const uint8_t* src = nullptr;
  ucp_mem_h src_memh = nullptr;
  uint64_t remote_base = 0;
  ucp_rkey_h rkey = nullptr;
  std::vector<WriteRange> ranges;
  TransferOptions options;
  TransferCallback done;
  TransferStats stats;
  double start = 0, deadline = 0;
  size_t next_range = 0;  // issue cursor: range and offset within it
  uint64_t next_offset = 0;
  size_t touched_ranges = 0;  // ranges[0, touched) have had a put issued
  int in_flight = 0;          // UCX requests outstanding
  enum class Phase { kPut, kFlush, kNotice, kDone } phase = Phase::kPut;
  bool finished = false;
};

struct Peer {
  UcxTransport* owner = nullptr;
  std::string address;
  ucp_ep_h ep = nullptr;
  bool peer_mode = false;    // UCP_ERR_HANDLING_MODE_PEER; else watched through its process
  int32_t pid = 0;           // same-host peer's process
  int pidfd = -1;            // its pidfd, when the kernel has them
  double checked_alive = 0;  // when its process was last seen alive
  absl::Status failed;       // not OK once the endpoint failed
  absl::flat_hash_map<std::string, ucp_rkey_h> rkeys;
  std::string transport;  // learned after the first completed flush
};

class UcxTransport : public KvTransport {
 public:
  static absl::StatusOr<std::unique_ptr<KvTransport>> Create(const UcxTransportOptions& options) {
    std::unique_ptr<UcxTransport> t(new UcxTransport());
    KVR_RETURN_IF_ERROR(t->Init(options));
    return std::unique_ptr<KvTransport>(std::move(t));
  }

  ~UcxTransport() override {
    if (thread_.joinable()) {
      {
        absl::MutexLock l(&mu_);
        stop_ = true;
      }
      Wake();
      thread_.join();
      running_ = false;
    }
    if (worker_ != nullptr) {
      if (worker_address_ != nullptr) ucp_worker_release_address(worker_, worker_address_);
      ucp_worker_destroy(worker_);
    }
    if (context_ != nullptr) ucp_cleanup(context_);
    if (epoll_fd_ >= 0) ::close(epoll_fd_);
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  std::string name() const override { return "ucx"; }
  std::string address() const override { return address_; }

  absl::StatusOr<std::unique_ptr<RegisteredMemory>> AllocatePool(uint64_t block_bytes,
                                                                 int64_t num_blocks,
                                                                 MemoryType type) override {
    return Map(nullptr, block_bytes, num_blocks, type);
  }

  absl::StatusOr<std::unique_ptr<RegisteredMemory>> RegisterPool(void* base, uint64_t block_bytes,
                                                                 int64_t num_blocks,
                                                                 MemoryType type) override {
    if (base == nullptr) return absl::InvalidArgumentError("ucx: RegisterPool of a null address");
    return Map(base, block_bytes, num_blocks, type);
  }

  absl::StatusOr<TransferId> Write(const RegisteredMemory& src, const PoolDescriptor& dst,
                                   std::vector<WriteRange> ranges, const TransferOptions& options,
                                   TransferCallback done) override {
    const auto* mem = dynamic_cast<const UcxMemory*>(&src);
    if (mem == nullptr || mem->owner() != this) {
      return absl::InvalidArgumentError(
          "ucx: the source pool is not registered with this transport");
    }
    if (dst.transport != "ucx") {
      return absl::InvalidArgumentError(
          absl::StrCat("ucx: descriptor is for transport '", dst.transport, "'"));
    }
    if (dst.peer_address.empty() || dst.rkey.empty()) {
      return absl::InvalidArgumentError("ucx: descriptor has no peer address or rkey");
    }
    if (options.chunk_bytes == 0 || options.max_in_flight <= 0 ||
        options.timeout <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError(
          "transfer: chunk_bytes, max_in_flight and timeout must be > 0");
    }
    KVR_RETURN_IF_ERROR(ValidateRanges(ranges, src.size(), dst.bytes));
    auto x = std::make_unique<Xfer>();
    x->id = next_id_.fetch_add(1);
    x->peer_address = dst.peer_address;
    x->rkey_bytes = dst.rkey;
    x->src = src.data();
    x->src_memh = mem->memh();
    x->remote_base = dst.base_address;
    x->ranges = std::move(ranges);
    x->options = options;
    x->done = std::move(done);
    x->start = Now();
    x->deadline = x->start + absl::ToDoubleSeconds(options.timeout);
    x->stats.ranges = static_cast<int64_t>(x->ranges.size());
    const TransferId id = x->id;
    Post([this, x = std::shared_ptr<Xfer>(std::move(x))]() mutable { Start(std::move(x)); });
    return id;
  }

  bool Cancel(TransferId id) override {
    bool cancelled = false;
    RunSync([&] {
      auto it = xfers_.find(id);
      if (it == xfers_.end() || it->second->finished) return;
      Fail(*it->second, absl::CancelledError("transfer cancelled"));
      cancelled = true;
    });
    return cancelled;
  }

  absl::Status Flush(const PoolDescriptor& dst, absl::Duration timeout) override {
    struct State {
      absl::Notification done;
      absl::Status status;
    };
    auto state = std::make_shared<State>();
    Post([this, state, address = dst.peer_address] {
      Peer* p = GetPeer(address);
      if (!p->failed.ok()) {
        state->status = p->failed;
        state->done.Notify();
        return;
      }
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.send = [](void* req, ucs_status_t s, void* arg) {
        auto* st = static_cast<std::shared_ptr<State>*>(arg);
        (*st)->status = FromUcs(s, "flush");
        (*st)->done.Notify();
        delete st;
        ucp_request_free(req);
      };
      prm.user_data = new std::shared_ptr<State>(state);
      ucs_status_ptr_t r = ucp_ep_flush_nbx(p->ep, &prm);
      if (!UCS_PTR_IS_PTR(r)) {
        delete static_cast<std::shared_ptr<State>*>(prm.user_data);
        state->status = FromUcs(UCS_PTR_STATUS(r), "flush");
        state->done.Notify();
      }
    });
    if (!state->done.WaitForNotificationWithTimeout(timeout)) {
      return absl::DeadlineExceededError(
          absl::StrCat("flush did not complete within ", absl::FormatDuration(timeout)));
    }
    return state->status;
  }

  absl::StatusOr<std::string> WaitNotice(const std::string& sender_address, uint64_t tag,
                                         absl::Duration timeout) override {
    // An endpoint to the sender makes its failure visible here.
    Post([this, sender_address] { GetPeer(sender_address); });
    absl::MutexLock l(&mu_);
    auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return notices_.count(tag) != 0 || failed_peers_.count(sender_address) != 0;
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) {
      return absl::DeadlineExceededError(
          absl::StrCat("no notice ", tag, " within ", absl::FormatDuration(timeout)));
    }
    auto it = notices_.find(tag);
    if (it == notices_.end()) {
      return absl::UnavailableError(absl::StrCat("the sender failed before its notice ", tag,
                                                 " arrived: ", failed_peers_[sender_address]));
    }
    std::string payload = std::move(it->second);
    notices_.erase(it);
    return payload;
  }

  // Called by ~UcxMemory.
  void Unmap(ucp_mem_h memh) {
    RunSync([&] { ucp_mem_unmap(context_, memh); });
  }

 private:
  UcxTransport() = default;

  absl::Status Init(const UcxTransportOptions& options) {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return FromUcs(s, "ucp_config_read");
    if (::getenv("UCX_KEEPALIVE_INTERVAL") == nullptr) {
      const std::string v =
          absl::StrCat(absl::ToInt64Milliseconds(options.keepalive_interval), "ms");
      ucp_config_modify(config, "KEEPALIVE_INTERVAL", v.c_str());
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    params.name = "kvrelay";
    s = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) {
      context_ = nullptr;
      return FromUcs(s, "ucp_init");
    }
    {
      char* buf = nullptr;
      size_t buf_len = 0;
      FILE* f = ::open_memstream(&buf, &buf_len);
      if (f != nullptr) {
        ucp_context_print_info(context_, f);
        ::fclose(f);
        shm_ = HasSharedMemoryTransport(std::string(buf, buf_len));
        ::free(buf);
      }
    }
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // only the progress thread calls UCX
    s = ucp_worker_create(context_, &wp, &worker_);
    if (s != UCS_OK) {
      worker_ = nullptr;
      return FromUcs(s, "ucp_worker_create");
    }
    size_t len = 0;
    s = ucp_worker_get_address(worker_, &worker_address_, &len);
    if (s != UCS_OK) return FromUcs(s, "ucp_worker_get_address");
    PeerIdentity self = SelfIdentity();
    self.ucx_address.assign(reinterpret_cast<const char*>(worker_address_), len);
    self_ = self;
    address_ = EncodeIdentity(self);

    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = kNoticeAmId;
    am.cb = &UcxTransport::OnNotice;
    am.arg = this;
    s = ucp_worker_set_am_recv_handler(worker_, &am);
    if (s != UCS_OK) return FromUcs(s, "ucp_worker_set_am_recv_handler");

    wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (wake_fd_ < 0 || epoll_fd_ < 0) return absl::InternalError("ucx: eventfd/epoll failed");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = wake_fd_;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
    int efd = -1;
    if (ucp_worker_get_efd(worker_, &efd) == UCS_OK) {
      ev.data.fd = efd;
      has_efd_ = ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, efd, &ev) == 0;
    }
    running_ = true;
    thread_ = std::thread([this] { Loop(); });
    pthread_setname_np(thread_.native_handle(), "kvr-ucx-progress");
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<RegisteredMemory>> Map(void* base, uint64_t block_bytes,
                                                        int64_t num_blocks, MemoryType type) {
    if (block_bytes == 0 || num_blocks <= 0 ||
        block_bytes > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(num_blocks)) {
      return absl::InvalidArgumentError(absl::StrCat("ucx: bad pool geometry: ", num_blocks,
                                                     " blocks of ", block_bytes, " bytes"));
    }
    const uint64_t bytes = block_bytes * static_cast<uint64_t>(num_blocks);
    absl::StatusOr<std::unique_ptr<RegisteredMemory>> out;
    RunSync([&] {
      ucp_mem_map_params_t mp{};
      mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS |
                      UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
      mp.length = bytes;
      mp.memory_type = type == MemoryType::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
      if (base == nullptr) {
        mp.flags = UCP_MEM_MAP_ALLOCATE;
      } else {
        mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_ADDRESS;
        mp.address = base;
      }
      ucp_mem_h memh = nullptr;
      ucs_status_t s = ucp_mem_map(context_, &mp, &memh);
      if (s != UCS_OK) {
        out = FromUcs(
            s, absl::StrCat("ucp_mem_map of ", bytes, " bytes (", MemoryTypeName(type), ")"));
        return;
      }
      ucp_mem_attr_t attr{};
      attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
      ucp_mem_query(memh, &attr);
      void* rkey_buf = nullptr;
      size_t rkey_len = 0;
      s = ucp_rkey_pack(context_, memh, &rkey_buf, &rkey_len);
      if (s != UCS_OK) {
        ucp_mem_unmap(context_, memh);
        out = FromUcs(s, "ucp_rkey_pack");
        return;
      }
      PoolDescriptor d;
      d.transport = "ucx";
      d.peer_address = address_;
      d.rkey.assign(static_cast<const char*>(rkey_buf), rkey_len);
      ucp_rkey_buffer_release(rkey_buf);
      d.base_address = reinterpret_cast<uint64_t>(attr.address);
      d.bytes = bytes;
      d.memory_type = type;
      d.block_bytes = block_bytes;
      d.num_blocks = num_blocks;
      out = std::unique_ptr<RegisteredMemory>(
          new UcxMemory(this, memh, static_cast<uint8_t*>(attr.address), bytes, std::move(d)));
    });
    return out;
  }

  // ---- cross-thread plumbing ----

  void Wake() {
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof(one));
  }

  void Post(std::function<void()> fn) {
    {
      absl::MutexLock l(&mu_);
      tasks_.push_back(std::move(fn));
    }
    Wake();
  }

  bool OnProgressThread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Runs fn on the progress thread and waits; inline when called from it, or once the
  // thread has stopped (nothing else touches UCX then).
  void RunSync(const std::function<void()>& fn) {
    if (OnProgressThread() || !running_.load()) {
      fn();
      return;
    }
    absl::Notification done;
    Post([&] {
      fn();
      done.Notify();
    });
    done.WaitForNotification();
  }

  // ---- progress thread ----

  void Loop() {
    for (;;) {
      std::deque<std::function<void()>> tasks;
      bool stop = false;
      {
        absl::MutexLock l(&mu_);
        tasks.swap(tasks_);
        stop = stop_;
      }
      for (auto& t : tasks) t();
      while (ucp_worker_progress(worker_) != 0) {
      }
      CheckPeerProcesses();
      CloseFailedEndpoints();
      const bool busy = Pump();
      if (stop) break;
      if (busy) continue;  // puts waiting for a free slot: progress again
      if (has_efd_ && ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      // Sleep until UCX or another thread has something, a transfer's deadline, or
      // the next keepalive round.
      double wait_s = 0.1;
      const double now = Now();
      for (const auto& [id, x] : xfers_) {
        if (!x->finished) wait_s = std::min(wait_s, std::max(0.0, x->deadline - now));
      }
      if (!has_efd_ && !xfers_.empty()) wait_s = std::min(wait_s, 0.0005);
      epoll_event evs[4];
      ::epoll_wait(epoll_fd_, evs, 4, static_cast<int>(wait_s * 1000) + 1);
      uint64_t drained;
      while (::read(wake_fd_, &drained, sizeof(drained)) > 0) {
      }
    }
    Shutdown();
  }

  void Shutdown() {
    for (auto& [id, x] : xfers_) {
      if (!x->finished) Fail(*x, absl::CancelledError("transport shutting down"));
    }
    for (auto& [address, p] : peers_) {
      if (p->ep != nullptr) CloseEndpoint(p.get());
    }
    // Every request is complete once its endpoint is closed; the tasks left behind
    // (e.g. an unanswered RunSync) are run so no caller waits forever.
    std::deque<std::function<void()>> tasks;
    {
      absl::MutexLock l(&mu_);
      tasks.swap(tasks_);
    }
    for (auto& t : tasks) t();
    xfers_.clear();
    peers_.clear();
  }

  Peer* GetPeer(const std::string& address) {
    auto it = peers_.find(address);
    if (it != peers_.end()) return it->second.get();
    auto p = std::make_unique<Peer>();
    p->owner = this;
    p->address = address;
    Peer* raw = p.get();
    peers_.emplace(address, std::move(p));
    absl::StatusOr<PeerIdentity> id = DecodeIdentity(address);
    if (!id.ok()) {
      raw->failed = id.status();
      MarkPeerFailed(address, raw->failed);
      return raw;
    }
    // UCX 1.13's shared-memory transports (posix, sysv) cannot run in peer-failure
    // mode, so when they are enabled a peer on this host gets a plain endpoint (shm at
    // memcpy speed). Any peer on this host is also watched through its process. Every
    // other endpoint uses UCX's peer-failure mode: without it a dead peer is a fatal
    // error inside UCX (e.g. tcp's put emulation on the receiving side).
    const bool same_host = !id->boot_id.empty() && id->boot_id == self_.boot_id &&
                           id->pid_ns != 0 && id->pid_ns == self_.pid_ns;
    raw->peer_mode = !(same_host && shm_);
    if (same_host) {
      raw->pid = id->pid;
      raw->pidfd = static_cast<int>(::syscall(SYS_pidfd_open, id->pid, 0));
      if (raw->pidfd >= 0) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = raw->pidfd;
        ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, raw->pidfd, &ev);
      }
      if (!PeerProcessAlive(*raw)) {
        raw->failed = absl::UnavailableError(absl::StrCat("peer process ", raw->pid, " is gone"));
        MarkPeerFailed(address, raw->failed);
        return raw;
      }
    }
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(id->ucx_address.data());
    ep.err_mode = raw->peer_mode ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    if (raw->peer_mode) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = &UcxTransport::OnEpError;
      ep.err_handler.arg = raw;
    }
    ucs_status_t s = ucp_ep_create(worker_, &ep, &raw->ep);
    if (s != UCS_OK) {
      raw->ep = nullptr;
      raw->failed = FromUcs(s, "ucp_ep_create");
      MarkPeerFailed(address, raw->failed);
    }
    return raw;
  }

  static bool PeerProcessAlive(const Peer& p) {
    if (p.pidfd >= 0) {
      pollfd pfd{p.pidfd, POLLIN, 0};
      return ::poll(&pfd, 1, 0) == 0;  // readable once the process has exited
    }
    return ::kill(p.pid, 0) == 0 || errno != ESRCH;
  }

  // Same-host peers whose process is gone fail like a UCX peer failure.
  void CheckPeerProcesses() {
    for (auto& [address, p] : peers_) PeerGone(p.get(), /*max_age_s=*/0);
  }

  // For a same-host peer: true, after failing it and its transfers, if its process has
  // exited. Checks at most every max_age_s. Shared memory gives no error when the
  // receiver dies (the sender still maps its pages), so puts are interleaved with
  // these checks, and a transfer completes only if the receiver outlived its flush.
  bool PeerGone(Peer* p, double max_age_s) {
    if (p->pid == 0 || !p->failed.ok()) return !p->failed.ok();
    const double now = Now();
    if (max_age_s > 0 && now - p->checked_alive < max_age_s) return false;
    if (PeerProcessAlive(*p)) {
      p->checked_alive = now;
      return false;
    }
    PeerFailed(p, absl::UnavailableError(absl::StrCat("peer process ", p->pid, " exited")));
    return true;
  }

  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* p = static_cast<Peer*>(arg);
    p->owner->PeerFailed(p, FromUcs(status, "peer failed"));
  }

  void PeerFailed(Peer* p, absl::Status status) {
    if (!p->failed.ok()) return;
    p->failed = std::move(status);
    for (auto& [id, x] : xfers_) {
      if (x->peer == p && !x->finished) Fail(*x, p->failed);
    }
    MarkPeerFailed(p->address, p->failed);
    failed_.push_back(p);  // its endpoint is closed outside the UCX callback
  }

  void MarkPeerFailed(const std::string& address, const absl::Status& status) {
    absl::MutexLock l(&mu_);
    failed_peers_[address] = status.ToString();
  }

  void CloseFailedEndpoints() {
    std::vector<Peer*> failed;
    failed.swap(failed_);
    for (Peer* p : failed) {
      if (p->ep != nullptr) CloseEndpoint(p);
    }
  }

  // Releases a peer's endpoint: forced when the peer failed (outstanding requests
  // complete with an error), else flushed first, for at most a few seconds.
  void CloseEndpoint(Peer* p) {
    ucp_request_param_t prm{};
    const bool force = !p->failed.ok();
    if (force) {
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
    }
    ucs_status_ptr_t r = ucp_ep_close_nbx(p->ep, &prm);
    if (UCS_PTR_IS_PTR(r)) {
      const double deadline = Now() + 5;
      while (ucp_request_check_status(r) == UCS_INPROGRESS && Now() < deadline) {
        ucp_worker_progress(worker_);
      }
      if (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_request_cancel(worker_, r);
      ucp_request_free(r);
    }
    for (auto& [bytes, rkey] : p->rkeys) ucp_rkey_destroy(rkey);
    p->rkeys.clear();
    p->ep = nullptr;
    if (p->pidfd >= 0) {
      ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, p->pidfd, nullptr);
      ::close(p->pidfd);
      p->pidfd = -1;
    }
    if (p->failed.ok()) p->failed = absl::UnavailableError("endpoint closed");
  }

  static ucs_status_t OnNotice(void* arg, const void* header, size_t header_length, void* data,
                               size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxTransport*>(arg);
    if (header_length != sizeof(uint64_t) || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
      return UCS_OK;  // not ours (notices are always eager)
    }
    uint64_t tag;
    std::memcpy(&tag, header, sizeof(tag));
    absl::MutexLock l(&self->mu_);
    self->notices_[tag].assign(static_cast<const char*>(data), length);
    return UCS_OK;
  }

  void Start(std::shared_ptr<Xfer> shared) {
    // Owned by xfers_ from here on (unique ownership; the shared_ptr only carried it).
    auto x = std::make_unique<Xfer>(std::move(*shared));
    Xfer& r = *x;
    xfers_[r.id] = std::move(x);
    r.peer = GetPeer(r.peer_address);
    if (!r.peer->failed.ok()) {
      Fail(r, r.peer->failed);
      return;
    }
    auto it = r.peer->rkeys.find(r.rkey_bytes);
    if (it == r.peer->rkeys.end()) {
      ucp_rkey_h rkey = nullptr;
      ucs_status_t s = ucp_ep_rkey_unpack(r.peer->ep, r.rkey_bytes.data(), &rkey);
      if (s != UCS_OK) {
        Fail(r, absl::InvalidArgumentError(absl::StrCat(
                    "ucx: cannot unpack the descriptor's rkey: ", ucs_status_string(s))));
        return;
      }
      it = r.peer->rkeys.emplace(r.rkey_bytes, rkey).first;
    }
    r.rkey = it->second;
  }

  static void OnRequestDone(void* request, ucs_status_t status, void* user_data) {
    auto* x = static_cast<Xfer*>(user_data);
    --x->in_flight;
    if (status != UCS_OK && !x->finished) {
      x->peer->owner->Fail(*x, FromUcs(status, "ucx request"));
    }
    ucp_request_free(request);
  }

  // Starts one request; false if it failed at once (the transfer is then failed).
  template <typename Issue>
  bool Issue1(Xfer& x, Issue issue) {
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = &UcxTransport::OnRequestDone;
    prm.user_data = &x;
    ucs_status_ptr_t r = issue(&prm);
    if (UCS_PTR_IS_ERR(r)) {
      Fail(x, FromUcs(UCS_PTR_STATUS(r), "ucx request"));
      return false;
    }
    if (r != nullptr) ++x.in_flight;
    return true;
  }

  // Advances every transfer; true if some transfer could issue more right away.
  bool Pump() {
    bool busy = false;
    const double now = Now();
    for (auto it = xfers_.begin(); it != xfers_.end();) {
      Xfer& x = *it->second;
      if (!x.finished && now > x.deadline) {
        Fail(x, absl::DeadlineExceededError(absl::StrCat("transfer did not complete within ",
                                                         absl::FormatDuration(x.options.timeout))));
      }
      if (!x.finished) busy |= Advance(x);
      if (x.finished && x.in_flight == 0) {
        it = xfers_.erase(it);
      } else {
        ++it;
      }
    }
    return busy;
  }

  bool Advance(Xfer& x) {
    if (x.phase == Xfer::Phase::kPut) {
      while (x.in_flight < x.options.max_in_flight && x.next_range < x.ranges.size()) {
        if (PeerGone(x.peer, kAliveCheckSeconds)) return false;
        const WriteRange& w = x.ranges[x.next_range];
        const uint64_t n = std::min(x.options.chunk_bytes, w.length - x.next_offset);
        const uint8_t* from = x.src + w.src_offset + x.next_offset;
        const uint64_t to = x.remote_base + w.dst_offset + x.next_offset;
        x.touched_ranges = x.next_range + 1;
        const bool ok = Issue1(x, [&](ucp_request_param_t* prm) {
          prm->op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
          prm->memh = x.src_memh;
          return ucp_put_nbx(x.peer->ep, from, n, to, x.rkey, prm);
        });
        if (!ok) return false;
        ++x.stats.puts;
        x.stats.bytes += n;
        x.next_offset += n;
        if (x.next_offset == w.length) {
          ++x.next_range;
          x.next_offset = 0;
        }
      }
      if (x.next_range < x.ranges.size()) return false;  // window full: wait for completions
      if (x.in_flight > 0) return false;
      x.phase = Xfer::Phase::kFlush;
      if (!Issue1(x, [&](ucp_request_param_t* prm) { return ucp_ep_flush_nbx(x.peer->ep, prm); })) {
        return false;
      }
    }
    if (x.in_flight > 0) return false;
    if (x.phase == Xfer::Phase::kFlush) {
      if (x.peer->transport.empty()) {
        char* buf = nullptr;
        size_t len = 0;
        FILE* f = ::open_memstream(&buf, &len);
        if (f != nullptr) {
          ucp_ep_print_info(x.peer->ep, f);
          ::fclose(f);
          x.peer->transport = TransportFromEpInfo(std::string(buf, len));
          ::free(buf);
        }
      }
      x.phase = Xfer::Phase::kNotice;
      if (x.options.notice_tag != 0) {
        if (!Issue1(x, [&](ucp_request_param_t* prm) {
              prm->op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
              prm->flags = UCP_AM_SEND_FLAG_EAGER;
              return ucp_am_send_nbx(x.peer->ep, kNoticeAmId, &x.options.notice_tag,
                                     sizeof(x.options.notice_tag), x.options.notice.data(),
                                     x.options.notice.size(), prm);
            })) {
          return false;
        }
        if (x.in_flight > 0) return false;
      }
    }
    if (x.phase == Xfer::Phase::kNotice) {
      if (PeerGone(x.peer, /*max_age_s=*/0)) return false;  // landed in a dead process
      x.phase = Xfer::Phase::kDone;
      Complete(x, absl::OkStatus());
    }
    return false;
  }

  void Complete(Xfer& x, absl::Status status) {
    x.finished = true;
    TransferResult r;
    r.status = std::move(status);
    x.stats.seconds = Now() - x.start;
    x.stats.transport = x.peer != nullptr ? x.peer->transport : "";
    r.stats = x.stats;
    if (!r.status.ok()) {
      r.maybe_written.assign(x.ranges.begin(), x.ranges.begin() + x.touched_ranges);
    }
    if (x.done) {
      TransferCallback done = std::move(x.done);
      done(std::move(r));
    }
  }

  void Fail(Xfer& x, absl::Status status) {
    if (x.finished) return;
    Complete(x, std::move(status));
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_address_t* worker_address_ = nullptr;
  std::string address_;
  PeerIdentity self_;
  int wake_fd_ = -1, epoll_fd_ = -1;
  bool has_efd_ = false;
  bool shm_ = false;  // the context has a shared-memory transport
  std::thread thread_;
  std::atomic<TransferId> next_id_{1};
  std::atomic<bool> running_{false};

  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, std::string> notices_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::string> failed_peers_ ABSL_GUARDED_BY(mu_);

  // Progress thread only.
  std::map<TransferId, std::unique_ptr<Xfer>> xfers_;
  absl::flat_hash_map<std::string, std::unique_ptr<Peer>> peers_;
  std::vector<Peer*> failed_;
};

UcxMemory::~UcxMemory() { owner_->Unmap(memh_); }

}  // namespace

absl::StatusOr<std::unique_ptr<KvTransport>> NewUcxTransport(const UcxTransportOptions& options) {
  return UcxTransport::Create(options);
}

}  // namespace kvrelay::transfer
