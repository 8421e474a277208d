// A test client of a decode worker's DecodeWorker.Generate (integration tests that drive
// workers directly, without a router), and the KV geometry of the tiny test model.
// Header-only: the tests that use it already link gRPC and the protos.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "tests/testing/test_models.h"

namespace kvrelay::testing {

// What one Generate call returned: its status, every token, the last usage.
struct DecodeReply {
  grpc::Status status;
  std::vector<int32_t> tokens;
  v1::DecodeUsage usage;
};

inline DecodeReply DecodeGenerate(v1::DecodeWorker::Stub& stub, const v1::DecodeRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  DecodeReply out;
  auto reader = stub.Generate(&ctx, req);
  v1::DecodeResponse m;
  while (reader->Read(&m)) {
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.has_usage()) out.usage = m.usage();
  }
  out.status = reader->Finish();
  return out;
}

// Bytes of one f32 KV block of `block_size` tokens of the first tiny test model.
inline uint64_t TinyBlockBytes(int block_size = 16) {
  return LoadedModel(TinyVariants()[0]).KvLayout(kernels::DType::kF32, block_size).block_bytes();
}

}  // namespace kvrelay::testing
