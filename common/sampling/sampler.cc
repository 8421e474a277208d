#include "common/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <iterator>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/device_math.h"

namespace kvrelay::sampling {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxLogprobs = 20;

// The per-token arithmetic (penalties, tempered probabilities, filter thresholds, the seeded
// draw) is kernels/device_math.h's, shared with the CUDA sampler (kernels/cuda/sampling.cu).
namespace math = kernels::math;

// NaN logits are treated as -inf: they can never win and never poison a sum.
float Sanitize(float logit) { return math::SampleSanitize(logit); }

// A token with its (unnormalised) probability.
struct Candidate {
  float p;
  int32_t id;
};

// The canonical order for every selection and walk: probability descending,
// token id ascending. It is a strict total order, so results never depend on
// how std::nth_element / std::sort permute equal elements. A function object
// (not a function pointer) so the std algorithms inline it.
struct BetterOrder {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.p > b.p || (a.p == b.p && a.id < b.id);
  }
};
constexpr BetterOrder Better;

// Sums probabilities in the order given; callers keep candidates in id order.
double SumInIdOrder(const std::vector<Candidate>& candidates) {
  double total = 0.0;
  for (const Candidate& c : candidates) total += c.p;
  return total;
}

// Keeps only candidates not worse than `boundary`, preserving id order.
void KeepNotWorseThan(const Candidate& boundary, std::vector<Candidate>* candidates) {
  candidates->erase(std::remove_if(candidates->begin(), candidates->end(),
                                   [&](const Candidate& c) { return Better(boundary, c); }),
                    candidates->end());
}

// A copy of a candidate set that is sorted in Better order lazily, in growing
// chunks (nth_element + sort of the chunk). Walking a short prefix of a peaked
// distribution costs O(n) instead of a full O(n log n) sort.
class SortedView {
 public:
  explicit SortedView(std::vector<Candidate> items) : items_(std::move(items)) {}

  size_t size() const { return items_.size(); }

  const Candidate& At(size_t i) {
    while (sorted_ <= i) SortNextChunk();
    return items_[i];
  }

 private:
  static constexpr size_t kFirstChunk = 256;
  static constexpr size_t kGrowth = 4;

  // Each chunk is kGrowth - 1 times the sorted prefix, so a walk that reaches
  // m tokens costs O(n log_kGrowth(m)) plus the sorts of the chunks.
  void SortNextChunk() {
    const size_t chunk = std::max(kFirstChunk, sorted_ * (kGrowth - 1));
    const size_t end = std::min(items_.size(), sorted_ + chunk);
    const auto first = items_.begin() + static_cast<std::ptrdiff_t>(sorted_);
    const auto mid = items_.begin() + static_cast<std::ptrdiff_t>(end);
    if (mid != items_.end()) std::nth_element(first, mid, items_.end(), Better);
    std::sort(first, mid, Better);
    sorted_ = end;
  }

  std::vector<Candidate> items_;
  size_t sorted_ = 0;
};

// A penalised logit for one token of the history.
struct TokenOverride {
  int32_t id;
  float logit;
};

bool InVocab(int32_t id, size_t vocab) { return id >= 0 && static_cast<size_t>(id) < vocab; }

