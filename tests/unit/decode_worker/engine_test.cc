#include "decode_worker/engine.h"

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/model/generator.h"
#include "common/worker/kv_tiers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/test_models.h"

namespace kvrelay::decode {
namespace {

using ::testing::HasSubstr;

struct Kv {
  std::unique_ptr<kvcache::KvPool> pool;
  std::unique_ptr<kvcache::PrefixCache> cache;
};

Kv MakeKv(const model::Model& m, int blocks, int block_size = 16) {
  Kv kv;
  kv.pool =
      std::move(*kvcache::KvPool::Create(m.KvLayout(kernels::DType::kF32, block_size), blocks));
  kvcache::PrefixCache::Options o;
  o.num_blocks = blocks;
  o.block_size = block_size;
  kv.cache = std::move(*kvcache::PrefixCache::Create(o));
  return kv;
}

std::vector<int32_t> Prompt(int n, uint32_t seed, int vocab) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(n);
  for (auto& t : p) t = static_cast<int32_t>(rng() % vocab);
  return p;
}

// What one request produced through the engine.
struct Outcome {
  absl::Status status = absl::UnknownError("not done");
  RequestSummary summary;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  bool done = false;
};

// Collects every request's outcome; Wait() returns once all are done.
class Collector {
 public:
  RequestCallbacks For(const std::string& id) {
    RequestCallbacks cb;
    cb.on_tokens = [this, id](const StepOutput& out) {
      absl::MutexLock l(&mu_);
      for (size_t i = 0; i < out.tokens.size(); ++i) {
        outcomes_[id].tokens.push_back(out.tokens[i]);
        outcomes_[id].logprobs.push_back(out.samples[i].logprob);
      }
    };
    cb.on_done = [this, id](const absl::Status& st, const RequestSummary& s) {
      absl::MutexLock l(&mu_);
      Outcome& o = outcomes_[id];
      EXPECT_FALSE(o.done) << id << " finished twice";
      o.status = st;
      o.summary = s;
      o.done = true;
      ++done_;
    };
    return cb;
  }
  void Wait(int n) {
    absl::MutexLock l(&mu_);
    auto ready = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done_ >= n; };
    mu_.Await(absl::Condition(&ready));
  }
  Outcome Get(const std::string& id) {
    absl::MutexLock l(&mu_);
    return outcomes_[id];
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, Outcome> outcomes_;
  int done_ = 0;
};

using ::kvrelay::testing::Metric;

// The reference: single-sequence generation on its own pool.
model::GenerationResult Reference(const model::Model& m, const std::vector<int32_t>& prompt,
                                  const sampling::SamplingParams& p) {
  Kv kv = MakeKv(m, 256);
  model::Generator gen(&m, kv.pool.get(), kv.cache.get(), "ref", 64);
  auto r = gen.Generate(prompt, p);
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

class EngineTest : public ::testing::TestWithParam<testing::ModelVariant> {
 protected:
  const model::Model& M() { return testing::LoadedModel(GetParam()); }
};

TEST_P(EngineTest, ConcurrentRequestsMatchSingleSequenceGeneration) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 256);
  EngineOptions o;
  o.prefill_chunk = 24;  // long prompts take several steps, interleaved with decodes
  o.max_batch_tokens = 64;
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", o);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int vocab = m.config().vocab_size;
  // Short, exactly block-aligned, long (several chunks), with and without sampling.
  const std::vector<int> lengths = {3, 16, 32, 90, 7, 48, 130, 1};
  std::vector<sampling::SamplingParams> params(lengths.size());
  Collector col;
  for (size_t i = 0; i < lengths.size(); ++i) {
    params[i].max_tokens = 6 + static_cast<int>(i);
    params[i].ignore_eos = true;
    if (i % 3 == 2) {
      params[i].temperature = 0.8f;
      params[i].top_p = 0.9f;
      params[i].seed = 1000 + i;
    }
    EngineRequest r;
    r.id = "r" + std::to_string(i);
    r.prompt = Prompt(lengths[i], static_cast<uint32_t>(i), vocab);
    r.params = params[i];
    ASSERT_TRUE((*engine)->Submit(r, col.For(r.id)).ok());
  }
  col.Wait(static_cast<int>(lengths.size()));
  for (size_t i = 0; i < lengths.size(); ++i) {
    const Outcome o = col.Get("r" + std::to_string(i));
    ASSERT_TRUE(o.status.ok()) << o.status;
    const auto ref = Reference(m, Prompt(lengths[i], static_cast<uint32_t>(i), vocab), params[i]);
    EXPECT_EQ(o.tokens, ref.token_ids) << "request " << i;
    ASSERT_EQ(o.logprobs.size(), ref.samples.size());
    for (size_t k = 0; k < o.logprobs.size(); ++k) {
      EXPECT_EQ(o.logprobs[k], ref.samples[k].logprob) << "request " << i << " token " << k;
    }
    EXPECT_EQ(o.summary.finish_reason, ref.finish_reason);
    EXPECT_EQ(o.summary.prompt_tokens, lengths[i]);
    EXPECT_EQ(o.summary.completion_tokens, static_cast<int64_t>(ref.token_ids.size()));
  }
  EXPECT_GE((*engine)->stats().max_batch_sequences, 4);  // batched, not one at a time
  EXPECT_EQ(kv.cache->counts().in_use, 0);
  EXPECT_TRUE(kv.cache->Validate().ok());
}

