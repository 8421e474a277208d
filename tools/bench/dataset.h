// Workloads for `kvrelay bench serve` (and the router simulation): reproducible request
// traces generated from a seed, or read from a JSONL file.
//
// Every dataset is a list of conversations; single-turn datasets have one turn each.
// A turn carries the tokens it adds to the conversation (the user's new message) and
// how many tokens the reply should have. Turn t of a conversation is sent as
//   turn[0].tokens + reply[0] + ... + turn[t-1].tokens + reply[t-1] + turn[t].tokens
// i.e. with the whole history, as a chat client does; the replies are only known at run
// time (the load generator uses what the service returned, the simulation makes them up).
//
//   random      prompts of uniform random token ids; input length uniform in
//               [in x (1 - r), in x (1 + r)], output likewise (r = range_ratio), as
//               vLLM's `random` dataset.
//   prefix      `prefix_groups` shared system prompts of `prefix_len` tokens, each request
//               one of them (round robin) followed by a unique random suffix of the input
//               length distribution: the prefix-cache workload (vLLM `prefix_repetition`,
//               SGLang `generated-shared-prefix`).
//   multi-turn  conversations of `turns` turns, each turn a fresh random message of the
//               input length distribution, sent with the whole history; a think time
//               (exponential, mean `think_seconds`) between a reply and the next turn.
//   jsonl       one JSON object per line: {"prompt": TEXT | "prompt_token_ids": [ids],
//               "max_tokens": N (optional, default output_len)}; lines are single-turn
//               requests, in file order (a ShareGPT-style trace converted to this form).
//               Text prompts are tokenized by the caller (TurnSpec::text is set and
//               `tokens` is empty until then).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrelay::bench {

struct TurnSpec {
  std::vector<int32_t> tokens;  // new tokens of this turn (empty while `text` is pending)
  std::string text;             // jsonl text prompt, to be tokenized by the caller
  int max_tokens = 0;           // reply length asked for (ignore_eos makes it exact)
};

struct Conversation {
  std::vector<TurnSpec> turns;        // >= 1
  std::vector<double> think_seconds;  // before turn t (t >= 1); think_seconds[0] = 0
};

enum class DatasetKind { kRandom, kPrefix, kMultiTurn, kJsonl };

struct DatasetOptions {
  DatasetKind kind = DatasetKind::kRandom;
  int num_prompts = 100;  // conversations (for multi-turn: each has `turns` requests)
  int input_len = 256;
  int output_len = 64;
  double range_ratio = 0.0;    // in [0, 1)
  int prefix_groups = 4;       // prefix: shared system prompts
  int prefix_len = 512;        // prefix: tokens per shared system prompt
  int turns = 3;               // multi-turn
  double think_seconds = 0.0;  // multi-turn: mean think time (0: none)
  std::string jsonl_path;      // jsonl
  uint64_t seed = 0;
  int vocab_size = 0;  // token ids are drawn from [0, vocab_size); needed by synthetic kinds
};

// "random" | "prefix" | "multi-turn" | "jsonl"; INVALID_ARGUMENT naming the known ones.
absl::StatusOr<DatasetKind> ParseDatasetKind(const std::string& name);
const char* DatasetKindName(DatasetKind kind);

// The dataset for `options`: the same options (seed included) give the same dataset.
// INVALID_ARGUMENT for options out of range (naming the option); NOT_FOUND /
// INVALID_ARGUMENT naming the file and line for an unreadable or malformed jsonl.
// For jsonl, num_prompts > 0 keeps only the first num_prompts lines (0: all).
absl::StatusOr<std::vector<Conversation>> MakeDataset(const DatasetOptions& options);

// Total requests in a dataset (sum of turns).
int64_t CountRequests(const std::vector<Conversation>& dataset);

}  // namespace kvrelay::bench
