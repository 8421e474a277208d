#include "common/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/tokenizer/bpe_trainer.h"
#include "common/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

const std::string kMeta = "\xE2\x96\x81";  // "▁"

// A Llama-2-like SentencePiece tokenizer.json written by hand.
// ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF>, then the pieces below.
int ByteId(int byte) { return 3 + byte; }

json Llama2Fixture(bool metaspace_pre_tokenizer) {
  json vocab = json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = ByteId(b);
  }
  const std::vector<std::string> pieces = {kMeta,
                                           "h",
                                           "e",
                                           "l",
                                           "o",
                                           "w",
                                           "r",
                                           "d",
                                           kMeta + "h",
                                           "ll",
                                           kMeta + "he",
                                           "llo",
                                           kMeta + "hello",
                                           kMeta + "w",
                                           "or",
                                           kMeta + "wor",
                                           "ld",
                                           kMeta + "world"};
  for (size_t i = 0; i < pieces.size(); ++i) vocab[pieces[i]] = 259 + static_cast<int>(i);
  // Both merge notations.
  json merges = json::array({kMeta + " h", "l l", kMeta + "h e", "ll o", kMeta + "he llo"});
  merges.push_back({kMeta, "w"});
  merges.push_back({"o", "r"});
  merges.push_back({kMeta + "w", "or"});
  merges.push_back({"l", "d"});
  merges.push_back({kMeta + "wor", "ld"});

  json added = json::array();
  for (int i = 0; i < 3; ++i) {
    const char* names[] = {"<unk>", "<s>", "</s>"};
    added.push_back({{"id", i},
                     {"content", names[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  json root;
  root["version"] = "1.0";
  root["truncation"] = nullptr;
  root["padding"] = nullptr;
  root["added_tokens"] = added;
  if (metaspace_pre_tokenizer) {
    root["normalizer"] = nullptr;
    root["pre_tokenizer"] = {{"type", "Metaspace"},
                             {"replacement", kMeta},
                             {"prepend_scheme", "first"},
                             {"split", false}};
  } else {
    root["normalizer"] = json::parse(R"({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})");
    root["pre_tokenizer"] = nullptr;
  }
  root["post_processor"] = json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}})");
  root["decoder"] = json::parse(R"({"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})");
  root["model"] = {{"type", "BPE"},
                   {"dropout", nullptr},
                   {"unk_token", "<unk>"},
                   {"continuing_subword_prefix", nullptr},
                   {"end_of_word_suffix", nullptr},
                   {"fuse_unk", true},
                   {"byte_fallback", true},
                   {"vocab", vocab},
                   {"merges", merges}};
  return root;
}

std::unique_ptr<Tokenizer> Load(const std::string& text) {
  auto t = Tokenizer::FromJson(text, "test/tokenizer.json");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

std::unique_ptr<Tokenizer> Trained(ByteLevelStyle style, int vocab_size = 1024) {
  BpeTrainOptions options;
  options.style = style;
  options.vocab_size = vocab_size;
  auto trained = TrainByteLevelBpe(options);
  EXPECT_TRUE(trained.ok()) << trained.status();
  return Load(trained->json);
}

const char* const kUtf8Corpus[] = {
    "Hello world's 123  end",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph\twith tabs.",
    ("caf\xC3\xA9 na\xC3\xAFve \xC3\xBC"
     "ber Stra\xC3\x9F"
     "e"),
    "\xE4\xB8\xAD\xE6\x96\x87\xE6\xB5\x8B\xE8\xAF\x95\xEF\xBC\x8C\xE4\xBD\xA0\xE5\xA5\xBD",
    ("emoji \xF0\x9F\x98\x80\xF0\x9F\x9A\x80 family \xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB "
     "flag \xF0\x9F\x87\xAB\xF0\x9F\x87\xB7"),
    "  leading and trailing spaces  ",
    "x = f(a, b) * 3.14; // comment\nreturn {1, 2, 3};",
    "unseen words: zyxwvut qqqq \xE1\x83\x97\xE1\x83\x91",
    "",
};

// ---------------------------------------------------------------------------
// SentencePiece-style fixture

TEST(Llama2FixtureTest, ExactIds) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->vocab_size(), 277);
  EXPECT_EQ(t->bos_token_id(), 1);
  EXPECT_EQ(t->Encode("hello world", true), (std::vector<int32_t>{1, 271, 276}));
  EXPECT_EQ(t->Encode("hello world", false), (std::vector<int32_t>{271, 276}));
  EXPECT_EQ(t->Encode("hello", false), (std::vector<int32_t>{271}));
  // Leading space: "▁▁hello" -> ▁ + ▁hello.
  EXPECT_EQ(t->Encode(" hello", false), (std::vector<int32_t>{259, 271}));
  // "wor" without a leading ▁ inside a word: w|or.
  EXPECT_EQ(t->Encode("hello</s>world", false), (std::vector<int32_t>{271, 2, 276}));
}

