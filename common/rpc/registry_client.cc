#include "common/rpc/registry_client.h"

#include <netdb.h>
#include <pthread.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/rpc/keepalive.h"
#include "common/util/status.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kvrelay/v1/registry.grpc.pb.h"

namespace kvrelay::rpc {
namespace {

bool SplitHostPort(absl::string_view hostport, std::string* host, int* port) {
  const size_t colon = hostport.rfind(':');
  if (colon == absl::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(hostport.substr(colon + 1), port) || *port < 1 || *port > 65535 ||
      hostport.substr(0, colon).find_first_of("/ \t") != absl::string_view::npos) {
    return false;  // a '/' is a URI scheme gRPC would read differently
  }
  *host = std::string(hostport.substr(0, colon));
  return true;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ParseRouterList(const std::string& list,
                                                         const std::string& flag) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    part = absl::StripAsciiWhitespace(part);
    absl::string_view hostport = part;
    const bool dns = absl::ConsumePrefix(&hostport, kDnsRouterPrefix);
    std::string host;
    int port = 0;
    if (!SplitHostPort(hostport, &host, &port) || (dns && host.front() == '[')) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": '", part, "' is not host:port or dns:///host:port (port 1-65535)"));
    }
    out.emplace_back(part);
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ResolveRouterAddresses(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0) {
    const std::string msg = absl::StrCat("cannot resolve '", host, "': ", gai_strerror(rc));
    return rc == EAI_NONAME ? absl::NotFoundError(msg) : absl::UnavailableError(msg);
  }
  std::vector<std::string> out;
  for (const addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char ip[NI_MAXHOST];
    if (getnameinfo(a->ai_addr, a->ai_addrlen, ip, sizeof ip, nullptr, 0, NI_NUMERICHOST) != 0) {
      continue;
    }
    std::string address =
        a->ai_family == AF_INET6 ? absl::StrCat("[", ip, "]:", port) : absl::StrCat(ip, ":", port);
    if (std::find(out.begin(), out.end(), address) == out.end()) out.push_back(std::move(address));
  }
  freeaddrinfo(res);
  if (out.empty()) return absl::NotFoundError(absl::StrCat("'", host, "' has no TCP address"));
  return out;
}

v1::KvEventBatchMsg ToProto(const kvcache::KvEventBatch& batch) {
  v1::KvEventBatchMsg m;
  m.set_incarnation(batch.incarnation);
  for (const kvcache::KvEvent& e : batch.events) {
    v1::KvEventMsg* p = m.add_events();
    p->set_seq(e.seq);
    p->set_tier(static_cast<v1::KvTier>(static_cast<int>(e.tier)));
    switch (e.type) {
      case kvcache::KvEvent::Type::kStored:
        p->set_type(v1::KvEventMsg::TYPE_STORED);
        if (e.parent_hash) p->set_parent_hash(*e.parent_hash);
        break;
      case kvcache::KvEvent::Type::kRemoved:
        p->set_type(v1::KvEventMsg::TYPE_REMOVED);
        break;
      case kvcache::KvEvent::Type::kCleared:
        p->set_type(v1::KvEventMsg::TYPE_CLEARED);
        break;
    }
    for (uint64_t h : e.hashes) p->add_hashes(h);
  }
  return m;
}

v1::KvSnapshotMsg ToProto(const kvcache::KvSnapshot& snapshot) {
  v1::KvSnapshotMsg m;
  m.set_incarnation(snapshot.incarnation);
  m.set_seq(snapshot.seq);
  m.mutable_hashes()->Reserve(static_cast<int>(snapshot.blocks.size()));
  for (const kvcache::CachedBlockInfo& b : snapshot.blocks) {
    switch (b.tier) {
      case kvcache::KvTier::kPool:
        m.add_hashes(b.hash);
        break;
      case kvcache::KvTier::kHost:
        m.add_host_hashes(b.hash);
        break;
      case kvcache::KvTier::kDisk:
        m.add_disk_hashes(b.hash);
        break;
    }
  }
  return m;
}

// One router: a thread that keeps a stream open (redialling with backoff) and writes
// events, snapshots and load reports; per open stream, a reader thread that takes the
// router's acks and snapshot requests.
class RegistryClient::Connection {
 public:
  Connection(const RegistryClient* owner, std::string router)
      : owner_(owner), router_(std::move(router)) {}

