#include "common/tokenizer/components.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

const std::string kMeta = "\xE2\x96\x81";  // "▁"

std::vector<std::string> PreTokenize(const json& config, const std::string& text,
                                     bool at_origin = true) {
  auto pre = ParsePreTokenizer(config);
  EXPECT_TRUE(pre.ok()) << pre.status();
  std::vector<PreToken> pieces = {{text, at_origin}};
  (*pre)->PreTokenize(&pieces);
  std::vector<std::string> out;
  for (const PreToken& p : pieces) out.push_back(p.text);
  return out;
}

std::string DecodeWith(const json& config, std::vector<std::string> tokens) {
  auto dec = ParseDecoder(config);
  EXPECT_TRUE(dec.ok()) << dec.status();
  (*dec)->DecodeChain(&tokens);
  std::string out;
  for (const auto& t : tokens) out += t;
  return out;
}

TEST(NormalizerTest, SentencePieceStyleSequence) {
  auto n = ParseNormalizer(json::parse(R"({"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "▁"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})"));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ((*n)->Normalize("hello world"), kMeta + "hello" + kMeta + "world");
  EXPECT_EQ((*n)->Normalize(""), "");
}

TEST(NormalizerTest, NullNfcAndRegexReplace) {
  auto none = ParseNormalizer(json());
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  auto nfc = ParseNormalizer(json::parse(R"({"type": "NFC"})"));
  ASSERT_TRUE(nfc.ok());
  EXPECT_EQ((*nfc)->Normalize("caf\xC3\xA9"), "caf\xC3\xA9");
  auto re = ParseNormalizer(
      json::parse(R"({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})"));
  ASSERT_TRUE(re.ok()) << re.status();
  EXPECT_EQ((*re)->Normalize("a   b  c"), "a b c");
}

TEST(NormalizerTest, UnsupportedIsInvalidArgumentNamingType) {
  auto n = ParseNormalizer(json::parse(R"({"type": "Lowercase"})"));
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(n.status().message().find("Lowercase"), std::string::npos);
  auto bad = ParseNormalizer(json::parse(R"({"type": "Replace", "content": "x"})"));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PreTokenizerTest, ByteLevel) {
  const json with_regex = json::parse(
      R"({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})");
  EXPECT_EQ(PreTokenize(with_regex, "Hello world's"),
            (std::vector<std::string>{"Hello", "\xC4\xA0world", "'s"}));
  const json prefix = json::parse(R"({"type": "ByteLevel", "add_prefix_space": true})");
  EXPECT_EQ(PreTokenize(prefix, "Hi you"), (std::vector<std::string>{"\xC4\xA0Hi", "\xC4\xA0you"}));
  const json no_regex = json::parse(R"({"type": "ByteLevel", "add_prefix_space": false,
                                        "use_regex": false})");
  EXPECT_EQ(PreTokenize(no_regex, "a b\n"), (std::vector<std::string>{"a\xC4\xA0"
                                                                      "b\xC4\x8A"}));
}

