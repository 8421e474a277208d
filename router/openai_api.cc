#include "router/openai_api.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrelay::router::openai {
namespace {

using nlohmann::json;

Error Bad(const std::string& param, const std::string& message) {
  Error e;
  e.message = message;
  e.param = param;
  return e;
}

// A JSON number that must be finite (absent: nullopt).
std::optional<Error> GetNumber(const json& j, const char* name, std::optional<double>* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return Bad(name, absl::StrCat("'", name, "' must be a number"));
  const double v = it->get<double>();
  if (!std::isfinite(v)) return Bad(name, absl::StrCat("'", name, "' must be finite"));
  *out = v;
  return std::nullopt;
}

// A JSON integer in [lo, hi] (absent: nullopt).
std::optional<Error> GetInt(const json& j, const char* name, int64_t lo, int64_t hi,
                            std::optional<int64_t>* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) {
    // 16.0 is an integer too (JavaScript clients send numbers).
    if (it->is_number_float()) {
      const double d = it->get<double>();
      if (std::isfinite(d) && d == std::floor(d) && d >= static_cast<double>(lo) &&
          d <= static_cast<double>(hi)) {
        *out = static_cast<int64_t>(d);
        return std::nullopt;
      }
    }
    return Bad(name, absl::StrCat("'", name, "' must be an integer"));
  }
  int64_t v = 0;
  if (it->is_number_unsigned()) {
    const uint64_t u = it->get<uint64_t>();
    v = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
            ? std::numeric_limits<int64_t>::max()
            : static_cast<int64_t>(u);
  } else {
    v = it->get<int64_t>();
  }
  if (v < lo || v > hi) {
    return Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "], got ", v));
  }
  *out = v;
  return std::nullopt;
}

std::optional<Error> GetBool(const json& j, const char* name, std::optional<bool>* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return Bad(name, absl::StrCat("'", name, "' must be a boolean"));
  *out = it->get<bool>();
  return std::nullopt;
}

std::optional<Error> GetString(const json& j, const char* name, std::optional<std::string>* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) return Bad(name, absl::StrCat("'", name, "' must be a string"));
  *out = it->get<std::string>();
  return std::nullopt;
}

