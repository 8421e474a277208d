#include "common/tokenizer/unicode.h"

#include <gtest/gtest.h>

#include <string>

namespace kvrelay::tokenizer {
namespace {

const std::string kFffd = "\xEF\xBF\xBD";

TEST(ByteUnicodeMapTest, MatchesGpt2Table) {
  const ByteUnicodeMap& map = ByteUnicodeMap::Get();
  EXPECT_EQ(map.ByteToChar('A'), "A");
  EXPECT_EQ(map.ByteToChar(' '), "\xC4\xA0");   // U+0120 'Ġ'
  EXPECT_EQ(map.ByteToChar('\n'), "\xC4\x8A");  // U+010A 'Ċ'
  EXPECT_EQ(map.ByteToChar(0), "\xC4\x80");     // U+0100 'Ā'
  EXPECT_EQ(map.ByteOrder()[0], '!');
  EXPECT_EQ(map.ByteOrder()[188], 0);
  EXPECT_EQ(map.ByteOrder()[220], ' ');  // "Ġ" has id 220 in GPT-2
  EXPECT_EQ(map.CharToByte(0x120), ' ');
  EXPECT_EQ(map.CharToByte(0x4E2D), -1);
}

TEST(ByteUnicodeMapTest, EncodeDecodeRoundTripsEveryByte) {
  const ByteUnicodeMap& map = ByteUnicodeMap::Get();
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::string chars = map.Encode(all);
  EXPECT_TRUE(IsValidUtf8(chars));
  std::string back;
  ASSERT_TRUE(map.Decode(chars, &back));
  EXPECT_EQ(back, all);
  std::string out;
  EXPECT_FALSE(map.Decode("\xE4\xB8\xAD", &out));  // '中' is not in the table
}

TEST(Utf8Test, Validity) {
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("caf\xC3\xA9 \xE4\xB8\xAD \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xC3"));
  EXPECT_FALSE(IsValidUtf8("\xC0\x80"));          // overlong
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // > U+10FFFF
  EXPECT_EQ(Utf8CharLength("\xF0\x9F\x98\x80", 0), 4u);
  EXPECT_EQ(Utf8CharLength("\x80", 0), 1u);
}

TEST(Utf8Test, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(ToValidUtf8Lossy("ok"), "ok");
  EXPECT_EQ(ToValidUtf8Lossy("a\xC3"), "a" + kFffd);
  EXPECT_EQ(ToValidUtf8Lossy("\xE4\xB8"
                             "a"),
            kFffd + "a");  // one U+FFFD for the prefix
  EXPECT_EQ(ToValidUtf8Lossy("\xFF\xFE"), kFffd + kFffd);
  EXPECT_EQ(ToValidUtf8Lossy("\xED\xA0\x80"), kFffd + kFffd + kFffd);
  EXPECT_EQ(ToValidUtf8Lossy("\xC3\xA9\x80"), "\xC3\xA9" + kFffd);
}

TEST(Utf8Test, EndsWithIncomplete) {
  EXPECT_TRUE(EndsWithIncompleteUtf8("a\xE4\xB8"));
  EXPECT_TRUE(EndsWithIncompleteUtf8("\xF0"));
  EXPECT_FALSE(EndsWithIncompleteUtf8("a\xE4\xB8\xAD"));
  EXPECT_FALSE(EndsWithIncompleteUtf8("\x80"));
  EXPECT_FALSE(EndsWithIncompleteUtf8(""));
}

TEST(Utf8Test, AppendCodepoint) {
  std::string s;
  AppendCodepoint(0x41, &s);
  AppendCodepoint(0xE9, &s);
  AppendCodepoint(0x4E2D, &s);
  AppendCodepoint(0x1F600, &s);
  EXPECT_EQ(s, "A\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80");
}

}  // namespace
}  // namespace kvrelay::tokenizer