TEST_P(EngineTest, SecondRequestReusesThePrefixAndStaysExact) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 128);
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", EngineOptions());
  ASSERT_TRUE(engine.ok());
  sampling::SamplingParams p;
  p.max_tokens = 5;
  p.ignore_eos = true;
  const auto prompt = Prompt(40, 7, m.config().vocab_size);
  Collector col;
  EngineRequest r{"a", prompt, p, "", ""};
  ASSERT_TRUE((*engine)->Submit(r, col.For("a")).ok());
  col.Wait(1);
  r.id = "b";
  ASSERT_TRUE((*engine)->Submit(r, col.For("b")).ok());
  col.Wait(2);
  r.id = "c";
  r.cache_salt = "other-tenant";
  ASSERT_TRUE((*engine)->Submit(r, col.For("c")).ok());
  col.Wait(3);
  EXPECT_EQ(col.Get("a").summary.cached_tokens, 0);
  EXPECT_EQ(col.Get("b").summary.cached_tokens, 32);  // 2 full blocks of 40 tokens
  EXPECT_EQ(col.Get("c").summary.cached_tokens, 0);   // another salt never hits
  EXPECT_EQ(col.Get("a").tokens, col.Get("b").tokens);
  EXPECT_EQ(col.Get("a").logprobs, col.Get("b").logprobs);
  EXPECT_EQ(col.Get("a").tokens, Reference(m, prompt, p).token_ids);
}