// The sampling parameters both endpoints share.
std::optional<Error> ParseSampling(Kind kind, const json& j, v1::SamplingParams* s,
                                   int* top_logprobs) {
  std::optional<int64_t> i;
  std::optional<double> d;
  std::optional<bool> b;
  const int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  if (kind == Kind::kChat) {
    if (auto e = GetInt(j, "max_completion_tokens", 1, kMaxTokens, &i)) return e;
  }
  if (!i) {
    if (auto e = GetInt(j, "max_tokens", 1, kMaxTokens, &i)) return e;
  }
  if (i) s->set_max_tokens(static_cast<uint32_t>(*i));
  i.reset();
  // OpenAI's default temperature is 1 (the proto's 0 is greedy).
  if (auto e = GetNumber(j, "temperature", &d)) return e;
  s->set_temperature(static_cast<float>(d.value_or(1.0)));
  d.reset();
  if (auto e = GetNumber(j, "top_p", &d)) return e;
  if (d) s->set_top_p(static_cast<float>(*d));
  d.reset();
  if (auto e = GetInt(j, "top_k", -1, std::numeric_limits<int32_t>::max(), &i)) return e;
  if (i) s->set_top_k(static_cast<int32_t>(*i));
  i.reset();
  if (auto e = GetNumber(j, "min_p", &d)) return e;
  if (d) s->set_min_p(static_cast<float>(*d));
  d.reset();
  if (auto e = GetNumber(j, "presence_penalty", &d)) return e;
  if (d) s->set_presence_penalty(static_cast<float>(*d));
  d.reset();
  if (auto e = GetNumber(j, "frequency_penalty", &d)) return e;
  if (d) s->set_frequency_penalty(static_cast<float>(*d));
  d.reset();
  if (auto e = GetNumber(j, "repetition_penalty", &d)) return e;
  if (d) s->set_repetition_penalty(static_cast<float>(*d));
  d.reset();
  if (auto e = GetInt(j, "seed", std::numeric_limits<int64_t>::min(),
                      std::numeric_limits<int64_t>::max(), &i)) {
    return e;
  }
  if (i) s->set_seed(static_cast<uint64_t>(*i));
  i.reset();
  if (auto e = GetBool(j, "ignore_eos", &b)) return e;
  if (b) s->set_ignore_eos(*b);
  b.reset();
  if (auto it = j.find("stop"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      s->add_stop(it->get<std::string>());
    } else if (it->is_array()) {
      for (const json& x : *it) {
        if (!x.is_string()) return Bad("stop", "'stop' must be a string or a list of strings");
        s->add_stop(x.get<std::string>());
      }
    } else {
      return Bad("stop", "'stop' must be a string or a list of strings");
    }
  }
  if (auto it = j.find("stop_token_ids"); it != j.end() && !it->is_null()) {
    if (!it->is_array())
      return Bad("stop_token_ids", "'stop_token_ids' must be a list of integers");
    for (const json& x : *it) {
      if (!x.is_number_integer()) {
        return Bad("stop_token_ids", "'stop_token_ids' must be a list of integers");
      }
      const int64_t v = x.get<int64_t>();
      if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
        return Bad("stop_token_ids", absl::StrCat("stop_token_ids: ", v, " is not a token id"));
      }
      s->add_stop_token_ids(static_cast<int32_t>(v));
    }
  }
  if (auto e = GetInt(j, "n", 1, std::numeric_limits<int64_t>::max(), &i)) return e;
  if (i && *i != 1) return Bad("n", absl::StrCat("only n=1 is supported, got n=", *i));
  i.reset();
  if (auto e = GetInt(j, "best_of", 1, std::numeric_limits<int64_t>::max(), &i)) return e;
  if (i && *i != 1) return Bad("best_of", "only best_of=1 is supported");
  i.reset();
  std::optional<std::string> user;
  if (auto e = GetString(j, "user", &user)) return e;
  // Logprobs: completions take the number of top entries; chat a boolean + top_logprobs.
  if (kind == Kind::kCompletion) {
    if (auto e = GetInt(j, "logprobs", 0, 20, &i)) return e;
    if (i) {
      *top_logprobs = static_cast<int>(*i);
      s->set_logprobs(static_cast<uint32_t>(std::max<int64_t>(1, *i)));
    }
    if (auto e = GetBool(j, "echo", &b)) return e;
    if (b && *b) return Bad("echo", "echo=true is not supported");
  } else {
    if (auto e = GetBool(j, "logprobs", &b)) return e;
    if (auto e = GetInt(j, "top_logprobs", 0, 20, &i)) return e;
    if (i && !(b && *b)) return Bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    if (b && *b) {
      *top_logprobs = static_cast<int>(i.value_or(0));
      s->set_logprobs(static_cast<uint32_t>(std::max<int64_t>(1, i.value_or(0))));
    }
  }
  return std::nullopt;
}

// completions' "prompt": string | [string] | [int] | [[int]]: one GenerateRequest each.
std::optional<Error> ParsePrompts(const json& p, const v1::GenerateRequest& base,
                                  std::vector<v1::GenerateRequest>* out) {
  const char* kShape =
      "'prompt' must be a string, a list of strings, a list of token ids "
      "or a list of lists of token ids";
  auto token_ids = [&](const json& a, v1::GenerateRequest* r) -> std::optional<Error> {
    for (const json& x : a) {
      if (!x.is_number_integer()) return Bad("prompt", kShape);
      const int64_t v = x.get<int64_t>();
      if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
        return Bad("prompt", absl::StrCat("prompt: ", v, " is not a token id"));
      }
      r->mutable_token_ids()->add_ids(static_cast<int32_t>(v));
    }
    return std::nullopt;
  };
  if (p.is_string()) {
    out->push_back(base);
    out->back().set_prompt(p.get<std::string>());
    return std::nullopt;
  }
  if (!p.is_array() || p.empty()) return Bad("prompt", kShape);
  if (p[0].is_number_integer()) {
    out->push_back(base);
    return token_ids(p, &out->back());
  }
  for (const json& x : p) {
    out->push_back(base);
    if (x.is_string()) {
      out->back().set_prompt(x.get<std::string>());
    } else if (x.is_array() && !x.empty()) {
      if (auto e = token_ids(x, &out->back())) return e;
    } else {
      return Bad("prompt", kShape);
    }
  }
  return std::nullopt;
}

