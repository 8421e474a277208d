// Parity cases: batched GPU sampling (kernels/cuda/sampling.cuh) vs the CPU's sampling::Sample.
// Tokens are compared exactly (as floats; any different id fails kExact); logprobs within
// ~2 float ulps (a different summation order of the log-sum-exp and CUDA's exp / log).
//
// Boundaries (sampling.cu): the GPU's double exp can differ from glibc's by an ulp, which moves
// a p by one float ulp about once in 2^29 tokens; that can change a random draw only when
// the draw, a top-p cut or a top-k tie sits at that p. Greedy rows never depend on exp and
// are used as generated. Every random row is kept away from such boundaries: its seed is
// kept only if the CPU's token does not change when the temperature moves by ±1e-6 relative
// (which moves every p by far more than an ulp); otherwise the next seed is tried.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstring>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/sampling/sampler.h"
#include "kernels/cuda/sampling.cuh"
#include "kernels/device_math.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

struct RowSpec {
  cuda::SamplingRowParams params;
  std::vector<int32_t> prompt, output;
};

struct Batch {
  int64_t vocab = 0;
  std::vector<float> logits;  // [rows, vocab]
  std::vector<RowSpec> rows;
};

sampling::SamplingParams ToCpu(const cuda::SamplingRowParams& g) {
  sampling::SamplingParams p;
  p.temperature = g.temperature;
  p.top_k = g.top_k;
  p.top_p = g.top_p;
  p.min_p = g.min_p;
  p.repetition_penalty = g.repetition_penalty;
  p.frequency_penalty = g.frequency_penalty;
  p.presence_penalty = g.presence_penalty;
  p.seed = g.seed;
  return p;
}

sampling::SampleResult CpuSample(const Batch& b, size_t r, const cuda::SamplingRowParams& p) {
  const RowSpec& row = b.rows[r];
  return sampling::Sample(absl::MakeConstSpan(b.logits.data() + r * b.vocab, b.vocab), ToCpu(p),
                          row.prompt, row.output, p.position);
}

bool Greedy(const cuda::SamplingRowParams& p) { return !(p.temperature > 0.0f) || p.top_k == 1; }

// Moves each random row's seed until its CPU token is stable under a ±1e-6 relative change of
// the temperature (see the file comment).
void KeepAwayFromBoundaries(Batch* b) {
  for (size_t r = 0; r < b->rows.size(); ++r) {
    cuda::SamplingRowParams& p = b->rows[r].params;
    if (Greedy(p)) continue;
    for (int attempt = 0; attempt < 20; ++attempt) {
      const int32_t token = CpuSample(*b, r, p).token;
      bool stable = true;
      for (float f : {1.0f - 1e-6f, 1.0f + 1e-6f}) {
        cuda::SamplingRowParams q = p;
        q.temperature = p.temperature * f;
        stable = stable && CpuSample(*b, r, q).token == token;
      }
      if (stable) break;
      p.seed += 1000003;
    }
  }
}

// Logits: normal(0, sigma); `tie_step` > 0 rounds them to multiples of it (many exact ties);
// `specials` sprinkles NaN, -inf and +-0 (not +inf: it would leave a random row a single
// candidate).
std::vector<float> MakeLogits(std::mt19937* rng, int64_t n, float sigma, float tie_step,
                              bool specials) {
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) {
    x = d(*rng);
    if (tie_step > 0) x = std::round(x / tie_step) * tie_step;
  }
  if (specials && n > 1) {
    const float kSpecials[] = {std::numeric_limits<float>::quiet_NaN(), -INFINITY, 0.0f, -0.0f,
                               std::numeric_limits<float>::quiet_NaN()};
    for (size_t i = 0; i < sizeof(kSpecials) / sizeof(kSpecials[0]); ++i) {
      v[(i * 7919 + 13) % v.size()] = kSpecials[i];
    }
  }
  return v;
}

// History: prompt and output ids incl. repeats and ids outside [0, vocab).
void MakeHistory(std::mt19937* rng, int64_t vocab, RowSpec* row) {
  std::uniform_int_distribution<int32_t> id(-2, static_cast<int32_t>(vocab + 1));
  std::uniform_int_distribution<int32_t> hot(
      0, static_cast<int32_t>(std::min<int64_t>(vocab, 20) - 1));
  row->prompt.resize(1 + (*rng)() % 200);
  row->output.resize((*rng)() % 100);
  for (int32_t& t : row->prompt) t = id(*rng);
  for (int32_t& t : row->output) t = (*rng)() % 3 == 0 ? id(*rng) : hot(*rng);
}