// Tiered KV cache (issue 19): conversations visited round-robin on a pool far smaller
// than their histories. With a host tier the evicted history comes back from it instead
// of being recomputed, and every token and logprob is bit-identical to the run without
// tiers (reloaded KV is exact). Cancelling requests while their blocks are being copied
// up leaves nothing held.
TEST_P(EngineTest, TiersReloadEvictedHistoryAndChangeNoToken) {
  const model::Model& m = M();
  const int vocab = m.config().vocab_size;
  sampling::SamplingParams p;
  p.max_tokens = 6;
  p.ignore_eos = true;
  struct Run {
    std::map<std::string, Outcome> out;
    int64_t cached = 0, host = 0;
  };
  auto run = [&](bool tiers) {
    Kv kv = MakeKv(m, 24);  // 384 tokens; the conversations below need ~5x that
    std::unique_ptr<worker::KvTierStore> store;
    EngineOptions o;
    if (tiers) {
      worker::KvTierOptions to;
      to.host_bytes = 512 * kv.pool->layout().block_bytes();
      to.model_id = "tiny";
      auto st = worker::KvTierStore::Create(to, kv.pool.get(), kv.cache.get(), &m.backend());
      EXPECT_TRUE(st.ok()) << st.status();
      store = *std::move(st);
      o.tiers = store.get();
    }
    auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", o);
    EXPECT_TRUE(engine.ok());
    Run r;
    Collector col;
    std::vector<std::vector<int32_t>> history(6);
    int done = 0;
    for (int turn = 0; turn < 3; ++turn) {
      for (int c = 0; c < 6; ++c) {
        const std::vector<int32_t> more = Prompt(50, 100 * turn + c, vocab);
        history[c].insert(history[c].end(), more.begin(), more.end());
        const std::string id = absl::StrCat("c", c, "t", turn);
        EngineRequest req{id, history[c], p, "", ""};
        EXPECT_TRUE((*engine)->Submit(req, col.For(id)).ok());
        col.Wait(++done);  // one at a time: the next conversation evicts this one
        const Outcome out = col.Get(id);
        EXPECT_TRUE(out.status.ok()) << id << ": " << out.status;
        history[c].insert(history[c].end(), out.tokens.begin(), out.tokens.end());
        r.out[id] = out;
        r.cached += out.summary.cached_tokens;
        r.host += out.summary.host_cached_tokens;
      }
    }
    // Requests cancelled as soon as they are queued: some while their reload runs.
    for (int c = 0; c < 6; ++c) {
      const std::string id = absl::StrCat("cancel", c);
      EngineRequest req{id, history[c], p, "", ""};
      auto h = (*engine)->Submit(req, col.For(id));
      EXPECT_TRUE(h.ok());
      (*engine)->Cancel(*h);
    }
    col.Wait(done + 6);
    engine->reset();
    if (store) store->WaitIdle();
    EXPECT_EQ(kv.cache->counts().in_use, 0);
    EXPECT_TRUE(kv.cache->Validate().ok());
    store.reset();
    return r;
  };
  const Run off = run(false), on = run(true);
  EXPECT_EQ(off.host, 0);
  EXPECT_GT(on.host, 0);
  // Turn 0 has nothing to reuse; later turns reuse their whole history (all but the last
  // partial block) from the host tier, where the pool alone has evicted it.
  EXPECT_GE(on.cached, 2 * off.cached + 6 * 2 * 48);
  for (const auto& [id, o] : off.out) {
    const Outcome& t = on.out.at(id);
    EXPECT_EQ(o.tokens, t.tokens) << id;
    EXPECT_EQ(o.logprobs, t.logprobs) << id;
    EXPECT_LE(t.summary.host_cached_tokens, t.summary.cached_tokens) << id;
  }
}

