// Proto <-> domain conversions for the worker API (DESIGN §2: common/rpc), with the
// validation every RPC applies: a bad field is INVALID_ARGUMENT naming the field.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/sampling/sampler.h"
#include "common/transfer/kv_transport.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/status.h"
#include "kvrelay/v1/common.pb.h"
#include "kvrelay/v1/worker.pb.h"

namespace kvrelay::rpc {

// Proto sampling parameters with their defaults applied (max_tokens 0 -> 16, top_p and
// repetition_penalty unset -> 1), validated: INVALID_ARGUMENT "sampling.<field> ...".
absl::StatusOr<sampling::SamplingParams> FromProto(const v1::SamplingParams& p);

// The inverse (for requests a worker forwards).
v1::SamplingParams ToProto(const sampling::SamplingParams& p);

// One sampled token as TokenLogprobs (top entries only when the request asked for them).
void ToProto(const sampling::SampleResult& s, v1::TokenLogprobs* out);

sampling::SampleResult FromProto(const v1::TokenLogprobs& p);

v1::KvPoolDescriptor ToProto(const transfer::PoolDescriptor& d);
// INVALID_ARGUMENT "<field_name>.<field> ..." for an incomplete descriptor.
absl::StatusOr<transfer::PoolDescriptor> FromProto(const v1::KvPoolDescriptor& d,
                                                   absl::string_view field_name);

// "local" | "remote" (the names clients print), "" when unspecified.
const char* PrefillModeName(v1::PrefillMode mode);

// The same code and message.
grpc::Status ToGrpc(const absl::Status& s);
// How a server ends a call whose request it refuses with `s`: as ToGrpc, except that a
// call the client has already cancelled ends CANCELLED. A client that cancels right after
// sending leaves the handler an empty or partial request; answering that with the
// validation error would count an ordinary cancellation as a bad request.
grpc::Status RefusalStatus(const grpc::ServerContextBase& context, const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s);

}  // namespace kvrelay::rpc