std::vector<int32_t> SortedValidIds(absl::Span<const int32_t> ids, size_t vocab) {
  std::vector<int32_t> out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (InVocab(id, vocab)) out.push_back(id);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Penalised logits of the history tokens, sorted by id (sparse: every other
// token keeps its raw logit). Repetition penalty (HF/vLLM) over the distinct
// tokens of prompt + output, then frequency and presence penalties (OpenAI)
// over the output tokens.
std::vector<TokenOverride> PenalisedHistory(absl::Span<const float> logits,
                                            const SamplingParams& params,
                                            absl::Span<const int32_t> prompt_tokens,
                                            absl::Span<const int32_t> output_tokens) {
  const bool repetition = params.repetition_penalty != 1.0f;
  const bool additive = params.frequency_penalty != 0.0f || params.presence_penalty != 0.0f;
  if (!repetition && !additive) return {};

  const std::vector<int32_t> output = SortedValidIds(output_tokens, logits.size());
  std::vector<int32_t> ids = output;
  if (repetition) {
    const std::vector<int32_t> prompt = SortedValidIds(prompt_tokens, logits.size());
    std::vector<int32_t> merged;
    merged.reserve(prompt.size() + output.size());
    std::merge(prompt.begin(), prompt.end(), output.begin(), output.end(),
               std::back_inserter(merged));
    ids = std::move(merged);
  }
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());

  std::vector<TokenOverride> overrides;
  overrides.reserve(ids.size());
  for (int32_t id : ids) {
    float logit = Sanitize(logits[static_cast<size_t>(id)]);
    if (repetition) {
      logit = math::ApplyRepetitionPenalty(logit, params.repetition_penalty);
    }
    if (additive) {
      const auto range = std::equal_range(output.begin(), output.end(), id);
      const auto count = static_cast<float>(range.second - range.first);
      if (count > 0.0f) {
        logit = math::ApplyOutputPenalties(logit, count, params.frequency_penalty,
                                           params.presence_penalty);
      }
    }
    overrides.push_back({id, logit});
  }
  return overrides;
}

// Visits every token in id order with its penalised logit.
template <typename Fn>
void ForEachPenalisedLogit(absl::Span<const float> logits,
                           const std::vector<TokenOverride>& overrides, Fn&& fn) {
  size_t next = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    float logit;
    if (next < overrides.size() && static_cast<size_t>(overrides[next].id) == i) {
      logit = overrides[next++].logit;
    } else {
      logit = Sanitize(logits[i]);
    }
    fn(static_cast<int32_t>(i), logit);
  }
}

// Single pass: argmax of the penalised logits, lowest id on ties.
int32_t Greedy(absl::Span<const float> logits, const std::vector<TokenOverride>& overrides) {
  int32_t best = 0;
  float best_logit = kNegInf;
  ForEachPenalisedLogit(logits, overrides, [&](int32_t id, float logit) {
    if (logit > best_logit) {
      best = id;
      best_logit = logit;
    }
  });
  return best;
}

// exp((x - max) / temperature), computed so that tokens equal to the max get
// exactly 1 (also when the max is +-inf) and nothing overflows.
float RelativeProb(float logit, float max_logit, double temperature) {
  return math::SampleRelativeProb(logit, max_logit, temperature);
}

// Tempered softmax of the penalised logits, unnormalised (the max token has
// p == 1), id order, zero-probability tokens dropped.
std::vector<Candidate> TemperedCandidates(const std::vector<float>& work, float temperature) {
  const float max_logit = *std::max_element(work.begin(), work.end());
  std::vector<Candidate> candidates;
  candidates.reserve(work.size());
  for (size_t i = 0; i < work.size(); ++i) {
    const float p = RelativeProb(work[i], max_logit, temperature);
    if (p > 0.0f) candidates.push_back({p, static_cast<int32_t>(i)});
  }
  return candidates;
}

// Keeps the k best candidates (ties at the boundary: lower id wins).
void ApplyTopK(int top_k, std::vector<Candidate>* candidates) {
  const auto k = static_cast<size_t>(top_k);
  const size_t n = candidates->size();
  if (k >= n) return;
  Candidate boundary;  // The k-th best candidate.
  if (k <= n / 16) {
    // Bounded heap with the worst kept candidate on top: in one pass most
    // candidates are rejected by a single comparison.
    std::vector<Candidate> heap(candidates->begin(),
                                candidates->begin() + static_cast<std::ptrdiff_t>(k));
    std::make_heap(heap.begin(), heap.end(), Better);
    for (size_t i = k; i < n; ++i) {
      const Candidate& c = (*candidates)[i];
      if (!Better(c, heap.front())) continue;
      std::pop_heap(heap.begin(), heap.end(), Better);
      heap.back() = c;
      std::push_heap(heap.begin(), heap.end(), Better);
    }
    boundary = heap.front();
  } else {
    std::vector<Candidate> scratch = *candidates;
    const auto kth = scratch.begin() + static_cast<std::ptrdiff_t>(k - 1);
    std::nth_element(scratch.begin(), kth, scratch.end(), Better);
    boundary = *kth;
  }
  KeepNotWorseThan(boundary, candidates);
}