// Migration (DESIGN §5): a request resumed elsewhere with its prompt plus the tokens
// already generated continues exactly where it stopped, also with seeded sampling and
// penalties (the resumed tokens count as output), and the summary names the KV event
// that made its blocks known.
TEST_P(EngineTest, ResumedRequestContinuesTheSameStream) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 128);
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", EngineOptions());
  ASSERT_TRUE(engine.ok());
  sampling::SamplingParams p;
  p.max_tokens = 12;
  p.ignore_eos = true;
  p.temperature = 0.9f;
  p.seed = 42;
  p.repetition_penalty = 1.3f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.4f;
  const auto prompt = Prompt(21, 3, m.config().vocab_size);
  const auto ref = Reference(m, prompt, p);
  ASSERT_EQ(ref.token_ids.size(), 12u);
  Collector col;
  for (int k : {1, 5, 11}) {
    EngineRequest r;
    r.id = "resume" + std::to_string(k);
    r.prompt = prompt;
    r.prompt.insert(r.prompt.end(), ref.token_ids.begin(), ref.token_ids.begin() + k);
    r.resumed_tokens = k;
    r.params = p;
    ASSERT_TRUE((*engine)->Submit(r, col.For(r.id)).ok());
  }
  col.Wait(3);
  for (int k : {1, 5, 11}) {
    const Outcome o = col.Get("resume" + std::to_string(k));
    ASSERT_TRUE(o.status.ok()) << o.status;
    EXPECT_EQ(o.tokens, std::vector<int32_t>(ref.token_ids.begin() + k, ref.token_ids.end()))
        << "resumed after " << k;
    EXPECT_EQ(o.summary.prompt_tokens, 21);
    EXPECT_EQ(o.summary.finish_reason, "length");
    EXPECT_EQ(o.summary.kv_incarnation, kv.cache->incarnation());
    EXPECT_GT(o.summary.kv_event_seq, 0u);
    EXPECT_LE(o.summary.kv_event_seq, kv.cache->last_event_seq());
  }
  EngineRequest bad;
  bad.id = "bad";
  bad.prompt = prompt;
  bad.params = p;
  bad.resumed_tokens = static_cast<int64_t>(prompt.size());  // no real prompt left
  EXPECT_EQ((*engine)->Submit(bad, col.For("bad")).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.resumed_tokens = 2;
  bad.prefill_address = "127.0.0.1:1";
  EXPECT_FALSE((*engine)->Submit(bad, col.For("bad")).ok());
}

TEST_P(EngineTest, SmallPoolPreemptsAndEveryRequestStillMatches) {
  const model::Model& m = M();
  // 12 blocks of 4 tokens = 48 token slots; 6 requests of 20 + 16 tokens need 9 each.
  Kv kv = MakeKv(m, 12, 4);
  EngineOptions o;
  o.prefill_chunk = 8;
  o.metrics = std::make_shared<prometheus::Registry>();
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", o);
  ASSERT_TRUE(engine.ok());
  sampling::SamplingParams p;
  p.max_tokens = 16;
  p.ignore_eos = true;
  Collector col;
  const int kN = 6;
  for (int i = 0; i < kN; ++i) {
    EngineRequest r{"r" + std::to_string(i), Prompt(20, 100 + i, m.config().vocab_size), p, "", ""};
    ASSERT_TRUE((*engine)->Submit(r, col.For(r.id)).ok());
  }
  col.Wait(kN);
  int64_t preemptions = 0;
  for (int i = 0; i < kN; ++i) {
    const Outcome o = col.Get("r" + std::to_string(i));
    ASSERT_TRUE(o.status.ok()) << o.status;
    EXPECT_EQ(o.tokens, Reference(m, Prompt(20, 100 + i, m.config().vocab_size), p).token_ids)
        << "request " << i;
    preemptions += o.summary.preemptions;
  }
  EXPECT_GT(preemptions, 0);
  EXPECT_EQ((*engine)->stats().preemptions, preemptions);
  EXPECT_EQ(Metric(*o.metrics, "kvrelay_decode_preemptions_total"), preemptions);
  EXPECT_EQ(kv.cache->counts().in_use, 0);
  EXPECT_TRUE(kv.cache->Validate().ok());
  // The small pool evicted cached blocks; once the loop has ended the counter is final.
  engine->reset();
  EXPECT_GT(kv.cache->counts().evicted, 0);
  EXPECT_EQ(Metric(*o.metrics, "kvrelay_kv_evictions_total"), kv.cache->counts().evicted);
}

// Metrics off (the benchmark's baseline): no series at all, the same tokens.
TEST_P(EngineTest, MetricsOffRecordsNothingAndChangesNothing) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 64);
  EngineOptions o;
  o.metrics = std::make_shared<prometheus::Registry>();
  o.record_metrics = false;
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", o);
  ASSERT_TRUE(engine.ok());
  sampling::SamplingParams p;
  p.max_tokens = 6;
  p.ignore_eos = true;
  Collector col;
  for (int i = 0; i < 3; ++i) {
    EngineRequest r{"r" + std::to_string(i), Prompt(30, 200 + i, m.config().vocab_size), p, "", ""};
    ASSERT_TRUE((*engine)->Submit(r, col.For(r.id)).ok());
  }
  col.Wait(3);
  for (int i = 0; i < 3; ++i) {
    const Outcome out = col.Get("r" + std::to_string(i));
    ASSERT_TRUE(out.status.ok()) << out.status;
    EXPECT_EQ(out.tokens, Reference(m, Prompt(30, 200 + i, m.config().vocab_size), p).token_ids);
  }
  (*engine)->UpdateKvBlockGauges();
  EXPECT_GT((*engine)->stats().steps, 0);
  EXPECT_TRUE(o.metrics->Collect().empty());
}

