#include "common/tokenizer/chat_template.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace kvrelay::tokenizer {
namespace {

using ::testing::HasSubstr;
using testing::ScopedTempDir;

// A tokenizer that only knows a few token strings: enough for DetectChatFormat.
class FakeTokenizer : public Tokenizer {
 public:
  explicit FakeTokenizer(std::vector<std::string> tokens) {
    for (size_t i = 0; i < tokens.size(); ++i) ids_[tokens[i]] = static_cast<int32_t>(i);
  }
  std::vector<int32_t> Encode(absl::string_view, bool) const override { return {}; }
  std::string Decode(const std::vector<int32_t>&, bool) const override { return ""; }
  int32_t vocab_size() const override { return static_cast<int32_t>(ids_.size()); }
  std::optional<int32_t> TokenToId(absl::string_view token) const override {
    auto it = ids_.find(token);
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<std::string> IdToToken(int32_t) const override { return std::nullopt; }
  bool IsSpecial(int32_t) const override { return false; }
  std::optional<int32_t> bos_token_id() const override { return std::nullopt; }

 private:
  absl::flat_hash_map<std::string, int32_t> ids_;
};

// system + user + assistant + user.
std::vector<ChatMessage> Conversation() {
  return {{"system", "You are a helpful assistant"},
          {"user", "Hello"},
          {"assistant", "Hi there"},
          {"user", "Who are you"}};
}

std::string Render(ChatFormat f, const std::vector<ChatMessage>& messages, bool gen) {
  absl::StatusOr<std::string> r = RenderChat(f, messages, gen);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : "";
}

// ---------------------------------------------------------------------------
// Goldens: system + user + assistant + user, with and without the generation prompt.

TEST(RenderChatTest, ChatML) {
  const std::string body =
      "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
      "<|im_start|>user\nHello<|im_end|>\n"
      "<|im_start|>assistant\nHi there<|im_end|>\n"
      "<|im_start|>user\nWho are you<|im_end|>\n";
  EXPECT_EQ(Render(ChatFormat::kChatML, Conversation(), false), body);
  EXPECT_EQ(Render(ChatFormat::kChatML, Conversation(), true), body + "<|im_start|>assistant\n");
}

TEST(RenderChatTest, Llama3) {
  const std::string body =
      "<|begin_of_text|>"
      "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>";
  EXPECT_EQ(Render(ChatFormat::kLlama3, Conversation(), false), body);
  EXPECT_EQ(Render(ChatFormat::kLlama3, Conversation(), true),
            body + "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(RenderChatTest, Llama2) {
  const std::string want =
      "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there "
      "</s><s>[INST] Who are you [/INST]";
  EXPECT_EQ(Render(ChatFormat::kLlama2, Conversation(), false), want);
  // The user turn already ends in "[/INST]": there is no separate generation prompt.
  EXPECT_EQ(Render(ChatFormat::kLlama2, Conversation(), true), want);
}

TEST(RenderChatTest, Mistral) {
  const std::string want =
      "<s> [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you "
      "[/INST]";
  EXPECT_EQ(Render(ChatFormat::kMistral, Conversation(), false), want);
  EXPECT_EQ(Render(ChatFormat::kMistral, Conversation(), true), want);
}

TEST(RenderChatTest, Gemma) {
  const std::string body =
      "<bos><start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n"
      "<start_of_turn>model\nHi there<end_of_turn>\n"
      "<start_of_turn>user\nWho are you<end_of_turn>\n";
  EXPECT_EQ(Render(ChatFormat::kGemma, Conversation(), false), body);
  EXPECT_EQ(Render(ChatFormat::kGemma, Conversation(), true), body + "<start_of_turn>model\n");
}

TEST(RenderChatTest, Plain) {
  const std::string body =
      "system: You are a helpful assistant\nuser: Hello\nassistant: Hi there\nuser: Who are you\n";
  EXPECT_EQ(Render(ChatFormat::kPlain, Conversation(), false), body);
  EXPECT_EQ(Render(ChatFormat::kPlain, Conversation(), true), body + "assistant:");
}

// ---------------------------------------------------------------------------
// Outputs of HF apply_chat_template(..., add_generation_prompt=True, tokenize=False) with the
// models' own templates, as published by mistral.rs (test_chat_templates) and by Mistral
// (cookbook, tokenizer V1). Note the whitespace handling of "   I am an assistant   ".

std::vector<ChatMessage> HfConversation(bool with_system) {
  std::vector<ChatMessage> m = {{"user", "Hello"},
                                {"assistant", "Hi there"},
                                {"user", "Who are you"},
                                {"assistant", "   I am an assistant   "},
                                {"user", "Another question"}};
  if (with_system) m.insert(m.begin(), {"system", "You are a helpful assistant"});
  return m;
}

TEST(RenderChatTest, MatchesHfChatML) {  // teknium/OpenHermes-2.5-Mistral-7B
  EXPECT_EQ(Render(ChatFormat::kChatML, HfConversation(true), true),
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|"
            "im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are "
            "you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|"
            ">user\nAnother question<|im_end|>\n<|im_start|>assistant\n");
}

TEST(RenderChatTest, MatchesHfLlama2) {  // meta-llama/Llama-2-13b-chat-hf
  EXPECT_EQ(Render(ChatFormat::kLlama2, HfConversation(true), true),
            "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there "
            "</s><s>[INST] Who are you [/INST] I am an assistant </s><s>[INST] Another question "
            "[/INST]");
}

TEST(RenderChatTest, MatchesHfGemma) {  // google/gemma-7b-it
  EXPECT_EQ(Render(ChatFormat::kGemma, HfConversation(false), true),
            "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi "
            "there<end_of_turn>\n<start_of_turn>user\nWho are "
            "you<end_of_turn>\n<start_of_turn>model\nI am an "
            "assistant<end_of_turn>\n<start_of_turn>user\nAnother "
            "question<end_of_turn>\n<start_of_turn>model\n");
}

TEST(RenderChatTest, MatchesMistralTokenizerV1) {  // mistralai/cookbook tokenization/templates.md
  const std::vector<ChatMessage> m = {{"user", "Hello, how are you?"},
                                      {"assistant", "Fine, and you?"},
                                      {"user", "I'm doing great!"},
                                      {"assistant", "Glad to hear!"}};
  EXPECT_EQ(Render(ChatFormat::kMistral, m, false),
            "<s> [INST] Hello, how are you? [/INST] Fine, and you?</s> [INST] I'm doing great! "
            "[/INST] Glad to hear!</s>");
  // Mistral's template does not strip: the content is used as given.
  EXPECT_EQ(Render(ChatFormat::kMistral, HfConversation(false), true),
            "<s> [INST] Hello [/INST] Hi there</s> [INST] Who are you [/INST]    I am an "
            "assistant   </s> [INST] Another question [/INST]");
}

// ---------------------------------------------------------------------------
// Whitespace: Jinja's `trim` and str.strip() are Python's, which strip Unicode whitespace
// and U+001C..U+001F.

TEST(RenderChatTest, Llama3TrimsLikePython) {
  EXPECT_EQ(
      Render(ChatFormat::kLlama3, {{"user", "\xC2\xA0\x1C\t hi there \xE3\x80\x80\n"}}, false),
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>");
  // U+200B (zero width space) is not whitespace.
  EXPECT_EQ(Render(ChatFormat::kLlama3, {{"user", "\xE2\x80\x8Bx"}}, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\xE2\x80\x8Bx<|eot_id|>");
  EXPECT_EQ(Render(ChatFormat::kLlama3, {{"user", "  \n "}}, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>");
}

TEST(RenderChatTest, Llama2StripsTheCombinedFirstTurn) {
  // content.strip() runs on "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + user: the system text
  // and the user text's start keep their whitespace.
  EXPECT_EQ(Render(ChatFormat::kLlama2, {{"system", "  S  "}, {"user", " U  "}}, true),
            "<s>[INST] <<SYS>>\n  S  \n<</SYS>>\n\n U [/INST]");
  EXPECT_EQ(Render(ChatFormat::kLlama2, {{"user", " U "}, {"assistant", "\n A \n"}}, true),
            "<s>[INST] U [/INST] A </s>");
}

TEST(RenderChatTest, GemmaKeepsSystemWhitespace) {
  EXPECT_EQ(Render(ChatFormat::kGemma, {{"system", " S "}, {"user", "  U  "}}, false),
            "<bos><start_of_turn>user\n S \n\nU<end_of_turn>\n");
}

TEST(RenderChatTest, SingleUserMessageAndEmptyContent) {
  EXPECT_EQ(Render(ChatFormat::kChatML, {{"user", ""}}, true),
            "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(Render(ChatFormat::kMistral, {{"user", "Hi"}}, true), "<s> [INST] Hi [/INST]");
  EXPECT_EQ(Render(ChatFormat::kLlama2, {{"user", "Hi"}}, true), "<s>[INST] Hi [/INST]");
  EXPECT_EQ(Render(ChatFormat::kPlain, {{"user", ""}}, true), "user: \nassistant:");
}

TEST(RenderChatTest, FreeOrderFormatsAcceptAnyTurnOrder) {
  const std::vector<ChatMessage> m = {{"assistant", "A"}, {"user", "U1"}, {"user", "U2"}};
  EXPECT_EQ(Render(ChatFormat::kChatML, m, false),
            "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>"
            "user\nU2<|im_end|>\n");
  EXPECT_TRUE(RenderChat(ChatFormat::kLlama3, m, true).ok());
  EXPECT_TRUE(RenderChat(ChatFormat::kPlain, m, true).ok());
  // A lone system message is fine where it renders.
  EXPECT_EQ(Render(ChatFormat::kChatML, {{"system", "S"}}, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n");
}

TEST(RenderChatTest, UnicodeContentPassesThrough) {
  EXPECT_EQ(
      Render(ChatFormat::kChatML, {{"user", "h\xC3\xA9llo \xE4\xB8\xAD \xF0\x9F\x98\x80"}}, false),
      "<|im_start|>user\nh\xC3\xA9llo \xE4\xB8\xAD \xF0\x9F\x98\x80<|im_end|>\n");
}

// ---------------------------------------------------------------------------
// Errors.

void ExpectInvalid(ChatFormat f, const std::vector<ChatMessage>& m, const std::string& what) {
  absl::StatusOr<std::string> r = RenderChat(f, m, true);
  ASSERT_FALSE(r.ok()) << ChatFormatName(f) << " rendered " << *r;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr(what)) << ChatFormatName(f);
}

constexpr ChatFormat kAllFormats[] = {ChatFormat::kChatML, ChatFormat::kLlama3,
                                      ChatFormat::kLlama2, ChatFormat::kMistral,
                                      ChatFormat::kGemma,  ChatFormat::kPlain};

TEST(RenderChatErrorTest, NoMessages) {
  for (ChatFormat f : kAllFormats) ExpectInvalid(f, {}, "no messages");
}

TEST(RenderChatErrorTest, UnknownRole) {
  for (ChatFormat f : kAllFormats) {
    ExpectInvalid(f, {{"user", "a"}, {"assistant", "b"}, {"tool", "c"}},
                  "message 2 has role 'tool'; expected system, user or assistant");
    ExpectInvalid(f, {{"User", "a"}}, "message 0 has role 'User'");
    ExpectInvalid(f, {{"", "a"}}, "message 0 has role ''");
  }
}

TEST(RenderChatErrorTest, SystemNotFirst) {
  for (ChatFormat f : kAllFormats) {
    ExpectInvalid(f, {{"user", "a"}, {"system", "s"}},
                  "message 1 has role 'system'; only the first message may be a system one");
    ExpectInvalid(f, {{"system", "a"}, {"system", "s"}}, "message 1 has role 'system'");
  }
}

TEST(RenderChatErrorTest, InvalidUtf8) {
  for (ChatFormat f : kAllFormats) {
    ExpectInvalid(f, {{"user", "ok"}, {"assistant", "bad \xC3("}},
                  "message 1 (assistant): content is not valid UTF-8");
    ExpectInvalid(f, {{"user", "truncated \xE4\xB8"}}, "message 0 (user): content is not valid");
    ExpectInvalid(f, {{"system", "\xED\xA0\x80"}, {"user", "u"}}, "message 0 (system)");
  }
}

TEST(RenderChatErrorTest, AlternatingFormatsNeedUserAssistantTurns) {
  for (ChatFormat f : {ChatFormat::kLlama2, ChatFormat::kMistral, ChatFormat::kGemma}) {
    ExpectInvalid(f, {{"user", "a"}, {"user", "b"}},
                  "message 1 has role 'user' but 'assistant' was expected");
    ExpectInvalid(f, {{"assistant", "a"}},
                  "message 0 has role 'assistant' but 'user' was expected");
    ExpectInvalid(f, {{"system", "s"}, {"assistant", "a"}},
                  "message 1 has role 'assistant' but 'user' was expected");
    ExpectInvalid(f, {{"system", "s"}, {"user", "u"}, {"assistant", "a"}, {"assistant", "b"}},
                  "message 3 has role 'assistant' but 'user' was expected");
    ExpectInvalid(f, {{"system", "s"}}, "needs a user message after the system message");
  }
  ExpectInvalid(ChatFormat::kMistral, {{"user", "a"}, {"user", "b"}},
                "the mistral chat format needs roles alternating");
}

// ---------------------------------------------------------------------------
// Names.

TEST(ChatFormatNameTest, RoundTrips) {
  for (ChatFormat f : kAllFormats) {
    absl::StatusOr<ChatFormat> parsed = ParseChatFormat(ChatFormatName(f));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, f);
  }
  EXPECT_STREQ(ChatFormatName(ChatFormat::kChatML), "chatml");
  EXPECT_STREQ(ChatFormatName(ChatFormat::kLlama3), "llama3");
  EXPECT_STREQ(ChatFormatName(ChatFormat::kLlama2), "llama2");
  EXPECT_STREQ(ChatFormatName(ChatFormat::kMistral), "mistral");
  EXPECT_STREQ(ChatFormatName(ChatFormat::kGemma), "gemma");
  EXPECT_STREQ(ChatFormatName(ChatFormat::kPlain), "plain");
}

TEST(ChatFormatNameTest, UnknownName) {
  for (const char* name : {"", "ChatML", "llama", "jinja"}) {
    absl::StatusOr<ChatFormat> r = ParseChatFormat(name);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(std::string("unknown chat format '") + name));
    EXPECT_THAT(r.status().message(), HasSubstr("chatml, llama3, llama2, mistral, gemma, plain"));
  }
}

TEST(ChatFormatTest, OnlyPlainNeedsSpecialTokensWhenEncoding) {
  for (ChatFormat f : kAllFormats) {
    EXPECT_EQ(AddSpecialTokensForChat(f), f == ChatFormat::kPlain) << ChatFormatName(f);
  }
}

// ---------------------------------------------------------------------------
// Detection.

// Abbreviated versions of the real templates (the markers are what matters).
constexpr const char* kQwen2Template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
constexpr const char* kLlama3Template =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}";
constexpr const char* kLlama2Template =
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}";
constexpr const char* kMistralTemplate =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' "
    "+ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% endif %}{% endfor %}";
constexpr const char* kGemmaTemplate =
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt "
    "%}{{'<start_of_turn>model\\n'}}{% endif %}";
constexpr const char* kPhi3Template =  // a family without a built-in format
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] "
    "+ '<|end|>\\n' }}{% endfor %}";

TEST(ChatFormatFromTemplateTest, Markers) {
  EXPECT_EQ(ChatFormatFromTemplate(kQwen2Template), ChatFormat::kChatML);
  EXPECT_EQ(ChatFormatFromTemplate(kLlama3Template), ChatFormat::kLlama3);
  EXPECT_EQ(ChatFormatFromTemplate(kLlama2Template), ChatFormat::kLlama2);
  EXPECT_EQ(ChatFormatFromTemplate(kMistralTemplate), ChatFormat::kMistral);
  EXPECT_EQ(ChatFormatFromTemplate(kGemmaTemplate), ChatFormat::kGemma);
  EXPECT_EQ(ChatFormatFromTemplate(kPhi3Template), std::nullopt);
  EXPECT_EQ(ChatFormatFromTemplate(""), std::nullopt);
}

std::string TokenizerConfig(const nlohmann::json& chat_template) {
  nlohmann::json j = {{"bos_token", "<s>"}, {"model_max_length", 4096}};
  j["chat_template"] = chat_template;
  return j.dump(2);
}

ChatFormat Detect(const std::string& dir, const Tokenizer& tok, std::string* source = nullptr) {
  absl::StatusOr<ChatFormat> f = DetectChatFormat(dir, tok, source);
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? *f : ChatFormat::kPlain;
}

TEST(DetectChatFormatTest, StringTemplate) {
  const FakeTokenizer none({});
  const struct {
    const char* tmpl;
    ChatFormat want;
  } cases[] = {{kQwen2Template, ChatFormat::kChatML},
               {kLlama3Template, ChatFormat::kLlama3},
               {kLlama2Template, ChatFormat::kLlama2},
               {kMistralTemplate, ChatFormat::kMistral},
               {kGemmaTemplate, ChatFormat::kGemma}};
  for (const auto& c : cases) {
    ScopedTempDir dir;
    ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(c.tmpl)).ok());
    std::string source;
    EXPECT_EQ(Detect(dir.path(), none, &source), c.want) << c.tmpl;
    EXPECT_EQ(source, "chat_template in " + dir.File("tokenizer_config.json"));
  }
}

TEST(DetectChatFormatTest, ListTemplatePrefersDefault) {
  const FakeTokenizer none({});
  ScopedTempDir dir;
  nlohmann::json list =
      nlohmann::json::array({{{"name", "tool_use"}, {"template", kQwen2Template}},
                             {{"name", "default"}, {"template", kMistralTemplate}},
                             {{"name", "rag"}, {"template", kGemmaTemplate}}});
  ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(list)).ok());
  EXPECT_EQ(Detect(dir.path(), none), ChatFormat::kMistral);
}

TEST(DetectChatFormatTest, ListTemplateWithoutDefaultUsesFirst) {
  const FakeTokenizer none({});
  ScopedTempDir dir;
  nlohmann::json list =
      nlohmann::json::array({{{"name", "rag"}, {"template", kGemmaTemplate}},
                             {{"name", "tool_use"}, {"template", kQwen2Template}}});
  ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(list)).ok());
  EXPECT_EQ(Detect(dir.path(), none), ChatFormat::kGemma);
}