// Keeps the smallest Better-ordered prefix whose mass reaches top_p of the total.
void ApplyTopP(float top_p, std::vector<Candidate>* candidates) {
  const double threshold = math::TopPThreshold(top_p, SumInIdOrder(*candidates));
  SortedView sorted(*candidates);
  double cumulative = 0.0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const Candidate& c = sorted.At(i);
    cumulative += c.p;
    if (cumulative >= threshold) {
      KeepNotWorseThan(c, candidates);
      return;
    }
  }
  // Rounding kept the prefix just short of the threshold: keep everything.
}

// Drops candidates whose probability is below min_p times the largest one.
void ApplyMinP(float min_p, std::vector<Candidate>* candidates) {
  float max_p = 0.0f;
  for (const Candidate& c : *candidates) max_p = std::max(max_p, c.p);
  const float threshold = math::MinPThreshold(min_p, max_p);
  candidates->erase(std::remove_if(candidates->begin(), candidates->end(),
                                   [&](const Candidate& c) { return c.p < threshold; }),
                    candidates->end());
}

// Inverse-CDF draw over the candidates walked in Better order.
int32_t Draw(const std::vector<Candidate>& candidates, double u) {
  const double target = math::DrawTarget(u, SumInIdOrder(candidates));
  SortedView sorted(candidates);
  double cumulative = 0.0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    cumulative += sorted.At(i).p;
    if (cumulative > target) return sorted.At(i).id;
  }
  return sorted.At(sorted.size() - 1).id;  // Rounding guard: the last kept token.
}

int32_t SampleRandom(absl::Span<const float> logits, const SamplingParams& params,
                     const std::vector<TokenOverride>& overrides, int64_t position) {
  std::vector<float> work(logits.size());
  ForEachPenalisedLogit(logits, overrides,
                        [&](int32_t id, float logit) { work[static_cast<size_t>(id)] = logit; });

  std::vector<Candidate> candidates = TemperedCandidates(work, params.temperature);
  if (params.top_k > 0) ApplyTopK(params.top_k, &candidates);
  if (params.top_p < 1.0f) ApplyTopP(params.top_p, &candidates);
  if (params.min_p > 0.0f) ApplyMinP(params.min_p, &candidates);
  return Draw(candidates, UniformForPosition(params.seed, position));
}

// Log-softmax of the raw logits: logprob(x) = (x - max) - log(sum exp(x - max)).
class RawLogSoftmax {
 public:
  explicit RawLogSoftmax(absl::Span<const float> logits) : logits_(logits) {
    max_ = kNegInf;
    for (float x : logits) max_ = std::max(max_, Sanitize(x));
    double sum = 0.0;
    for (float x : logits) sum += std::exp(Shifted(Sanitize(x)));
    log_sum_ = std::log(sum);
  }

  float LogProb(int32_t id) const {
    return math::LogSoftmaxValue(Shifted(Sanitize(logits_[static_cast<size_t>(id)])), log_sum_);
  }