// The engine's Prometheus series follow the work it did: steps by phase, batch sizes,
// prompt/cached/generated tokens, and the KV block gauges (DESIGN §7).
TEST_P(EngineTest, MetricsFollowTheWork) {
  const model::Model& m = M();
  const int kBlocks = 128;
  Kv kv = MakeKv(m, kBlocks);
  EngineOptions o;
  o.prefill_chunk = 24;
  o.max_batch_tokens = 64;
  o.metrics = std::make_shared<prometheus::Registry>();
  const prometheus::Registry& reg = *o.metrics;
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", o);
  ASSERT_TRUE(engine.ok());
  EXPECT_EQ((*engine)->metrics(), o.metrics);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "free"}}), kBlocks);
  const int vocab = m.config().vocab_size;
  sampling::SamplingParams p;
  p.max_tokens = 5;
  p.ignore_eos = true;
  Collector col;
  // Alone: 40 prompt tokens in chunks of 24 and 16 (2 prefill steps), 4 decode steps.
  EngineRequest a{"a", Prompt(40, 7, vocab), p, "", ""};
  ASSERT_TRUE((*engine)->Submit(a, col.For("a")).ok());
  col.Wait(1);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_steps_total", {{"phase", "prefill"}}), 2);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_steps_total", {{"phase", "decode"}}), 4);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_steps_total", {{"phase", "mixed"}}), 0);
  // The same prompt: its 2 full blocks come from the prefix cache.
  a.id = "b";
  ASSERT_TRUE((*engine)->Submit(a, col.For("b")).ok());
  col.Wait(2);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_cached_tokens_total"), 32);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_prompt_tokens_total"), 80);
  // A short request decoding while a long one prefills: mixed steps.
  sampling::SamplingParams longer = p;
  longer.max_tokens = 40;
  EngineRequest c{"c", Prompt(3, 8, vocab), longer, "", ""};
  EngineRequest d{"d", Prompt(130, 9, vocab), p, "", ""};
  ASSERT_TRUE((*engine)->Submit(c, col.For("c")).ok());
  ASSERT_TRUE((*engine)->Submit(d, col.For("d")).ok());
  col.Wait(4);
  int64_t generated = 0, prompt = 0, cached = 0, processed = 0;
  for (const std::string id : {"a", "b", "c", "d"}) {
    const Outcome out = col.Get(id);
    ASSERT_TRUE(out.status.ok()) << out.status;
    generated += static_cast<int64_t>(out.tokens.size());
    prompt += out.summary.prompt_tokens;
    cached += out.summary.cached_tokens;
    // Each step feeds the prompt's uncached tokens and every generated token but the last.
    processed += out.summary.prompt_tokens - out.summary.cached_tokens +
                 static_cast<int64_t>(out.tokens.size()) - 1;
  }
  EXPECT_EQ(Metric(reg, "kvrelay_decode_generated_tokens_total"), generated);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_prompt_tokens_total"), prompt);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_cached_tokens_total"), cached);
  EXPECT_GT(Metric(reg, "kvrelay_decode_steps_total", {{"phase", "mixed"}}), 0);
  const int64_t steps = (*engine)->stats().steps;
  EXPECT_EQ(Metric(reg, "kvrelay_decode_steps_total"), steps);
  for (const std::string phase : {"decode", "prefill", "mixed"}) {
    EXPECT_EQ(Metric(reg, "kvrelay_decode_step_seconds", {{"phase", phase}}),
              Metric(reg, "kvrelay_decode_steps_total", {{"phase", phase}}))
        << phase;
  }
  EXPECT_GT(Metric(reg, "kvrelay_decode_step_seconds", {}, /*histogram_sum=*/true), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_batch_sequences"), steps);
  EXPECT_GT(Metric(reg, "kvrelay_decode_batch_sequences", {}, true), steps);  // some had 2
  EXPECT_EQ(Metric(reg, "kvrelay_decode_batch_tokens"), steps);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_batch_tokens", {}, true), processed);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_preemptions_total"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total"), 0);
  // Once the engine is gone (its loop has ended), the gauges are final.
  engine->reset();
  EXPECT_EQ(Metric(reg, "kvrelay_decode_running_sequences"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_waiting_sequences"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_quarantined_blocks"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "in_use"}}), 0);
  EXPECT_GT(Metric(reg, "kvrelay_kv_blocks", {{"state", "cached_free"}}), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks"), kBlocks);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "cached_free"}}),
            kv.cache->counts().cached_free);
}

