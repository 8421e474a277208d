#include "tools/bench/dataset.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace kvrelay::bench {
namespace {

// std::uniform_int_distribution's output is implementation-defined; a dataset must be the
// same on every machine for a seed, so draw from the raw 64-bit engine ourselves.
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  // Uniform in [lo, hi] (lo <= hi).
  int64_t Uniform(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    return lo + static_cast<int64_t>(engine_() % span);  // bias < 2^-40 for our spans
  }
  // Uniform in [0, 1).
  double Unit() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  double Exponential(double mean) { return -mean * std::log1p(-Unit()); }

 private:
  std::mt19937_64 engine_;  // mt19937_64's sequence is fixed by the standard
};

std::vector<int32_t> RandomTokens(Rng& rng, int n, int vocab) {
  std::vector<int32_t> t(n);
  for (int32_t& id : t) id = static_cast<int32_t>(rng.Uniform(0, vocab - 1));
  return t;
}

// A length around `mean`, uniform in [mean x (1 - r), mean x (1 + r)], at least 1.
int Length(Rng& rng, int mean, double r) {
  const auto lo = static_cast<int64_t>(std::floor(mean * (1.0 - r)));
  const auto hi = static_cast<int64_t>(std::ceil(mean * (1.0 + r)));
  return static_cast<int>(std::max<int64_t>(1, rng.Uniform(std::max<int64_t>(lo, 1), hi)));
}

absl::Status Check(bool ok, const std::string& what) {
  return ok ? absl::OkStatus() : absl::InvalidArgumentError(what);
}

absl::StatusOr<std::vector<Conversation>> ReadJsonl(const DatasetOptions& o) {
  std::ifstream in(o.jsonl_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the dataset file ", o.jsonl_path));
  std::vector<Conversation> out;
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (o.num_prompts > 0 && static_cast<int>(out.size()) >= o.num_prompts) break;
    const std::string where = absl::StrCat(o.jsonl_path, ":", line_no, ": ");
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(where + "not a JSON object");
    }
    TurnSpec turn;
    turn.max_tokens = o.output_len;
    const bool has_text = j.contains("prompt");
    const bool has_ids = j.contains("prompt_token_ids");
    if (has_text == has_ids) {
      return absl::InvalidArgumentError(where +
                                        "needs exactly one of \"prompt\" and \"prompt_token_ids\"");
    }
    if (has_text) {
      if (!j["prompt"].is_string() || j["prompt"].get_ref<const std::string&>().empty()) {
        return absl::InvalidArgumentError(where + "\"prompt\" must be a non-empty string");
      }
      turn.text = j["prompt"].get<std::string>();
    } else {
      const nlohmann::json& ids = j["prompt_token_ids"];
      if (!ids.is_array() || ids.empty()) {
        return absl::InvalidArgumentError(where + "\"prompt_token_ids\" must be a non-empty array");
      }
      for (const nlohmann::json& id : ids) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return absl::InvalidArgumentError(where + "\"prompt_token_ids\" holds a non-token-id");
        }
        turn.tokens.push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
    }
    if (j.contains("max_tokens")) {
      const nlohmann::json& m = j["max_tokens"];
      if (!m.is_number_integer() || m.get<int64_t>() < 1 || m.get<int64_t>() > (1 << 30)) {
        return absl::InvalidArgumentError(where + "\"max_tokens\" must be an integer >= 1");
      }
      turn.max_tokens = static_cast<int>(m.get<int64_t>());
    }
    Conversation c;
    c.turns.push_back(std::move(turn));
    c.think_seconds.push_back(0);
    out.push_back(std::move(c));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", o.jsonl_path));
  if (out.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the dataset file ", o.jsonl_path, " holds no request"));
  }
  return out;
}

}  // namespace

absl::StatusOr<DatasetKind> ParseDatasetKind(const std::string& name) {
  if (name == "random") return DatasetKind::kRandom;
  if (name == "prefix") return DatasetKind::kPrefix;
  if (name == "multi-turn") return DatasetKind::kMultiTurn;
  if (name == "jsonl") return DatasetKind::kJsonl;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dataset '", name, "' (known: random, prefix, multi-turn, jsonl)"));
}

const char* DatasetKindName(DatasetKind kind) {
  switch (kind) {
    case DatasetKind::kRandom:
      return "random";
    case DatasetKind::kPrefix:
      return "prefix";
    case DatasetKind::kMultiTurn:
      return "multi-turn";
    case DatasetKind::kJsonl:
      return "jsonl";
  }
  return "?";
}

absl::StatusOr<std::vector<Conversation>> MakeDataset(const DatasetOptions& o) {
  if (absl::Status s = Check(o.num_prompts >= 0, "--num-prompts must be >= 0"); !s.ok()) return s;
  if (o.kind == DatasetKind::kJsonl) {
    if (o.jsonl_path.empty()) return absl::InvalidArgumentError("the jsonl dataset needs a file");
    return ReadJsonl(o);
  }
  for (const absl::Status& s : {
           Check(o.num_prompts >= 1, "--num-prompts must be >= 1"),
           Check(o.input_len >= 1, "--input-len must be >= 1"),
           Check(o.output_len >= 1, "--output-len must be >= 1"),
           Check(o.range_ratio >= 0 && o.range_ratio < 1, "--random-range-ratio must be in [0, 1)"),
           Check(o.vocab_size >= 1, "the vocabulary size must be >= 1"),
           Check(o.kind != DatasetKind::kPrefix || o.prefix_groups >= 1,
                 "--prefix-groups must be >= 1"),
           Check(o.kind != DatasetKind::kPrefix || o.prefix_len >= 1, "--prefix-len must be >= 1"),
           Check(o.kind != DatasetKind::kMultiTurn || o.turns >= 1, "--turns must be >= 1"),
           Check(o.think_seconds >= 0 && std::isfinite(o.think_seconds),
                 "--think-seconds must be >= 0"),
       }) {
    if (!s.ok()) return s;
  }
  Rng rng(o.seed);
  std::vector<std::vector<int32_t>> prefixes;
  if (o.kind == DatasetKind::kPrefix) {
    for (int g = 0; g < o.prefix_groups; ++g) {
      prefixes.push_back(RandomTokens(rng, o.prefix_len, o.vocab_size));
    }
  }
  std::vector<Conversation> out(o.num_prompts);
  for (int i = 0; i < o.num_prompts; ++i) {
    Conversation& c = out[i];
    const int turns = o.kind == DatasetKind::kMultiTurn ? o.turns : 1;
    for (int t = 0; t < turns; ++t) {
      TurnSpec turn;
      turn.tokens = RandomTokens(rng, Length(rng, o.input_len, o.range_ratio), o.vocab_size);
      if (o.kind == DatasetKind::kPrefix) {
        const std::vector<int32_t>& p = prefixes[i % o.prefix_groups];
        turn.tokens.insert(turn.tokens.begin(), p.begin(), p.end());
      }
      turn.max_tokens = Length(rng, o.output_len, o.range_ratio);
      c.turns.push_back(std::move(turn));
      c.think_seconds.push_back(t == 0 || o.think_seconds == 0 ? 0.0
                                                               : rng.Exponential(o.think_seconds));
    }
  }
  return out;
}

int64_t CountRequests(const std::vector<Conversation>& dataset) {
  int64_t n = 0;
  for (const Conversation& c : dataset) n += static_cast<int64_t>(c.turns.size());
  return n;
}

}  // namespace kvrelay::bench
