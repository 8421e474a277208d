#include "common/process/worker_flags.h"

#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, router);
ABSL_DECLARE_FLAG(double, router_resolve_seconds);
ABSL_DECLARE_FLAG(int64_t, kv_blocks);
ABSL_DECLARE_FLAG(std::string, kv_dtype);
ABSL_DECLARE_FLAG(std::string, advertise_host);

namespace kvrelay::process {
namespace {

using ::testing::HasSubstr;

TEST(WorkerFlagsTest, FillsTheSharedOptions) {
  absl::SetFlag(&FLAGS_model, std::string("/models/tiny"));
  absl::SetFlag(&FLAGS_router, std::string("10.0.0.1:50051,dns:///router:50051"));
  absl::SetFlag(&FLAGS_kv_blocks, int64_t{321});
  absl::SetFlag(&FLAGS_kv_dtype, std::string("bf16"));
  absl::SetFlag(&FLAGS_advertise_host, std::string("10.0.0.9"));
  Process p;
  p.metrics = std::make_shared<prometheus::Registry>();
  absl::StatusOr<rpc::Security> token = rpc::Security::FromPem("", "", "", false, "", "the-token");
  ASSERT_TRUE(token.ok());
  p.security = *token;
  worker::WorkerOptions o;
  ASSERT_TRUE(ApplyWorkerFlags(p, o).ok());
  EXPECT_EQ(o.model_dir, "/models/tiny");
  EXPECT_EQ(o.listen, "127.0.0.1:0");  // the default
  EXPECT_EQ(o.kv.kv_blocks, 321);
  EXPECT_EQ(o.kv.kv_dtype, "bf16");
  EXPECT_EQ(o.kv.block_size, 16);
  EXPECT_EQ(o.registry.routers,
            (std::vector<std::string>{"10.0.0.1:50051", "dns:///router:50051"}));
  EXPECT_EQ(o.registry.advertise_host, "10.0.0.9");
  EXPECT_EQ(o.metrics, p.metrics);
  EXPECT_TRUE(o.security.has_token());
}

TEST(WorkerFlagsTest, BadValuesNameTheFlag) {
  Process p;
  worker::WorkerOptions o;
  absl::SetFlag(&FLAGS_router, std::string("no-port"));
  absl::Status s = ApplyWorkerFlags(p, o);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(s.message(), HasSubstr("--router"));
  absl::SetFlag(&FLAGS_router, std::string());
  absl::SetFlag(&FLAGS_router_resolve_seconds, 0.0);
  s = ApplyWorkerFlags(p, o);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(s.message(), HasSubstr("--router_resolve_seconds must be > 0"));
  absl::SetFlag(&FLAGS_router_resolve_seconds, 10.0);
}

}  // namespace
}  // namespace kvrelay::process