TEST(PreTokenizerTest, Llama3Sequence) {
  json config = {{"type", "Sequence"},
                 {"pretokenizers",
                  {{{"type", "Split"},
                    {"pattern", {{"Regex", std::string(kLlama3Pattern)}}},
                    {"behavior", "Isolated"},
                    {"invert", false}},
                   {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  EXPECT_EQ(PreTokenize(config, "I'm 12345 ok"),
            (std::vector<std::string>{"I", "'m", "\xC4\xA0", "123", "45", "\xC4\xA0ok"}));
}

TEST(PreTokenizerTest, Metaspace) {
  const json first = json::parse(
      R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true})");
  EXPECT_EQ(PreTokenize(first, "Hey  friend"),
            (std::vector<std::string>{kMeta + "Hey", kMeta, kMeta + "friend"}));
  EXPECT_EQ(PreTokenize(first, "Hey", /*at_origin=*/false), (std::vector<std::string>{"Hey"}));
  const json always_nosplit = json::parse(
      R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false})");
  EXPECT_EQ(PreTokenize(always_nosplit, "a b", false),
            (std::vector<std::string>{kMeta + "a" + kMeta + "b"}));
  const json legacy =
      json::parse(R"({"type": "Metaspace", "replacement": "▁", "add_prefix_space": false})");
  EXPECT_EQ(PreTokenize(legacy, "a b"), (std::vector<std::string>{"a", kMeta + "b"}));
}

TEST(PreTokenizerTest, DigitsAndSplitVariants) {
  EXPECT_EQ(PreTokenize(json::parse(R"({"type": "Digits", "individual_digits": true})"), "ab123"),
            (std::vector<std::string>{"ab", "1", "2", "3"}));
  EXPECT_EQ(PreTokenize(json::parse(R"({"type": "Digits", "individual_digits": false})"), "ab123c"),
            (std::vector<std::string>{"ab", "123", "c"}));
  EXPECT_EQ(PreTokenize(json::parse(R"({"type": "Split", "pattern": {"String": "-"},
                                        "behavior": "Removed", "invert": false})"),
                        "a-b--c"),
            (std::vector<std::string>{"a", "b", "c"}));
}

TEST(PreTokenizerTest, UnsupportedAndMalformed) {
  auto p = ParsePreTokenizer(json::parse(R"({"type": "Whitespace"})"));
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("Whitespace"), std::string::npos);
  auto bad = ParsePreTokenizer(
      json::parse(R"({"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"})"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  auto behavior = ParsePreTokenizer(
      json::parse(R"({"type": "Split", "pattern": {"String": "x"}, "behavior": "Sideways"})"));
  EXPECT_NE(behavior.status().message().find("Sideways"), std::string::npos);
}

TEST(DecoderTest, ByteLevel) {
  const json bl = json::parse(R"({"type": "ByteLevel"})");
  EXPECT_EQ(DecodeWith(bl, {"Hello", "\xC4\xA0world", "<|endoftext|>"}),
            "Hello world<|endoftext|>");
  // Half of "é" (0xC3 maps to U+00C3) decodes to U+FFFD.
  EXPECT_EQ(DecodeWith(bl, {"a", "\xC3\x83"}), "a\xEF\xBF\xBD");
  // A token with characters outside the byte table keeps its own bytes.
  EXPECT_EQ(DecodeWith(bl, {"\xE4\xB8\xAD"}), "\xE4\xB8\xAD");
}

TEST(DecoderTest, SentencePieceSequence) {
  const json seq = json::parse(R"({"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})");
  EXPECT_EQ(DecodeWith(seq, {kMeta + "hello", kMeta + "w", "<0xC3>", "<0xA9>"}), "hello w\xC3\xA9");
  // An invalid run: one U+FFFD per byte token (HF), not per maximal subpart.
  EXPECT_EQ(DecodeWith(seq, {"<0xE4>", "<0xB8>", "x"}), "\xEF\xBF\xBD\xEF\xBF\xBDx");
  EXPECT_EQ(DecodeWith(seq, {kMeta, kMeta + "a"}), " a");
}

// The decoder's own output tokens, unjoined.
std::vector<std::string> DecodeChainWith(const json& config, std::vector<std::string> tokens) {
  auto dec = ParseDecoder(config);
  EXPECT_TRUE(dec.ok()) << dec.status();
  (*dec)->DecodeChain(&tokens);
  return tokens;
}

// The cases of tokenizers/src/decoders/byte_fallback.rs, plus a few more.
TEST(DecoderTest, ByteFallbackMatchesHuggingFace) {
  using V = std::vector<std::string>;
  const std::string r = "\xEF\xBF\xBD";  // U+FFFD
  const json bf = json::parse(R"({"type": "ByteFallback"})");
  EXPECT_EQ(DecodeChainWith(bf, {"Hey", "friend!"}), (V{"Hey", "friend!"}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0x61>"}), (V{"a"}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0xe5>"}), (V{r}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0xe5>", "<0x8f>"}), (V{r, r}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0xe5>", "<0x8f>", "<0xab>"}), (V{"\xE5\x8F\xAB"}));  // 叫
  EXPECT_EQ(DecodeChainWith(bf, {"<0xe5>", "<0x8f>", "<0xab>", "a"}), (V{"\xE5\x8F\xAB", "a"}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0xe5>", "<0x8f>", "a"}), (V{r, r, "a"}));
  // A valid prefix does not survive an invalid byte later in the same run.
  EXPECT_EQ(DecodeChainWith(bf, {"<0x41>", "<0xFF>"}), (V{r, r}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0xE5>", "<0x8F>", "<0xAB>", "<0xE5>"}), (V{r, r, r, r}));
  // Runs are separated by any other token.
  EXPECT_EQ(DecodeChainWith(bf, {"<0xFF>", "b", "<0xC3>", "<0xA9>"}), (V{r, "b", "\xC3\xA9"}));
  // Not byte tokens: wrong length or not hex. Rust's from_str_radix accepts a '+'.
  EXPECT_EQ(DecodeChainWith(bf, {"<0x6>", "<0x611>", "<0xG1>", "<0x-1>", "<1x61>"}),
            (V{"<0x6>", "<0x611>", "<0xG1>", "<0x-1>", "<1x61>"}));
  EXPECT_EQ(DecodeChainWith(bf, {"<0x+A>"}), (V{"\n"}));
  EXPECT_EQ(ParseByteFallbackToken("<0x0A>"), 0x0A);
  EXPECT_EQ(ParseByteFallbackToken("<0xfF>"), 0xFF);
  EXPECT_EQ(ParseByteFallbackToken("<0x0A"), -1);
}

TEST(DecoderTest, UsesByteFallback) {
  auto seq = ParseDecoder(json::parse(R"({"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"}]})"));
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_TRUE((*seq)->UsesByteFallback());
  auto bl = ParseDecoder(json::parse(R"({"type": "ByteLevel"})"));
  ASSERT_TRUE(bl.ok()) << bl.status();
  EXPECT_FALSE((*bl)->UsesByteFallback());
}

TEST(DecoderTest, MetaspaceAndStrip) {
  const json ms =
      json::parse(R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"})");
  EXPECT_EQ(DecodeWith(ms, {kMeta + "Hey", kMeta + "friend!"}), "Hey friend!");
  const json never =
      json::parse(R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"})");
  EXPECT_EQ(DecodeWith(never, {kMeta + "Hey"}), " Hey");
  const json strip = json::parse(R"({"type": "Strip", "content": "x", "start": 2, "stop": 1})");
  EXPECT_EQ(DecodeWith(strip, {"xxxaxx", "x"}), "xax");
}

TEST(DecoderTest, Unsupported) {
  auto d = ParseDecoder(json::parse(R"({"type": "WordPiece"})"));
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("WordPiece"), std::string::npos);
}

TEST(PostProcessorTest, TemplateAndSequence) {
  const json tp = json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "</s>", "type_id": 0}}],
      "pair": [],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                         "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}})");
  auto t = ParsePostProcessor(tp);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->prefix, std::vector<int32_t>{1});
  EXPECT_EQ(t->suffix, std::vector<int32_t>{2});
  json seq = {{"type", "Sequence"},
              {"processors", {json::parse(R"({"type": "ByteLevel", "trim_offsets": false})"), tp}}};
  auto s = ParsePostProcessor(seq);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->prefix, std::vector<int32_t>{1});
  auto none = ParsePostProcessor(json());
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->prefix.empty());
  auto str = ParsePostProcessor(json::parse(R"({"type": "TemplateProcessing", "single": "<s> $A",
      "special_tokens": {"<s>": {"id": "<s>", "ids": [7], "tokens": ["<s>"]}}})"));
  ASSERT_TRUE(str.ok()) << str.status();
  EXPECT_EQ(str->prefix, std::vector<int32_t>{7});
}

TEST(PostProcessorTest, Errors) {
  auto missing = ParsePostProcessor(json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {}})"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  auto unsupported = ParsePostProcessor(json::parse(R"({"type": "Whatever"})"));
  EXPECT_NE(unsupported.status().message().find("Whatever"), std::string::npos);
}

}  // namespace
}  // namespace kvrelay::tokenizer