TEST(Llama2FixtureTest, ByteFallbackForUnknownCharacters) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  // 'i' is not a piece: <0x69>.
  EXPECT_EQ(t->Encode("hi", false), (std::vector<int32_t>{267, ByteId('i')}));
  EXPECT_EQ(t->Encode("h\xC3\xA9", false), (std::vector<int32_t>{267, ByteId(0xC3), ByteId(0xA9)}));
  EXPECT_EQ(t->Encode("\xF0\x9F\x98\x80", false),
            (std::vector<int32_t>{259, ByteId(0xF0), ByteId(0x9F), ByteId(0x98), ByteId(0x80)}));
  EXPECT_EQ(t->Decode({267, ByteId(0xC3), ByteId(0xA9)}, false), "h\xC3\xA9");
  EXPECT_EQ(t->Decode({1, 271, 276}, true), "hello world");
  EXPECT_EQ(t->Decode({1, 271, 276}, false), "<s> hello world");
  // An incomplete byte sequence decodes to one U+FFFD per byte token (HF).
  EXPECT_EQ(t->Decode({271, ByteId(0xE4), ByteId(0xB8)}, false), "hello\xEF\xBF\xBD\xEF\xBF\xBD");
  // A valid prefix of an invalid run is replaced too.
  EXPECT_EQ(t->Decode({ByteId(0x41), ByteId(0xFF)}, false), "\xEF\xBF\xBD\xEF\xBF\xBD");
  // Skipped special tokens are dropped before the decoder: the run continues.
  EXPECT_EQ(t->Decode({ByteId(0xC3), 2, ByteId(0xA9)}, true), "\xC3\xA9");
  EXPECT_EQ(t->Decode({ByteId(0xC3), 2, ByteId(0xA9)}, false), "\xEF\xBF\xBD</s>\xEF\xBF\xBD");
  EXPECT_TRUE(t->IsByteFallbackToken(ByteId(0x00)));
  EXPECT_TRUE(t->IsByteFallbackToken(ByteId(0xFF)));
  EXPECT_FALSE(t->IsByteFallbackToken(271));
  EXPECT_FALSE(t->IsByteFallbackToken(1));
  EXPECT_FALSE(t->IsByteFallbackToken(100000));
}

TEST(Llama2FixtureTest, RoundTrip) {
  for (bool metaspace : {false, true}) {
    auto t = Load(Llama2Fixture(metaspace).dump());
    ASSERT_NE(t, nullptr);
    for (const char* text : kUtf8Corpus) {
      // Like HF, the Metaspace pre-tokenizer does not prepend "▁" to text that
      // already starts with a space, and the decoder then strips one space.
      if (metaspace && text[0] == ' ') continue;
      const std::vector<int32_t> ids = t->Encode(text, true);
      EXPECT_EQ(t->Decode(ids, true), text) << "metaspace=" << metaspace;
    }
  }
}

TEST(Llama2FixtureTest, LongTextWithoutPreTokenizerEncodes) {
  // With pre_tokenizer null the whole text is a single BPE word.
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  std::string text;
  for (int i = 0; i < 2000; ++i) text += "hello world hi ";
  const std::vector<int32_t> ids = t->Encode(text, false);
  EXPECT_EQ(ids.size(), 2000u * 4 + 1);  // ▁hello ▁world ▁h <0x69> per repeat, final ▁
  EXPECT_EQ(t->Decode(ids, false), text);
}

