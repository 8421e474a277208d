#include "common/tokenizer/bpe_trainer.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/tokenizer/components.h"
#include "common/tokenizer/pattern.h"
#include "common/tokenizer/unicode.h"
#include "common/util/status.h"
#include "nlohmann/json.hpp"

namespace kvrelay::tokenizer {
namespace {

using ojson = nlohmann::ordered_json;

constexpr int kMaxVocabSize = 1 << 20;

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct Word {
  std::vector<int32_t> symbols;
  int64_t count = 0;
};

// Byte-level BPE training state. Pair counts are maintained incrementally: only
// words containing the merged pair are re-counted.
class Trainer {
 public:
  Trainer(std::vector<Word> words, size_t target_vocab)
      : words_(std::move(words)), target_(target_vocab) {
    const ByteUnicodeMap& map = ByteUnicodeMap::Get();
    for (uint8_t b : map.ByteOrder()) AddToken(map.ByteToChar(b));
    for (size_t w = 0; w < words_.size(); ++w) AddPairs(static_cast<int32_t>(w), +1);
  }

  void Run() {
    while (tokens_.size() < target_) {
      uint64_t best = 0;
      int64_t best_count = 0;
      for (const auto& [pair, count] : pair_counts_) {
        if (count < 2) continue;  // a merge must be seen at least twice
        if (count > best_count || (count == best_count && PairLess(pair, best))) {
          best = pair;
          best_count = count;
        }
      }
      if (best_count == 0) break;  // nothing left worth merging: vocab stays smaller
      ApplyMerge(best);
    }
  }

  const std::vector<std::string>& tokens() const { return tokens_; }
  const std::vector<std::pair<int32_t, int32_t>>& merges() const { return merges_; }

 private:
  int32_t AddToken(const std::string& s) {
    auto [it, inserted] = token_ids_.emplace(s, static_cast<int32_t>(tokens_.size()));
    if (inserted) tokens_.push_back(s);
    return it->second;
  }

  // Deterministic tie-break: lexicographically smaller (left, right) strings first.
  bool PairLess(uint64_t a, uint64_t b) const {
    const std::string& al = tokens_[a >> 32];
    const std::string& bl = tokens_[b >> 32];
    if (al != bl) return al < bl;
    return tokens_[a & 0xFFFFFFFFu] < tokens_[b & 0xFFFFFFFFu];
  }

  void AddPairs(int32_t w, int sign) {
    const Word& word = words_[w];
    for (size_t i = 0; i + 1 < word.symbols.size(); ++i) {
      const uint64_t key = PairKey(word.symbols[i], word.symbols[i + 1]);
      auto it = pair_counts_.find(key);
      if (sign > 0) {
        if (it == pair_counts_.end()) it = pair_counts_.emplace(key, 0).first;
        it->second += word.count;
        std::vector<int32_t>& where = pair_words_[key];
        if (where.empty() || where.back() != w) where.push_back(w);
      } else if (it != pair_counts_.end()) {
        it->second -= word.count;
        if (it->second <= 0) pair_counts_.erase(it);
      }
    }
  }

  void ApplyMerge(uint64_t pair) {
    const auto left = static_cast<int32_t>(pair >> 32);
    const auto right = static_cast<int32_t>(pair & 0xFFFFFFFFu);
    const int32_t merged = AddToken(tokens_[left] + tokens_[right]);
    if (recorded_.insert(pair).second) merges_.emplace_back(left, right);
    std::vector<int32_t> where = std::move(pair_words_[pair]);
    pair_words_.erase(pair);
    std::sort(where.begin(), where.end());
    where.erase(std::unique(where.begin(), where.end()), where.end());
    for (int32_t w : where) {
      std::vector<int32_t>& s = words_[w].symbols;
      bool present = false;
      for (size_t i = 0; i + 1 < s.size() && !present; ++i) {
        present = s[i] == left && s[i + 1] == right;
      }
      if (!present) continue;
      AddPairs(w, -1);
      std::vector<int32_t> out;
      out.reserve(s.size());
      for (size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == left && s[i + 1] == right) {
          out.push_back(merged);
          i += 2;
        } else {
          out.push_back(s[i++]);
        }
      }
      s = std::move(out);
      AddPairs(w, +1);
    }
    pair_counts_.erase(pair);
  }

