#include "decode_worker/prefill_client.h"

#include <chrono>
#include <utility>

#include "common/rpc/convert.h"
#include "common/rpc/keepalive.h"
#include "grpcpp/create_channel.h"

namespace kvrelay::decode {
namespace {

std::chrono::system_clock::time_point Deadline(absl::Duration timeout) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(absl::ToInt64Microseconds(timeout));
}

}  // namespace

v1::PrefillWorker::Stub* PrefillClient::Stub(const std::string& address) {
  absl::MutexLock l(&mu_);
  auto& stub = stubs_[address];
  if (stub == nullptr) {
    stub = v1::PrefillWorker::NewStub(rpc::CreateInternalChannel(address, security_));
  }
  return stub.get();
}

void PrefillClient::Prefill(const std::string& address, v1::PrefillRequest request,
                            absl::Duration timeout, PrefillDone done) {
  struct Call {
    grpc::ClientContext ctx;
    v1::PrefillRequest request;
    v1::PrefillResponse response;
    PrefillDone done;
  };
  auto* call = new Call();
  call->request = std::move(request);
  call->done = std::move(done);
  call->ctx.set_deadline(Deadline(timeout));
  Stub(address)->async()->Prefill(&call->ctx, &call->request, &call->response,
                                  [call](grpc::Status s) {
                                    call->done(rpc::FromGrpc(s), call->response);
                                    delete call;
                                  });
}

void PrefillClient::Abort(const std::string& address, const std::string& request_id,
                          uint64_t lease_generation, absl::Duration timeout, AbortDone done) {
  struct Call {
    grpc::ClientContext ctx;
    v1::AbortRequest request;
    v1::AbortResponse response;
    AbortDone done;
  };
  auto* call = new Call();
  call->request.set_request_id(request_id);
  call->request.set_lease_generation(lease_generation);
  call->done = std::move(done);
  call->ctx.set_deadline(Deadline(timeout));
  Stub(address)->async()->Abort(&call->ctx, &call->request, &call->response,
                                [call](grpc::Status s) {
                                  call->done(rpc::FromGrpc(s), call->response.found());
                                  delete call;
                                });
}

bool PeerIsGone(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable &&
         status.message().find("Connection refused") != absl::string_view::npos;
}

}  // namespace kvrelay::decode
