// `kvrelay health` against an in-process server with mutual TLS (what the Helm chart's
// exec probes do when TLS is on).
#include <sstream>
#include <string>
#include <vector>

#include "common/rpc/pki.h"
#include "common/rpc/server.h"
#include "gmock/gmock.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "tests/testing/temp_dir.h"
#include "tools/cli/cli.h"

namespace kvrelay::cli {
namespace {

using ::testing::HasSubstr;

int Health(std::vector<std::string> argv, std::string* out, std::string* err) {
  argv.insert(argv.begin(), {"kvrelay", "health"});
  std::vector<char*> p;
  for (auto& s : argv) p.push_back(s.data());
  std::ostringstream o, e;
  const int rc = RunCli(static_cast<int>(p.size()), p.data(), o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(HealthCmdTest, AsksTheHealthServiceOverMutualTls) {
  testing::ScopedTempDir dir;
  ASSERT_TRUE(rpc::WriteLocalPki(dir.path()).ok());
  absl::StatusOr<rpc::Security> security = rpc::Security::Load(
      {dir.File("node.crt"), dir.File("node.key"), dir.File("ca.crt"), true, "", ""});
  ASSERT_TRUE(security.ok()) << security.status();
  v1::Registry::CallbackService service;
  rpc::ServerSpec spec;
  spec.listen = "127.0.0.1:0";
  spec.security = *security;
  spec.services = {&service};
  int port = 0;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = rpc::StartServer(spec, &port);
  ASSERT_TRUE(server.ok()) << server.status();
  (*server)->GetHealthCheckService()->SetServingStatus("kvrelay.v1.Registry", false);
  const std::string address = "127.0.0.1:" + std::to_string(port);
  const std::vector<std::string> tls = {"--tls-ca",   dir.File("ca.crt"),
                                        "--tls-cert", dir.File("node.crt"),
                                        "--tls-key",  dir.File("node.key")};
  auto with_tls = [&](std::vector<std::string> a) {
    a.insert(a.end(), tls.begin(), tls.end());
    return a;
  };
  std::string out, err;
  EXPECT_EQ(Health(with_tls({"--server", address}), &out, &err), 0) << err;
  EXPECT_EQ(out, "SERVING\n");
  EXPECT_EQ(Health(with_tls({"--server", address, "--service", "kvrelay.v1.Registry"}), &out, &err),
            1);
  EXPECT_EQ(out, "NOT_SERVING\n");
  EXPECT_EQ(Health(with_tls({"--server", address, "--service", "no.such.Service"}), &out, &err), 1);
  // No client certificate: the mTLS handshake fails; plaintext likewise.
  EXPECT_EQ(Health({"--server", address, "--tls-ca", dir.File("ca.crt"), "--timeout-seconds", "5"},
                   &out, &err),
            1);
  EXPECT_EQ(Health({"--server", address, "--timeout-seconds", "5"}, &out, &err), 1);
  (*server)->Shutdown(std::chrono::system_clock::now());
}

TEST(HealthCmdTest, BadFlagsAreUsageErrors) {
  std::string out, err;
  EXPECT_EQ(Health({}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--server HOST:PORT is required"));
  EXPECT_EQ(Health({"--server", "127.0.0.1:1", "--timeout-seconds", "0"}, &out, &err), 2);
  EXPECT_EQ(Health({"--server", "127.0.0.1:1", "--tls-cert", "/x.crt"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--tls-cert and --tls-key go together"));
}

}  // namespace
}  // namespace kvrelay::cli
