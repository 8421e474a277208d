// A server-streaming reactor fed from other threads (an engine, a router's runner):
// Send queues a message, End sets the final status; gRPC writes the messages one at a
// time, in order, and the call finishes once all are written (CANCELLED instead if the
// client went away). Finish is called exactly once and never while a write is in
// flight; after End the producer must not touch the reactor (gRPC may then call OnDone,
// where the subclass deletes itself).
#pragma once

#include <deque>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"

namespace kvrelay::rpc {

template <typename Msg>
class QueuedWriteReactor : public grpc::ServerWriteReactor<Msg> {
 public:
  void Send(Msg m) {
    {
      absl::MutexLock l(&write_mu_);
      queue_.push_back(std::move(m));
    }
    Pump();
  }

  // The first status given wins.
  void End(grpc::Status status) {
    {
      absl::MutexLock l(&write_mu_);
      if (!final_) final_ = std::move(status);
    }
    Pump();
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock l(&write_mu_);
      queue_.pop_front();
      writing_ = false;
      if (!ok) broken_ = true;  // the client is gone: OnCancel follows
    }
    Pump();
  }

 private:
  void Pump() {
    const Msg* next = nullptr;
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock l(&write_mu_);
      if (writing_ || finishing_) return;
      if (!queue_.empty() && !broken_) {
        writing_ = true;
        next = &queue_.front();
      } else if (final_) {
        finishing_ = true;
        finish = broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away") : *final_;
      }
    }
    if (next != nullptr) {
      this->StartWrite(next);
    } else if (finish) {
      this->Finish(*finish);  // last use of `this`
    }
  }

  absl::Mutex write_mu_;
  std::deque<Msg> queue_ ABSL_GUARDED_BY(write_mu_);  // front: being written
  bool writing_ ABSL_GUARDED_BY(write_mu_) = false;
  bool broken_ ABSL_GUARDED_BY(write_mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(write_mu_) = false;
  std::optional<grpc::Status> final_ ABSL_GUARDED_BY(write_mu_);
};

}  // namespace kvrelay::rpc
