#include "router/openai_api.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::router::openai {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

Request Ok(Kind kind, const std::string& body) {
  auto r = ParseRequest(kind, body);
  if (auto* e = std::get_if<Error>(&r)) {
    ADD_FAILURE() << body << ": " << e->message;
    return Request();
  }
  return std::get<Request>(r);
}

Error Err(Kind kind, const std::string& body) {
  auto r = ParseRequest(kind, body);
  if (auto* e = std::get_if<Error>(&r)) return *e;
  ADD_FAILURE() << body << " was accepted";
  return Error();
}

TEST(OpenAIApiTest, CompletionsParameters) {
  const Request r = Ok(Kind::kCompletion, R"({
      "model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0, "top_p": 0.9,
      "top_k": 5, "min_p": 0.1, "seed": 42, "stop": ["a", "b"], "n": 1,
      "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
      "logprobs": 2, "stream": true, "stream_options": {"include_usage": true},
      "user": "u", "cache_salt": "tenant", "ignore_eos": true, "stop_token_ids": [3],
      "unknown_parameter": {"ignored": true}})");
  ASSERT_EQ(r.prompts.size(), 1u);
  const v1::GenerateRequest& g = r.prompts[0];
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(g.model(), "m");
  EXPECT_EQ(g.prompt(), "hello");
  EXPECT_EQ(g.cache_salt(), "tenant");
  const v1::SamplingParams& s = g.sampling();
  EXPECT_EQ(s.max_tokens(), 7u);
  EXPECT_EQ(s.temperature(), 0.0f);
  EXPECT_FLOAT_EQ(s.top_p(), 0.9f);
  EXPECT_EQ(s.top_k(), 5);
  EXPECT_FLOAT_EQ(s.min_p(), 0.1f);
  EXPECT_EQ(s.seed(), 42u);
  EXPECT_THAT(s.stop(), ::testing::ElementsAre("a", "b"));
  EXPECT_FLOAT_EQ(s.presence_penalty(), 0.5f);
  EXPECT_FLOAT_EQ(s.frequency_penalty(), 0.25f);
  EXPECT_FLOAT_EQ(s.repetition_penalty(), 1.1f);
  EXPECT_EQ(s.logprobs(), 2u);
  EXPECT_TRUE(s.ignore_eos());
  EXPECT_THAT(s.stop_token_ids(), ::testing::ElementsAre(3));
  EXPECT_EQ(r.top_logprobs, 2);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(OpenAIApiTest, DefaultsAreOpenAIs) {
  const Request r = Ok(Kind::kCompletion, R"({"prompt": "x"})");
  const v1::SamplingParams& s = r.prompts[0].sampling();
  EXPECT_EQ(s.temperature(), 1.0f);  // OpenAI's default, not greedy
  EXPECT_EQ(s.max_tokens(), 0u);     // the service's default (16)
  EXPECT_FALSE(s.has_top_p());
  EXPECT_EQ(r.top_logprobs, -1);
  EXPECT_FALSE(r.stream);
}

TEST(OpenAIApiTest, PromptForms) {
  EXPECT_EQ(Ok(Kind::kCompletion, R"({"prompt": ["a", "b", "c"]})").prompts.size(), 3u);
  const Request ids = Ok(Kind::kCompletion, R"({"prompt": [1, 2, 3]})");
  ASSERT_EQ(ids.prompts.size(), 1u);
  EXPECT_THAT(ids.prompts[0].token_ids().ids(), ::testing::ElementsAre(1, 2, 3));
  const Request lists = Ok(Kind::kCompletion, R"({"prompt": [[1], [2, 3]]})");
  ASSERT_EQ(lists.prompts.size(), 2u);
  EXPECT_THAT(lists.prompts[1].token_ids().ids(), ::testing::ElementsAre(2, 3));
  for (const char* bad : {R"({"prompt": 5})", R"({"prompt": []})", R"({"prompt": [1, "a"]})",
                          R"({"prompt": [[1], 2]})", R"({"prompt": [[]]})", R"({"prompt": {}})"}) {
    EXPECT_EQ(Err(Kind::kCompletion, bad).param, "prompt") << bad;
  }
  EXPECT_THAT(Err(Kind::kCompletion, R"({"prompt": [-1]})").message, HasSubstr("-1"));
  EXPECT_EQ(Err(Kind::kCompletion, R"({"model": "m"})").param, "prompt");
}

