// The decode worker's client of prefill workers: one channel per address, calls made
// with the gRPC callback API; completions run on gRPC threads.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/security.h"
#include "grpcpp/channel.h"
#include "kvrelay/v1/worker.grpc.pb.h"

namespace kvrelay::decode {

class PrefillClient {
 public:
  using PrefillDone = std::function<void(const absl::Status&, const v1::PrefillResponse&)>;
  using AbortDone = std::function<void(const absl::Status&, bool found)>;

  // `security`: TLS and the cluster token of the calls (rpc/security.h).
  explicit PrefillClient(rpc::Security security = rpc::Security())
      : security_(std::move(security)) {}

  // Prefill on the worker at `address` (host:port), bounded by `timeout`.
  void Prefill(const std::string& address, v1::PrefillRequest request, absl::Duration timeout,
               PrefillDone done);
  // Abort of a request's job there; `done` gets the RPC status and whether a job was found.
  void Abort(const std::string& address, const std::string& request_id, uint64_t lease_generation,
             absl::Duration timeout, AbortDone done);

 private:
  v1::PrefillWorker::Stub* Stub(const std::string& address);

  const rpc::Security security_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<v1::PrefillWorker::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);
};

// Whether a failed call's status shows that nothing listens at the address any more
// (the process is gone): connection refused.
bool PeerIsGone(const absl::Status& status);

}  // namespace kvrelay::decode
