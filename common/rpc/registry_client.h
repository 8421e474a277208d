// The worker side of the registry (DESIGN §5): a worker dials every router replica on
// one bidirectional stream (Registry/Connect), registers, then sends its KV events as
// they happen and a load report every heartbeat. Each connection reads the prefix
// cache's event log from its own position: after (re)connecting and whenever the
// router asks (a gap, a new incarnation) or the log no longer holds what it needs, it
// sends a snapshot instead. Connections that fail are redialled with backoff, so a
// restarted router rebuilds its index from the workers' snapshots.
//
// A router entry `dns:///host:port` names every address `host` resolves to (e.g. a
// Kubernetes headless Service over the router replicas): it is re-resolved every
// `resolve_interval` and the worker keeps one stream per address, opening streams to
// new replicas and closing those whose address went away. A failed lookup keeps the
// addresses of the last good one; a name that never resolved yet is retried every second.
// A plain `host:port` is one router.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/kvcache/prefix_cache.h"
#include "common/rpc/security.h"
#include "kvrelay/v1/registry.pb.h"

namespace kvrelay::rpc {

// A prefix cache's events and snapshot as the registry stream carries them (also used by
// the router simulation, which feeds a WorkerRegistry without a stream).
v1::KvEventBatchMsg ToProto(const kvcache::KvEventBatch& batch);
v1::KvSnapshotMsg ToProto(const kvcache::KvSnapshot& snapshot);

// host -> its addresses as "ip:port" / "[ipv6]:port"; NOT_FOUND or UNAVAILABLE when the
// name does not resolve.
using RouterResolver =
    std::function<absl::StatusOr<std::vector<std::string>>(const std::string& host, int port)>;
// getaddrinfo: every TCP address of `host`, deduplicated, in the resolver's order.
absl::StatusOr<std::vector<std::string>> ResolveRouterAddresses(const std::string& host, int port);

inline constexpr char kDnsRouterPrefix[] = "dns:///";

struct RegistryClientOptions {
  std::vector<std::string> routers;  // host:port or dns:///host:port of the router replicas
  absl::Duration resolve_interval = absl::Seconds(10);  // for dns:/// entries
  RouterResolver resolver = ResolveRouterAddresses;
  v1::WorkerRegistration registration;
  // How often new KV events are looked for (the router learns of new blocks this late).
  absl::Duration event_poll = absl::Milliseconds(5);
  // Load report interval until the router's ack says otherwise.
  absl::Duration heartbeat = absl::Milliseconds(500);
  absl::Duration reconnect_min = absl::Milliseconds(50);
  absl::Duration reconnect_max = absl::Seconds(2);
  size_t max_events_per_message = 1024;
  Security security;  // TLS and the cluster token of the registry streams
};

// What a worker's flags say about the registry.
struct RegistrySettings {
  std::vector<std::string> routers;                     // empty: register nowhere
  absl::Duration resolve_interval = absl::Seconds(10);  // dns:/// entries are re-resolved
  std::string worker_id;                                // empty: "<role>-<host>:<port>"
  std::string advertise_host = "127.0.0.1";             // how routers and peers reach this worker
};

// "host:port[,host:port...]" -> the list; INVALID_ARGUMENT naming `flag` for an entry
// that is not host:port or dns:///host:port.
absl::StatusOr<std::vector<std::string>> ParseRouterList(const std::string& list,
                                                         const std::string& flag);

// Starts a client registering `role` served on `port` (nullptr when no router is set).
// INVALID_ARGUMENT for incomplete settings.
class RegistryClient;
absl::StatusOr<std::unique_ptr<RegistryClient>> StartRegistryClient(
    const RegistrySettings& settings, v1::WorkerRole role, int port, const std::string& model_id,
    const kvcache::PrefixCache* cache, const std::string& kv_dtype,
    std::function<v1::LoadReport()> load, const Security& security = Security());

class RegistryClient {
 public:
  // `load` runs on the client's threads (one per router) for every report.
  RegistryClient(RegistryClientOptions options, const kvcache::PrefixCache* cache,
                 std::function<v1::LoadReport()> load);
  // Closes every stream and joins the threads (Stop).
  ~RegistryClient();

  // INVALID_ARGUMENT when the registration is incomplete (naming the field).
  absl::Status Start();
  void Stop();

  // Routers whose stream is open and registration acknowledged.
  int connected() const;
  // The router addresses this client keeps a stream to (dns:/// entries expanded), sorted.
  std::vector<std::string> routers() const;

 private:
  class Connection;

  // Resolves the dns:/// entries every resolve_interval until Stop.
  void ResolveLoop();
  // Makes the connections exactly `want` (plus nothing else): opens new ones, closes others.
  void SetRouters(const std::set<std::string>& want) ABSL_LOCKS_EXCLUDED(mu_);

  const RegistryClientOptions options_;
  const kvcache::PrefixCache* cache_;
  std::function<v1::LoadReport()> load_;
  std::vector<std::string> static_routers_;  // plain host:port entries
  // dns:/// entries (host, port) and their last good addresses.
  std::vector<std::pair<std::string, int>> dns_routers_;
  std::vector<std::vector<std::string>> dns_addresses_;  // resolver thread only
  std::thread resolver_;
  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, std::unique_ptr<Connection>> connections_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrelay::rpc