  void Start() {
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "kvr-registry");
      Run();
    });
  }

  void Stop() {
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
      if (ctx_ != nullptr) ctx_->TryCancel();
    }
    if (thread_.joinable()) thread_.join();
  }

  bool acked() const {
    absl::MutexLock l(&mu_);
    return acked_;
  }

 private:
  void Run() {
    const RegistryClientOptions& o = owner_->options_;
    auto stub = v1::Registry::NewStub(CreateInternalChannel(router_, o.security));
    absl::Duration backoff = o.reconnect_min;
    while (true) {
      const bool was_acked = Session(*stub);
      absl::MutexLock l(&mu_);
      acked_ = false;
      if (stop_) return;
      if (was_acked) backoff = o.reconnect_min;  // it worked for a while: retry soon
      mu_.AwaitWithTimeout(absl::Condition(&stop_), backoff);
      if (stop_) return;
      backoff = std::min(backoff * 2, o.reconnect_max);
    }
  }

  // One stream, until it breaks or Stop. True if the router acknowledged it.
  bool Session(v1::Registry::Stub& stub) {
    const RegistryClientOptions& o = owner_->options_;
    grpc::ClientContext ctx;
    {
      absl::MutexLock l(&mu_);
      if (stop_) return false;
      ctx_ = &ctx;
      read_done_ = false;
      want_snapshot_ = true;  // a new stream: the router may know nothing of us
      heartbeat_ = o.heartbeat;
    }
    std::unique_ptr<grpc::ClientReaderWriter<v1::WorkerMessage, v1::RouterMessage>> stream =
        stub.Connect(&ctx);
    std::thread reader([this, &stream] {
      pthread_setname_np(pthread_self(), "kvr-registry-rd");
      v1::RouterMessage m;
      while (stream->Read(&m)) {
        absl::MutexLock l(&mu_);
        if (m.has_ack()) {
          acked_ = true;
          ever_acked_ = true;
          if (m.ack().heartbeat_interval_ms() > 0) {
            heartbeat_ = absl::Milliseconds(m.ack().heartbeat_interval_ms());
          }
        } else if (m.has_snapshot_request()) {
          want_snapshot_ = true;
        }
      }
      absl::MutexLock l(&mu_);
      read_done_ = true;
    });

    v1::WorkerMessage reg;
    *reg.mutable_register_() = o.registration;
    bool ok = stream->Write(reg);
    uint64_t next_seq = 1;
    absl::Time next_report = absl::InfinitePast();
    while (ok) {
      bool snapshot = false;
      absl::Duration heartbeat;
      {
        absl::MutexLock l(&mu_);
        auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stop_ || read_done_ || want_snapshot_;
        };
        // Wake for new events, and in time for the next load report.
        mu_.AwaitWithTimeout(absl::Condition(&wake),
                             std::min(o.event_poll, next_report - absl::Now()));
        if (stop_ || read_done_) break;
        snapshot = want_snapshot_;
        want_snapshot_ = false;
        heartbeat = heartbeat_;
      }
      if (!snapshot) {
        kvcache::KvEventBatch batch =
            owner_->cache_->ReadEvents(next_seq, o.max_events_per_message);
        if (batch.need_snapshot) {
          snapshot = true;  // the log moved past us
        } else if (!batch.events.empty()) {
          v1::WorkerMessage m;
          *m.mutable_events() = ToProto(batch);
          next_seq = batch.next_seq;
          ok = stream->Write(m);
        }
      }
      if (snapshot && ok) {
        kvcache::KvSnapshot s = owner_->cache_->Snapshot();
        v1::WorkerMessage m;
        *m.mutable_snapshot() = ToProto(s);
        next_seq = s.seq + 1;
        ok = stream->Write(m);
      }
      const absl::Time now = absl::Now();
      if (ok && now >= next_report) {
        v1::WorkerMessage m;
        *m.mutable_load() = owner_->load_();
        ok = stream->Write(m);
        next_report = now + heartbeat;
      }
    }
    ctx.TryCancel();
    reader.join();
    const grpc::Status st = stream->Finish();
    absl::MutexLock l(&mu_);
    ctx_ = nullptr;
    const bool was = ever_acked_;
    ever_acked_ = false;
    if (!was && !stop_ && !st.ok() && st.error_code() != grpc::StatusCode::CANCELLED) {
      // Refused (another model, block size...) or unreachable: say why, then redial.
      std::fprintf(stderr, "kvrelay registry: router %s: %s\n", router_.c_str(),
                   st.error_message().c_str());
    }
    return was;
  }

  const RegistryClient* owner_;
  const std::string router_;
  std::thread thread_;
  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* ctx_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool read_done_ ABSL_GUARDED_BY(mu_) = false;
  bool want_snapshot_ ABSL_GUARDED_BY(mu_) = false;
  bool acked_ ABSL_GUARDED_BY(mu_) = false;
  bool ever_acked_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration heartbeat_ ABSL_GUARDED_BY(mu_);
};

RegistryClient::RegistryClient(RegistryClientOptions options, const kvcache::PrefixCache* cache,
                               std::function<v1::LoadReport()> load)
    : options_(std::move(options)), cache_(cache), load_(std::move(load)) {}

RegistryClient::~RegistryClient() { Stop(); }

