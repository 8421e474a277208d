#include "tools/cli/client_tls.h"

#include <string>
#include <vector>

#include "common/rpc/pki.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::cli {
namespace {

absl::StatusOr<std::shared_ptr<grpc::Channel>> Channel(std::vector<std::string> argv) {
  argv.insert(argv.begin(), {"kvrelay", "x"});
  std::vector<char*> p;
  for (auto& s : argv) p.push_back(s.data());
  Args args;
  DeclareClientTlsFlags(args);
  if (absl::Status s = args.Parse(static_cast<int>(p.size()), p.data(), 2); !s.ok()) return s;
  return ClientChannel(args, "127.0.0.1:1");
}

TEST(ClientTlsTest, PlaintextWithoutFlagsTlsWithACa) {
  EXPECT_TRUE(Channel({}).ok());
  testing::ScopedTempDir dir;
  ASSERT_TRUE(rpc::WriteLocalPki(dir.path()).ok());
  EXPECT_TRUE(Channel({"--tls-ca", dir.File("ca.crt"), "--tls-server-name", "localhost"}).ok());
}

TEST(ClientTlsTest, ABadCaFileNamesTheFlag) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> c = Channel({"--tls-ca", "/nonexistent/ca.crt"});
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsNotFound(c.status()));
  EXPECT_THAT(c.status().message(), ::testing::HasSubstr("--tls-ca: cannot read"));
  testing::ScopedTempDir dir;
  ASSERT_TRUE(rpc::WriteLocalPki(dir.path()).ok());
  c = Channel({"--tls-ca", dir.File("node.key")});  // a key, not a certificate
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(c.status()));
  EXPECT_THAT(c.status().message(), ::testing::HasSubstr("--tls-ca"));
}

}  // namespace
}  // namespace kvrelay::cli
