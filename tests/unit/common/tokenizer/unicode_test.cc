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

TEST(Utf8Test, DecodeAtAndBefore) {
  const std::string text = "A\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80\xFF";
  uint32_t cp = 0;
  EXPECT_EQ(DecodeUtf8At(text, 0, &cp), 1u);
  EXPECT_EQ(cp, 0x41u);
  EXPECT_EQ(DecodeUtf8At(text, 1, &cp), 2u);
  EXPECT_EQ(cp, 0xE9u);
  EXPECT_EQ(DecodeUtf8At(text, 3, &cp), 3u);
  EXPECT_EQ(cp, 0x4E2Du);
  EXPECT_EQ(DecodeUtf8At(text, 6, &cp), 4u);
  EXPECT_EQ(cp, 0x1F600u);
  EXPECT_EQ(DecodeUtf8At(text, 2, &cp), 0u);   // continuation byte
  EXPECT_EQ(DecodeUtf8At(text, 10, &cp), 0u);  // 0xFF
  EXPECT_EQ(DecodeUtf8At(text, 11, &cp), 0u);  // end
  EXPECT_EQ(DecodeUtf8Before(text, 10, &cp), 4u);
  EXPECT_EQ(cp, 0x1F600u);
  EXPECT_EQ(DecodeUtf8Before(text, 6, &cp), 3u);
  EXPECT_EQ(cp, 0x4E2Du);
  EXPECT_EQ(DecodeUtf8Before(text, 3, &cp), 2u);
  EXPECT_EQ(DecodeUtf8Before(text, 1, &cp), 1u);
  EXPECT_EQ(cp, 0x41u);
  EXPECT_EQ(DecodeUtf8Before(text, 0, &cp), 0u);
  EXPECT_EQ(DecodeUtf8Before(text, 11, &cp), 0u);  // after 0xFF
  EXPECT_EQ(DecodeUtf8Before(text, 5, &cp), 0u);   // inside a character
  EXPECT_EQ(DecodeUtf8Before("\x80\x80\x80\x80", 4, &cp), 0u);
}

TEST(Utf8Test, UnicodeWhitespaceIsRustIsWhitespace) {
  for (uint32_t c : {0x09u, 0x0Au, 0x0Bu, 0x0Cu, 0x0Du, 0x20u, 0x85u, 0xA0u, 0x1680u, 0x2000u,
                     0x2005u, 0x200Au, 0x2028u, 0x2029u, 0x202Fu, 0x205Fu, 0x3000u}) {
    EXPECT_TRUE(IsUnicodeWhitespace(c)) << std::hex << c;
  }
  for (uint32_t c : {0x00u, 0x08u, 0x0Eu, 0x1Fu, 0x21u, 0x41u, 0x84u, 0x86u, 0x9Fu, 0xA1u, 0x180Eu,
                     0x200Bu, 0x200Cu, 0x200Du, 0x2060u, 0xFEFFu, 0x3001u}) {
    EXPECT_FALSE(IsUnicodeWhitespace(c)) << std::hex << c;
  }
}

}  // namespace
}  // namespace kvrelay::tokenizer
