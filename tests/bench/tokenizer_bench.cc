// Tokenizer throughput: Encode of a ~4,096-token English + multi-byte UTF-8 prompt
// (warm word cache and "cold": rotating through many distinct prompts), Decode,
// StreamingDetokenizer::Push, and TrainByteLevelBpe to vocab 1024. Tokenizers are
// GPT-2-style and Llama-3-style byte-level BPEs trained on the built-in corpus.
//
//   build/bin/tokenizer_bench [--benchmark_filter=...] [--benchmark_min_time=0.5]
//
// Performance targets for the tokenizer live here, not in the unit tests.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "common/tokenizer/bpe_trainer.h"
#include "common/tokenizer/tokenizer.h"

namespace kvrelay::tokenizer {
namespace {

constexpr int kVocabSize = 1024;
constexpr size_t kPromptTokens = 4096;
// Distinct prompts for the cold variant. Together they hold well over
// BpeModel::kMaxCacheEntries (50,000) distinct words, so by the time a prompt comes
// round again its words have been evicted (the cache is cleared when full).
constexpr int kColdPrompts = 96;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "tokenizer_bench: %s\n", what.c_str());
  std::exit(1);
}

std::unique_ptr<Tokenizer> LoadTrained(const std::string& json) {
  auto t = Tokenizer::FromJson(json, "bench/tokenizer.json");
  if (!t.ok()) Die(std::string(t.status().message()));
  return std::move(t).value();
}

// About kPromptTokens tokens of `text` (repeated as needed), cut on a token boundary.
std::string TrimToTokens(const Tokenizer& t, const std::string& text) {
  std::string long_text;
  while (t.Encode(long_text, false).size() < kPromptTokens) long_text += text;
  const std::vector<int32_t> ids = t.Encode(long_text, false);
  return t.Decode(std::vector<int32_t>(ids.begin(), ids.begin() + kPromptTokens), false);
}

// The built-in corpus with every word changed a little (one letter replaced, one or
// two letters appended), so a prompt's pre-tokens are almost all new to the word
// cache while the text keeps English-like subwords, spaces, punctuation and UTF-8.
std::string MutatedCorpus(std::mt19937* rng) {
  const std::string& corpus = BuiltinCorpus();
  std::uniform_int_distribution<int> letter('a', 'z');
  std::uniform_int_distribution<int> coin(0, 1);
  auto is_letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  std::string out;
  out.reserve(corpus.size() * 3 / 2);
  size_t i = 0;
  while (i < corpus.size()) {
    if (!is_letter(corpus[i])) {
      out += corpus[i++];
      continue;
    }
    size_t end = i;
    while (end < corpus.size() && is_letter(corpus[end])) ++end;
    std::string word = corpus.substr(i, end - i);
    word[std::uniform_int_distribution<size_t>(0, word.size() - 1)(*rng)] =
        static_cast<char>(letter(*rng));
    word += static_cast<char>(letter(*rng));
    if (coin(*rng)) word += static_cast<char>(letter(*rng));
    out += word;
    i = end;
  }
  return out;
}

bool IsSpace(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// Whitespace-separated words in `text`; adds them to `distinct`.
size_t CountWords(const std::string& text, std::unordered_set<std::string>* distinct) {
  size_t words = 0;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && IsSpace(text[i])) ++i;
    size_t end = i;
    while (end < text.size() && !IsSpace(text[end])) ++end;
    if (end > i) {
      ++words;
      distinct->insert(text.substr(i, end - i));
    }
    i = end;
  }
  return words;
}

struct StyleFixture {
  std::string json;
  std::unique_ptr<Tokenizer> warm;  // Encode/Decode/streaming benchmarks
  std::unique_ptr<Tokenizer> cold;  // only ever sees the rotating cold prompts
  std::string prompt;
  std::vector<int32_t> prompt_ids;
  std::vector<std::string> cold_prompts;
  double cold_avg_tokens = 0;
  double cold_distinct_word_frac = 0;
  size_t next_cold = 0;  // rotation continues across benchmark runs
};

StyleFixture& Get(ByteLevelStyle style) {
  static StyleFixture* fixtures = [] {
    auto* f = new StyleFixture[2];
    for (ByteLevelStyle s : {ByteLevelStyle::kGpt2, ByteLevelStyle::kLlama3}) {
      StyleFixture& x = f[s == ByteLevelStyle::kGpt2 ? 0 : 1];
      BpeTrainOptions options;
      options.style = s;
      options.vocab_size = kVocabSize;
      auto trained = TrainByteLevelBpe(options);
      if (!trained.ok()) Die(std::string(trained.status().message()));
      x.json = trained->json;
      // A separate instance builds the prompts so that `warm` and `cold` start
      // with empty word caches.
      auto setup = LoadTrained(x.json);
      x.warm = LoadTrained(x.json);
      x.cold = LoadTrained(x.json);
      x.prompt = TrimToTokens(*setup, BuiltinCorpus());
      x.prompt_ids = setup->Encode(x.prompt, false);
      if (setup->Decode(x.prompt_ids, false) != x.prompt) Die("warm prompt does not round-trip");

      std::mt19937 rng(20240607);
      std::unordered_set<std::string> distinct;
      size_t words = 0;
      double tokens = 0;
      for (int p = 0; p < kColdPrompts; ++p) {
        std::string text = TrimToTokens(*setup, MutatedCorpus(&rng));
        const std::vector<int32_t> ids = setup->Encode(text, false);
        if (setup->Decode(ids, false) != text) Die("cold prompt does not round-trip");
        tokens += static_cast<double>(ids.size());
        words += CountWords(text, &distinct);
        x.cold_prompts.push_back(std::move(text));
      }
      x.cold_avg_tokens = tokens / kColdPrompts;
      x.cold_distinct_word_frac = static_cast<double>(distinct.size()) / words;
      std::fprintf(stderr,
                   "%s: prompt %zu tokens / %zu bytes; %d cold prompts, avg %.0f tokens, "
                   "%zu distinct words (%.1f%%)\n",
                   s == ByteLevelStyle::kGpt2 ? "gpt2" : "llama3", x.prompt_ids.size(),
                   x.prompt.size(), kColdPrompts, x.cold_avg_tokens, distinct.size(),
                   100.0 * x.cold_distinct_word_frac);
    }
    return f;
  }();
  return fixtures[style == ByteLevelStyle::kGpt2 ? 0 : 1];
}

