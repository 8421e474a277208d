// The classic experiment: generate N tokens with the KV cache vs recomputing the whole
// sequence at every step, on a random GPT-2-medium-shaped model (24 layers, hidden 1024,
// 16 heads, vocab 50257, f32 weights).
//
// The cached run is measured in full. Recompute is quadratic: it is measured at several
// sequence lengths (a full forward pass over L tokens each), fitted with
// t(L) = a + b L + c L^2 (least squares), and summed over the lengths the N steps need.
// The output says which numbers are measured and which are extrapolated.
//
//   build/bin/kv_vs_recompute [--tokens 1000] [--prompt 8] [--lengths 8,128,256,512,768,1000]
//                             [--measure-steps 48]
//                             [--layers 24 --hidden 1024 --heads 16] [--reps 2]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/kvcache/block_allocator.h"
#include "common/kvcache/kv_pool.h"
#include "common/model/model.h"
#include "common/model/model_maker.h"
#include "common/util/file.h"
#include "kernels/ops.h"
#include "tests/bench/bench_util.h"

namespace kvrelay::bench {
namespace {

struct Options {
  int tokens = 1000;
  int prompt = 8;
  std::vector<int> lengths = {8, 128, 256, 512, 768, 1000};
  int measure_steps = 48;
  int layers = 24, hidden = 1024, heads = 16, reps = 2;
};

int ArgInt(const char* v) {
  int x = 0;
  if (!absl::SimpleAtoi(v, &x)) {
    std::fprintf(stderr, "not an integer: %s\n", v);
    std::exit(2);
  }
  return x;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--tokens")
      o.tokens = ArgInt(v);
    else if (k == "--prompt")
      o.prompt = ArgInt(v);
    else if (k == "--layers")
      o.layers = ArgInt(v);
    else if (k == "--hidden")
      o.hidden = ArgInt(v);
    else if (k == "--heads")
      o.heads = ArgInt(v);
    else if (k == "--measure-steps")
      o.measure_steps = ArgInt(v);
    else if (k == "--reps")
      o.reps = ArgInt(v);
    else if (k == "--lengths") {
      o.lengths.clear();
      for (absl::string_view s : absl::StrSplit(v, ','))
        o.lengths.push_back(ArgInt(std::string(s).c_str()));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      std::exit(2);
    }
  }
  return o;
}

// Solves the 3x3 normal equations for t = a + b L + c L^2.
void FitQuadratic(const std::vector<double>& x, const std::vector<double>& y, double* a, double* b,
                  double* c) {
  double S[3][4] = {};
  for (size_t i = 0; i < x.size(); ++i) {
    const double p[3] = {1, x[i], x[i] * x[i]};
    for (int r = 0; r < 3; ++r) {
      for (int k = 0; k < 3; ++k) S[r][k] += p[r] * p[k];
      S[r][3] += p[r] * y[i];
    }
  }
  for (int col = 0; col < 3; ++col) {
    int piv = col;
    for (int r = col + 1; r < 3; ++r)
      if (std::fabs(S[r][col]) > std::fabs(S[piv][col])) piv = r;
    for (int k = 0; k < 4; ++k) std::swap(S[col][k], S[piv][k]);
    for (int r = 0; r < 3; ++r) {
      if (r == col) continue;
      const double f = S[r][col] / S[col][col];
      for (int k = 0; k < 4; ++k) S[r][k] -= f * S[col][k];
    }
  }
  *a = S[0][3] / S[0][0];
  *b = S[1][3] / S[1][1];
  *c = S[2][3] / S[2][2];
}

int Main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  const int max_len = o.prompt + o.tokens;
  const std::string dir = "/tmp/kvrelay-bench-gpt2-" + std::to_string(o.layers) + "x" +
                          std::to_string(o.hidden) + "-" + std::to_string(std::max(1024, max_len));
  if (!FileExists(dir + "/model.safetensors")) {
    model::MakeModelOptions m;
    m.family = model::Family::kGpt2;
    m.layers = o.layers;
    m.hidden = o.hidden;
    m.heads = o.heads;
    m.vocab = 50257;
    m.max_pos = std::max(1024, max_len);
    absl::Status s = model::MakeModel(m, dir);
    if (!s.ok()) {
      std::fprintf(stderr, "make-model: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  kernels::ThreadPool pool(0);
  auto model = model::Model::Load(dir, &pool);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  const model::Model& m = **model;
  const int V = m.config().vocab_size;
  auto kv =
      std::move(*kvcache::KvPool::Create(m.KvLayout(kernels::DType::kF32, 16),
                                         2 * kvcache::BlocksFor(std::max(max_len, 1024), 16) + 2));
  auto blocks = *kvcache::BlockAllocator::Create(kv->num_blocks());
  std::printf(
      "model: GPT-2 shape %d layers, hidden %d, %d heads, %.0fM parameters (f32), isa %s, %d "
      "threads\n",
      o.layers, o.hidden, o.heads, m.weights().parameter_count / 1e6,
      kernels::IsaName(kernels::ActiveKernels().isa), pool.num_threads());

  // Cached: prefill the prompt, then one decode step per token (greedy).
  std::vector<int32_t> seq;
  for (int i = 0; i < o.prompt; ++i) seq.push_back((i * 7919 + 13) % V);
  std::vector<int32_t> table = *blocks.Allocate(kvcache::BlocksFor(max_len, 16), -1, nullptr);
  std::vector<float> logits;
  const double t0 = NowSeconds();
  (void)m.Forward({model::SeqChunk{absl::MakeConstSpan(seq), 0, table, true}}, kv->view(), &logits);
  for (int step = 0; step < o.tokens; ++step) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    seq.push_back(next);
    if (step + 1 == o.tokens) break;
    logits.clear();
    (void)m.Forward({model::SeqChunk{absl::MakeConstSpan(&seq.back(), 1),
                                     static_cast<int64_t>(seq.size() - 1), table, true}},
                    kv->view(), &logits);
  }
  const double cached = NowSeconds() - t0;
  blocks.Release(table);
  std::printf("cached:    %d tokens in %.2f s (measured), %.1f ms/token\n", o.tokens, cached,
              cached * 1e3 / o.tokens);

  // Recompute: a full forward over L tokens, for each measured L.
  std::vector<double> xs, ys;
  std::printf("recompute: full forward pass over L tokens (measured, best of %d):\n", o.reps);
  for (int L : o.lengths) {
    if (L > static_cast<int>(seq.size())) {
      std::printf("  L=%d skipped (longer than the generated sequence)\n", L);
      continue;
    }
    std::vector<int32_t> t = *blocks.Allocate(kvcache::BlocksFor(L, 16), -1, nullptr);
    double best = 1e30;
    for (int r = 0; r < o.reps; ++r) {
      logits.clear();
      const double s0 = NowSeconds();
      (void)m.Forward({model::SeqChunk{absl::MakeConstSpan(seq.data(), L), 0, t, true}}, kv->view(),
                      &logits);
      best = std::min(best, NowSeconds() - s0);
    }
    blocks.Release(t);
    std::printf("  L=%5d  %8.3f s\n", L, best);
    xs.push_back(L);
    ys.push_back(best);
  }
  double a, b, c;
  FitQuadratic(xs, ys, &a, &b, &c);
  double total = 0;
  for (int L = o.prompt; L < o.prompt + o.tokens; ++L)
    total += a + b * L + c * static_cast<double>(L) * L;
  std::printf("fit:       t(L) = %.4g + %.4g L + %.4g L^2 s\n", a, b, c);
  std::printf("recompute: %d tokens ~ %.0f s (extrapolated: sum of t(L) for L = %d..%d)\n",
              o.tokens, total, o.prompt, o.prompt + o.tokens - 1);
  // Check the fit against real recompute steps: the first `measure_steps` steps of the
  // generation, each a full forward pass over the sequence so far.
  if (o.measure_steps > 0) {
    const int steps = std::min(o.measure_steps, o.tokens);
    double measured = 0, predicted = 0;
    for (int L = o.prompt; L < o.prompt + steps; ++L) {
      std::vector<int32_t> t = *blocks.Allocate(kvcache::BlocksFor(L, 16), -1, nullptr);
      logits.clear();
      const double s0 = NowSeconds();
      (void)m.Forward({model::SeqChunk{absl::MakeConstSpan(seq.data(), L), 0, t, true}}, kv->view(),
                      &logits);
      measured += NowSeconds() - s0;
      blocks.Release(t);
      predicted += a + b * L + c * static_cast<double>(L) * L;
    }
    std::printf("check:     first %d recompute steps measured %.2f s, fit predicts %.2f s\n", steps,
                measured, predicted);
  }
  std::printf("ratio:     recompute / cached = %.1fx\n", total / cached);
  return 0;
}

}  // namespace
}  // namespace kvrelay::bench

int main(int argc, char** argv) { return kvrelay::bench::Main(argc, argv); }