// Runs a batch on both sides; logprobs ? compares logprobs : tokens.
absl::Status RunBatch(const Batch& b, bool logprobs, cudaStream_t st, Outputs* o) {
  std::vector<cuda::SamplingRow> rows(b.rows.size());
  for (size_t r = 0; r < b.rows.size(); ++r) {
    rows[r] = {b.rows[r].params, b.rows[r].prompt, b.rows[r].output};
    const sampling::SampleResult cpu = CpuSample(b, r, b.rows[r].params);
    o->cpu.push_back(logprobs ? cpu.logprob : static_cast<float>(cpu.token));
  }
  const auto n = static_cast<int64_t>(b.rows.size());
  absl::StatusOr<std::unique_ptr<cuda::Sampler>> sampler = cuda::Sampler::Create(n, b.vocab);
  if (!sampler.ok()) return sampler.status();
  ASSIGN_OR_RETURN_BUF(dlogits, DeviceBuffer::Upload(b.logits, st));
  ASSIGN_OR_RETURN_BUF(dtokens, DeviceBuffer::Alloc(sizeof(int32_t) * rows.size()));
  ASSIGN_OR_RETURN_BUF(dlogprobs, DeviceBuffer::Alloc(sizeof(float) * rows.size()));
  RETURN_IF_ERROR((*sampler)->Sample(dlogits.as<float>(), rows, dtokens.as<int32_t>(),
                                     logprobs ? dlogprobs.as<float>() : nullptr, st));
  if (logprobs) return dlogprobs.Download(&o->gpu, st);
  std::vector<int32_t> tokens;
  RETURN_IF_ERROR(dtokens.Download(&tokens, st));
  for (int32_t t : tokens) o->gpu.push_back(static_cast<float>(t));
  return absl::OkStatus();
}

// A batch of `rows` rows over `vocab`, each row's parameters from `params(r)`.
template <typename ParamsFn>
Batch MakeBatch(uint32_t seed, int64_t vocab, int rows, float sigma, float tie_step, bool specials,
                bool history, ParamsFn params) {
  std::mt19937 rng(seed);
  Batch b;
  b.vocab = vocab;
  b.rows.resize(static_cast<size_t>(rows));
  for (int r = 0; r < rows; ++r) {
    const std::vector<float> x = MakeLogits(&rng, vocab, sigma, tie_step, specials);
    b.logits.insert(b.logits.end(), x.begin(), x.end());
    b.rows[r].params = params(r);
    b.rows[r].params.seed = rng();
    b.rows[r].params.position = static_cast<int64_t>(rng() % 100000);
    if (history) MakeHistory(&rng, vocab, &b.rows[r]);
  }
  KeepAwayFromBoundaries(&b);
  return b;
}

constexpr Tolerance kLogprobTol{1e-6, 3e-7};  // ~2 float ulps relative

void AddCase(std::vector<Case>* cases, const std::string& op, const std::string& params,
             bool logprobs, std::function<Batch()> make) {
  cases->push_back(
      {op, params, logprobs ? kLogprobTol : kExact, [make, logprobs](cudaStream_t st, Outputs* o) {
         return RunBatch(make(), logprobs, st, o);
       }});
}

