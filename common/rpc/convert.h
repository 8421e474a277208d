// Proto <-> domain conversions for the worker API (DESIGN §2: common/rpc), with the
// validation every RPC applies: a bad field is INVALID_ARGUMENT naming the field.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/sampling/sampler.h"
#include "common/transfer/kv_transport.h"
#include "google/protobuf/descriptor.h"
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

// Serialized `bytes` of a message of type `type` that protobuf refused to parse: the
// first string field (nested messages included) whose value is not valid UTF-8, as
// "field 'chat.messages[1].content' is not valid UTF-8 (byte offset 3 of its value)";
// nullopt when no such field is found (the bytes are malformed otherwise).
std::optional<std::string> FindInvalidUtf8(absl::string_view bytes,
                                           const google::protobuf::Descriptor* type);

// The offset of the first byte of `s` that is not part of a valid UTF-8 sequence
// (overlong forms, surrogates and code points above U+10FFFF are invalid), or -1.
int64_t FirstInvalidUtf8(absl::string_view s);

// "local" | "remote" (the names clients print), "" when unspecified.
const char* PrefillModeName(v1::PrefillMode mode);

// The same code and message.
grpc::Status ToGrpc(const absl::Status& s);
// How a server ends a call whose request it refuses with `s`: as ToGrpc, except that a
// call the client has already cancelled ends CANCELLED: answering it with the validation
// error would count an ordinary cancellation as a bad request.
grpc::Status RefusalStatus(const grpc::ServerContextBase& context, const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s);

}  // namespace kvrelay::rpc