TEST(Llama2FixtureTest, MetaspacePrependsOnlyAtTheStart) {
  auto t = Load(Llama2Fixture(true).dump());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Encode("hello world", true), (std::vector<int32_t>{1, 271, 276}));
  // After an added token the segment does not start the input: no "▁" prepended.
  EXPECT_EQ(t->Encode("hello</s>world", false), (std::vector<int32_t>{271, 2, 264, 273, 275}));
}

// ---------------------------------------------------------------------------
// Trained byte-level tokenizers

class ByteLevelTest : public ::testing::TestWithParam<ByteLevelStyle> {};

TEST_P(ByteLevelTest, RoundTripUtf8) {
  auto t = Trained(GetParam());
  ASSERT_NE(t, nullptr);
  for (const char* text : kUtf8Corpus) {
    const std::vector<int32_t> ids = t->Encode(text, true);
    EXPECT_EQ(t->Decode(ids, true), text);
    EXPECT_EQ(t->Decode(t->Encode(text, false), false), text);
  }
  const std::vector<int32_t> all = t->Encode(BuiltinCorpus(), false);
  EXPECT_EQ(t->Decode(all, false), BuiltinCorpus());
  EXPECT_LT(all.size() * 10, BuiltinCorpus().size() * 6);  // merges actually compress
}

TEST_P(ByteLevelTest, SpecialTokensAreNotSplit) {
  const bool llama3 = GetParam() == ByteLevelStyle::kLlama3;
  auto t = Trained(GetParam());
  ASSERT_NE(t, nullptr);
  const std::string special = llama3 ? "<|eot_id|>" : "<|endoftext|>";
  const std::optional<int32_t> id = t->TokenToId(special);
  ASSERT_TRUE(id.has_value());
  EXPECT_TRUE(t->IsSpecial(*id));
  EXPECT_EQ(t->IdToToken(*id), special);
  const std::vector<int32_t> ids = t->Encode("hi" + special + "there", false);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), *id), 1);
  EXPECT_EQ(t->Decode(ids, false), "hi" + special + "there");
  EXPECT_EQ(t->Decode(ids, true), "hithere");
  // A partial special token is ordinary text.
  const std::vector<int32_t> partial = t->Encode("<|endof", false);
  EXPECT_EQ(std::count(partial.begin(), partial.end(), *id), 0);
}

TEST_P(ByteLevelTest, BosFromPostProcessor) {
  const bool llama3 = GetParam() == ByteLevelStyle::kLlama3;
  auto t = Trained(GetParam());
  ASSERT_NE(t, nullptr);
  const std::vector<int32_t> with = t->Encode("Hello", true);
  const std::vector<int32_t> without = t->Encode("Hello", false);
  if (llama3) {
    ASSERT_TRUE(t->bos_token_id().has_value());
    EXPECT_EQ(*t->bos_token_id(), *t->TokenToId("<|begin_of_text|>"));
    ASSERT_EQ(with.size(), without.size() + 1);
    EXPECT_EQ(with[0], *t->bos_token_id());
  } else {
    EXPECT_FALSE(t->bos_token_id().has_value());
    EXPECT_EQ(with, without);
  }
}

TEST_P(ByteLevelTest, EncodesLongPromptConsistentlyAndThreadSafely) {
  auto t = Trained(GetParam());
  ASSERT_NE(t, nullptr);
  std::string prompt;
  while (t->Encode(prompt, false).size() < 4096) prompt += BuiltinCorpus();
  // Trim to ~4,096 tokens.
  std::vector<int32_t> ids = t->Encode(prompt, false);
  prompt = t->Decode(std::vector<int32_t>(ids.begin(), ids.begin() + 4096), false);
  // A freshly loaded tokenizer (cold word cache) and a warm one agree.
  // Encode speed is measured in tests/bench/tokenizer_bench.cc.
  auto fresh = Trained(GetParam());
  ASSERT_NE(fresh, nullptr);
  const std::vector<int32_t> expected = fresh->Encode(prompt, false);
  EXPECT_EQ(fresh->Encode(prompt, false), expected);
  EXPECT_GE(expected.size(), 4000u);
  EXPECT_EQ(fresh->Decode(expected, false), prompt);

  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int k = 0; k < 5; ++k) ok[i] += t->Encode(prompt, false) == expected;
    });
  }
  for (auto& th : threads) th.join();
  for (int v : ok) EXPECT_EQ(v, 5);
}

