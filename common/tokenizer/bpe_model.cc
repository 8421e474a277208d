#include "common/tokenizer/bpe_model.h"

#include <cstdio>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/tokenizer/unicode.h"

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

absl::Status ModelError(absl::string_view detail) {
  return absl::InvalidArgumentError(absl::StrCat("model: ", detail));
}

bool IsNullOrEmptyString(const json& model, const char* key) {
  auto it = model.find(key);
  return it == model.end() || it->is_null() || (it->is_string() && it->get<std::string>().empty());
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const json& model) {
  try {
    if (!model.is_object()) return ModelError("not an object");
    std::string type = model.value("type", std::string());
    if (type.empty() && model.contains("merges")) type = "BPE";  // very old files omit it
    if (type != "BPE") {
      return ModelError(absl::StrCat("unsupported model type '", type, "' (only BPE)"));
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (!IsNullOrEmptyString(model, key)) {
        return ModelError(absl::StrCat(key, " is not supported"));
      }
    }
    std::unique_ptr<BpeModel> m(new BpeModel());
    const json& vocab = model.at("vocab");
    if (!vocab.is_object()) return ModelError("vocab must be an object");
    int32_t max_id = -1;
    m->vocab_.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const int64_t id = it.value().get<int64_t>();
      if (id < 0 || id >= kMaxId) {
        return ModelError(absl::StrCat("vocab id ", id, " of '", it.key(), "' out of range"));
      }
      m->vocab_[it.key()] = static_cast<int32_t>(id);
      max_id = std::max(max_id, static_cast<int32_t>(id));
    }
    m->id_to_token_.resize(static_cast<size_t>(max_id + 1));
    for (const auto& [token, id] : m->vocab_) m->id_to_token_[id] = token;

    const json& merges = model.at("merges");
    if (!merges.is_array()) return ModelError("merges must be an array");
    m->merges_.reserve(merges.size());
    int32_t rank = 0;
    for (const json& merge : merges) {
      std::string a, b;
      if (merge.is_string()) {
        const std::string line = merge.get<std::string>();
        const size_t space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
          return ModelError(absl::StrCat("merge '", line, "' is not of the form 'a b'"));
        }
        a = line.substr(0, space);
        b = line.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2) {
        a = merge[0].get<std::string>();
        b = merge[1].get<std::string>();
      } else {
        return ModelError(absl::StrCat("bad merge entry ", merge.dump()));
      }
      auto ia = m->vocab_.find(a);
      auto ib = m->vocab_.find(b);
      auto iab = m->vocab_.find(a + b);
      if (ia == m->vocab_.end() || ib == m->vocab_.end() || iab == m->vocab_.end()) {
        return ModelError(absl::StrCat("merge '", a, " ", b, "' uses a token not in the vocab"));
      }
      // Like HF (a map built from the list), a repeated pair keeps its last rank.
      m->merges_[PairKey(ia->second, ib->second)] = Merge{rank++, iab->second};
    }

    const json unk = model.value("unk_token", json());
    if (!unk.is_null()) {
      auto it = m->vocab_.find(unk.get<std::string>());
      if (it == m->vocab_.end()) {
        return ModelError(absl::StrCat("unk_token '", unk.get<std::string>(), "' not in vocab"));
      }
      m->unk_id_ = it->second;
    }
    m->fuse_unk_ = model.value("fuse_unk", false);
    m->byte_fallback_ = model.value("byte_fallback", false);
    m->ignore_merges_ = model.value("ignore_merges", false);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = m->vocab_.find(absl::string_view(name));
      m->byte_ids_[b] = it == m->vocab_.end() ? -1 : it->second;
    }
    return m;
  } catch (const json::exception& e) {
    return ModelError(e.what());
  }
}

std::optional<int32_t> BpeModel::TokenToId(absl::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !id_to_token_[id].has_value()) {
    return nullptr;
  }
  return &*id_to_token_[id];
}

size_t BpeModel::cache_size_for_test() const {
  absl::MutexLock lock(&mu_);
  return cache_.size();
}

void BpeModel::Encode(absl::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    absl::MutexLock lock(&mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t mark = ids->size();
  EncodeUncached(word, ids);
  if (cacheable) {
    std::vector<int32_t> result(ids->begin() + mark, ids->end());
    absl::MutexLock lock(&mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();  // bounded; refills with hot words
    cache_.emplace(std::string(word), std::move(result));
  }
}

void BpeModel::EncodeUncached(absl::string_view word, std::vector<int32_t>* ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  bool last_was_unk = false;
  auto push = [&symbols](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, n + 1, true});
  };
  for (size_t pos = 0; pos < word.size();) {
    const size_t len = Utf8CharLength(word, pos);
    const absl::string_view ch = word.substr(pos, len);
    pos += len;
    auto it = vocab_.find(ch);
    if (it != vocab_.end()) {
      push(it->second);
      last_was_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : ch) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        for (char c : ch) push(byte_ids_[static_cast<uint8_t>(c)]);
        last_was_unk = false;
        continue;
      }
    }
    if (unk_id_.has_value()) {
      if (!(fuse_unk_ && last_was_unk)) push(*unk_id_);
      last_was_unk = true;
    }
    // Without an unk token the character is dropped (as HF does).
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t left;
    int32_t right;
    int32_t merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int32_t pos) {
    if (pos < 0) return;
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    auto it = merges_.find(PairKey(symbols[pos].id, symbols[next].id));
    if (it != merges_.end()) {
      queue.push({it->second.rank, pos, symbols[pos].id, symbols[next].id, it->second.merged_id});
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.pos];
    if (!left.alive || left.id != c.left || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    if (right.id != c.right) continue;
    left.id = c.merged;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.pos;
    consider(left.prev);
    consider(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

}  // namespace kvrelay::tokenizer
