#include "common/tokenizer/chat_template.h"

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/tokenizer/unicode.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "nlohmann/json.hpp"

// Reference templates (the `chat_template` of each model's tokenizer_config.json on the
// Hugging Face Hub); every format below reproduces what HF apply_chat_template renders with
// them, and the goldens in tests/unit/common/tokenizer/chat_template_test.cc were checked
// against HF-rendered outputs published by other projects (e.g. mistral.rs's
// test_chat_templates, generated with apply_chat_template):
//
// Qwen/Qwen2-7B-Instruct (ChatML):
//   {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}
//   {{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}
//   {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
//   {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
//   (the default system message is Qwen's own addition; generic ChatML, e.g.
//   teknium/OpenHermes-2.5-Mistral-7B, has none, and neither do we.)
//
// meta-llama/Meta-Llama-3-8B-Instruct:
//   {% set loop_messages = messages %}{% for message in loop_messages %}{% set content =
//   '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] |
//   trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}
//   {% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}
//   {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
//
// meta-llama/Llama-2-7b-chat-hf:
//   {% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set
//   system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}
//   {% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if
//   (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation
//   roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 ==
//   0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message +
//   '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}
//   {% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() +
//   ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' +
//   eos_token }}{% endif %}{% endfor %}
//
// mistralai/Mistral-7B-Instruct-v0.2 (current revision; the same text as mistral-common's
// tokenizer V1, see mistralai/cookbook concept-deep-dive/tokenization/templates.md:
// "<s> [INST] Hello, how are you? [/INST] Fine, and you?</s> [INST] ...", system prompt
// prepended to the first user message):
//   {%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}
//   {%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}
//   {%- endif %}{{- bos_token }}{%- for message in loop_messages %}{%- if (message['role'] ==
//   'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system
//   message, conversation roles must alternate user/assistant/user/assistant/...') }}
//   {%- endif %}{%- if message['role'] == 'user' %}{%- if loop.first and system_message is
//   defined %}{{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
//   {%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- elif
//   message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- else %}
//   {{- raise_exception('Only user and assistant roles are supported, ...') }}{%- endif %}
//   {%- endfor %}
//   (The first revision had '[INST] ' and no space before the assistant text, and no system
//   message; the model was trained on the V1 text above.)
//
// google/gemma-7b-it:
//   {{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not
//   supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') !=
//   (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate
//   user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}
//   {% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}
//   {{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}
//   {% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}
//   A system message is accepted the way google/gemma-3-*-it's template does it: its content
//   + '\n\n' (not trimmed) is put before the first user message's trimmed content, inside
//   that turn. Rejecting it (Gemma 1/2) would make every OpenAI-style client fail.

namespace kvrelay::tokenizer {
namespace {

using Json = nlohmann::json;

constexpr absl::string_view kChatTemplateJinja = "chat_template.jinja";
constexpr absl::string_view kTokenizerConfig = "tokenizer_config.json";

// Python's str.isspace(), which Jinja's `trim` filter and str.strip() use: Unicode
// White_Space plus U+001C..U+001F (Python counts the information separators as whitespace).
bool IsPythonWhitespace(uint32_t cp) {
  return IsUnicodeWhitespace(cp) || (cp >= 0x1C && cp <= 0x1F);
}

// Python's str.strip() with no argument. `s` is valid UTF-8 (checked before rendering).
absl::string_view PyStrip(absl::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    uint32_t cp = 0;
    const size_t n = DecodeUtf8At(s, begin, &cp);
    if (n == 0 || !IsPythonWhitespace(cp)) break;
    begin += n;
  }
  size_t end = s.size();
  while (end > begin) {
    uint32_t cp = 0;
    const size_t n = DecodeUtf8Before(s, end, &cp);
    if (n == 0 || !IsPythonWhitespace(cp)) break;
    end -= n;
  }
  return s.substr(begin, end - begin);
}

bool NeedsAlternation(ChatFormat f) {
  return f == ChatFormat::kLlama2 || f == ChatFormat::kMistral || f == ChatFormat::kGemma;
}

// The checks every format shares, plus the user/assistant alternation of the formats whose
// reference templates raise_exception without it.
absl::Status ValidateMessages(ChatFormat format, const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return absl::InvalidArgumentError("chat: no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("chat: message ", i, " has role '", m.role,
                                                     "'; expected system, user or assistant"));
    }
    if (m.role == "system" && i != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chat: message ", i, " has role 'system'; only the first message may be a system one"));
    }
    if (!IsValidUtf8(m.content)) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat: message ", i, " (", m.role, "): content is not valid UTF-8"));
    }
  }
  if (!NeedsAlternation(format)) return absl::OkStatus();
  const size_t first = messages[0].role == "system" ? 1 : 0;
  if (first == messages.size()) {
    // The reference templates would silently drop the system message (Llama-2) or render
    // nothing but BOS; neither is what the caller meant.
    return absl::InvalidArgumentError(
        absl::StrCat("chat: the ", ChatFormatName(format),
                     " chat format needs a user message after the system message (message 1)"));
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const char* expected = (i - first) % 2 == 0 ? "user" : "assistant";
    if (messages[i].role != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chat: message ", i, " has role '", messages[i].role, "' but '", expected,
          "' was expected: the ", ChatFormatName(format),
          " chat format needs roles alternating user/assistant/user/... after an optional "
          "system message"));
    }
  }
  return absl::OkStatus();
}