INSTANTIATE_TEST_SUITE_P(Styles, ByteLevelTest,
                         ::testing::Values(ByteLevelStyle::kGpt2, ByteLevelStyle::kLlama3));

// ---------------------------------------------------------------------------
// Streaming detokenization

std::string StreamAll(const Tokenizer& t, const std::vector<int32_t>& ids, bool skip,
                      bool* chunks_valid) {
  StreamingDetokenizer detok(&t, skip);
  std::string out;
  *chunks_valid = true;
  for (int32_t id : ids) {
    const std::string chunk = detok.Push(id);
    *chunks_valid = *chunks_valid && IsValidUtf8(chunk);
    out += chunk;
  }
  const std::string tail = detok.Flush();
  *chunks_valid = *chunks_valid && IsValidUtf8(tail);
  return out + tail;
}

std::vector<std::unique_ptr<Tokenizer>> AllTokenizers() {
  std::vector<std::unique_ptr<Tokenizer>> all;
  all.push_back(Trained(ByteLevelStyle::kGpt2, 512));
  all.push_back(Trained(ByteLevelStyle::kLlama3, 512));
  all.push_back(Load(Llama2Fixture(false).dump()));
  all.push_back(Load(Llama2Fixture(true).dump()));
  return all;
}

TEST(StreamingDetokenizerTest, RandomIdsMatchDecodeAndStayValidUtf8) {
  std::mt19937 rng(1234);
  for (const auto& t : AllTokenizers()) {
    ASSERT_NE(t, nullptr);
    std::uniform_int_distribution<int32_t> any_id(0, t->vocab_size() - 1);
    for (int trial = 0; trial < 30; ++trial) {
      std::vector<int32_t> ids(1 + trial * 5);
      for (int32_t& id : ids) id = any_id(rng);
      for (bool skip : {false, true}) {
        bool valid = false;
        const std::string streamed = StreamAll(*t, ids, skip, &valid);
        EXPECT_TRUE(valid);
        EXPECT_EQ(streamed, t->Decode(ids, skip)) << "trial " << trial << " skip " << skip;
      }
    }
  }
}

TEST(StreamingDetokenizerTest, EncodedEmojiTextStreamsExactly) {
  const std::string text =
      "Hi \xF0\x9F\x98\x80\xF0\x9F\x98\x83 caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 "
      "\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB done";
  for (const auto& t : AllTokenizers()) {
    ASSERT_NE(t, nullptr);
    const std::vector<int32_t> ids = t->Encode(text, true);
    StreamingDetokenizer detok(t.get(), /*skip_special_tokens=*/true);
    std::string out;
    for (int32_t id : ids) {
      const std::string chunk = detok.Push(id);
      EXPECT_TRUE(IsValidUtf8(chunk));
      EXPECT_EQ(chunk.find("\xEF\xBF\xBD"), std::string::npos);
      out += chunk;
    }
    EXPECT_EQ(detok.Flush(), "");
    EXPECT_EQ(out, text);
  }
}

TEST(StreamingDetokenizerTest, PrefixGivesContextToFirstToken) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  StreamingDetokenizer detok(t.get(), true);
  detok.SetPrefix(t->Encode("hello", true));
  // Alone "▁world" decodes to "world"; after the prompt it carries its space.
  EXPECT_EQ(detok.Push(276), " world");
  EXPECT_EQ(detok.Push(2), "");  // </s> skipped
  EXPECT_EQ(detok.Flush(), "");
}

TEST(StreamingDetokenizerTest, PrefixContextSkipsSpecialTokens) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  StreamingDetokenizer detok(t.get(), true);
  // Text followed by more than five special tokens still gives the context.
  detok.SetPrefix({1, 271, 2, 2, 2, 2, 2, 2});
  EXPECT_EQ(detok.Push(276), " world");
}

TEST(StreamingDetokenizerTest, PrefixEndingInByteFallbackCharacters) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  // "hello 叫😀": the five-token context would start inside the byte run of 叫.
  const std::vector<int32_t> prompt = t->Encode("hello \xE5\x8F\xAB\xF0\x9F\x98\x80", true);
  ASSERT_EQ(prompt.size(), 10u);
  StreamingDetokenizer detok(t.get(), true);
  detok.SetPrefix(prompt);
  EXPECT_EQ(detok.Push(276), " world");
  EXPECT_EQ(detok.Push(ByteId(0xC3)), "");
  EXPECT_EQ(detok.Push(ByteId(0xA9)), "");
  EXPECT_EQ(detok.Flush(), "\xC3\xA9");
}