TEST(OpenAIApiTest, ChatMessages) {
  const Request r = Ok(Kind::kChat, R"({"messages": [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": null}],
      "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 3})");
  ASSERT_EQ(r.prompts.size(), 1u);
  const v1::ChatMessages& m = r.prompts[0].chat();
  ASSERT_EQ(m.messages_size(), 3);
  EXPECT_EQ(m.messages(0).role(), "system");
  EXPECT_EQ(m.messages(1).content(), "hi there");
  EXPECT_EQ(m.messages(2).content(), "");
  EXPECT_EQ(r.prompts[0].sampling().max_tokens(), 9u);
  EXPECT_EQ(r.prompts[0].sampling().logprobs(), 3u);
  EXPECT_EQ(r.top_logprobs, 3);
  EXPECT_EQ(Err(Kind::kChat, R"({"messages": []})").param, "messages");
  EXPECT_EQ(Err(Kind::kChat, R"({})").param, "messages");
  EXPECT_EQ(Err(Kind::kChat, R"({"messages": [{"content": "x"}]})").param, "messages[0].role");
  EXPECT_EQ(Err(Kind::kChat, R"({"messages": [{"role": "user", "content": 3}]})").param,
            "messages[0].content");
  EXPECT_EQ(
      Err(Kind::kChat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})")
          .param,
      "messages[0].content");
  EXPECT_EQ(
      Err(Kind::kChat, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})")
          .param,
      "top_logprobs");
}

TEST(OpenAIApiTest, WrongTypesAndValuesNameTheParameter) {
  struct Case {
    const char* body;
    const char* param;
  };
  const Case cases[] = {
      {R"({"prompt": "x", "max_tokens": "7"})", "max_tokens"},
      {R"({"prompt": "x", "max_tokens": 0})", "max_tokens"},
      {R"({"prompt": "x", "max_tokens": 1.5})", "max_tokens"},
      {R"({"prompt": "x", "temperature": "hot"})", "temperature"},
      {R"({"prompt": "x", "top_k": -2})", "top_k"},
      {R"({"prompt": "x", "seed": "s"})", "seed"},
      {R"({"prompt": "x", "stop": 3})", "stop"},
      {R"({"prompt": "x", "stop": ["a", 1]})", "stop"},
      {R"({"prompt": "x", "n": 2})", "n"},
      {R"({"prompt": "x", "logprobs": 21})", "logprobs"},
      {R"({"prompt": "x", "logprobs": true})", "logprobs"},
      {R"({"prompt": "x", "echo": true})", "echo"},
      {R"({"prompt": "x", "stream": "yes"})", "stream"},
      {R"({"prompt": "x", "stream_options": {"include_usage": true}})", "stream_options"},
      {R"({"prompt": "x", "stream": true, "stream_options": {"include_usage": 1}})",
       "stream_options.include_usage"},
      {R"({"prompt": "x", "model": 3})", "model"},
      {R"({"prompt": "x", "user": 3})", "user"},
      {R"({"prompt": "x", "cache_salt": 3})", "cache_salt"},
      {R"({"prompt": "x", "stop_token_ids": [-1]})", "stop_token_ids"},
  };
  for (const Case& c : cases) {
    const Error e = Err(Kind::kCompletion, c.body);
    EXPECT_EQ(e.http_status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body << ": " << e.message;
    EXPECT_EQ(e.type, "invalid_request_error");
  }
  // 16.0 is an integer (JavaScript numbers).
  EXPECT_EQ(Ok(Kind::kCompletion, R"({"prompt": "x", "max_tokens": 16.0})")
                .prompts[0]
                .sampling()
                .max_tokens(),
            16u);
}

// Found by tests/fuzz/request_fuzz: a number beyond a double is no parse_error but an
// out_of_range exception, which escaped and aborted the router.
TEST(OpenAIApiTest, NumbersBeyondADoubleAreABadRequestNotACrash) {
  for (const char* body :
       {"1e4444", R"({"prompt": "x", "max_tokens": 1e400})", "444444444e444444"}) {
    const Error e = Err(Kind::kCompletion, body);
    EXPECT_EQ(e.http_status, 400) << body;
    EXPECT_THAT(e.message, HasSubstr("not valid JSON")) << body;
  }
}

TEST(OpenAIApiTest, MalformedJsonAndBadUtf8) {
  for (const std::string& body : {std::string("{"), std::string("[1]"), std::string("null"),
                                  std::string("{\"prompt\": \"\xff\"}")}) {
    const Error e = Err(Kind::kCompletion, body);
    EXPECT_EQ(e.http_status, 400);
    EXPECT_THAT(e.message, HasSubstr("JSON")) << body;
  }
  EXPECT_THAT(Err(Kind::kCompletion, "{\"prompt\": \"ab\xff\"}").message, HasSubstr("UTF-8"));
  // The error body is valid JSON even when the message quotes bad bytes.
  const Error e = Err(Kind::kCompletion, "{\"prompt\": \"ab\xff\"}");
  const json j = json::parse(ErrorJson(e));
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_TRUE(j["error"]["param"].is_null());
}

TEST(OpenAIApiTest, GrpcStatusesMapToHttp) {
  struct Case {
    grpc::StatusCode code;
    int http;
  };
  for (const Case& c :
       {Case{grpc::StatusCode::INVALID_ARGUMENT, 400}, Case{grpc::StatusCode::UNAUTHENTICATED, 401},
        Case{grpc::StatusCode::NOT_FOUND, 404}, Case{grpc::StatusCode::RESOURCE_EXHAUSTED, 429},
        Case{grpc::StatusCode::UNAVAILABLE, 503}, Case{grpc::StatusCode::DEADLINE_EXCEEDED, 504},
        Case{grpc::StatusCode::INTERNAL, 500}}) {
    const Error e = FromGrpc(grpc::Status(c.code, "why"));
    EXPECT_EQ(e.http_status, c.http);
    EXPECT_EQ(e.message, "why");
  }
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::NOT_FOUND, "m")).code, "model_not_found");
  const json j = json::parse(ErrorJson(FromGrpc(grpc::Status(grpc::StatusCode::NOT_FOUND, "m"))));
  EXPECT_EQ(j["error"]["code"], "model_not_found");
  EXPECT_EQ(j["error"]["message"], "m");
}

