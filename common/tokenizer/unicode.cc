#include "common/tokenizer/unicode.h"

namespace kvrelay::tokenizer {
namespace {

enum class SeqKind { kValid, kTruncated, kInvalid };

struct Seq {
  size_t len;  // bytes consumed: the whole character, or the maximal ill-formed subpart
  SeqKind kind;
};

// Classifies the sequence at text[pos] following Unicode Table 3-7.
Seq Scan(absl::string_view text, size_t pos) {
  const auto b0 = static_cast<uint8_t>(text[pos]);
  if (b0 < 0x80) return {1, SeqKind::kValid};
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {1, SeqKind::kInvalid};
  }
  size_t len = 1;
  for (size_t k = 0; k < need; ++k) {
    if (pos + len >= text.size()) return {len, SeqKind::kTruncated};
    const auto b = static_cast<uint8_t>(text[pos + len]);
    const uint8_t min = k == 0 ? lo : 0x80;
    const uint8_t max = k == 0 ? hi : 0xBF;
    if (b < min || b > max) return {len, SeqKind::kInvalid};
    ++len;
  }
  return {len, SeqKind::kValid};
}

}  // namespace

size_t ValidUtf8SequenceLength(absl::string_view text, size_t pos) {
  if (pos >= text.size()) return 0;
  Seq s = Scan(text, pos);
  return s.kind == SeqKind::kValid ? s.len : 0;
}

size_t Utf8CharLength(absl::string_view text, size_t pos) {
  size_t len = ValidUtf8SequenceLength(text, pos);
  return len == 0 ? 1 : len;
}

bool IsValidUtf8(absl::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    // Fast path for ASCII.
    if (static_cast<uint8_t>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    Seq s = Scan(text, pos);
    if (s.kind != SeqKind::kValid) return false;
    pos += s.len;
  }
  return true;
}

std::string ToValidUtf8Lossy(absl::string_view text) {
  if (IsValidUtf8(text)) return std::string(text);
  std::string out;
  out.reserve(text.size() + 8);
  size_t pos = 0;
  while (pos < text.size()) {
    Seq s = Scan(text, pos);
    if (s.kind == SeqKind::kValid) {
      out.append(text.data() + pos, s.len);
    } else {
      out.append(kReplacementChar.data(), kReplacementChar.size());
    }
    pos += s.len;
  }
  return out;
}

bool EndsWithIncompleteUtf8(absl::string_view text) {
  const size_t start = text.size() > 3 ? text.size() - 3 : 0;
  for (size_t pos = start; pos < text.size(); ++pos) {
    Seq s = Scan(text, pos);
    if (s.kind == SeqKind::kTruncated) return true;
  }
  return false;
}

void AppendCodepoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t DecodeUtf8At(absl::string_view text, size_t pos, uint32_t* codepoint) {
  const size_t len = ValidUtf8SequenceLength(text, pos);
  if (len == 0) return 0;
  const auto b0 = static_cast<uint8_t>(text[pos]);
  static constexpr uint8_t kLeadMask[] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  uint32_t cp = b0 & kLeadMask[len];
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(text[pos + k]) & 0x3F);
  *codepoint = cp;
  return len;
}

size_t DecodeUtf8Before(absl::string_view text, size_t end, uint32_t* codepoint) {
  if (end > text.size()) return 0;
  size_t begin = end;
  // Step back over at most three continuation bytes to the lead byte.
  while (begin > 0 && end - begin < 4) {
    --begin;
    if ((static_cast<uint8_t>(text[begin]) & 0xC0) != 0x80) break;
  }
  if (begin == end) return 0;
  const size_t len = DecodeUtf8At(text, begin, codepoint);
  return begin + len == end ? len : 0;
}

bool IsUnicodeWhitespace(uint32_t c) {
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

const ByteUnicodeMap& ByteUnicodeMap::Get() {
  static const ByteUnicodeMap* const kMap = new ByteUnicodeMap();
  return *kMap;
}

ByteUnicodeMap::ByteUnicodeMap() {
  char_to_byte_.fill(-1);
  std::array<bool, 256> printable{};
  size_t n = 0;
  auto add_printable = [&](int lo, int hi) {
    for (int b = lo; b <= hi; ++b) {
      printable[b] = true;
      byte_order_[n++] = static_cast<uint8_t>(b);
      byte_to_char_[b].clear();
      AppendCodepoint(static_cast<uint32_t>(b), &byte_to_char_[b]);
      char_to_byte_[b] = static_cast<int16_t>(b);
    }
  };
  add_printable('!', '~');
  add_printable(0xA1, 0xAC);
  add_printable(0xAE, 0xFF);
  uint32_t extra = 0;
  for (int b = 0; b < 256; ++b) {
    if (printable[b]) continue;
    const uint32_t cp = 256 + extra++;
    byte_order_[n++] = static_cast<uint8_t>(b);
    AppendCodepoint(cp, &byte_to_char_[b]);
    char_to_byte_[cp] = static_cast<int16_t>(b);
  }
}

std::string ByteUnicodeMap::Encode(absl::string_view bytes) const {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += byte_to_char_[static_cast<uint8_t>(c)];
  return out;
}

bool ByteUnicodeMap::Decode(absl::string_view chars, std::string* out) const {
  size_t pos = 0;
  while (pos < chars.size()) {
    const auto b0 = static_cast<uint8_t>(chars[pos]);
    uint32_t cp;
    if (b0 < 0x80) {
      cp = b0;
      pos += 1;
    } else if ((b0 & 0xE0) == 0xC0 && pos + 1 < chars.size() &&
               (static_cast<uint8_t>(chars[pos + 1]) & 0xC0) == 0x80) {
      cp = ((b0 & 0x1F) << 6) | (static_cast<uint8_t>(chars[pos + 1]) & 0x3F);
      pos += 2;
    } else {
      return false;  // every mapped code point is < U+0800
    }
    const int byte = CharToByte(cp);
    if (byte < 0) return false;
    out->push_back(static_cast<char>(byte));
  }
  return true;
}

}  // namespace kvrelay::tokenizer
