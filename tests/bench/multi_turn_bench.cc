// Multi-turn prefill with prefix reuse: turn 1 is a prompt of H tokens plus O generated
// tokens; turn 2 is turn 1's prompt + its output + N new tokens. Turn 2's prefill is
// timed with the prefix cache (everything turn 1 left in the cache is reused) and cold
// (the same prompt under a cache_salt nothing else uses, so no block is reused), on the
// ~100M-parameter Llama-shaped model of decode_bench (same folder: /tmp/kvrelay-bench-100m
// or $KVRELAY_BENCH_DIR/kvrelay-bench-100m; written on first use).
//
// Each configuration runs --reps times after one untimed warm-up; reuse and cold
// alternate in order. Reported: medians of the prefill times (GenerationResult::
// prefill_seconds, which includes hashing and the cache lookup), the ratio reuse / cold,
// and beside it computed / total (tokens actually prefilled over the turn-2 prompt) and
// new / total (the N new tokens over the turn-2 prompt). Also timed: the computed tokens
// prefilled alone, as a prompt of their own (no cached context to attend to), which
// separates the cost of attending to the reused prefix from the per-token work.
//
//   build/bin/multi_turn_bench [--configs 1024:64:128,256:32:128] [--reps 5]
//                              [--prefill-chunk 256] [--kv-dtype f32|bf16]
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/generator.h"
#include "common/model/model.h"
#include "common/model/model_maker.h"
#include "common/util/file.h"
#include "kernels/ops.h"
#include "tests/bench/bench_model.h"

namespace kvrelay::bench {
namespace {

struct Config {
  int history = 1024;  // turn-1 prompt tokens
  int output = 64;     // turn-1 generated tokens
  int fresh = 128;     // new tokens in turn 2
};

struct Options {
  std::vector<Config> configs = {{1024, 64, 128}, {256, 32, 128}};
  int reps = 5;
  int prefill_chunk = 256;
  kernels::DType kv_dtype = kernels::DType::kF32;
};

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "multi_turn_bench: %s\n", what.c_str());
  std::exit(2);
}

int ArgInt(absl::string_view v) {
  int x = 0;
  if (!absl::SimpleAtoi(v, &x)) Die(absl::StrCat("not an integer: ", v));
  return x;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const std::string v = argv[i + 1];
    if (k == "--reps") {
      o.reps = ArgInt(v);
    } else if (k == "--prefill-chunk") {
      o.prefill_chunk = ArgInt(v);
    } else if (k == "--kv-dtype") {
      if (v == "f32") {
        o.kv_dtype = kernels::DType::kF32;
      } else if (v == "bf16") {
        o.kv_dtype = kernels::DType::kBF16;
      } else {
        Die("--kv-dtype must be f32 or bf16");
      }
    } else if (k == "--configs") {
      o.configs.clear();
      for (absl::string_view c : absl::StrSplit(v, ',')) {
        std::vector<absl::string_view> p = absl::StrSplit(c, ':');
        if (p.size() != 3) Die(absl::StrCat("config must be history:output:new, got ", c));
        o.configs.push_back({ArgInt(p[0]), ArgInt(p[1]), ArgInt(p[2])});
      }
    } else {
      Die("unknown flag " + k);
    }
  }
  if (argc % 2 == 0) Die(absl::StrCat("flag ", argv[argc - 1], " needs a value"));
  if (o.reps < 1) Die("--reps must be >= 1");
  return o;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::vector<int32_t> out(n);
  for (int32_t& t : out) t = tok(rng);
  return out;
}

struct Sample {
  double reuse_s = 0, cold_s = 0;
  double alone_s = 0;  // the tokens turn 2 computes, prefilled as a prompt of their own
  int64_t cached = 0, cold_cached = 0, total = 0;
  bool same_token = false;
};

// One repetition: turn 1, then turn 2 reused and cold (order by `cold_first`).
Sample RunOnce(model::Generator* gen, const Config& c, int vocab, int rep_id, bool cold_first) {
  const std::vector<int32_t> history = RandomTokens(c.history, vocab, 1000 + rep_id);
  sampling::SamplingParams p1;
  p1.max_tokens = c.output;
  p1.ignore_eos = true;  // exactly c.output tokens
  model::GenerateOptions warm;
  warm.cache_salt = absl::StrCat("conv-", rep_id);  // nothing from other reps is reused
  auto t1 = gen->Generate(history, p1, warm);
  if (!t1.ok()) Die(absl::StrCat("turn 1: ", t1.status().message()));
  if (static_cast<int>(t1->token_ids.size()) != c.output) Die("turn 1 stopped early");

  std::vector<int32_t> prompt2 = history;
  prompt2.insert(prompt2.end(), t1->token_ids.begin(), t1->token_ids.end());
  const std::vector<int32_t> fresh = RandomTokens(c.fresh, vocab, 5000 + rep_id);
  prompt2.insert(prompt2.end(), fresh.begin(), fresh.end());

  sampling::SamplingParams p2;
  p2.max_tokens = 1;  // prefill + the first token only
  p2.ignore_eos = true;
  model::GenerateOptions cold;
  cold.cache_salt = absl::StrCat("cold-", rep_id);  // a chain nobody has stored

  Sample s;
  s.total = static_cast<int64_t>(prompt2.size());
  absl::StatusOr<model::GenerationResult> reused, fresh_run;
  auto run_reuse = [&] { reused = gen->Generate(prompt2, p2, warm); };
  auto run_cold = [&] { fresh_run = gen->Generate(prompt2, p2, cold); };
  if (cold_first) {
    run_cold();
    run_reuse();
  } else {
    run_reuse();
    run_cold();
  }
  if (!reused.ok()) Die(absl::StrCat("turn 2 (reuse): ", reused.status().message()));
  if (!fresh_run.ok()) Die(absl::StrCat("turn 2 (cold): ", fresh_run.status().message()));
  s.reuse_s = reused->prefill_seconds;
  s.cold_s = fresh_run->prefill_seconds;
  s.cached = reused->cached_tokens;
  s.cold_cached = fresh_run->cached_tokens;
  s.same_token = reused->token_ids == fresh_run->token_ids;

  // The same number of tokens without the cached context in front (what reuse would
  // cost if prefill were linear in the tokens computed).
  const std::vector<int32_t> tail(prompt2.begin() + s.cached, prompt2.end());
  model::GenerateOptions alone;
  alone.cache_salt = absl::StrCat("alone-", rep_id);
  auto a = gen->Generate(tail, p2, alone);
  if (!a.ok()) Die(absl::StrCat("tail alone: ", a.status().message()));
  s.alone_s = a->prefill_seconds;
  return s;
}