TEST_P(EngineTest, CancelAtRandomPointsReleasesEverything) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 64, 8);
  EngineOptions o;
  o.prefill_chunk = 16;
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", o);
  ASSERT_TRUE(engine.ok());
  std::mt19937 rng(5);
  sampling::SamplingParams p;
  p.max_tokens = 40;
  p.ignore_eos = true;
  // Each request is cancelled after a random number of tokens (0: before any).
  struct Cancelling {
    Engine* engine = nullptr;
    uint64_t handle = 0;
    int after = 0;
  };
  const int kN = 10;
  std::vector<Cancelling> cs(kN);
  std::vector<int> counts(kN, 0);
  Collector col;
  absl::Mutex mu;  // guards cs[].handle, read by the engine thread's callbacks
  for (int i = 0; i < kN; ++i) {
    cs[i].engine = engine->get();
    cs[i].after = static_cast<int>(rng() % 6);
    EngineRequest r{"r" + std::to_string(i), Prompt(10 + 7 * i, i, m.config().vocab_size), p, "",
                    ""};
    RequestCallbacks cb = col.For(r.id);
    auto inner = cb.on_tokens;
    cb.on_tokens = [inner, &counts, &cs, &mu, i](const StepOutput& out) {
      inner(out);
      absl::MutexLock l(&mu);
      if (++counts[i] == cs[i].after) cs[i].engine->Cancel(cs[i].handle);
    };
    absl::MutexLock l(&mu);
    auto h = (*engine)->Submit(r, cb);
    ASSERT_TRUE(h.ok());
    cs[i].handle = *h;
    if (cs[i].after == 0) (*engine)->Cancel(*h);
  }
  col.Wait(kN);
  for (int i = 0; i < kN; ++i) {
    const Outcome out = col.Get("r" + std::to_string(i));
    EXPECT_EQ(out.status.code(), absl::StatusCode::kCancelled) << i;
    EXPECT_LE(static_cast<int>(out.tokens.size()), cs[i].after + 1) << i;
  }
  // Cancelling a finished request changes nothing.
  (*engine)->Cancel(cs[0].handle);
  EXPECT_EQ(kv.cache->counts().in_use, 0);
  EXPECT_TRUE(kv.cache->Validate().ok());
}

