// The OpenAI HTTP API's JSON (issue 16) translated to and from kvrelay.v1.Generation, as
// pure functions: the HTTP server (openai_server.h) parses a body into GenerateRequests,
// sends them through the router's own gRPC service (the same request path, validation,
// routing, cancellation and metrics as any gRPC client), and writes the responses and
// stream chunks built here. Parameter checks that only the JSON form has (types, `n`,
// `stream_options`) are here; every other check is the gRPC path's (one place), its
// status mapped to the HTTP status OpenAI uses.
//
//   POST /v1/completions       prompt: string | [string] | [int] | [[int]]
//   POST /v1/chat/completions  messages: [{role, content: string | [{type: "text", text}]}]
//   Parameters: model, max_tokens (chat: also max_completion_tokens), temperature (default
//   1, as OpenAI's), top_p, top_k, min_p, seed, stop (string or list), n (1 only),
//   presence_penalty, frequency_penalty, repetition_penalty, logprobs (completions: 0..20
//   top entries; chat: bool, with top_logprobs), stream, stream_options.include_usage,
//   user (accepted, unused); kvrelay / vLLM extensions: cache_salt, ignore_eos,
//   stop_token_ids. Unknown parameters are ignored, as vLLM does.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/strings/string_view.h"
#include "grpcpp/support/status.h"
#include "kvrelay/v1/kvrelay.pb.h"
#include "nlohmann/json.hpp"

namespace kvrelay::router::openai {

enum class Kind { kCompletion, kChat };

// An error as OpenAI returns it: {"error": {"message", "type", "param", "code"}} with
// this HTTP status.
struct Error {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
};
std::string ErrorJson(const Error& e);

// The HTTP status and type OpenAI uses for a gRPC status of the request path:
// INVALID_ARGUMENT 400, UNAUTHENTICATED 401, NOT_FOUND 404 (model_not_found),
// RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, others 500.
Error FromGrpc(const grpc::Status& s);

struct Request {
  Kind kind = Kind::kCompletion;
  std::string model;                         // as asked ("" when absent)
  std::vector<v1::GenerateRequest> prompts;  // one per prompt (completions may batch)
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  int top_logprobs = -1;       // logprobs to report per token; -1: none
};

// The request for a JSON body; an Error (400, naming `param`) for malformed JSON, a
// parameter of the wrong type or out of what this layer accepts.
std::variant<Request, Error> ParseRequest(Kind kind, absl::string_view body);

// A token's text, for logprobs (the tokenizer's decoding of that one token).
using TokenText = std::function<std::string(int32_t)>;

// One prompt's result (non-streaming), or what a stream chunk adds.
struct Choice {
  int index = 0;
  std::string text;
  std::string finish_reason;  // "" while streaming
  std::vector<v1::TokenLogprobs> logprobs;
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
};

// The "logprobs" member of a choice (null when top_logprobs < 0). `text_offset` is where
// the first token's text starts in the choice's text (completions).
nlohmann::json LogprobsJson(Kind kind, const std::vector<v1::TokenLogprobs>& lp, int top_logprobs,
                            const TokenText& token_text, size_t text_offset);

// {"id", "object": "text_completion" | "chat.completion", "created", "model", "choices",
// "usage": {..., "prompt_tokens_details": {"cached_tokens"}}}.
nlohmann::json Response(const Request& r, const std::string& id, int64_t created,
                        const std::string& model, const std::vector<Choice>& choices,
                        const Usage& usage, const TokenText& token_text);

// A stream chunk ("text_completion" | "chat.completion.chunk") with one choice: `c.text`
// as the delta, finish_reason null unless set; `role` adds the chat delta's role (the
// first chunk). Usage chunk: no choices, the usage (stream_options.include_usage).
nlohmann::json Chunk(const Request& r, const std::string& id, int64_t created,
                     const std::string& model, const Choice& c, bool role,
                     const TokenText& token_text, size_t text_offset);
nlohmann::json UsageChunk(const Request& r, const std::string& id, int64_t created,
                          const std::string& model, const Usage& usage);

nlohmann::json UsageJson(const Usage& u);

// GET /v1/models.
nlohmann::json ModelsResponse(const std::string& model_id, int64_t created);

}  // namespace kvrelay::router::openai
