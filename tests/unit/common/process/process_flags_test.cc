#include "common/process/process_flags.h"

#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "common/rpc/pki.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

ABSL_DECLARE_FLAG(std::string, tls_cert);
ABSL_DECLARE_FLAG(std::string, tls_key);
ABSL_DECLARE_FLAG(std::string, tls_ca);
ABSL_DECLARE_FLAG(bool, tls_require_client_cert);
ABSL_DECLARE_FLAG(std::string, cluster_token_file);

namespace kvrelay::process {
namespace {

using ::testing::HasSubstr;

TEST(ProcessFlagsTest, NoSecurityFlagsMeanPlaintext) {
  absl::StatusOr<rpc::Security> s = SecurityFromFlags();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->Describe(), "tls=off mtls=off cluster_token=off");
}

TEST(ProcessFlagsTest, SecurityFlagsLoadTheFiles) {
  testing::ScopedTempDir dir;
  ASSERT_TRUE(rpc::WriteLocalPki(dir.path()).ok());
  absl::SetFlag(&FLAGS_tls_cert, dir.File("node.crt"));
  absl::SetFlag(&FLAGS_tls_key, dir.File("node.key"));
  absl::SetFlag(&FLAGS_tls_ca, dir.File("ca.crt"));
  absl::SetFlag(&FLAGS_tls_require_client_cert, true);
  absl::SetFlag(&FLAGS_cluster_token_file, dir.File("cluster-token"));
  absl::StatusOr<rpc::Security> s = SecurityFromFlags();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->Describe(), "tls=on mtls=on cluster_token=on");

  absl::SetFlag(&FLAGS_tls_key, std::string());  // a certificate without its key
  EXPECT_THAT(SecurityFromFlags().status().message(), HasSubstr("--tls_cert and --tls_key"));
  for (auto* f : {&FLAGS_tls_cert, &FLAGS_tls_ca, &FLAGS_cluster_token_file}) {
    absl::SetFlag(f, std::string());
  }
  absl::SetFlag(&FLAGS_tls_require_client_cert, false);
}

TEST(ProcessFlagsTest, FailedPrintsAndPicksTheExitCode) {
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(Failed("kvrelay-x", absl::InvalidArgumentError("--flag is bad")), 2);
  EXPECT_EQ(Failed("kvrelay-x", absl::NotFoundError("--model: no such folder")), 2);
  EXPECT_EQ(Failed("kvrelay-x", absl::UnavailableError("cannot listen")), 1);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(err, HasSubstr("kvrelay-x: INVALID_ARGUMENT: --flag is bad\n"));
  EXPECT_THAT(err, HasSubstr("kvrelay-x: UNAVAILABLE: cannot listen\n"));
}

}  // namespace
}  // namespace kvrelay::process