TEST_P(EngineTest, BadInputIsInvalidArgumentAndNothingIsQueued) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 16);
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", EngineOptions());
  ASSERT_TRUE(engine.ok());
  Collector col;
  EngineRequest r;
  r.id = "bad";
  auto st = (*engine)->Submit(r, col.For("bad")).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("prompt is empty"));
  r.prompt = {1, 2, m.config().vocab_size};
  st = (*engine)->Submit(r, col.For("bad")).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("token 2"));
  r.prompt = {1, 2};
  r.params.temperature = -1;
  st = (*engine)->Submit(r, col.For("bad")).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("temperature"));
  EXPECT_EQ((*engine)->stats().waiting, 0);
  EXPECT_EQ(Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny",
                           EngineOptions{/*max_batch_tokens=*/4, /*max_running=*/8})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(EngineTest, PromptLargerThanThePoolFailsAloneWithResourceExhausted) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 4, 4);  // 16 token slots
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", EngineOptions());
  ASSERT_TRUE(engine.ok());
  sampling::SamplingParams p;
  p.max_tokens = 2;
  p.ignore_eos = true;
  Collector col;
  EngineRequest big{"big", Prompt(40, 1, m.config().vocab_size), p, "", ""};
  EngineRequest small{"small", Prompt(5, 2, m.config().vocab_size), p, "", ""};
  ASSERT_TRUE((*engine)->Submit(big, col.For("big")).ok());
  ASSERT_TRUE((*engine)->Submit(small, col.For("small")).ok());
  col.Wait(2);
  EXPECT_EQ(col.Get("big").status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(col.Get("big").status.message(), HasSubstr("needs 10 KV blocks"));
  EXPECT_TRUE(col.Get("small").status.ok());
  EXPECT_EQ(col.Get("small").tokens.size(), 2u);
  EXPECT_EQ(kv.cache->counts().in_use, 0);
}

TEST_P(EngineTest, DrainWaitsForRunningRequestsAndThenRefusesNewOnes) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 32);
  auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", EngineOptions());
  ASSERT_TRUE(engine.ok());
  sampling::SamplingParams p;
  p.max_tokens = 20;
  p.ignore_eos = true;
  Collector col;
  for (int i = 0; i < 3; ++i) {
    EngineRequest r{"r" + std::to_string(i), Prompt(9, i, m.config().vocab_size), p, "", ""};
    ASSERT_TRUE((*engine)->Submit(r, col.For(r.id)).ok());
  }
  (*engine)->Drain();
  for (int i = 0; i < 3; ++i) {
    const Outcome o = col.Get("r" + std::to_string(i));
    EXPECT_TRUE(o.done);
    EXPECT_TRUE(o.status.ok());
    EXPECT_EQ(o.tokens.size(), 20u);
  }
  EngineRequest late{"late", {1, 2, 3}, p, "", ""};
  EXPECT_EQ((*engine)->Submit(late, col.For("late")).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_P(EngineTest, DestroyingTheEngineEndsQueuedRequests) {
  const model::Model& m = M();
  Kv kv = MakeKv(m, 32);
  Collector col;
  {
    auto engine = Engine::Create(&m, kv.pool.get(), kv.cache.get(), "tiny", EngineOptions());
    ASSERT_TRUE(engine.ok());
    sampling::SamplingParams p;
    p.max_tokens = 1000;
    p.ignore_eos = true;
    for (int i = 0; i < 3; ++i) {
      EngineRequest r{"r" + std::to_string(i), Prompt(9, i, m.config().vocab_size), p, "", ""};
      ASSERT_TRUE((*engine)->Submit(r, col.For(r.id)).ok());
    }
  }
  for (int i = 0; i < 3; ++i) {
    const Outcome o = col.Get("r" + std::to_string(i));
    EXPECT_TRUE(o.done);
    EXPECT_TRUE(o.status.ok() || o.status.code() == absl::StatusCode::kUnavailable) << o.status;
  }
  EXPECT_EQ(kv.cache->counts().in_use, 0);
}

std::vector<testing::ModelVariant> Variants() {
  std::vector<testing::ModelVariant> out;
  for (const auto& v : testing::TinyVariants()) {
    if (v.name == "llama_gqa" || v.name == "gpt2") out.push_back(v);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Models, EngineTest, ::testing::ValuesIn(Variants()),
                         [](const ::testing::TestParamInfo<testing::ModelVariant>& i) {
                           return i.param.name;
                         });

}  // namespace
}  // namespace kvrelay::decode