TEST(DetectChatFormatTest, ChatTemplateJinjaFileWins) {
  const FakeTokenizer none({});
  ScopedTempDir dir;
  ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(kQwen2Template)).ok());
  ASSERT_TRUE(WriteFile(dir.File("chat_template.jinja"), kLlama3Template).ok());
  std::string source;
  EXPECT_EQ(Detect(dir.path(), none, &source), ChatFormat::kLlama3);
  EXPECT_THAT(source, HasSubstr("chat_template.jinja"));
}

TEST(DetectChatFormatTest, FallsBackToSpecialTokens) {
  const struct {
    const char* token;
    ChatFormat want;
  } cases[] = {{"<|im_start|>", ChatFormat::kChatML},
               {"<|start_header_id|>", ChatFormat::kLlama3},
               {"<start_of_turn>", ChatFormat::kGemma},
               {"[INST]", ChatFormat::kMistral}};
  for (const auto& c : cases) {
    const FakeTokenizer tok({"<s>", "</s>", c.token, "hello"});
    {
      ScopedTempDir dir;  // no tokenizer_config.json at all
      std::string source;
      EXPECT_EQ(Detect(dir.path(), tok, &source), c.want) << c.token;
      EXPECT_THAT(source, HasSubstr(std::string("token ") + c.token));
    }
    {
      ScopedTempDir dir;  // a config without chat_template
      ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), R"({"bos_token": "<s>"})").ok());
      EXPECT_EQ(Detect(dir.path(), tok), c.want) << c.token;
    }
    {
      ScopedTempDir dir;  // chat_template: null
      ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), R"({"chat_template": null})").ok());
      EXPECT_EQ(Detect(dir.path(), tok), c.want) << c.token;
    }
    {
      ScopedTempDir dir;  // a template without known markers
      ASSERT_TRUE(
          WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(kPhi3Template)).ok());
      std::string source;
      EXPECT_EQ(Detect(dir.path(), tok, &source), c.want) << c.token;
      EXPECT_THAT(source, HasSubstr("unrecognised chat_template"));
    }
  }
  // Several present: the order above decides.
  const FakeTokenizer both({"[INST]", "<|im_start|>"});
  ScopedTempDir dir;
  EXPECT_EQ(Detect(dir.path(), both), ChatFormat::kChatML);
}

