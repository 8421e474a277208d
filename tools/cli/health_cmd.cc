// `kvrelay health --server HOST:PORT [--service NAME]`: grpc.health.v1.Health/Check.
// Exit 0 when SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable), 2 for
// bad flags. The messages are encoded by hand (one string / one enum field): the
// health proto's C++ classes are not part of the gRPC packages.
#include <chrono>
#include <ostream>
#include <string>

#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "tools/cli/args.h"
#include "tools/cli/cli.h"
#include "tools/cli/client_tls.h"

namespace kvrelay::cli {
namespace {

// HealthCheckRequest{service}: field 1, length-delimited.
std::string EncodeRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;
  out.push_back(0x0a);
  size_t n = service.size();
  while (n >= 0x80) {
    out.push_back(static_cast<char>((n & 0x7f) | 0x80));
    n >>= 7;
  }
  out.push_back(static_cast<char>(n));
  return out + service;
}

// HealthCheckResponse{status}: its only field, 1 (varint, values 0..3: one byte), is
// the whole message when set; absent (empty message): 0, UNKNOWN.
int DecodeStatus(const std::string& bytes) {
  if (bytes.size() == 2 && bytes[0] == 0x08) return static_cast<unsigned char>(bytes[1]);
  return 0;
}

const char* StatusName(int s) {
  switch (s) {
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
    default:
      return "UNKNOWN";
  }
}

}  // namespace

int RunHealth(int argc, char** argv, std::ostream& out, std::ostream& err) {
  Args args;
  args.Flag("server", Args::Kind::kString, "HOST:PORT of a kvrelay process (required)")
      .Flag("service", Args::Kind::kString,
            "the service to ask about, e.g. kvrelay.v1.Generation (default: the server)")
      .Flag("timeout-seconds", Args::Kind::kFloat, "give up after this long (default 5)")
      .Flag("help", Args::Kind::kBool, "this text");
  DeclareClientTlsFlags(args);
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok()) {
    err << "kvrelay health: " << s.message() << "\n";
    return 2;
  }
  if (args.GetBool("help")) {
    out << "usage: kvrelay health --server HOST:PORT [--service NAME] [--tls-ca CA ...]\n"
           "Asks grpc.health.v1.Health; exit 0 when SERVING, else 1.\n"
        << args.Help();
    return 0;
  }
  const std::string server = args.GetString("server", "");
  if (server.empty()) {
    err << "kvrelay health: --server HOST:PORT is required\n";
    return 2;
  }
  const double timeout = args.GetFloat("timeout-seconds", 5);
  if (!(timeout > 0)) {
    err << "kvrelay health: --timeout-seconds must be > 0\n";
    return 2;
  }
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = ClientChannel(args, server);
  if (!channel.ok()) {
    err << "kvrelay health: " << channel.status().message() << "\n";
    return 2;
  }
  grpc::GenericStub stub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::microseconds(static_cast<int64_t>(timeout * 1e6)));
  const std::string body = EncodeRequest(args.GetString("service", ""));
  grpc::Slice slice(body);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) {
    err << "kvrelay health: " << server << ": " << status.error_message() << "\n";
    return 1;
  }
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices)
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  const int serving = DecodeStatus(bytes);
  out << StatusName(serving) << "\n";
  return serving == 1 ? 0 : 1;
}

}  // namespace kvrelay::cli