TEST(StreamingDetokenizerTest, HoldsBackIncompleteCharacters) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  StreamingDetokenizer detok(t.get(), true);
  EXPECT_EQ(detok.Push(271), "hello");
  EXPECT_EQ(detok.Push(ByteId(0xF0)), "");
  EXPECT_EQ(detok.Push(ByteId(0x9F)), "");
  EXPECT_EQ(detok.Push(ByteId(0x98)), "");
  // Complete, but a further invalid byte would still turn the run into U+FFFDs.
  EXPECT_EQ(detok.Push(ByteId(0x80)), "");
  EXPECT_EQ(detok.Push(276), "\xF0\x9F\x98\x80 world");
  EXPECT_EQ(detok.Push(ByteId(0xE4)), "");
  EXPECT_EQ(detok.Flush(), "\xEF\xBF\xBD");
}

TEST(StreamingDetokenizerTest, ByteFallbackRunInvalidatedByALaterByte) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  const std::string r = "\xEF\xBF\xBD";
  {
    // "A" alone would be valid, but the run decodes to two U+FFFD.
    StreamingDetokenizer detok(t.get(), true);
    EXPECT_EQ(detok.Push(ByteId(0x41)), "");
    EXPECT_EQ(detok.Push(ByteId(0xFF)), "");
    EXPECT_EQ(detok.Flush(), r + r);
  }
  {
    // 叫 then E5: four U+FFFD, emitted when the run ends.
    StreamingDetokenizer detok(t.get(), true);
    EXPECT_EQ(detok.Push(271), "hello");
    for (int b : {0xE5, 0x8F, 0xAB, 0xE5}) EXPECT_EQ(detok.Push(ByteId(b)), "");
    EXPECT_EQ(detok.Push(276), r + r + r + r + " world");
    EXPECT_EQ(detok.Flush(), "");
  }
  {
    // A skipped special token inside a run does not end it.
    StreamingDetokenizer detok(t.get(), /*skip_special_tokens=*/true);
    EXPECT_EQ(detok.Push(ByteId(0xC3)), "");
    EXPECT_EQ(detok.Push(2), "");
    EXPECT_EQ(detok.Push(ByteId(0xA9)), "");
    EXPECT_EQ(detok.Push(271), "\xC3\xA9 hello");
  }
  {
    // Not skipped, it does.
    StreamingDetokenizer detok(t.get(), /*skip_special_tokens=*/false);
    EXPECT_EQ(detok.Push(ByteId(0xC3)), "");
    EXPECT_EQ(detok.Push(2), r + "</s>");
    EXPECT_EQ(detok.Push(ByteId(0xA9)), "");
    EXPECT_EQ(detok.Flush(), r);
  }
}

// Random ids drawn mostly from the byte tokens, so that runs of all kinds (valid,
// invalid, valid then invalid, interrupted by skipped specials) occur often.
TEST(StreamingDetokenizerTest, RandomByteFallbackRunsMatchDecode) {
  std::mt19937 rng(99);
  const std::vector<int> utf8_leads = {0x41, 0xC3, 0xE4, 0xE5, 0xF0, 0x80, 0x8F, 0xA9, 0xFF};
  for (bool metaspace : {false, true}) {
    auto t = Load(Llama2Fixture(metaspace).dump());
    ASSERT_NE(t, nullptr);
    std::uniform_int_distribution<int> kind(0, 9);
    std::uniform_int_distribution<int> any_byte(0, 255);
    std::uniform_int_distribution<int> lead(0, static_cast<int>(utf8_leads.size()) - 1);
    std::uniform_int_distribution<int32_t> any_id(0, t->vocab_size() - 1);
    for (int trial = 0; trial < 300; ++trial) {
      std::vector<int32_t> ids(1 + trial % 40);
      for (int32_t& id : ids) {
        const int k = kind(rng);
        if (k < 3) {
          id = ByteId(utf8_leads[lead(rng)]);
        } else if (k < 5) {
          id = ByteId(0x80 + any_byte(rng) % 0x40);  // continuation byte
        } else if (k < 6) {
          id = ByteId(any_byte(rng));
        } else if (k < 7) {
          id = static_cast<int32_t>(kind(rng) % 3);  // <unk> <s> </s>
        } else {
          id = any_id(rng);
        }
      }
      for (bool skip : {false, true}) {
        bool valid = false;
        const std::string streamed = StreamAll(*t, ids, skip, &valid);
        EXPECT_TRUE(valid);
        EXPECT_EQ(streamed, t->Decode(ids, skip))
            << "metaspace " << metaspace << " trial " << trial << " skip " << skip;
      }
    }
  }
}