ByteLevelStyle StyleArg(const benchmark::State& state) {
  return state.range(0) == 0 ? ByteLevelStyle::kGpt2 : ByteLevelStyle::kLlama3;
}

void SetStyleLabel(benchmark::State& state) {
  state.SetLabel(state.range(0) == 0 ? "gpt2" : "llama3");
}

// tokens/s and the time per prompt.
void SetPromptCounters(benchmark::State& state, double tokens_per_iter, double bytes_per_iter) {
  state.counters["tokens_per_s"] =
      benchmark::Counter(tokens_per_iter, benchmark::Counter::kIsIterationInvariantRate);
  // Inverse rate with value 1: seconds per iteration, printed with an SI prefix ("812us").
  state.counters["time_per_prompt"] = benchmark::Counter(
      1, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["tokens_per_prompt"] = tokens_per_iter;
  state.SetBytesProcessed(static_cast<int64_t>(bytes_per_iter * state.iterations()));
}

// Same prompt every iteration: every word is a cache hit after the first run.
void BM_EncodeWarm(benchmark::State& state) {
  StyleFixture& f = Get(StyleArg(state));
  size_t n = 0;
  for (auto _ : state) {
    std::vector<int32_t> ids = f.warm->Encode(f.prompt, false);
    n = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  SetPromptCounters(state, static_cast<double>(n), static_cast<double>(f.prompt.size()));
  SetStyleLabel(state);
}
BENCHMARK(BM_EncodeWarm)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// A different prompt every iteration, rotating through kColdPrompts prompts of
// mostly unseen words: nearly every pre-token misses the word cache.
void BM_EncodeCold(benchmark::State& state) {
  StyleFixture& f = Get(StyleArg(state));
  double tokens = 0;
  double bytes = 0;
  for (auto _ : state) {
    const std::string& prompt = f.cold_prompts[f.next_cold];
    f.next_cold = (f.next_cold + 1) % f.cold_prompts.size();
    std::vector<int32_t> ids = f.cold->Encode(prompt, false);
    tokens += static_cast<double>(ids.size());
    bytes += static_cast<double>(prompt.size());
    benchmark::DoNotOptimize(ids.data());
  }
  const double iters = static_cast<double>(state.iterations());
  SetPromptCounters(state, tokens / iters, bytes / iters);
  state.counters["distinct_word_frac"] = f.cold_distinct_word_frac;
  SetStyleLabel(state);
}
BENCHMARK(BM_EncodeCold)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

void BM_Decode(benchmark::State& state) {
  StyleFixture& f = Get(StyleArg(state));
  size_t bytes = 0;
  for (auto _ : state) {
    std::string text = f.warm->Decode(f.prompt_ids, false);
    bytes = text.size();
    benchmark::DoNotOptimize(text.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(f.prompt_ids.size()), benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(static_cast<int64_t>(bytes * state.iterations()));
  SetStyleLabel(state);
}
BENCHMARK(BM_Decode)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// One generated sequence of kPromptTokens ids pushed one at a time, then flushed.
void BM_StreamingPush(benchmark::State& state) {
  StyleFixture& f = Get(StyleArg(state));
  size_t bytes = 0;
  for (auto _ : state) {
    StreamingDetokenizer detok(f.warm.get(), /*skip_special_tokens=*/true);
    bytes = 0;
    for (int32_t id : f.prompt_ids) bytes += detok.Push(id).size();
    bytes += detok.Flush().size();
  }
  if (bytes != f.prompt.size()) state.SkipWithError("streamed text differs from the prompt");
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(f.prompt_ids.size()), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["time_per_push"] = benchmark::Counter(
      static_cast<double>(f.prompt_ids.size()),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  SetStyleLabel(state);
}
BENCHMARK(BM_StreamingPush)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

void BM_TrainVocab1024(benchmark::State& state) {
  BpeTrainOptions options;
  options.style = StyleArg(state);
  options.vocab_size = kVocabSize;
  for (auto _ : state) {
    auto trained = TrainByteLevelBpe(options);
    if (!trained.ok()) {
      state.SkipWithError(std::string(trained.status().message()).c_str());
      break;
    }
    benchmark::DoNotOptimize(trained->json.data());
  }
  state.counters["corpus_bytes"] = static_cast<double>(BuiltinCorpus().size());
  SetStyleLabel(state);
}
BENCHMARK(BM_TrainVocab1024)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvrelay::tokenizer

BENCHMARK_MAIN();
