// kvrelay.v1.Registry on the router (DESIGN §5): one bidirectional stream per worker
// (Connect) feeding the WorkerRegistry, plus ListWorkers. A sweeper thread marks
// workers that miss their heartbeat deadline dead.
#pragma once

#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/rpc/call_tracker.h"
#include "common/rpc/security.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "router/worker_registry.h"

namespace kvrelay::router {

class RegistryService final : public v1::Registry::CallbackService {
 public:
  // `on_change` runs (on a gRPC or the sweeper thread) after a worker registered or
  // died, e.g. to update the health status.
  // died, e.g. to update the health status. `security`: which callers are workers of
  // this cluster (rpc::Security::CheckInternalCaller; default: anyone).
  RegistryService(WorkerRegistry* registry, std::function<void()> on_change,
                  rpc::Security security = rpc::Security());
  ~RegistryService() override;  // stops the sweeper

  grpc::ServerBidiReactor<v1::WorkerMessage, v1::RouterMessage>* Connect(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* ListWorkers(grpc::CallbackServerContext* context,
                                        const v1::ListWorkersRequest* request,
                                        v1::ListWorkersResponse* response) override;

  WorkerRegistry& registry() { return *registry_; }
  const rpc::Security& security() const { return security_; }
  void Changed() {
    if (on_change_) on_change_();
  }

 private:
  WorkerRegistry* registry_;
  std::function<void()> on_change_;
  const rpc::Security security_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread sweeper_;
};

}  // namespace kvrelay::router