std::string RenderChatML(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out;
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

std::string RenderLlama3(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out = "<|begin_of_text|>";
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n",
                    PyStrip(m.content), "<|eot_id|>");
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// Llama-2 strips the *combined* first turn ("<<SYS>>\n" + system + ... + user), so the
// system text keeps its own surrounding whitespace and only the user text's end is stripped.
std::string RenderLlama2(const std::vector<ChatMessage>& messages) {
  std::string out;
  size_t i = 0;
  std::string system;
  bool has_system = false;
  if (messages[0].role == "system") {
    system = messages[0].content;
    has_system = true;
    i = 1;
  }
  for (bool first = true; i < messages.size(); ++i, first = false) {
    const ChatMessage& m = messages[i];
    std::string content = m.content;
    if (first && has_system) {
      content = absl::StrCat("<<SYS>>\n", system, "\n<</SYS>>\n\n", m.content);
    }
    if (m.role == "user") {
      absl::StrAppend(&out, "<s>[INST] ", PyStrip(content), " [/INST]");
    } else {
      absl::StrAppend(&out, " ", PyStrip(content), " </s>");
    }
  }
  return out;
}

std::string RenderMistral(const std::vector<ChatMessage>& messages) {
  std::string out = "<s>";
  size_t i = 0;
  const std::string* system = nullptr;
  if (messages[0].role == "system") {
    system = &messages[0].content;
    i = 1;
  }
  for (bool first = true; i < messages.size(); ++i, first = false) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      if (first && system != nullptr) {
        absl::StrAppend(&out, " [INST] ", *system, "\n\n", m.content, " [/INST]");
      } else {
        absl::StrAppend(&out, " [INST] ", m.content, " [/INST]");
      }
    } else {
      absl::StrAppend(&out, " ", m.content, "</s>");
    }
  }
  return out;
}

std::string RenderGemma(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out = "<bos>";
  size_t i = 0;
  std::string first_user_prefix;
  if (messages[0].role == "system") {
    first_user_prefix = absl::StrCat(messages[0].content, "\n\n");
    i = 1;
  }
  for (bool first = true; i < messages.size(); ++i, first = false) {
    const ChatMessage& m = messages[i];
    absl::StrAppend(&out, "<start_of_turn>", m.role == "assistant" ? "model" : m.role, "\n",
                    first ? first_user_prefix : "", PyStrip(m.content), "<end_of_turn>\n");
  }
  if (add_generation_prompt) out += "<start_of_turn>model\n";
  return out;
}

std::string RenderPlain(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out;
  for (const ChatMessage& m : messages) absl::StrAppend(&out, m.role, ": ", m.content, "\n");
  if (add_generation_prompt) out += "assistant:";
  return out;
}

// The template text of a tokenizer_config.json. nullopt when it has no chat_template.
absl::StatusOr<std::optional<std::string>> TemplateFromTokenizerConfig(const std::string& json_text,
                                                                       const std::string& path) {
  const Json j = Json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a JSON object at top level (got ", j.type_name(), ")"));
  }
  auto it = j.find("chat_template");
  if (it == j.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (!it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": field 'chat_template' must be a string or a list of {name, "
                     "template} objects (got ",
                     it->type_name(), ")"));
  }
  // Named templates (e.g. "default", "tool_use", "rag"): HF uses "default" for plain chat.
  const Json* first = nullptr;
  const Json* named_default = nullptr;
  for (size_t k = 0; k < it->size(); ++k) {
    const Json& e = (*it)[k];
    const bool ok = e.is_object() && e.contains("name") && e["name"].is_string() &&
                    e.contains("template") && e["template"].is_string();
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": chat_template[", k, "] must be an object with string 'name' and 'template'"));
    }
    if (first == nullptr) first = &e;
    if (named_default == nullptr && e["name"].get<std::string>() == "default") named_default = &e;
  }
  const Json* chosen = named_default != nullptr ? named_default : first;
  if (chosen == nullptr) return std::optional<std::string>();
  return std::optional<std::string>((*chosen)["template"].get<std::string>());
}