  std::vector<Word> words_;
  size_t target_;
  std::vector<std::string> tokens_;
  absl::flat_hash_map<std::string, int32_t> token_ids_;
  std::vector<std::pair<int32_t, int32_t>> merges_;
  absl::flat_hash_set<uint64_t> recorded_;
  absl::flat_hash_map<uint64_t, int64_t> pair_counts_;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> pair_words_;
};

ojson AddedTokenJson(int id, const std::string& content) {
  return ojson{{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
               {"rstrip", false}, {"normalized", false}, {"special", true}};
}

ojson ByteLevelJson(bool add_prefix_space, bool trim_offsets, bool use_regex) {
  return ojson{{"type", "ByteLevel"},
               {"add_prefix_space", add_prefix_space},
               {"trim_offsets", trim_offsets},
               {"use_regex", use_regex}};
}

}  // namespace

const std::string& BuiltinCorpus() {
  static const std::string* const kCorpus = new std::string(
#include "common/tokenizer/builtin_corpus.inc"
  );
  return *kCorpus;
}

absl::StatusOr<TrainedTokenizer> TrainByteLevelBpe(const BpeTrainOptions& options) {
  const bool llama3 = options.style == ByteLevelStyle::kLlama3;
  TrainedTokenizer result;
  result.special_tokens =
      llama3 ? std::vector<std::string>{"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"}
             : std::vector<std::string>{"<|endoftext|>"};
  const int num_special = static_cast<int>(result.special_tokens.size());
  if (options.vocab_size < 256 + num_special || options.vocab_size > kMaxVocabSize) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", options.vocab_size,
                                                   " must be in [", 256 + num_special, ", ",
                                                   kMaxVocabSize, "]"));
  }
  const std::string& corpus = options.corpus.empty() ? BuiltinCorpus() : options.corpus;
  const absl::string_view pattern = llama3 ? kLlama3Pattern : kGpt2Pattern;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Regex> regex, Regex::Compile(pattern));

  // Count the pre-tokens, then order them so training does not depend on hash order.
  absl::flat_hash_map<std::string, int64_t> counts;
  for (const Span& s :
       SplitByMatches(corpus, regex->FindAll(corpus), SplitBehavior::kIsolated, false)) {
    ++counts[corpus.substr(s.begin, s.end - s.begin)];
  }
  std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end());
  std::array<int32_t, 256> byte_id{};
  const auto& order = ByteUnicodeMap::Get().ByteOrder();
  for (int i = 0; i < 256; ++i) byte_id[order[i]] = i;
  std::vector<Word> words;
  words.reserve(sorted.size());
  for (const auto& [text, count] : sorted) {
    Word w;
    w.count = count;
    for (char c : text) w.symbols.push_back(byte_id[static_cast<uint8_t>(c)]);
    words.push_back(std::move(w));
  }

  Trainer trainer(std::move(words), static_cast<size_t>(options.vocab_size - num_special));
  trainer.Run();
  const std::vector<std::string>& tokens = trainer.tokens();
  const int model_vocab = static_cast<int>(tokens.size());

  ojson added = ojson::array();
  for (int i = 0; i < num_special; ++i) {
    added.push_back(AddedTokenJson(model_vocab + i, result.special_tokens[i]));
  }
  ojson vocab = ojson::object();
  for (int i = 0; i < model_vocab; ++i) vocab[tokens[i]] = i;
  ojson merges = ojson::array();
  for (const auto& [a, b] : trainer.merges()) merges.push_back(tokens[a] + " " + tokens[b]);

  ojson root;
  root["version"] = "1.0";
  root["truncation"] = nullptr;
  root["padding"] = nullptr;
  root["added_tokens"] = std::move(added);
  root["normalizer"] = nullptr;
  if (llama3) {
    root["pre_tokenizer"] =
        ojson{{"type", "Sequence"},
              {"pretokenizers",
               ojson::array({ojson{{"type", "Split"},
                                   {"pattern", ojson{{"Regex", std::string(kLlama3Pattern)}}},
                                   {"behavior", "Isolated"},
                                   {"invert", false}},
                             ByteLevelJson(false, true, false)})}};
    const std::string& bos = result.special_tokens[0];
    auto piece = [](const char* kind, const std::string& id) {
      return ojson{{kind, ojson{{"id", id}, {"type_id", 0}}}};
    };
    root["post_processor"] =
        ojson{{"type", "TemplateProcessing"},
              {"single", ojson::array({piece("SpecialToken", bos), piece("Sequence", "A")})},
              {"pair", ojson::array({piece("SpecialToken", bos), piece("Sequence", "A"),
                                     ojson{{"SpecialToken", ojson{{"id", bos}, {"type_id", 1}}}},
                                     ojson{{"Sequence", ojson{{"id", "B"}, {"type_id", 1}}}}})},
              {"special_tokens", ojson{{bos, ojson{{"id", bos},
                                                   {"ids", ojson::array({model_vocab})},
                                                   {"tokens", ojson::array({bos})}}}}}};
    result.bos_token_id = model_vocab;
    result.eos_token_ids = {model_vocab + 1, model_vocab + 2};
  } else {
    root["pre_tokenizer"] = ByteLevelJson(false, true, true);
    root["post_processor"] = ByteLevelJson(true, false, true);
    result.bos_token_id = -1;
    result.eos_token_ids = {model_vocab};
  }
  root["decoder"] = ByteLevelJson(true, true, true);
  root["model"] = ojson{{"type", "BPE"},
                        {"dropout", nullptr},
                        {"unk_token", nullptr},
                        {"continuing_subword_prefix", nullptr},
                        {"end_of_word_suffix", nullptr},
                        {"fuse_unk", false},
                        {"byte_fallback", false},
                        {"ignore_merges", llama3},
                        {"vocab", std::move(vocab)},
                        {"merges", std::move(merges)}};
  try {
    result.json = root.dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    return absl::InternalError(absl::StrCat("serializing tokenizer.json: ", e.what()));
  }
  return result;
}

}  // namespace kvrelay::tokenizer
