#include "router/model_context.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/rpc/convert.h"
#include "common/tokenizer/stop_strings.h"
#include "common/tokenizer/unicode.h"
#include "common/util/file.h"
#include "common/util/status.h"

namespace kvrelay::router {

absl::StatusOr<std::unique_ptr<ModelContext>> ModelContext::Load(const std::string& dir,
                                                                 const std::string& model_id,
                                                                 int block_size,
                                                                 const std::string& chat_format) {
  if (dir.empty()) return absl::InvalidArgumentError("--model is required");
  if (block_size < 1 || block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block_size must be in [1, 1024], got ", block_size));
  }
  auto m = std::make_unique<ModelContext>();
  m->model_id = model_id.empty() ? BaseName(dir) : model_id;
  m->block_size = block_size;
  KVR_ASSIGN_OR_RETURN(m->config, model::LoadModelConfig(dir));
  KVR_ASSIGN_OR_RETURN(m->tokenizer,
                       tokenizer::Tokenizer::FromFile(JoinPath(dir, "tokenizer.json")));
  if (chat_format.empty()) {
    KVR_ASSIGN_OR_RETURN(m->chat_format, tokenizer::DetectChatFormat(dir, *m->tokenizer));
  } else {
    absl::StatusOr<tokenizer::ChatFormat> f = tokenizer::ParseChatFormat(chat_format);
    if (!f.ok())
      return absl::InvalidArgumentError(absl::StrCat("--chat_format: ", f.status().message()));
    m->chat_format = *f;
  }
  return m;
}

namespace {

absl::StatusOr<std::vector<int32_t>> EncodeText(const ModelContext& m, const std::string& text,
                                                bool add_special, absl::string_view field) {
  if (text.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " is empty"));
  if (!tokenizer::IsValidUtf8(text)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is not valid UTF-8"));
  }
  return m.tokenizer->Encode(text, add_special);
}

absl::StatusOr<std::vector<int32_t>> EncodeChat(const ModelContext& m, const v1::ChatMessages& c,
                                                absl::string_view field) {
  std::vector<tokenizer::ChatMessage> messages;
  for (const v1::ChatMessage& msg : c.messages()) messages.push_back({msg.role(), msg.content()});
  const bool gen_prompt = c.has_add_generation_prompt()
                              ? c.add_generation_prompt()
                              : messages.empty() || messages.back().role != "assistant";
  absl::StatusOr<std::string> text = tokenizer::RenderChat(m.chat_format, messages, gen_prompt);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", text.status().message()));
  }
  return m.tokenizer->Encode(*text, tokenizer::AddSpecialTokensForChat(m.chat_format));
}

}  // namespace

absl::StatusOr<PreparedRequest> Prepare(const ModelContext& m, const v1::GenerateRequest& r,
                                        const std::string& generated_id) {
  if (!r.model().empty() && r.model() != m.model_id) {
    return absl::NotFoundError(
        absl::StrCat("model '", r.model(), "' is not served here; models: ", m.model_id));
  }
  PreparedRequest p;
  if (r.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id is longer than ", kMaxRequestIdBytes, " bytes"));
  }
  p.id = r.request_id().empty() ? generated_id : r.request_id();
  if (r.cache_salt().size() > kMaxCacheSaltBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache_salt is longer than ", kMaxCacheSaltBytes, " bytes"));
  }
  p.cache_salt = r.cache_salt();
  switch (r.input_case()) {
    case v1::GenerateRequest::kPrompt: {
      KVR_ASSIGN_OR_RETURN(p.prompt, EncodeText(m, r.prompt(), true, "prompt"));
      if (p.prompt.empty()) return absl::InvalidArgumentError("prompt encodes to no tokens");
      break;
    }
    case v1::GenerateRequest::kChat: {
      KVR_ASSIGN_OR_RETURN(p.prompt, EncodeChat(m, r.chat(), "chat"));
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      if (r.token_ids().ids().empty()) {
        return absl::InvalidArgumentError("token_ids.ids is empty");
      }
      for (int i = 0; i < r.token_ids().ids_size(); ++i) {
        const int32_t id = r.token_ids().ids(i);
        if (id < 0 || id >= m.config.vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat("token_ids.ids[", i, "] = ", id,
                                                         " is outside the vocabulary [0, ",
                                                         m.config.vocab_size, ")"));
        }
      }
      p.prompt.assign(r.token_ids().ids().begin(), r.token_ids().ids().end());
      break;
    }
    default:
      return absl::InvalidArgumentError("input is required: prompt, chat or token_ids");
  }
  if (static_cast<int64_t>(p.prompt.size()) >= m.config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt has ", p.prompt.size(), " tokens; the context length is ",
        m.config.max_position_embeddings, " (room for at least one new token needed)"));
  }
  KVR_ASSIGN_OR_RETURN(p.params, rpc::FromProto(r.sampling()));
  for (int i = 0; i < r.sampling().stop_token_ids_size(); ++i) {
    const int32_t id = r.sampling().stop_token_ids(i);
    if (id < 0 || id >= m.config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop_token_ids[", i, "] = ", id,
                                                     " is outside the vocabulary [0, ",
                                                     m.config.vocab_size, ")"));
    }
  }
  p.stop.assign(r.sampling().stop().begin(), r.sampling().stop().end());
  if (absl::Status s = tokenizer::StopStringMatcher::Validate(p.stop); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.stop: ", s.message()));
  }
  p.forward = r.sampling();
  p.forward.clear_stop();  // decode workers match token ids only
  return p;
}

absl::StatusOr<std::vector<int32_t>> TokenizeInput(const ModelContext& m,
                                                   const v1::TokenizeRequest& r) {
  if (!r.model().empty() && r.model() != m.model_id) {
    return absl::NotFoundError(
        absl::StrCat("model '", r.model(), "' is not served here; models: ", m.model_id));
  }
  switch (r.input_case()) {
    case v1::TokenizeRequest::kPrompt:
      return EncodeText(m, r.prompt(), r.has_add_special_tokens() ? r.add_special_tokens() : true,
                        "prompt");
    case v1::TokenizeRequest::kChat:
      return EncodeChat(m, r.chat(), "chat");
    default:
      return absl::InvalidArgumentError("input is required: prompt or chat");
  }
}

}  // namespace kvrelay::router