TEST(DetectChatFormatTest, TemplateBeatsTokens) {
  const FakeTokenizer tok({"<|im_start|>"});
  ScopedTempDir dir;
  ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(kLlama2Template)).ok());
  EXPECT_EQ(Detect(dir.path(), tok), ChatFormat::kLlama2);
}

TEST(DetectChatFormatTest, PlainWhenNothingIsKnown) {
  const FakeTokenizer tok({"<s>", "</s>", "<unk>"});
  ScopedTempDir dir;
  std::string source;
  EXPECT_EQ(Detect(dir.path(), tok, &source), ChatFormat::kPlain);
  EXPECT_THAT(source, HasSubstr("plain"));
  ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(kPhi3Template)).ok());
  EXPECT_EQ(Detect(dir.path(), tok), ChatFormat::kPlain);
  // A model folder that does not exist is just a folder without files.
  EXPECT_EQ(Detect(dir.File("missing"), tok), ChatFormat::kPlain);
}

TEST(DetectChatFormatTest, MalformedConfigIsAnError) {
  const FakeTokenizer tok({"<|im_start|>"});
  const struct {
    const char* text;
    const char* what;
  } cases[] = {
      {"{\"chat_template\": ", "malformed JSON"},
      {"[1, 2]", "expected a JSON object at top level"},
      {R"({"chat_template": 7})", "field 'chat_template' must be a string or a list"},
      {R"({"chat_template": [{"name": "default"}]})", "chat_template[0] must be an object"},
      {R"({"chat_template": [{"name": "a", "template": "x"}, "y"]})", "chat_template[1]"},
      {R"({"chat_template": [{"name": 1, "template": "x"}]})", "chat_template[0]"},
  };
  for (const auto& c : cases) {
    ScopedTempDir dir;
    ASSERT_TRUE(WriteFile(dir.File("tokenizer_config.json"), c.text).ok());
    absl::StatusOr<ChatFormat> r = DetectChatFormat(dir.path(), tok);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(r.status().message(), HasSubstr(c.what)) << c.text;
    EXPECT_THAT(r.status().message(), HasSubstr(dir.File("tokenizer_config.json")));
  }
}

TEST(DetectChatFormatTest, EmptyTemplateListFallsBack) {
  const FakeTokenizer tok({"<start_of_turn>"});
  ScopedTempDir dir;
  ASSERT_TRUE(
      WriteFile(dir.File("tokenizer_config.json"), TokenizerConfig(nlohmann::json::array())).ok());
  EXPECT_EQ(Detect(dir.path(), tok), ChatFormat::kGemma);
}

}  // namespace
}  // namespace kvrelay::tokenizer
