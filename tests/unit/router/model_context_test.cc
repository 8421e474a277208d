#include "router/model_context.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/tokenizer/chat_template.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::router {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

const testing::ModelVariant& Variant() {
  static const testing::ModelVariant* v = new testing::ModelVariant(testing::TinyVariants()[0]);
  return *v;
}

class ModelContextTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = ModelContext::Load(testing::ModelDir(Variant()), "tiny", 16, "");
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  const ModelContext& m() const { return *model_; }

  static v1::GenerateRequest Text(const std::string& prompt) {
    v1::GenerateRequest r;
    r.set_request_id("req-1");
    r.set_prompt(prompt);
    return r;
  }
  static v1::GenerateRequest Ids(const std::vector<int32_t>& ids) {
    v1::GenerateRequest r;
    r.set_request_id("req-1");
    r.mutable_token_ids();  // the input is token ids, even when there are none
    for (int32_t id : ids) r.mutable_token_ids()->add_ids(id);
    return r;
  }

  // Prepare must fail with INVALID_ARGUMENT and a message containing `what`.
  void ExpectInvalid(const v1::GenerateRequest& r, const std::string& what) {
    absl::StatusOr<PreparedRequest> p = Prepare(m(), r, "gen-id");
    ASSERT_FALSE(p.ok()) << "accepted: " << r.ShortDebugString();
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
    EXPECT_THAT(std::string(p.status().message()), HasSubstr(what));
  }

  static ModelContext* model_;
};

ModelContext* ModelContextTest::model_ = nullptr;

TEST_F(ModelContextTest, LoadReadsTheFolder) {
  EXPECT_EQ(m().model_id, "tiny");
  EXPECT_EQ(m().block_size, 16);
  EXPECT_EQ(m().config.vocab_size, Variant().options.vocab);
  EXPECT_EQ(m().config.max_position_embeddings, Variant().options.max_pos);
  ASSERT_NE(m().tokenizer, nullptr);
  auto detected = tokenizer::DetectChatFormat(testing::ModelDir(Variant()), *m().tokenizer);
  ASSERT_TRUE(detected.ok()) << detected.status();
  EXPECT_EQ(m().chat_format, *detected);

  // The model id defaults to the folder's name.
  auto unnamed = ModelContext::Load(testing::ModelDir(Variant()), "", 32, "");
  ASSERT_TRUE(unnamed.ok()) << unnamed.status();
  EXPECT_EQ((*unnamed)->model_id, Variant().name);
  EXPECT_EQ((*unnamed)->block_size, 32);

  auto chatml = ModelContext::Load(testing::ModelDir(Variant()), "tiny", 16, "chatml");
  ASSERT_TRUE(chatml.ok()) << chatml.status();
  EXPECT_EQ((*chatml)->chat_format, tokenizer::ChatFormat::kChatML);
}

TEST_F(ModelContextTest, LoadErrorsNameTheFlag) {
  const std::string dir = testing::ModelDir(Variant());
  auto r = ModelContext::Load("", "tiny", 16, "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--model"));
  for (int bad : {0, -1, 1025}) {
    r = ModelContext::Load(dir, "tiny", bad, "");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("--block_size")) << bad;
  }
  r = ModelContext::Load(dir, "tiny", 16, "no-such-format");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--chat_format"));
  r = ModelContext::Load(dir + "/does-not-exist", "tiny", 16, "");
  EXPECT_FALSE(r.ok());
}