// chat's "messages": content as a string or a list of text parts.
std::optional<Error> ParseMessages(const json& m, v1::ChatMessages* out) {
  if (!m.is_array() || m.empty()) {
    return Bad("messages", "'messages' must be a non-empty list of {role, content}");
  }
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string param = absl::StrCat("messages[", i, "]");
    const json& x = m[i];
    if (!x.is_object()) return Bad(param, absl::StrCat(param, " must be an object"));
    auto role = x.find("role");
    if (role == x.end() || !role->is_string()) {
      return Bad(param + ".role", absl::StrCat(param, ".role must be a string"));
    }
    v1::ChatMessage* msg = out->add_messages();
    msg->set_role(role->get<std::string>());
    auto content = x.find("content");
    if (content == x.end() || content->is_null()) continue;  // e.g. an assistant turn
    if (content->is_string()) {
      msg->set_content(content->get<std::string>());
    } else if (content->is_array()) {
      std::string text;
      for (const json& part : *content) {
        auto type = part.is_object() ? part.find("type") : part.end();
        if (!part.is_object() || type == part.end() || *type != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return Bad(param + ".content",
                     absl::StrCat(param,
                                  ".content: only {\"type\": \"text\", \"text\": ...} "
                                  "parts are supported"));
        }
        text += part["text"].get<std::string>();
      }
      msg->set_content(text);
    } else {
      return Bad(param + ".content",
                 absl::StrCat(param, ".content must be a string or a list of text parts"));
    }
  }
  return std::nullopt;
}

const char* Object(Kind kind, bool chunk) {
  if (kind == Kind::kChat) return chunk ? "chat.completion.chunk" : "chat.completion";
  return "text_completion";
}

json Base(const Request& r, const std::string& id, int64_t created, const std::string& model,
          bool chunk) {
  return json{
      {"id", id}, {"object", Object(r.kind, chunk)}, {"created", created}, {"model", model}};
}

json FinishReason(const std::string& f) { return f.empty() ? json(nullptr) : json(f); }

}  // namespace

