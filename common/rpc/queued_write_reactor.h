// A server-streaming reactor fed from other threads (an engine, a router's runner):
// Send queues a message, End sets the final status; gRPC writes the messages one at a
// time, in order, and the call finishes once all are written (CANCELLED instead if the
// client went away). Finish is called exactly once and never while a write is in
// flight. Every state change and the decision it leads to happen in one critical
// section, and only StartWrite or Finish follow it outside the lock: once a thread has
// decided to Finish, no other thread touches the reactor, so gRPC may delete it (OnDone)
// as soon as Finish is called. The producer must not touch the reactor after End.
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
    Action a;
    {
      absl::MutexLock l(&write_mu_);
      queue_.push_back(std::move(m));
      a = NextLocked();
    }
    Run(a);
  }

  // The first status given wins.
  void End(grpc::Status status) {
    Action a;
    {
      absl::MutexLock l(&write_mu_);
      if (!final_) final_ = std::move(status);
      a = NextLocked();
    }
    Run(a);  // may Finish: `this` may be gone after it
  }

  void OnWriteDone(bool ok) override {
    Action a;
    {
      absl::MutexLock l(&write_mu_);
      queue_.pop_front();
      writing_ = false;
      if (!ok) broken_ = true;  // the client is gone: OnCancel follows
      a = NextLocked();
    }
    Run(a);
  }

 private:
  struct Action {
    const Msg* write = nullptr;
    std::optional<grpc::Status> finish;
  };

  Action NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_) {
    Action a;
    if (writing_ || finishing_) return a;
    if (!queue_.empty() && !broken_) {
      writing_ = true;  // nobody finishes while this write is in flight
      a.write = &queue_.front();
    } else if (final_) {
      finishing_ = true;  // nobody else touches the reactor from now on
      a.finish = broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away") : *final_;
    }
    return a;
  }

  void Run(const Action& a) {
    if (a.write != nullptr) {
      this->StartWrite(a.write);
    } else if (a.finish) {
      this->Finish(*a.finish);  // last use of `this`
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