TEST_F(ModelContextTest, GoodTextRequest) {
  v1::GenerateRequest r = Text("Once upon a time");
  r.set_model("tiny");
  r.set_cache_salt("tenant-a");
  r.mutable_sampling()->set_temperature(0.7f);
  r.mutable_sampling()->set_max_tokens(5);
  r.mutable_sampling()->add_stop("\n\n");
  r.mutable_sampling()->add_stop("END");
  r.mutable_sampling()->add_stop_token_ids(7);
  absl::StatusOr<PreparedRequest> p = Prepare(m(), r, "gen-id");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->id, "req-1");
  EXPECT_EQ(p->prompt, m().tokenizer->Encode("Once upon a time", true));
  ASSERT_FALSE(p->prompt.empty());
  if (m().tokenizer->bos_token_id().has_value()) {
    EXPECT_EQ(p->prompt[0], *m().tokenizer->bos_token_id());  // text gets the special tokens
  }
  EXPECT_EQ(p->cache_salt, "tenant-a");
  EXPECT_EQ(p->params.max_tokens, 5);
  EXPECT_FLOAT_EQ(p->params.temperature, 0.7f);
  EXPECT_EQ(p->params.top_p, 1.0f);  // defaults applied
  EXPECT_EQ(p->params.stop_token_ids, std::vector<int32_t>{7});
  EXPECT_EQ(p->stop, (std::vector<std::string>{"\n\n", "END"}));
  // Decode workers get the sampling parameters without the stop strings.
  EXPECT_EQ(p->forward.stop_size(), 0);
  EXPECT_EQ(p->forward.max_tokens(), 5u);
  EXPECT_FLOAT_EQ(p->forward.temperature(), 0.7f);
  ASSERT_EQ(p->forward.stop_token_ids_size(), 1);
  EXPECT_EQ(p->forward.stop_token_ids(0), 7);

  // Defaults: 16 tokens.
  p = Prepare(m(), Text("hello"), "gen-id");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->params.max_tokens, 16);
  EXPECT_TRUE(p->stop.empty());
}

TEST_F(ModelContextTest, UnknownModelIsNotFound) {
  v1::GenerateRequest r = Text("hello");
  r.set_model("gpt-17");
  absl::StatusOr<PreparedRequest> p = Prepare(m(), r, "gen-id");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound) << p.status();
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("gpt-17"));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("tiny"));
}

TEST_F(ModelContextTest, InputIsChecked) {
  v1::GenerateRequest r;
  r.set_request_id("x");
  ExpectInvalid(r, "input is required");

  ExpectInvalid(Text(""), "prompt is empty");
  // C++ protobuf lets bad bytes into a string field in memory.
  ExpectInvalid(Text(std::string("caf\xc3", 4)), "prompt is not valid UTF-8");
  ExpectInvalid(Text(std::string("a\xff"
                                 "b",
                                 3)),
                "prompt is not valid UTF-8");

  ExpectInvalid(Ids({}), "token_ids.ids is empty");
  const int32_t vocab = m().config.vocab_size;
  ExpectInvalid(Ids({1, 2, vocab}), "token_ids.ids[2]");
  ExpectInvalid(Ids({-1, 2}), "token_ids.ids[0]");
  absl::StatusOr<PreparedRequest> p = Prepare(m(), Ids({0, vocab - 1}), "gen-id");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->prompt, (std::vector<int32_t>{0, vocab - 1}));  // used as they are
}

TEST_F(ModelContextTest, PromptMustLeaveRoomInTheContext) {
  const int ctx = m().config.max_position_embeddings;
  ExpectInvalid(Ids(std::vector<int32_t>(ctx, 5)), "context length");
  ExpectInvalid(Ids(std::vector<int32_t>(ctx + 10, 5)), "context length");
  absl::StatusOr<PreparedRequest> p = Prepare(m(), Ids(std::vector<int32_t>(ctx - 1, 5)), "g");
  EXPECT_TRUE(p.ok()) << p.status();

  // The same for text, counted in tokens.
  std::string text;
  while (m().tokenizer->Encode(text, true).size() < static_cast<size_t>(ctx)) {
    text += "The quick brown fox jumps over the lazy dog. ";
  }
  ExpectInvalid(Text(text), "context length");
}