void RegistryClient::SetRouters(const std::set<std::string>& want) {
  std::vector<std::unique_ptr<Connection>> gone;
  {
    absl::MutexLock l(&mu_);
    if (stop_) return;
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (want.count(it->first) == 0) {
        gone.push_back(std::move(it->second));
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
    for (const std::string& router : want) {
      if (connections_.count(router) != 0) continue;
      auto c = std::make_unique<Connection>(this, router);
      c->Start();
      connections_.emplace(router, std::move(c));
    }
  }
  for (auto& c : gone) c->Stop();  // outside mu_: joins its thread
}

void RegistryClient::ResolveLoop() {
  std::vector<bool> reported(dns_routers_.size(), false);
  while (true) {
    std::set<std::string> want(static_routers_.begin(), static_routers_.end());
    for (size_t i = 0; i < dns_routers_.size(); ++i) {
      const auto& [host, port] = dns_routers_[i];
      absl::StatusOr<std::vector<std::string>> addresses = options_.resolver(host, port);
      if (addresses.ok()) {
        dns_addresses_[i] = *std::move(addresses);
        reported[i] = false;
      } else if (!reported[i]) {  // keep the last good addresses; say so once
        std::fprintf(stderr, "kvrelay registry: %s%s:%d: %s\n", kDnsRouterPrefix, host.c_str(),
                     port, addresses.status().ToString().c_str());
        reported[i] = true;
      }
      want.insert(dns_addresses_[i].begin(), dns_addresses_[i].end());
    }
    SetRouters(want);
    // A name that has never resolved (no router pod yet) is asked again within a second.
    const bool unresolved = std::any_of(dns_addresses_.begin(), dns_addresses_.end(),
                                        [](const auto& a) { return a.empty(); });
    absl::MutexLock l(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&stop_),
                         unresolved ? std::min(options_.resolve_interval, absl::Seconds(1))
                                    : options_.resolve_interval);
    if (stop_) return;
  }
}

absl::Status RegistryClient::Start() {
  const v1::WorkerRegistration& r = options_.registration;
  if (r.worker_id().empty()) return absl::InvalidArgumentError("registration.worker_id is empty");
  if (r.role() != v1::WORKER_ROLE_PREFILL && r.role() != v1::WORKER_ROLE_DECODE) {
    return absl::InvalidArgumentError("registration.role must be prefill or decode");
  }
  if (r.address().empty()) return absl::InvalidArgumentError("registration.address is empty");
  if (r.model_id().empty()) return absl::InvalidArgumentError("registration.model_id is empty");
  if (r.block_size() < 1 || r.num_blocks() < 1) {
    return absl::InvalidArgumentError("registration.block_size and num_blocks must be >= 1");
  }
  if (options_.event_poll <= absl::ZeroDuration() || options_.heartbeat <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("event_poll and heartbeat must be > 0");
  }
  if (options_.resolve_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("resolve_interval must be > 0");
  }
  for (const std::string& router : options_.routers) {
    absl::string_view hostport = router;
    if (!absl::ConsumePrefix(&hostport, kDnsRouterPrefix)) {
      static_routers_.push_back(router);
      continue;
    }
    std::string host;
    int port = 0;
    if (!SplitHostPort(hostport, &host, &port)) {
      return absl::InvalidArgumentError(absl::StrCat("router '", router, "' is not host:port"));
    }
    dns_routers_.emplace_back(std::move(host), port);
  }
  dns_addresses_.assign(dns_routers_.size(), {});
  if (dns_routers_.empty()) {
    SetRouters(std::set<std::string>(static_routers_.begin(), static_routers_.end()));
  } else {
    resolver_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "kvr-resolve");
      ResolveLoop();
    });
  }
  return absl::OkStatus();
}

void RegistryClient::Stop() {
  std::map<std::string, std::unique_ptr<Connection>> connections;
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  if (resolver_.joinable()) resolver_.join();
  {
    absl::MutexLock l(&mu_);
    connections.swap(connections_);
  }
  for (auto& [router, c] : connections) c->Stop();
}

std::vector<std::string> RegistryClient::routers() const {
  absl::MutexLock l(&mu_);
  std::vector<std::string> out;
  for (const auto& [router, c] : connections_) out.push_back(router);
  return out;
}

absl::StatusOr<std::unique_ptr<RegistryClient>> StartRegistryClient(
    const RegistrySettings& settings, v1::WorkerRole role, int port, const std::string& model_id,
    const kvcache::PrefixCache* cache, const std::string& kv_dtype,
    std::function<v1::LoadReport()> load, const Security& security) {
  if (settings.routers.empty()) return std::unique_ptr<RegistryClient>();
  RegistryClientOptions o;
  o.security = security;
  o.routers = settings.routers;
  o.resolve_interval = settings.resolve_interval;
  v1::WorkerRegistration& r = o.registration;
  const std::string address = absl::StrCat(settings.advertise_host, ":", port);
  r.set_worker_id(
      !settings.worker_id.empty()
          ? settings.worker_id
          : absl::StrCat(role == v1::WORKER_ROLE_PREFILL ? "prefill-" : "decode-", address));
  r.set_role(role);
  r.set_address(address);
  r.set_model_id(model_id);
  r.set_block_size(cache->block_size());
  r.set_num_blocks(cache->num_blocks());
  r.set_incarnation(cache->incarnation());
  r.set_kv_dtype(kv_dtype);
  auto client = std::make_unique<RegistryClient>(std::move(o), cache, std::move(load));
  KVR_RETURN_IF_ERROR(client->Start());
  return client;
}

int RegistryClient::connected() const {
  absl::MutexLock l(&mu_);
  int n = 0;
  for (const auto& [router, c] : connections_) n += c->acked() ? 1 : 0;
  return n;
}

}  // namespace kvrelay::rpc
