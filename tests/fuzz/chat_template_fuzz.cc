// Chat template rendering and detection (issue 17). The first byte picks the format
// and the generation prompt; the rest is role / content fields split at NUL bytes.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "common/tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvrelay::tokenizer::ChatFormat;
  if (size < 1) return 0;
  const std::string in(reinterpret_cast<const char*>(data) + 1, size - 1);
  static const ChatFormat kFormats[] = {ChatFormat::kChatML, ChatFormat::kLlama3,
                                        ChatFormat::kLlama2, ChatFormat::kMistral,
                                        ChatFormat::kGemma,  ChatFormat::kPlain};
  const ChatFormat format = kFormats[data[0] % 6];
  std::vector<std::string> fields = absl::StrSplit(in, '\0');
  std::vector<kvrelay::tokenizer::ChatMessage> messages;
  for (size_t i = 0; i + 1 < fields.size(); i += 2) {
    messages.push_back({fields[i], fields[i + 1]});
  }
  (void)kvrelay::tokenizer::RenderChat(format, messages, (data[0] & 0x80) != 0);
  (void)kvrelay::tokenizer::ChatFormatFromTemplate(in);
  (void)kvrelay::tokenizer::ParseChatFormat(in);
  return 0;
}