TEST_F(ModelContextTest, SamplingIsChecked) {
  v1::GenerateRequest r = Text("hi");
  r.mutable_sampling()->set_temperature(-0.5f);
  absl::StatusOr<PreparedRequest> p = Prepare(m(), r, "g");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), StartsWith("sampling."));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("temperature"));

  r = Text("hi");
  r.mutable_sampling()->set_top_p(1.5f);
  p = Prepare(m(), r, "g");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), StartsWith("sampling."));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("top_p"));

  r = Text("hi");
  r.mutable_sampling()->set_logprobs(21);
  p = Prepare(m(), r, "g");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), StartsWith("sampling."));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("logprobs"));
  r.mutable_sampling()->set_logprobs(20);
  EXPECT_TRUE(Prepare(m(), r, "g").ok());

  // Stop strings: validated, the index named.
  r = Text("hi");
  r.mutable_sampling()->add_stop("ok");
  r.mutable_sampling()->add_stop("");
  ExpectInvalid(r, "sampling.stop");
  ExpectInvalid(r, "stop[1]");
  r = Text("hi");
  r.mutable_sampling()->add_stop(std::string("\xff", 1));
  ExpectInvalid(r, "sampling.stop");

  // Stop token ids: inside the vocabulary.
  r = Text("hi");
  r.mutable_sampling()->add_stop_token_ids(3);
  r.mutable_sampling()->add_stop_token_ids(m().config.vocab_size);
  ExpectInvalid(r, "sampling.stop_token_ids[1]");
  r = Text("hi");
  r.mutable_sampling()->add_stop_token_ids(-1);
  ExpectInvalid(r, "sampling.stop_token_ids[0]");
}

TEST_F(ModelContextTest, RequestIdAndCacheSalt) {
  v1::GenerateRequest r = Text("hi");
  r.set_request_id(std::string(kMaxRequestIdBytes + 1, 'r'));
  ExpectInvalid(r, "request_id");
  r.set_request_id(std::string(kMaxRequestIdBytes, 'r'));
  absl::StatusOr<PreparedRequest> p = Prepare(m(), r, "g");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->id, std::string(kMaxRequestIdBytes, 'r'));

  r = Text("hi");
  r.set_cache_salt(std::string(kMaxCacheSaltBytes + 1, 's'));
  ExpectInvalid(r, "cache_salt");
  r.set_cache_salt(std::string(kMaxCacheSaltBytes, 's'));
  EXPECT_TRUE(Prepare(m(), r, "g").ok());

  r = Text("hi");
  r.clear_request_id();
  p = Prepare(m(), r, "router-7-42");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->id, "router-7-42");
}

std::vector<tokenizer::ChatMessage> Conversation() {
  return {{"system", "You are terse."}, {"user", "Name a colour."}};
}

v1::ChatMessages ToProto(const std::vector<tokenizer::ChatMessage>& msgs) {
  v1::ChatMessages c;
  for (const auto& msg : msgs) {
    v1::ChatMessage* p = c.add_messages();
    p->set_role(msg.role);
    p->set_content(msg.content);
  }
  return c;
}

std::vector<int32_t> Expected(const ModelContext& m,
                              const std::vector<tokenizer::ChatMessage>& msgs,
                              bool add_generation_prompt) {
  absl::StatusOr<std::string> text =
      tokenizer::RenderChat(m.chat_format, msgs, add_generation_prompt);
  EXPECT_TRUE(text.ok()) << text.status();
  if (!text.ok()) return {};
  return m.tokenizer->Encode(*text, tokenizer::AddSpecialTokensForChat(m.chat_format));
}

