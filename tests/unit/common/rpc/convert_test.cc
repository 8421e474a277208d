#include "common/rpc/convert.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::rpc {
namespace {

using ::testing::HasSubstr;

TEST(ConvertTest, SamplingDefaultsAndFields) {
  v1::SamplingParams p;
  auto s = FromProto(p);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->max_tokens, 16);
  EXPECT_EQ(s->top_p, 1.0f);
  EXPECT_EQ(s->repetition_penalty, 1.0f);
  EXPECT_EQ(s->temperature, 0.0f);
  p.set_max_tokens(7);
  p.set_temperature(0.5f);
  p.set_top_k(40);
  p.set_top_p(0.9f);
  p.set_min_p(0.05f);
  p.set_repetition_penalty(1.1f);
  p.set_frequency_penalty(0.5f);
  p.set_presence_penalty(-0.5f);
  p.set_seed(99);
  p.add_stop_token_ids(3);
  p.set_ignore_eos(true);
  p.set_logprobs(2);
  s = FromProto(p);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->max_tokens, 7);
  EXPECT_EQ(s->temperature, 0.5f);
  EXPECT_EQ(s->top_k, 40);
  EXPECT_EQ(s->top_p, 0.9f);
  EXPECT_EQ(s->min_p, 0.05f);
  EXPECT_EQ(s->repetition_penalty, 1.1f);
  EXPECT_EQ(s->frequency_penalty, 0.5f);
  EXPECT_EQ(s->presence_penalty, -0.5f);
  EXPECT_EQ(s->seed, 99u);
  EXPECT_EQ(s->stop_token_ids, std::vector<int32_t>{3});
  EXPECT_TRUE(s->ignore_eos);
  EXPECT_EQ(s->logprobs, 2);
  // And back.
  auto again = FromProto(ToProto(*s));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->seed, 99u);
  EXPECT_EQ(again->top_p, 0.9f);
  EXPECT_EQ(again->repetition_penalty, 1.1f);
  EXPECT_EQ(again->stop_token_ids, s->stop_token_ids);
  EXPECT_EQ(again->max_tokens, 7);
}

TEST(ConvertTest, BadSamplingNamesTheField) {
  struct Case {
    std::function<void(v1::SamplingParams*)> set;
    std::string want;
  };
  for (const Case& c : std::vector<Case>{
           {[](v1::SamplingParams* p) { p->set_temperature(-1); }, "sampling.temperature"},
           {[](v1::SamplingParams* p) { p->set_top_p(0); }, "sampling.top_p"},
           {[](v1::SamplingParams* p) { p->set_min_p(2); }, "sampling.min_p"},
           {[](v1::SamplingParams* p) { p->set_repetition_penalty(0); },
            "sampling.repetition_penalty"},
           {[](v1::SamplingParams* p) { p->set_frequency_penalty(3); },
            "sampling.frequency_penalty"},
           {[](v1::SamplingParams* p) { p->set_logprobs(21); }, "sampling.logprobs"},
           {[](v1::SamplingParams* p) { p->set_logprobs(1u << 31); }, "sampling.logprobs"},
           {[](v1::SamplingParams* p) { p->set_max_tokens(1u << 31); }, "sampling.max_tokens"},
           {[](v1::SamplingParams* p) { p->set_top_k(-2); }, "sampling.top_k"},
           {[](v1::SamplingParams* p) { p->add_stop_token_ids(-1); }, "sampling.stop_token_ids[0]"},
       }) {
    v1::SamplingParams p;
    c.set(&p);
    auto s = FromProto(p);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << c.want;
    EXPECT_THAT(s.status().message(), HasSubstr(c.want));
  }
}

TEST(ConvertTest, PrefillModeNames) {
  EXPECT_STREQ(PrefillModeName(v1::PREFILL_MODE_LOCAL), "local");
  EXPECT_STREQ(PrefillModeName(v1::PREFILL_MODE_REMOTE), "remote");
  EXPECT_STREQ(PrefillModeName(v1::PREFILL_MODE_UNSPECIFIED), "");
}

