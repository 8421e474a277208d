#include "prefill_worker/prefill_service.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::prefill {
namespace {

using ::testing::HasSubstr;

v1::PrefillRequest Good() {
  v1::PrefillRequest r;
  r.set_request_id("r");
  r.add_prompt_token_ids(3);
  r.add_prompt_token_ids(4);
  r.mutable_sampling()->set_temperature(0.5f);
  r.set_cache_salt("s");
  v1::KvPoolDescriptor* d = r.mutable_destination();
  d->set_transport("ucx");
  d->set_peer_address("addr");
  d->set_block_bytes(64);
  d->set_num_blocks(4);
  d->set_bytes(256);
  r.set_first_block(0);
  r.add_destination_blocks(2);
  r.set_model_id("m");
  r.set_block_size(16);
  r.set_kv_dtype("f32");
  return r;
}

TEST(PrefillServiceTest, RequestConversion) {
  auto j = FromProto(Good());
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(j->id, "r");
  EXPECT_EQ(j->prompt, (std::vector<int32_t>{3, 4}));
  EXPECT_EQ(j->params.temperature, 0.5f);
  EXPECT_EQ(j->cache_salt, "s");
  EXPECT_EQ(j->destination.num_blocks, 4);
  EXPECT_EQ(j->destination_blocks, std::vector<int32_t>{2});
  EXPECT_EQ(j->model_id, "m");
  EXPECT_EQ(j->block_size, 16);
  EXPECT_EQ(j->kv_dtype, "f32");
}

TEST(PrefillServiceTest, BadRequestsNameTheField) {
  v1::PrefillRequest r = Good();
  r.clear_request_id();
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("request_id is required"));
  r = Good();
  r.clear_prompt_token_ids();
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("prompt_token_ids is empty"));
  r = Good();
  r.clear_destination();
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("destination is required"));
  r = Good();
  r.mutable_destination()->set_num_blocks(0);
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("destination.num_blocks"));
  r = Good();
  r.mutable_sampling()->set_min_p(3);
  EXPECT_THAT(FromProto(r).status().message(), HasSubstr("sampling.min_p"));
}

}  // namespace
}  // namespace kvrelay::prefill
