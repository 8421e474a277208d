// Built-in chat templates: turns chat messages (kvrelay.v1.ChatMessages) into the prompt
// text a model was fine-tuned on. There is no Jinja engine; instead the common template
// families are written out by hand, each reproducing, character for character, what Hugging
// Face `apply_chat_template(messages, tokenize=False)` renders with that family's reference
// `chat_template` (the model each format cites in chat_template.cc). The model's own
// template is only used to *recognise* the family (DetectChatFormat).
//
// The rendered text contains the BOS token text where the reference template does
// ("<s>", "<|begin_of_text|>", "<bos>"), so it must be encoded with the
// add_special_tokens value AddSpecialTokensForChat() gives (false for all but kPlain), as HF
// does; otherwise the prompt would start with two BOS tokens.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/tokenizer/tokenizer.h"

namespace kvrelay::tokenizer {

enum class ChatFormat {
  // "<|im_start|>{role}\n{content}<|im_end|>\n" per message; generation prompt
  // "<|im_start|>assistant\n". Qwen2 / Qwen2.5 / Qwen3, OpenHermes, ... (no default
  // system message is inserted, unlike Qwen's own templates: pass one if the model wants it).
  kChatML,
  // "<|begin_of_text|>" then "<|start_header_id|>{role}<|end_header_id|>\n\n{trim(content)}
  // <|eot_id|>" per message; generation prompt "<|start_header_id|>assistant<|end_header_id|>
  // \n\n". Meta-Llama-3-Instruct (3.1+ templates add tool/date preambles that are not rendered).
  kLlama3,
  // "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ..."
  // (Llama-2-chat; user and assistant text stripped as Python's str.strip does). The user
  // turn ends with "[/INST]", so add_generation_prompt adds nothing.
  kLlama2,
  // "<s> [INST] {system}\n\n{user} [/INST] {assistant}</s> [INST] {user} [/INST]"
  // (Mistral-7B-Instruct-v0.1/v0.2, Mixtral-8x7B-Instruct: mistral-common tokenizer V1).
  // add_generation_prompt adds nothing. Templates of later Mistral models (tokenizer V3:
  // "[INST] user[/INST]", system before the last user message) are detected as this too.
  kMistral,
  // "<bos><start_of_turn>{user|model}\n{trim(content)}<end_of_turn>\n" per message, the system
  // message prepended to the first user message followed by "\n\n" (as Gemma 3 does; Gemma 1/2
  // reject a system message); generation prompt "<start_of_turn>model\n".
  kGemma,
  // For models without any chat template: "{role}: {content}\n" per message, generation prompt
  // "assistant:" (no trailing space: BPE vocabularies attach a space to the following word).
  // No BOS text; encode with add_special_tokens=true so the tokenizer adds its own.
  kPlain,
};

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// "chatml", "llama3", "llama2", "mistral", "gemma", "plain".
const char* ChatFormatName(ChatFormat format);

// Inverse of ChatFormatName. INVALID_ARGUMENT listing the known names otherwise.
absl::StatusOr<ChatFormat> ParseChatFormat(absl::string_view name);

// The add_special_tokens value to encode RenderChat's output with: false when the rendered
// text already holds the BOS text (every format but kPlain), true for kPlain.
bool AddSpecialTokensForChat(ChatFormat format);

// Recognises a template family by its markers: "<|im_start|>" -> kChatML,
// "<|start_header_id|>" -> kLlama3, "<start_of_turn>" -> kGemma, "<<SYS>>" -> kLlama2,
// "[INST]" -> kMistral (checked in this order: Llama-2 templates also contain "[INST]").
// nullopt when none is present.
std::optional<ChatFormat> ChatFormatFromTemplate(absl::string_view chat_template);

// Picks the format for the model in `model_dir`:
//  1. the chat template in `chat_template.jinja` (newer transformers save it there) or else
//     the `chat_template` field of `tokenizer_config.json` — a string, or a list of
//     {"name", "template"} objects of which the one named "default" (else the first) is used
//     — if its markers are recognised (ChatFormatFromTemplate);
//  2. else the tokenizer's vocabulary: "<|im_start|>", "<|start_header_id|>",
//     "<start_of_turn>", "[INST]" (TokenToId), in that order;
//  3. else kPlain.
// When `source` is given it receives a short explanation for logs, e.g.
// "chat_template in /m/tokenizer_config.json". INVALID_ARGUMENT (naming the file) when a file
// exists but is malformed: not JSON, or chat_template of the wrong type; the error of a file
// that exists but cannot be read is passed on.
absl::StatusOr<ChatFormat> DetectChatFormat(const std::string& model_dir, const Tokenizer& tok,
                                            std::string* source = nullptr);

// Renders `messages` in `format`. INVALID_ARGUMENT, naming the message index where one is
// at fault, when:
//  - there are no messages;
//  - a role is not "system", "user" or "assistant";
//  - a system message is not the first message;
//  - a content is not valid UTF-8;
//  - kLlama2 / kMistral / kGemma: after the optional system message the roles do not
//    alternate user, assistant, user, ... starting with user (their reference templates raise
//    the same error), or the system message is not followed by a user message.
// With add_generation_prompt the assistant turn header is appended (kLlama2 and kMistral have
// none: their prompt already ends with "[/INST]").
absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt);

}  // namespace kvrelay::tokenizer