std::string ErrorJson(const Error& e) {
  json err = {{"message", e.message},
              {"type", e.type},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return json{{"error", err}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

Error FromGrpc(const grpc::Status& s) {
  Error e;
  e.message = s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
      e.http_status = 400;
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      e.http_status = 401;
      e.type = "authentication_error";
      e.code = "invalid_api_key";
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      e.http_status = 403;
      e.type = "permission_error";
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.http_status = 404;
      e.code = "model_not_found";
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.http_status = 429;
      e.type = "rate_limit_error";
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.http_status = 503;
      e.type = "service_unavailable";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.http_status = 504;
      e.type = "timeout";
      break;
    default:
      e.http_status = 500;
      e.type = "internal_error";
  }
  return e;
}

std::variant<Request, Error> ParseRequest(Kind kind, absl::string_view body) {
  json j;
  try {
    j = json::parse(body.begin(), body.end());
  } catch (const json::parse_error& e) {
    // e.g. "parse error at line 1, column 12: syntax error while parsing value - invalid
    // string: ill-formed UTF-8 byte" (the byte offset is e.byte).
    return Bad("",
               absl::StrCat("the request body is not valid JSON (byte ", e.byte, "): ", e.what()));
  } catch (const json::exception& e) {
    // Not a syntax error but still no JSON value, e.g. out_of_range 406 for a number
    // beyond a double ("1e4444"): found by tests/fuzz/request_fuzz, which it made abort.
    return Bad("", absl::StrCat("the request body is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return Bad("", "the request body must be a JSON object");
  Request r;
  r.kind = kind;
  v1::GenerateRequest base;
  std::optional<std::string> s;
  if (auto e = GetString(j, "model", &s)) return *e;
  r.model = s.value_or("");
  base.set_model(r.model);
  s.reset();
  if (auto e = GetString(j, "cache_salt", &s)) return *e;
  if (s) base.set_cache_salt(*s);
  std::optional<bool> b;
  if (auto e = GetBool(j, "stream", &b)) return *e;
  r.stream = b.value_or(false);
  if (auto it = j.find("stream_options"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("stream_options", "'stream_options' must be an object");
    if (!r.stream) return Bad("stream_options", "'stream_options' needs 'stream': true");
    b.reset();
    if (auto e = GetBool(*it, "include_usage", &b)) {
      e->param = "stream_options.include_usage";
      return *e;
    }
    r.include_usage = b.value_or(false);
  }
  if (auto e = ParseSampling(kind, j, base.mutable_sampling(), &r.top_logprobs)) return *e;
  if (kind == Kind::kCompletion) {
    auto p = j.find("prompt");
    if (p == j.end() || p->is_null()) return Bad("prompt", "'prompt' is required");
    if (auto e = ParsePrompts(*p, base, &r.prompts)) return *e;
  } else {
    auto m = j.find("messages");
    if (m == j.end() || m->is_null()) return Bad("messages", "'messages' is required");
    r.prompts.push_back(base);
    if (auto e = ParseMessages(*m, r.prompts.back().mutable_chat())) return *e;
  }
  return r;
}

nlohmann::json LogprobsJson(Kind kind, const std::vector<v1::TokenLogprobs>& lp, int top_logprobs,
                            const TokenText& token_text, size_t text_offset) {
  if (top_logprobs < 0) return nullptr;
  if (kind == Kind::kChat) {
    json content = json::array();
    for (const v1::TokenLogprobs& t : lp) {
      json top = json::array();
      for (int k = 0; k < std::min(top_logprobs, t.top_size()); ++k) {
        top.push_back(
            {{"token", token_text(t.top(k).token_id())}, {"logprob", t.top(k).logprob()}});
      }
      content.push_back(
          {{"token", token_text(t.token_id())}, {"logprob", t.logprob()}, {"top_logprobs", top}});
    }
    return json{{"content", content}};
  }
  json tokens = json::array(), logprobs = json::array(), tops = json::array(),
       offsets = json::array();
  size_t offset = text_offset;
  for (const v1::TokenLogprobs& t : lp) {
    const std::string text = token_text(t.token_id());
    tokens.push_back(text);
    logprobs.push_back(t.logprob());
    json top = json::object();
    for (int k = 0; k < std::min(top_logprobs, t.top_size()); ++k) {
      top[token_text(t.top(k).token_id())] = t.top(k).logprob();
    }
    tops.push_back(top_logprobs > 0 ? top : json(nullptr));
    offsets.push_back(offset);
    offset += text.size();
  }
  return json{{"tokens", tokens},
              {"token_logprobs", logprobs},
              {"top_logprobs", tops},
              {"text_offset", offsets}};
}

nlohmann::json UsageJson(const Usage& u) {
  return json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

nlohmann::json Response(const Request& r, const std::string& id, int64_t created,
                        const std::string& model, const std::vector<Choice>& choices,
                        const Usage& usage, const TokenText& token_text) {
  json j = Base(r, id, created, model, false);
  json cs = json::array();
  for (const Choice& c : choices) {
    json x = {{"index", c.index},
              {"logprobs", LogprobsJson(r.kind, c.logprobs, r.top_logprobs, token_text, 0)},
              {"finish_reason", FinishReason(c.finish_reason)}};
    if (r.kind == Kind::kChat) {
      x["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      x["text"] = c.text;
    }
    cs.push_back(std::move(x));
  }
  j["choices"] = std::move(cs);
  j["usage"] = UsageJson(usage);
  return j;
}

nlohmann::json Chunk(const Request& r, const std::string& id, int64_t created,
                     const std::string& model, const Choice& c, bool role,
                     const TokenText& token_text, size_t text_offset) {
  json j = Base(r, id, created, model, true);
  json x = {{"index", c.index},
            {"logprobs", c.logprobs.empty() ? json(nullptr)
                                            : LogprobsJson(r.kind, c.logprobs, r.top_logprobs,
                                                           token_text, text_offset)},
            {"finish_reason", FinishReason(c.finish_reason)}};
  if (r.kind == Kind::kChat) {
    json delta = json::object();
    if (role) delta["role"] = "assistant";
    if (!c.text.empty() || role) delta["content"] = c.text;
    x["delta"] = std::move(delta);
  } else {
    x["text"] = c.text;
  }
  j["choices"] = json::array({std::move(x)});
  if (r.include_usage) j["usage"] = nullptr;
  return j;
}

nlohmann::json UsageChunk(const Request& r, const std::string& id, int64_t created,
                          const std::string& model, const Usage& usage) {
  json j = Base(r, id, created, model, true);
  j["choices"] = json::array();
  j["usage"] = UsageJson(usage);
  return j;
}

nlohmann::json ModelsResponse(const std::string& model_id, int64_t created) {
  return json{{"object", "list"},
              {"data", json::array({json{{"id", model_id},
                                         {"object", "model"},
                                         {"created", created},
                                         {"owned_by", "kvrelay"}}})}};
}

}  // namespace kvrelay::router::openai