TEST(OpenAIApiTest, ResponsesAndChunks) {
  const TokenText text = [](int32_t t) { return std::string(1, static_cast<char>('a' + t)); };
  Request r = Ok(Kind::kCompletion, R"({"prompt": "x", "logprobs": 1})");
  Choice c;
  c.text = "ab";
  c.finish_reason = "length";
  v1::TokenLogprobs lp;
  lp.set_token_id(0);
  lp.set_logprob(-0.5f);
  auto* top = lp.add_top();
  top->set_token_id(0);
  top->set_logprob(-0.5f);
  c.logprobs = {lp, lp};
  Usage u{5, 2, 3};
  json j = Response(r, "cmpl-1", 100, "m", {c}, u, text);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "ab");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["choices"][0]["logprobs"]["tokens"], json({"a", "a"}));
  EXPECT_EQ(j["choices"][0]["logprobs"]["text_offset"], json({0, 1}));
  EXPECT_EQ(j["choices"][0]["logprobs"]["top_logprobs"][0]["a"], -0.5);
  EXPECT_EQ(j["usage"]["total_tokens"], 7);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 3);

  Request chat = Ok(Kind::kChat, R"({"messages": [{"role": "user", "content": "x"}],
                                     "stream": true, "stream_options": {"include_usage": true}})");
  j = Response(chat, "chatcmpl-1", 100, "m", {c}, u, text);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "ab");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  Choice delta;
  delta.text = "a";
  j = Chunk(chat, "chatcmpl-1", 100, "m", delta, /*role=*/true, text, 0);
  EXPECT_EQ(j["object"], "chat.completion.chunk");
  EXPECT_EQ(j["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["delta"]["content"], "a");
  EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(j["usage"].is_null());
  delta.text.clear();
  delta.finish_reason = "stop";
  j = Chunk(chat, "chatcmpl-1", 100, "m", delta, false, text, 0);
  EXPECT_EQ(j["choices"][0]["delta"], json::object());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  j = UsageChunk(chat, "chatcmpl-1", 100, "m", u);
  EXPECT_EQ(j["choices"], json::array());
  EXPECT_EQ(j["usage"]["completion_tokens"], 2);
  j = ModelsResponse("m", 5);
  EXPECT_EQ(j["data"][0]["id"], "m");
  EXPECT_EQ(j["object"], "list");
}

}  // namespace
}  // namespace kvrelay::router::openai