absl::StatusOr<ChatFormat> DetectChatFormatImpl(const std::string& model_dir, const Tokenizer& tok,
                                                std::string* source) {
  std::string why;
  std::optional<ChatFormat> format;
  const std::string jinja_path = JoinPath(model_dir, std::string(kChatTemplateJinja));
  const std::string config_path = JoinPath(model_dir, std::string(kTokenizerConfig));
  if (FileExists(jinja_path)) {
    KVR_ASSIGN_OR_RETURN(std::string text, ReadFile(jinja_path));
    format = ChatFormatFromTemplate(text);
    why = format ? absl::StrCat("chat template ", jinja_path)
                 : absl::StrCat("unrecognised chat template in ", jinja_path);
  } else if (FileExists(config_path)) {
    KVR_ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
    KVR_ASSIGN_OR_RETURN(std::optional<std::string> tmpl,
                         TemplateFromTokenizerConfig(text, config_path));
    if (tmpl) {
      format = ChatFormatFromTemplate(*tmpl);
      why = format ? absl::StrCat("chat_template in ", config_path)
                   : absl::StrCat("unrecognised chat_template in ", config_path);
    } else {
      why = absl::StrCat("no chat_template in ", config_path);
    }
  } else {
    why = "no tokenizer_config.json";
  }
  if (!format) {
    // Models whose template is missing or unknown still tell their family by their
    // turn-marker tokens. (Llama-2 has none of its own: "[INST]" is plain text there.)
    static constexpr struct {
      absl::string_view token;
      ChatFormat format;
    } kMarkers[] = {{"<|im_start|>", ChatFormat::kChatML},
                    {"<|start_header_id|>", ChatFormat::kLlama3},
                    {"<start_of_turn>", ChatFormat::kGemma},
                    {"[INST]", ChatFormat::kMistral}};
    for (const auto& marker : kMarkers) {
      if (tok.TokenToId(marker.token).has_value()) {
        format = marker.format;
        absl::StrAppend(&why, "; token ", marker.token, " in the vocabulary");
        break;
      }
    }
  }
  if (!format) {
    format = ChatFormat::kPlain;
    absl::StrAppend(&why, "; no chat marker tokens: plain");
  }
  if (source != nullptr) *source = std::move(why);
  return *format;
}

}  // namespace

const char* ChatFormatName(ChatFormat format) {
  switch (format) {
    case ChatFormat::kChatML:
      return "chatml";
    case ChatFormat::kLlama3:
      return "llama3";
    case ChatFormat::kLlama2:
      return "llama2";
    case ChatFormat::kMistral:
      return "mistral";
    case ChatFormat::kGemma:
      return "gemma";
    case ChatFormat::kPlain:
      return "plain";
  }
  return "unknown";
}

absl::StatusOr<ChatFormat> ParseChatFormat(absl::string_view name) {
  for (ChatFormat f : {ChatFormat::kChatML, ChatFormat::kLlama3, ChatFormat::kLlama2,
                       ChatFormat::kMistral, ChatFormat::kGemma, ChatFormat::kPlain}) {
    if (name == ChatFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown chat format '", name, "' (expected chatml, llama3, llama2, mistral, gemma, plain)"));
}

bool AddSpecialTokensForChat(ChatFormat format) { return format == ChatFormat::kPlain; }

std::optional<ChatFormat> ChatFormatFromTemplate(absl::string_view chat_template) {
  // Order matters: Llama-2 templates contain "[INST]" too, and ChatML / Llama-3 / Gemma
  // markers are specific enough to win over anything else a template mentions.
  static constexpr struct {
    absl::string_view marker;
    ChatFormat format;
  } kMarkers[] = {{"<|im_start|>", ChatFormat::kChatML},
                  {"<|start_header_id|>", ChatFormat::kLlama3},
                  {"<start_of_turn>", ChatFormat::kGemma},
                  {"<<SYS>>", ChatFormat::kLlama2},
                  {"[INST]", ChatFormat::kMistral}};
  for (const auto& m : kMarkers) {
    if (chat_template.find(m.marker) != absl::string_view::npos) return m.format;
  }
  return std::nullopt;
}

absl::StatusOr<ChatFormat> DetectChatFormat(const std::string& model_dir, const Tokenizer& tok,
                                            std::string* source) {
  // nlohmann accessors are only used after type checks; the catch is the boundary guard the
  // rest of the code base keeps around JSON handling (e.g. bad_alloc on a huge file).
  try {
    return DetectChatFormatImpl(model_dir, tok, source);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_dir, ": cannot read the chat template: ", e.what()));
  }
}

absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt) {
  KVR_RETURN_IF_ERROR(ValidateMessages(format, messages));
  switch (format) {
    case ChatFormat::kChatML:
      return RenderChatML(messages, add_generation_prompt);
    case ChatFormat::kLlama3:
      return RenderLlama3(messages, add_generation_prompt);
    case ChatFormat::kLlama2:
      return RenderLlama2(messages);
    case ChatFormat::kMistral:
      return RenderMistral(messages);
    case ChatFormat::kGemma:
      return RenderGemma(messages, add_generation_prompt);
    case ChatFormat::kPlain:
      return RenderPlain(messages, add_generation_prompt);
  }
  return absl::InvalidArgumentError("chat: unknown chat format");
}

}  // namespace kvrelay::tokenizer