TEST(ConvertTest, RefusalOfALiveCallKeepsItsCode) {
  // (A cancelled call ends CANCELLED: that needs a real call, see the process tests.)
  grpc::ServerContext live;
  const grpc::Status s = RefusalStatus(live, absl::InvalidArgumentError("prompt: required"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "prompt: required");
}

TEST(ConvertTest, TokenLogprobs) {
  sampling::SampleResult r;
  r.token = 5;
  r.logprob = -0.25f;
  r.top_logprobs = {{5, -0.25f}, {9, -2.0f}};
  v1::TokenLogprobs p;
  ToProto(r, &p);
  EXPECT_EQ(p.token_id(), 5);
  EXPECT_EQ(p.logprob(), -0.25f);
  ASSERT_EQ(p.top_size(), 2);
  EXPECT_EQ(p.top(1).token_id(), 9);
  EXPECT_EQ(p.top(1).logprob(), -2.0f);
  const sampling::SampleResult back = FromProto(p);
  EXPECT_EQ(back.token, 5);
  EXPECT_EQ(back.top_logprobs, r.top_logprobs);
}

TEST(ConvertTest, DescriptorRoundTripAndValidation) {
  transfer::PoolDescriptor d;
  d.transport = "ucx";
  d.peer_address = std::string("addr\0bytes", 10);
  d.rkey = "rk";
  d.base_address = 0x1000;
  d.bytes = 4096 * 8;
  d.memory_type = transfer::MemoryType::kCuda;
  d.block_bytes = 4096;
  d.num_blocks = 8;
  auto back = FromProto(ToProto(d), "destination");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->peer_address, d.peer_address);
  EXPECT_EQ(back->rkey, d.rkey);
  EXPECT_EQ(back->base_address, d.base_address);
  EXPECT_EQ(back->memory_type, transfer::MemoryType::kCuda);
  EXPECT_EQ(back->num_blocks, 8);
  v1::KvPoolDescriptor p = ToProto(d);
  p.set_num_blocks(9);
  EXPECT_THAT(FromProto(p, "destination").status().message(), HasSubstr("destination.bytes"));
  p = ToProto(d);
  p.clear_peer_address();
  EXPECT_THAT(FromProto(p, "destination").status().message(),
              HasSubstr("destination.peer_address is required"));
  p = ToProto(d);
  p.set_block_bytes(0);
  EXPECT_EQ(FromProto(p, "d").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConvertTest, StatusKeepsCodeAndMessage) {
  const absl::Status s = absl::InvalidArgumentError("prompt is empty");
  const grpc::Status g = ToGrpc(s);
  EXPECT_EQ(g.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(g.error_message(), "prompt is empty");
  EXPECT_EQ(FromGrpc(g), s);
  EXPECT_TRUE(ToGrpc(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpc(grpc::Status::OK).ok());
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::UNAVAILABLE, "x")).code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
TEST(ConvertTest, FirstInvalidUtf8) {
  EXPECT_EQ(FirstInvalidUtf8(""), -1);
  EXPECT_EQ(FirstInvalidUtf8("plain ascii"), -1);
  EXPECT_EQ(FirstInvalidUtf8("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"), -1);  // é € 😀
  EXPECT_EQ(FirstInvalidUtf8("ab\xff"), 2);
  EXPECT_EQ(FirstInvalidUtf8("a\x80"), 1);              // a lone continuation byte
  EXPECT_EQ(FirstInvalidUtf8("ab\xc3"), 2);             // truncated
  EXPECT_EQ(FirstInvalidUtf8("\xc3("), 0);              // bad continuation
  EXPECT_EQ(FirstInvalidUtf8("x\xc0\xaf"), 1);          // overlong '/'
  EXPECT_EQ(FirstInvalidUtf8("\xe0\x80\xaf"), 0);       // overlong, 3 bytes
  EXPECT_EQ(FirstInvalidUtf8("\xed\xa0\x80"), 0);       // surrogate U+D800
  EXPECT_EQ(FirstInvalidUtf8("\xf4\x90\x80\x80"), 0);   // above U+10FFFF
  EXPECT_EQ(FirstInvalidUtf8("\xf4\x8f\xbf\xbf"), -1);  // U+10FFFF
  EXPECT_EQ(FirstInvalidUtf8(std::string("a\0b", 3)), -1);
}

TEST(ConvertTest, FindInvalidUtf8NamesTheField) {
  const auto* type = v1::SamplingParams::descriptor();
  v1::SamplingParams p;
  p.add_stop("fine");
  p.add_stop("bad\xff");
  std::string wire;
  ASSERT_TRUE(p.SerializePartialToString(&wire));
  EXPECT_EQ(FindInvalidUtf8(wire, type),
            "field 'stop[1]' is not valid UTF-8 (byte offset 3 of its value)");
  // Valid text, malformed bytes, no type: nothing found.
  p.set_stop(1, "good");
  ASSERT_TRUE(p.SerializePartialToString(&wire));
  EXPECT_EQ(FindInvalidUtf8(wire, type), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8(std::string("\x12\x7f", 2), type), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8(wire, nullptr), std::nullopt);
}

}  // namespace kvrelay::rpc
