// Request validation (issue 17): the OpenAI HTTP API's JSON bodies (both endpoints)
// and the public gRPC request's bytes (protobuf parse, sampling checks, the UTF-8
// locator the router uses for text protobuf refused).
#include <cstdint>
#include <string>
#include <variant>

#include "common/rpc/convert.h"
#include "kvrelay/v1/kvrelay.pb.h"
#include "router/openai_api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvrelay::router::openai::Kind;
  const std::string in(reinterpret_cast<const char*>(data), size);
  for (Kind kind : {Kind::kCompletion, Kind::kChat}) {
    auto r = kvrelay::router::openai::ParseRequest(kind, in);
    if (auto* req = std::get_if<kvrelay::router::openai::Request>(&r)) {
      for (const kvrelay::v1::GenerateRequest& g : req->prompts) {
        (void)kvrelay::rpc::FromProto(g.sampling());
      }
    } else {
      (void)kvrelay::router::openai::ErrorJson(std::get<kvrelay::router::openai::Error>(r));
    }
  }
  kvrelay::v1::GenerateRequest g;
  if (g.ParseFromString(in)) {
    (void)kvrelay::rpc::FromProto(g.sampling());
  } else {
    (void)kvrelay::rpc::FindInvalidUtf8(in, kvrelay::v1::GenerateRequest::descriptor());
  }
  (void)kvrelay::rpc::FirstInvalidUtf8(in);
  return 0;
}