TEST_F(ModelContextTest, ChatIsRenderedWithTheModelsFormat) {
  std::unique_ptr<ModelContext> chatml;
  {
    auto c = ModelContext::Load(testing::ModelDir(Variant()), "tiny", 16, "chatml");
    ASSERT_TRUE(c.ok()) << c.status();
    chatml = *std::move(c);
  }
  for (const ModelContext* ctx : {&m(), static_cast<const ModelContext*>(chatml.get())}) {
    SCOPED_TRACE(tokenizer::ChatFormatName(ctx->chat_format));
    v1::GenerateRequest r;
    *r.mutable_chat() = ToProto(Conversation());
    absl::StatusOr<PreparedRequest> p = Prepare(*ctx, r, "g");
    ASSERT_TRUE(p.ok()) << p.status();
    // The last message is the user's: the assistant header is added by default.
    EXPECT_EQ(p->prompt, Expected(*ctx, Conversation(), true));

    r.mutable_chat()->set_add_generation_prompt(false);
    p = Prepare(*ctx, r, "g");
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->prompt, Expected(*ctx, Conversation(), false));

    // Ending with the assistant's message: continue it (no new header) by default.
    std::vector<tokenizer::ChatMessage> cont = Conversation();
    cont.push_back({"assistant", "Blue"});
    *r.mutable_chat() = ToProto(cont);
    p = Prepare(*ctx, r, "g");
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->prompt, Expected(*ctx, cont, false));

    // TokenizeInput renders the same.
    v1::TokenizeRequest t;
    *t.mutable_chat() = ToProto(Conversation());
    absl::StatusOr<std::vector<int32_t>> ids = TokenizeInput(*ctx, t);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, Expected(*ctx, Conversation(), true));
  }
  // The two formats differ, so the format really is the model's.
  v1::GenerateRequest r;
  *r.mutable_chat() = ToProto(Conversation());
  if (m().chat_format != tokenizer::ChatFormat::kChatML) {
    EXPECT_NE(Prepare(m(), r, "g")->prompt, Prepare(*chatml, r, "g")->prompt);
  }
}

TEST_F(ModelContextTest, BadChatIsInvalid) {
  v1::GenerateRequest r;
  r.mutable_chat();  // no messages
  ExpectInvalid(r, "chat");
  *r.mutable_chat() = ToProto({{"wizard", "hi"}});
  ExpectInvalid(r, "chat");
  *r.mutable_chat() = ToProto({{"user", std::string("\xc3(", 2)}});
  ExpectInvalid(r, "chat");
}

TEST_F(ModelContextTest, TokenizeInput) {
  const std::string text = "Hello there, general.";
  v1::TokenizeRequest t;
  t.set_prompt(text);
  absl::StatusOr<std::vector<int32_t>> with = TokenizeInput(m(), t);
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_EQ(*with, m().tokenizer->Encode(text, true));

  t.set_add_special_tokens(true);
  absl::StatusOr<std::vector<int32_t>> explicit_with = TokenizeInput(m(), t);
  ASSERT_TRUE(explicit_with.ok());
  EXPECT_EQ(*explicit_with, *with);

  t.set_add_special_tokens(false);
  absl::StatusOr<std::vector<int32_t>> without = TokenizeInput(m(), t);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_EQ(*without, m().tokenizer->Encode(text, false));
  ASSERT_TRUE(m().tokenizer->bos_token_id().has_value()) << "the fixture adds a BOS";
  EXPECT_EQ(with->size(), without->size() + 1);
  EXPECT_EQ((*with)[0], *m().tokenizer->bos_token_id());

  t.set_model("other");
  EXPECT_EQ(TokenizeInput(m(), t).status().code(), absl::StatusCode::kNotFound);
  t.set_model("tiny");
  EXPECT_TRUE(TokenizeInput(m(), t).ok());

  v1::TokenizeRequest empty;
  EXPECT_EQ(TokenizeInput(m(), empty).status().code(), absl::StatusCode::kInvalidArgument);
  empty.set_prompt("");
  EXPECT_EQ(TokenizeInput(m(), empty).status().code(), absl::StatusCode::kInvalidArgument);
  empty.set_prompt(std::string("\xff", 1));
  EXPECT_EQ(TokenizeInput(m(), empty).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvrelay::router
