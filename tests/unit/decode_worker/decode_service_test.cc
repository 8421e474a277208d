#include "decode_worker/decode_service.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::decode {
namespace {

using ::testing::HasSubstr;

v1::DecodeRequest Good() {
  v1::DecodeRequest r;
  r.set_request_id("r1");
  r.add_prompt_token_ids(1);
  r.add_prompt_token_ids(2);
  r.mutable_sampling()->set_max_tokens(3);
  r.mutable_sampling()->set_temperature(0.7f);
  r.set_cache_salt("tenant");
  return r;
}

TEST(DecodeServiceTest, RequestConversion) {
  auto r = FromProto(Good());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->id, "r1");
  EXPECT_EQ(r->prompt, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(r->params.max_tokens, 3);
  EXPECT_EQ(r->params.temperature, 0.7f);
  EXPECT_EQ(r->cache_salt, "tenant");
  v1::DecodeRequest local = Good();
  local.mutable_plan()->set_mode(v1::PREFILL_MODE_LOCAL);
  EXPECT_TRUE(FromProto(local).ok());
}

TEST(DecodeServiceTest, BadRequestsNameTheField) {
  v1::DecodeRequest r = Good();
  r.clear_request_id();
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("request_id is required"));
  r = Good();
  r.clear_prompt_token_ids();
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("prompt_token_ids is empty"));
  r = Good();
  r.mutable_sampling()->set_temperature(-2);
  EXPECT_EQ(FromProto(r).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("sampling.temperature"));
  r = Good();
  r.mutable_plan()->set_mode(static_cast<v1::PrefillMode>(42));
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("plan.mode"));
  r = Good();
  r.mutable_plan()->set_mode(v1::PREFILL_MODE_REMOTE);
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("plan.prefill_address is required"));
  r.mutable_plan()->set_prefill_address("127.0.0.1:5");
  auto remote = FromProto(r);
  ASSERT_TRUE(remote.ok());
  EXPECT_EQ(remote->prefill_address, "127.0.0.1:5");
}

}  // namespace
}  // namespace kvrelay::decode