  // The n best tokens, best first, ties by lower id. One pass with a small
  // sorted buffer (n <= 20), no full sort of the vocabulary.
  std::vector<std::pair<int32_t, float>> Top(int n) const {
    const size_t limit = std::min(static_cast<size_t>(std::max(n, 0)), logits_.size());
    std::vector<Candidate> best;  // Candidate::p holds the raw logit here.
    best.reserve(limit + 1);
    for (size_t i = 0; i < logits_.size() && limit > 0; ++i) {
      const Candidate c{Sanitize(logits_[i]), static_cast<int32_t>(i)};
      if (best.size() == limit && !Better(c, best.back())) continue;
      best.insert(std::upper_bound(best.begin(), best.end(), c, Better), c);
      if (best.size() > limit) best.pop_back();
    }
    std::vector<std::pair<int32_t, float>> top;
    top.reserve(best.size());
    for (const Candidate& c : best) top.emplace_back(c.id, LogProb(c.id));
    return top;
  }

 private:
  // x - max, exactly 0 for the max itself (also when the max is +-inf).
  double Shifted(float x) const { return math::LogSoftmaxShift(x, max_); }

  absl::Span<const float> logits_;
  float max_;
  double log_sum_;
};

absl::Status InvalidField(absl::string_view field, absl::string_view requirement, float value) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must be ", requirement, ", got ", value));
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& params) {
  if (params.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", params.max_tokens));
  }
  const float temperature = params.temperature;
  if (std::isnan(temperature) || std::isinf(temperature)) {
    return InvalidField("temperature", "finite", temperature);
  }
  if (temperature < 0.0f) return InvalidField("temperature", ">= 0", temperature);
  if (params.top_k < -1) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be -1 or >= 0, got ", params.top_k));
  }
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return InvalidField("top_p", "in (0, 1]", params.top_p);
  }
  if (!(params.min_p >= 0.0f && params.min_p <= 1.0f)) {
    return InvalidField("min_p", "in [0, 1]", params.min_p);
  }
  if (!(params.repetition_penalty > 0.0f)) {
    return InvalidField("repetition_penalty", "> 0", params.repetition_penalty);
  }
  if (std::isinf(params.repetition_penalty)) {
    return InvalidField("repetition_penalty", "finite", params.repetition_penalty);
  }
  if (!(params.frequency_penalty >= -2.0f && params.frequency_penalty <= 2.0f)) {
    return InvalidField("frequency_penalty", "in [-2, 2]", params.frequency_penalty);
  }
  if (!(params.presence_penalty >= -2.0f && params.presence_penalty <= 2.0f)) {
    return InvalidField("presence_penalty", "in [-2, 2]", params.presence_penalty);
  }
  if (params.logprobs < 0 || params.logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs must be in [0, ", kMaxLogprobs, "], got ", params.logprobs));
  }
  for (size_t i = 0; i < params.stop_token_ids.size(); ++i) {
    if (params.stop_token_ids[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids[", i, "] must be >= 0, got ", params.stop_token_ids[i]));
    }
  }
  return absl::OkStatus();
}

SampleResult Sample(absl::Span<const float> logits, const SamplingParams& params,
                    absl::Span<const int32_t> prompt_tokens,
                    absl::Span<const int32_t> output_tokens, int64_t position) {
  SampleResult result;
  if (logits.empty()) return result;

  const std::vector<TokenOverride> overrides =
      PenalisedHistory(logits, params, prompt_tokens, output_tokens);
  const bool greedy = !(params.temperature > 0.0f) || params.top_k == 1;
  result.token =
      greedy ? Greedy(logits, overrides) : SampleRandom(logits, params, overrides, position);

  const RawLogSoftmax log_softmax(logits);
  result.logprob = log_softmax.LogProb(result.token);
  result.top_logprobs = log_softmax.Top(params.logprobs);
  return result;
}

double UniformForPosition(uint64_t seed, int64_t position) {
  // XXH3_64bits_withSeed over the 8 little-endian bytes of the position, seeded with
  // `seed`; the top 53 bits become a double in [0, 1). Stable across machines.
  return math::SampleUniform(seed, position);
}

}  // namespace kvrelay::sampling