int Main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  const std::string dir = EnsureBenchModel();
  kernels::ThreadPool pool(0);
  auto loaded = model::Model::Load(dir, &pool);
  if (!loaded.ok()) Die(std::string(loaded.status().message()));
  const model::Model& m = **loaded;
  const int vocab = m.config().vocab_size;
  const int B = 16;

  // Room for one rep's three sequences (turn 1, turn 2 reused, turn 2 cold) plus slack;
  // older reps' cached blocks are evicted as needed.
  int64_t longest = 0;
  for (const Config& c : o.configs) {
    longest = std::max<int64_t>(longest, c.history + c.output + c.fresh);
    if (longest >= m.config().max_position_embeddings) Die("config longer than the context");
  }
  const int64_t num_blocks = 3 * kvcache::BlocksFor(longest, B) + 16;
  auto kv = kvcache::KvPool::Create(m.KvLayout(o.kv_dtype, B), num_blocks);
  if (!kv.ok()) Die(std::string(kv.status().message()));
  kvcache::PrefixCache::Options co;
  co.num_blocks = num_blocks;
  co.block_size = B;
  co.incarnation = kvcache::NewIncarnationId();
  auto cache = kvcache::PrefixCache::Create(co);
  if (!cache.ok()) Die(std::string(cache.status().message()));
  model::Generator gen(&m, kv->get(), cache->get(), "kvrelay-bench-100m", o.prefill_chunk);

  std::printf(
      "model: Llama shape 12 layers, hidden 768, 12 heads, %.1fM parameters (bf16), KV %s, "
      "block %d, prefill chunk %d, isa %s, %d threads, %d reps (median)\n",
      m.weights().parameter_count / 1e6, kernels::DTypeName(o.kv_dtype), B, o.prefill_chunk,
      kernels::IsaName(kernels::ActiveKernels().isa), pool.num_threads(), o.reps);

  int rep_id = 0;
  for (const Config& c : o.configs) {
    std::printf("\nturn 1: %d prompt + %d generated; turn 2: + %d new = %d tokens\n", c.history,
                c.output, c.fresh, c.history + c.output + c.fresh);
    (void)RunOnce(&gen, c, vocab, rep_id++, false);  // warm-up, not counted
    std::vector<double> reuse, cold, ratio, alone;
    Sample last;
    bool all_same = true;
    for (int r = 0; r < o.reps; ++r) {
      const Sample s = RunOnce(&gen, c, vocab, rep_id++, r % 2 == 1);
      if (s.cold_cached != 0) Die("cold run reused blocks");
      std::printf(
          "  rep %d: reuse %7.1f ms (%lld cached)  cold %7.1f ms  ratio %.3f  (computed tokens "
          "alone %6.1f ms)%s\n",
          r, s.reuse_s * 1e3, static_cast<long long>(s.cached), s.cold_s * 1e3,
          s.reuse_s / s.cold_s, s.alone_s * 1e3, s.same_token ? "" : "  FIRST TOKEN DIFFERS");
      reuse.push_back(s.reuse_s);
      cold.push_back(s.cold_s);
      ratio.push_back(s.reuse_s / s.cold_s);
      alone.push_back(s.alone_s);
      all_same = all_same && s.same_token;
      last = s;
    }
    const double computed = static_cast<double>(last.total - last.cached);
    std::printf(
        "  median: reuse %.1f ms, cold %.1f ms; reuse/cold %.3f (median of per-rep ratios "
        "%.3f)\n",
        Median(reuse) * 1e3, Median(cold) * 1e3, Median(reuse) / Median(cold), Median(ratio));
    std::printf(
        "  tokens: %lld total, %lld cached, %lld computed; computed/total %.3f, "
        "new/total %.3f\n",
        static_cast<long long>(last.total), static_cast<long long>(last.cached),
        static_cast<long long>(last.total - last.cached), computed / last.total,
        static_cast<double>(c.fresh) / last.total);
    std::printf(
        "  computed tokens alone (no cached context): %.1f ms = %.3f of cold; reuse / alone "
        "%.2f\n",
        Median(alone) * 1e3, Median(alone) / Median(cold), Median(reuse) / Median(alone));
    std::printf("  first turn-2 token, reuse vs cold: %s\n",
                all_same ? "same in every rep" : "DIFFERS");
  }
  return 0;
}

}  // namespace
}  // namespace kvrelay::bench

int main(int argc, char** argv) { return kvrelay::bench::Main(argc, argv); }