// Generated text that spells characters in byte tokens streams exactly, with no
// U+FFFD in any chunk, one token late at most.
TEST(StreamingDetokenizerTest, ByteFallbackCharactersStreamAfterTheirRun) {
  auto t = Load(Llama2Fixture(false).dump());
  ASSERT_NE(t, nullptr);
  const std::string text = "hello \xE5\x8F\xAB world \xF0\x9F\x98\x80 \xC3\xA9";
  const std::vector<int32_t> ids = t->Encode(text, false);
  StreamingDetokenizer detok(t.get(), true);
  std::string out;
  for (int32_t id : ids) {
    const std::string chunk = detok.Push(id);
    EXPECT_EQ(chunk.find("\xEF\xBF\xBD"), std::string::npos);
    out += chunk;
  }
  EXPECT_EQ(out, "hello \xE5\x8F\xAB world \xF0\x9F\x98\x80 ");  // é: run still open
  EXPECT_EQ(detok.Flush(), "\xC3\xA9");
}

// ---------------------------------------------------------------------------
// Errors

TEST(TokenizerErrorsTest, MalformedJson) {
  auto t = Tokenizer::FromJson("{not json", "/models/x/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("/models/x/tokenizer.json"), std::string::npos);
}

TEST(TokenizerErrorsTest, UnsupportedPiecesNameThemselves) {
  struct Case {
    const char* field;
    json value;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"model", json::parse(R"({"type": "Unigram", "vocab": []})"), "Unigram"},
      {"normalizer", json::parse(R"({"type": "NFKC"})"), "NFKC"},
      {"pre_tokenizer", json::parse(R"({"type": "BertPreTokenizer"})"), "BertPreTokenizer"},
      {"decoder", json::parse(R"({"type": "CTC"})"), "CTC"},
      {"post_processor", json::parse(R"({"type": "Foo"})"), "Foo"},
      {"added_tokens", json::parse(R"([{"content": "x"}])"), "added_tokens"},
  };
  for (const Case& c : cases) {
    json root = Llama2Fixture(false);
    root[c.field] = c.value;
    auto t = Tokenizer::FromJson(root.dump(), "dir/tokenizer.json");
    ASSERT_FALSE(t.ok()) << c.field;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(t.status().message().find("dir/tokenizer.json: "), std::string::npos) << t.status();
    EXPECT_NE(t.status().message().find(c.expect), std::string::npos) << t.status();
  }
  auto no_model = Tokenizer::FromJson("{}", "p");
  EXPECT_EQ(no_model.status().code(), absl::StatusCode::kInvalidArgument);
  auto not_object = Tokenizer::FromJson("[1, 2]", "p");
  EXPECT_EQ(not_object.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerErrorsTest, MissingFile) {
  auto t = Tokenizer::FromFile("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("/nonexistent/dir/tokenizer.json"), std::string::npos);
}

TEST(AddedTokensTest, LongestMatchStripAndIdsBeyondVocab) {
  json root = Llama2Fixture(false);
  root["added_tokens"].push_back({{"id", 300},
                                  {"content", "<tool>"},
                                  {"special", false},
                                  {"single_word", false},
                                  {"lstrip", true},
                                  {"rstrip", true},
                                  {"normalized", false}});
  root["added_tokens"].push_back({{"id", 301},
                                  {"content", "<tool_call>"},
                                  {"special", true},
                                  {"single_word", false},
                                  {"lstrip", false},
                                  {"rstrip", false},
                                  {"normalized", false}});
  auto t = Load(root.dump());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->vocab_size(), 302);
  EXPECT_FALSE(t->IsSpecial(300));
  EXPECT_TRUE(t->IsSpecial(301));
  EXPECT_EQ(t->Encode("<tool_call>", false), (std::vector<int32_t>{301}));
  // lstrip/rstrip absorb the surrounding spaces.
  EXPECT_EQ(t->Encode("hello  <tool>  world", false), (std::vector<int32_t>{271, 300, 276}));
  EXPECT_EQ(t->Decode({301, 300}, true), "<tool>");
  EXPECT_EQ(t->TokenToId("<tool>"), 300);
  EXPECT_EQ(t->IdToToken(300), "<tool>");
  EXPECT_EQ(t->IdToToken(299), std::nullopt);
}

json AddedTokenJson(int id, const std::string& content, bool special, bool single_word, bool lstrip,
                    bool rstrip, bool normalized) {
  return {{"id", id},
          {"content", content},
          {"special", special},
          {"single_word", single_word},
          {"lstrip", lstrip},
          {"rstrip", rstrip},
          {"normalized", normalized}};
}

bool Contains(const std::vector<int32_t>& ids, int32_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

TEST(AddedTokensTest, StripRemovesUnicodeWhitespace) {
  json root = Llama2Fixture(false);
  root["added_tokens"].push_back(AddedTokenJson(300, "<tool>", false, false, true, true, false));
  auto t = Load(root.dump());
  ASSERT_NE(t, nullptr);
  // U+3000 ideographic space, U+00A0 no-break space, U+2003 em space, U+0085, tab/newline.
  EXPECT_EQ(t->Encode("hello\xE3\x80\x80\xC2\xA0\t<tool>\xE2\x80\x83\n\xC2\x85world", false),
            (std::vector<int32_t>{271, 300, 276}));
  for (const char* ws : {"\x0B", "\x0C", "\r", "\xE1\x9A\x80", "\xE2\x80\x80", "\xE2\x80\x8A",
                         "\xE2\x80\xA8", "\xE2\x80\xA9", "\xE2\x80\xAF", "\xE2\x81\x9F"}) {
    EXPECT_EQ(t->Encode(std::string("hello") + ws + "<tool>" + ws + "world", false),
              (std::vector<int32_t>{271, 300, 276}))
        << ws;
  }
  // U+200B zero width space is not White_Space: it stays (byte fallback).
  EXPECT_EQ(t->Encode("hello\xE2\x80\x8B<tool>", false),
            (std::vector<int32_t>{271, ByteId(0xE2), ByteId(0x80), ByteId(0x8B), 300}));
  // lstrip does not reach into a previous added token's text.
  EXPECT_EQ(t->Encode("<tool> <tool>", false), (std::vector<int32_t>{300, 300}));
  EXPECT_EQ(t->Encode("<s> <tool>", false), (std::vector<int32_t>{1, 300}));
}

TEST(AddedTokensTest, SingleWordUsesUnicodeWordCharacters) {
  json root = Llama2Fixture(false);
  root["added_tokens"].push_back(AddedTokenJson(300, "<w>", false, true, false, false, false));
  auto t = Load(root.dump());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Encode("<w>", false), (std::vector<int32_t>{300}));
  EXPECT_EQ(t->Encode("hello <w> world", false), (std::vector<int32_t>{271, 259, 300, 259, 276}));
  EXPECT_TRUE(Contains(t->Encode("-<w>.", false), 300));
  EXPECT_TRUE(Contains(t->Encode("\xE3\x80\x82<w>\xE3\x80\x82", false), 300));  // 。<w>。
  EXPECT_TRUE(Contains(t->Encode("<w>\xC2\xB2", false), 300));                  // ² is not \w
  // Word characters on either side: ASCII, '_', digits, letters of any script,
  // combining marks, connector punctuation, ZWJ.
  for (const char* side : {"x", "_", "7", "\xC3\xA9", "\xE4\xB8\xAD", "\xD0\x96", "\xCC\x81",
                           "\xE2\x80\xBF", "\xE2\x80\x8D", "\xD9\xA3"}) {
    EXPECT_FALSE(Contains(t->Encode(std::string(side) + "<w>", false), 300)) << side;
    EXPECT_FALSE(Contains(t->Encode(std::string("<w>") + side, false), 300)) << side;
  }
}

TEST(AddedTokensTest, RejectedLongestMatchIsSkippedLikeHf) {
  // Leftmost-longest, non-overlapping: "<q>" is found at 0 and rejected
  // (single_word, followed by 'z'); the scan resumes after it, so the shorter
  // "<q" at the same position is not tried.
  json root = Llama2Fixture(false);
  root["added_tokens"].push_back(AddedTokenJson(300, "<q", false, false, false, false, false));
  root["added_tokens"].push_back(AddedTokenJson(301, "<q>", false, true, false, false, false));
  auto t = Load(root.dump());
  ASSERT_NE(t, nullptr);
  const std::vector<int32_t> ids = t->Encode("<q>z", false);
  EXPECT_FALSE(Contains(ids, 300));
  EXPECT_FALSE(Contains(ids, 301));
  // Accepted when followed by a space; "<q" is then found in "<qz". (Every piece
  // between added tokens gets the normalizer's "▁": " " -> "▁▁", "z" -> "▁z".)
  EXPECT_EQ(t->Encode("<q> <qz", false),
            (std::vector<int32_t>{301, 259, 259, 300, 259, ByteId('z')}));
}

TEST(AddedTokensTest, NormalizedTokensMatchTheNormalizedText) {
  json root = Llama2Fixture(false);  // Prepend("▁") + Replace(" ", "▁")
  root["added_tokens"].push_back(
      AddedTokenJson(300, "<tool call>", false, false, false, false, true));
  root["added_tokens"].push_back(AddedTokenJson(301, "<raw>", false, false, false, false, false));
  auto t = Load(root.dump());
  ASSERT_NE(t, nullptr);
  // Looked for as "▁<tool▁call>": after a space or at the start of a piece.
  EXPECT_EQ(t->Encode("hello <tool call> world", false), (std::vector<int32_t>{271, 300, 276}));
  EXPECT_EQ(t->Encode("<tool call>", false), (std::vector<int32_t>{300}));
  EXPECT_EQ(t->Encode("<tool call> hello", true), (std::vector<int32_t>{1, 300, 271}));
  EXPECT_EQ(t->Encode("<raw><tool call>", false), (std::vector<int32_t>{301, 300}));
  // Not after a letter (the pattern's "▁" is missing), as in HF.
  EXPECT_FALSE(Contains(t->Encode("hello<tool call>", false), 300));
  // Non-normalized tokens are found in the raw text first; the pieces between them
  // are normalized separately (each gets its "▁"), like HF's Llama-2 tokenizer.json.
  EXPECT_EQ(t->Encode("hello<s> world", false), (std::vector<int32_t>{271, 1, 259, 276}));
  EXPECT_EQ(t->Encode("hello<raw>world", false), (std::vector<int32_t>{271, 301, 276}));
  EXPECT_EQ(t->Decode({271, 300, 276}, false), "hello<tool call> world");

  // Without a normalizer the pattern is the content itself.
  json ms = Llama2Fixture(true);
  ms["added_tokens"].push_back(
      AddedTokenJson(300, "<tool call>", false, false, false, false, true));
  auto m = Load(ms.dump());
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->Encode("hello <tool call> world", false),
            (std::vector<int32_t>{271, 259, 300, 276}));
  EXPECT_EQ(m->Encode("hello<tool call>world", false),
            (std::vector<int32_t>{271, 300, 264, 273, 275}));
}

TEST(AddedTokensTest, MissingNormalizedFieldDefaultsToNotSpecial) {
  json root = Llama2Fixture(false);
  json normal = {{"id", 300}, {"content", "<a b>"}, {"special", false}};
  json special = {{"id", 301}, {"content", "<c d>"}, {"special", true}};
  root["added_tokens"].push_back(normal);
  root["added_tokens"].push_back(special);
  auto t = Load(root.dump());
  ASSERT_NE(t, nullptr);
  // <a b> is normalized (needs the "▁" before it), <c d> is not.
  EXPECT_FALSE(Contains(t->Encode("x<a b>", false), 300));
  EXPECT_TRUE(Contains(t->Encode("x <a b>", false), 300));
  EXPECT_TRUE(Contains(t->Encode("x<c d>", false), 301));
}

}  // namespace
}  // namespace kvrelay::tokenizer
