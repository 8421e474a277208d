// UTF-8 helpers and the GPT-2 byte <-> unicode mapping used by byte-level BPE.
// Internal to the tokenizer library.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace kvrelay::tokenizer {

inline constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length in bytes of the well-formed UTF-8 sequence starting at text[pos], or 0
// when the bytes there are not a complete well-formed sequence.
size_t ValidUtf8SequenceLength(absl::string_view text, size_t pos);

// Length of the character starting at text[pos] for splitting purposes: the
// well-formed sequence length, or 1 for an invalid byte. Never 0 when pos < size.
size_t Utf8CharLength(absl::string_view text, size_t pos);

bool IsValidUtf8(absl::string_view text);

// Replaces every maximal ill-formed subsequence with U+FFFD (the Unicode
// "substitution of maximal subparts" practice, same as Rust's from_utf8_lossy).
std::string ToValidUtf8Lossy(absl::string_view text);

// True when `text` ends with an incomplete (but so far well-formed) UTF-8 sequence.
bool EndsWithIncompleteUtf8(absl::string_view text);

void AppendCodepoint(uint32_t codepoint, std::string* out);

// Decodes the well-formed character starting at text[pos]. Returns its length in
// bytes (and sets *codepoint), or 0 when there is no well-formed character there.
size_t DecodeUtf8At(absl::string_view text, size_t pos, uint32_t* codepoint);

// Decodes the well-formed character ending just before text[end]. Returns its
// length in bytes (and sets *codepoint), or 0 when there is none.
size_t DecodeUtf8Before(absl::string_view text, size_t end, uint32_t* codepoint);

// Unicode White_Space: Rust's char::is_whitespace and regex \s (U+0009..U+000D,
// U+0020, U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
bool IsUnicodeWhitespace(uint32_t codepoint);

// GPT-2 bytes_to_unicode(): every byte maps to one printable code point
// ('!'..'~', '¡'..'¬', '®'..'ÿ' map to themselves; the rest to U+0100 + n).
class ByteUnicodeMap {
 public:
  static const ByteUnicodeMap& Get();

  // UTF-8 encoding of the code point for `byte`.
  const std::string& ByteToChar(uint8_t byte) const { return byte_to_char_[byte]; }
  // Maps a code point back to its byte; -1 when it is not in the table.
  int CharToByte(uint32_t codepoint) const {
    return codepoint < char_to_byte_.size() ? char_to_byte_[codepoint] : -1;
  }
  // The 256 bytes in GPT-2 vocabulary order (the order of bytes_to_unicode's `bs`).
  const std::array<uint8_t, 256>& ByteOrder() const { return byte_order_; }

  // Maps every byte of `bytes` to its character.
  std::string Encode(absl::string_view bytes) const;
  // Inverse of Encode. Returns false (and leaves `out` partially written) when a
  // character is not in the table.
  bool Decode(absl::string_view chars, std::string* out) const;

 private:
  ByteUnicodeMap();
  std::array<std::string, 256> byte_to_char_;
  std::array<int16_t, 324> char_to_byte_;
  std::array<uint8_t, 256> byte_order_;
};

}  // namespace kvrelay::tokenizer
