#include "router/registry_service.h"

#include <pthread.h>

#include <deque>
#include <optional>

#include "absl/time/clock.h"
#include "common/rpc/convert.h"

namespace kvrelay::router {
namespace {

// One worker's stream. Reads are processed one at a time, in order; router messages
// (the ack, snapshot requests) are queued and written one at a time. Finish is called
// once, when nothing is being written; `this` is deleted in OnDone.
class ConnectReactor final : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::RouterMessage> {
 public:
  ConnectReactor(RegistryService* service, const grpc::CallbackServerContext& context)
      : service_(service), conn_(service->registry().NewConnection()) {
    if (std::optional<grpc::Status> denied = service_->security().CheckInternalCaller(context)) {
      End(*std::move(denied));
      return;
    }
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      End(grpc::Status::OK);  // the worker closed the stream or went away
      return;
    }
    WorkerRegistry& reg = service_->registry();
    const absl::Time now = absl::Now();
    if (!registered_) {
      if (!in_.has_register_()) {
        End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                         "the first message must be a registration"));
        return;
      }
      absl::Status st = reg.OnRegister(conn_, in_.register_(), now);
      if (!st.ok()) {
        End(rpc::ToGrpc(st));
        return;
      }
      registered_ = true;
      v1::RouterMessage ack;
      ack.mutable_ack()->set_router_id(reg.options().router_id);
      ack.mutable_ack()->set_heartbeat_interval_ms(
          static_cast<uint32_t>(absl::ToInt64Milliseconds(reg.options().heartbeat_interval)));
      Send(std::move(ack));
      service_->Changed();
    } else if (in_.has_load()) {
      if (!reg.OnLoad(conn_, in_.load(), now)) {
        v1::RouterMessage m;
        m.mutable_snapshot_request();
        Send(std::move(m));
        service_->Changed();  // back from the dead
      }
    } else if (in_.has_events()) {
      if (!reg.OnEvents(conn_, in_.events(), now)) {
        v1::RouterMessage m;
        m.mutable_snapshot_request();
        Send(std::move(m));
        service_->Changed();  // it may be back from the dead
      }
    } else if (in_.has_snapshot()) {
      reg.OnSnapshot(conn_, in_.snapshot(), now);
    } else if (in_.has_register_()) {
      End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "registered twice on one stream"));
      return;
    }
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock l(&mu_);
      out_.pop_front();
      writing_ = false;
      if (!ok) out_.clear();  // the worker is gone; the read side ends the call
    }
    Pump();
  }

  void OnDone() override {
    service_->registry().OnDisconnect(conn_);
    RegistryService* service = service_;
    const bool was_registered = registered_;
    delete this;
    if (was_registered) service->Changed();
  }

 private:
  void Send(v1::RouterMessage m) {
    {
      absl::MutexLock l(&mu_);
      out_.push_back(std::move(m));
    }
    Pump();
  }

  void End(grpc::Status status) {
    service_->registry().OnDisconnect(conn_);
    {
      absl::MutexLock l(&mu_);
      if (!final_) final_ = std::move(status);
    }
    Pump();
  }

  void Pump() {
    const v1::RouterMessage* next = nullptr;
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock l(&mu_);
      if (writing_ || finished_) return;
      if (final_) {
        out_.clear();  // the stream ends: pending messages no longer matter
        finished_ = true;
        finish = *final_;
      } else if (!out_.empty()) {
        writing_ = true;
        next = &out_.front();
      }
    }
    if (next != nullptr) StartWrite(next);
    if (finish) Finish(*finish);
  }

  RegistryService* service_;
  const uint64_t conn_;
  v1::WorkerMessage in_;
  bool registered_ = false;  // reactor callbacks for reads are serialised
  absl::Mutex mu_;
  std::deque<v1::RouterMessage> out_ ABSL_GUARDED_BY(mu_);  // front: being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> final_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

RegistryService::RegistryService(WorkerRegistry* registry, std::function<void()> on_change,
                                 rpc::Security security)
    : registry_(registry), on_change_(std::move(on_change)), security_(std::move(security)) {
  sweeper_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "kvr-heartbeat");
    const absl::Duration period = registry_->options().heartbeat_interval / 2;
    absl::MutexLock l(&mu_);
    while (!stop_) {
      mu_.AwaitWithTimeout(absl::Condition(&stop_), period);
      if (stop_) break;
      mu_.Unlock();
      registry_->ExpireSilent(absl::Now());
      Changed();  // every tick: cheap when nothing changed, and catches any missed change
      mu_.Lock();
    }
  });
}

RegistryService::~RegistryService() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  sweeper_.join();
}

grpc::ServerBidiReactor<v1::WorkerMessage, v1::RouterMessage>* RegistryService::Connect(
    grpc::CallbackServerContext* context) {
  return new ConnectReactor(this, *context);
}

grpc::ServerUnaryReactor* RegistryService::ListWorkers(grpc::CallbackServerContext* context,
                                                       const v1::ListWorkersRequest* request,
                                                       v1::ListWorkersResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (std::optional<grpc::Status> denied = security_.CheckInternalCaller(*context)) {
    reactor->Finish(*denied);
    return reactor;
  }
  *response = registry_->List();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvrelay::router