void AddSamplingCases(std::vector<Case>* cases) {
  // Greedy: always exact (no exp); ties by lowest id, NaN / inf, penalties; top_k == 1 with a
  // temperature is greedy too.
  for (int64_t vocab : {1, 7, 1000, 32000, 50257}) {
    AddCase(cases, "sampling_greedy", absl::StrFormat("vocab=%d,rows=8,ties,specials", vocab),
            false, [vocab] {
              return MakeBatch(static_cast<uint32_t>(vocab), vocab, 8, 2.0f, 0.5f, true, true,
                               [](int r) {
                                 cuda::SamplingRowParams p;
                                 if (r % 4 == 1) p.repetition_penalty = 1.3f;
                                 if (r % 4 == 2) p.frequency_penalty = 0.7f;
                                 if (r % 4 == 3) {
                                   p.temperature = 0.8f;
                                   p.top_k = 1;
                                   p.presence_penalty = -1.5f;
                                 }
                                 return p;
                               });
            });
  }
  // Temperature alone, many seeds and positions.
  for (int64_t vocab : {1000, 32000}) {
    AddCase(cases, "sampling_temperature", absl::StrFormat("vocab=%d,rows=64,T=0.3..1.5", vocab),
            false, [vocab] {
              return MakeBatch(1, vocab, 64, 3.0f, 0, false, false, [](int r) {
                cuda::SamplingRowParams p;
                p.temperature = 0.3f + 0.4f * static_cast<float>(r % 4);
                return p;
              });
            });
  }
  AddCase(cases, "sampling_seeds", "vocab=32000,rows=256,one row,seeds", false, [] {
    Batch b = MakeBatch(2, 32000, 1, 2.0f, 0, false, false, [](int) {
      cuda::SamplingRowParams p;
      p.temperature = 1.0f;
      return p;
    });
    const RowSpec first = b.rows[0];
    b.rows.resize(256, first);
    b.logits.resize(256 * b.logits.size());
    for (size_t r = 1; r < 256; ++r) {
      std::copy(b.logits.begin(), b.logits.begin() + 32000, b.logits.begin() + r * 32000);
      b.rows[r].params.seed = r;
      b.rows[r].params.position = static_cast<int64_t>(r) * 31;
    }
    KeepAwayFromBoundaries(&b);
    return b;
  });
  // Each filter alone, then together.
  for (int k : {2, 5, 50, 1000, 40000}) {
    AddCase(
        cases, "sampling_top_k", absl::StrFormat("vocab=32000,rows=16,k=%d,T=0.8", k), false, [k] {
          return MakeBatch(static_cast<uint32_t>(k), 32000, 16, 3.0f, 0, false, false, [k](int) {
            cuda::SamplingRowParams p;
            p.temperature = 0.8f;
            p.top_k = k;
            return p;
          });
        });
  }
  AddCase(cases, "sampling_top_k", "vocab=5000,rows=16,k=10,ties(step 1)", false, [] {
    return MakeBatch(3, 5000, 16, 2.0f, 1.0f, false, false, [](int) {
      cuda::SamplingRowParams p;
      p.temperature = 1.0f;
      p.top_k = 10;
      return p;
    });
  });
  for (float top_p : {0.3f, 0.9f, 0.99f}) {
    // sigma 1, T 1.5: a flat distribution, so top-p 0.99 walks most of the vocabulary (many
    // 2048-key chunks).
    AddCase(cases, "sampling_top_p", absl::StrFormat("vocab=32000,rows=16,p=%g", top_p), false,
            [top_p] {
              return MakeBatch(4, 32000, 16, top_p > 0.95f ? 1.0f : 3.0f, 0, false, false,
                               [top_p](int) {
                                 cuda::SamplingRowParams p;
                                 p.temperature = top_p > 0.95f ? 1.5f : 0.9f;
                                 p.top_p = top_p;
                                 return p;
                               });
            });
  }
  for (float min_p : {0.02f, 0.1f, 0.5f}) {
    AddCase(cases, "sampling_min_p", absl::StrFormat("vocab=32000,rows=16,min_p=%g", min_p), false,
            [min_p] {
              return MakeBatch(5, 32000, 16, 2.0f, 0, false, false, [min_p](int) {
                cuda::SamplingRowParams p;
                p.temperature = 1.0f;
                p.min_p = min_p;
                return p;
              });
            });
  }
  AddCase(cases, "sampling_combined", "vocab=50257,rows=32,k=40,p=0.9,min_p=0.05,T=0.7", false, [] {
    return MakeBatch(6, 50257, 32, 3.0f, 0, true, false, [](int) {
      cuda::SamplingRowParams p;
      p.temperature = 0.7f;
      p.top_k = 40;
      p.top_p = 0.9f;
      p.min_p = 0.05f;
      return p;
    });
  });
  // Penalties with histories (repeats, ids outside the vocabulary), random and greedy.
  AddCase(cases, "sampling_penalties", "vocab=32000,rows=32,rep/freq/presence", false, [] {
    return MakeBatch(7, 32000, 32, 2.0f, 0, false, true, [](int r) {
      cuda::SamplingRowParams p;
      p.temperature = r % 5 == 0 ? 0.0f : 0.9f;
      p.repetition_penalty = (r % 3 == 0) ? 1.0f : (r % 3 == 1 ? 0.8f : 1.3f);
      p.frequency_penalty = (r % 4) * 0.5f - 1.0f;
      p.presence_penalty = (r % 2 == 0) ? 1.0f : -1.0f;
      if (r % 7 == 0) p.top_p = 0.8f;
      return p;
    });
  });
  // More rows than CTAs (grid-stride), everything mixed.
  AddCase(cases, "sampling_batch", "vocab=4099,rows=300,mixed", false, [] {
    return MakeBatch(8, 4099, 300, 2.5f, 0, true, true, [](int r) {
      cuda::SamplingRowParams p;
      p.temperature = (r % 6 == 0) ? 0.0f : 0.5f + 0.1f * static_cast<float>(r % 10);
      p.top_k = (r % 3 == 0) ? 0 : (r % 3 == 1 ? 20 : -1);
      p.top_p = (r % 4 == 0) ? 0.85f : 1.0f;
      p.min_p = (r % 5 == 0) ? 0.1f : 0.0f;
      p.repetition_penalty = (r % 2 == 0) ? 1.2f : 1.0f;
      p.frequency_penalty = (r % 7 == 0) ? 0.5f : 0.0f;
      return p;
    });
  });
  // Logprobs of the chosen tokens (greedy and random rows).
  for (int64_t vocab : {7, 32000, 50257}) {
    AddCase(cases, "sampling_logprob", absl::StrFormat("vocab=%d,rows=32", vocab), true, [vocab] {
      return MakeBatch(9, vocab, 32, 3.0f, 0, true, true, [](int r) {
        cuda::SamplingRowParams p;
        p.temperature = (r % 3 == 0) ? 0.0f : 1.0f;
        p.top_p = 0.95f;
        p.repetition_penalty = 1.1f;
        return p;
      });
    });
  }
}

void SamplingHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  using absl::StatusCode;
  // The shared RNG (device_math.h) against libxxhash and the CPU sampler.
  std::mt19937_64 rng(99);
  int bad = 0;
  for (int i = 0; i < 100000; ++i) {
    const uint64_t seed = i % 4 == 0 ? static_cast<uint64_t>(i) : rng();
    const auto position = static_cast<int64_t>(i % 3 == 0 ? rng() : rng() % 100000);
    unsigned char bytes[8];
    for (int k = 0; k < 8; ++k) bytes[k] = static_cast<unsigned char>(position >> (8 * k));
    const double want = static_cast<double>(XXH3_64bits_withSeed(bytes, 8, seed) >> 11) * 0x1.0p-53;
    if (math::SampleUniform(seed, position) != want ||
        sampling::UniformForPosition(seed, position) != want) {
      ++bad;
    }
  }
  expect(bad == 0, "math::SampleUniform == XXH3_64bits_withSeed draw == CPU sampler's (100k)");

  auto rejects = [](void (*edit)(cuda::SamplingRowParams*), const char* field) {
    cuda::SamplingRow row;
    edit(&row.params);
    const absl::Status s = cuda::ValidateSamplingRow(row);
    return s.code() == StatusCode::kInvalidArgument && absl::StrContains(s.message(), field);
  };
  expect(cuda::ValidateSamplingRow(cuda::SamplingRow{}).ok(), "ValidateSamplingRow defaults -> OK");
  expect(rejects([](cuda::SamplingRowParams* p) { p->temperature = -1; }, "temperature") &&
             rejects([](cuda::SamplingRowParams* p) { p->temperature = NAN; }, "temperature"),
         "ValidateSamplingRow temperature < 0 / NaN -> INVALID_ARGUMENT");
  expect(rejects([](cuda::SamplingRowParams* p) { p->top_k = -2; }, "top_k"),
         "ValidateSamplingRow top_k < -1 -> INVALID_ARGUMENT");
  expect(rejects([](cuda::SamplingRowParams* p) { p->top_p = 0; }, "top_p") &&
             rejects([](cuda::SamplingRowParams* p) { p->top_p = 1.5f; }, "top_p"),
         "ValidateSamplingRow top_p outside (0, 1] -> INVALID_ARGUMENT");
  expect(rejects([](cuda::SamplingRowParams* p) { p->min_p = -0.1f; }, "min_p"),
         "ValidateSamplingRow min_p outside [0, 1] -> INVALID_ARGUMENT");
  expect(rejects([](cuda::SamplingRowParams* p) { p->repetition_penalty = 0; },
                 "repetition_penalty") &&
             rejects([](cuda::SamplingRowParams* p) { p->repetition_penalty = INFINITY; },
                     "repetition_penalty"),
         "ValidateSamplingRow repetition_penalty <= 0 / inf -> INVALID_ARGUMENT");
  expect(
      rejects([](cuda::SamplingRowParams* p) { p->frequency_penalty = 2.5f; },
              "frequency_penalty") &&
          rejects([](cuda::SamplingRowParams* p) { p->presence_penalty = -3; }, "presence_penalty"),
      "ValidateSamplingRow frequency / presence outside [-2, 2] -> INVALID_ARGUMENT");
  expect(cuda::Sampler::Create(0, 100).status().code() == StatusCode::kInvalidArgument &&
             cuda::Sampler::Create(4, int64_t{1} << 31).status().code() ==
                 StatusCode::kInvalidArgument,
         "Sampler::Create max_rows < 1 / vocab >= 2^31 -> INVALID_ARGUMENT");
  if (cuda::CudaDeviceCount() == 0) {
    expect(cuda::Sampler::Create(4, 100).status().code() == StatusCode::kUnavailable,
           "Sampler::Create without a device -> UNAVAILABLE");
  }
}

}  // namespace
KVR_PARITY_CASES(AddSamplingCases);
KVR_PARITY_HOST_CHECKS(SamplingHostChecks);
}  // namespace kvrelay::kernels::parity
