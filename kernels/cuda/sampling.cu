// Batched token sampling (CPU twin: sampling::Sample in common/sampling/sampler.cc), run as
// the CPU runs it, step for step, so the chosen token is the CPU's:
//  1. penalised logits: NaN -> -inf; repetition penalty over the distinct in-vocabulary ids
//     of prompt + output, then frequency / presence over the output (kernels/device_math.h,
//     the functions the CPU calls);
//  2. greedy (temperature 0 or top_k 1): argmax, lowest id on ties;
//  3. otherwise p[v] = SampleRelativeProb(logit, max, temperature) (1 for the max, float),
//     candidates = {v : p[v] > 0}; then in this order top-k, top-p, min-p, and the draw;
//  4. the log-softmax of the chosen token under the raw logits.
// Order: candidates are ranked by the CPU's strict total order (p descending, id ascending),
// encoded as the 64-bit key (bits(p) << 32) | (2^32 - 1 - id), larger = better (p >= 0, so
// its bits order like the value). Top-k keeps the keys >= the k-th largest key (exactly k).
// Top-p and the draw walk the candidates best-first accumulating p in double, exactly as the
// CPU's walk: the kernel selects the next chunk of kChunk = 2048 best keys (a radix select),
// sorts it in shared memory (bitonic), and thread 0 accumulates it in order, chunk after
// chunk, until the threshold is met (top-p: cumulative >= top_p * total; draw: cumulative >
// u * total; else the last candidate). The totals are the CPU's id-order sums: thread 0 adds
// p[0], p[1], ... in double (removed candidates hold p = 0, and x + 0.0 == x), staged
// through shared memory tiles. Min-p compares with min_p * max p (a max: order-free).
// u = SampleUniform(seed, position), the CPU's XXH3 draw (integer arithmetic, exact).
//
// Exactness: every comparison, sum and walk above is the CPU's operation in the CPU's order,
// and the key order is a total order, so ties resolve identically. The one operation that
// can differ is exp: CUDA's double exp is within 1 ulp, glibc's is (almost always) correctly
// rounded, and p is that double rounded to float, so a p can differ by 1 float ulp only when
// the exact exp lies within ~1 double ulp of a float rounding boundary (~2^-29 per token).
// Such a p changes the token only if it moves a top-k tie, the top-p cut or the draw across
// a boundary. Greedy (no exp) and everything with equal inputs is always identical. The
// logprob uses a fixed-order block tree sum (not the CPU's id order) and CUDA's exp / log:
// it matches the CPU's to ~1 float ulp, not bit for bit.
//
// Grid/block: one CTA of kThreads = 512 threads per row; CTA b handles rows b, b + gridDim.x,
// ... (grid = min(rows, Sampler's CTA count = min(max_rows, SMs))), each with its own scratch
// row of vocab floats in global memory: first the history counts (uint32: output count in
// bits 0..30, "in the prompt" in bit 31; zeroed, then atomicAdd / atomicOr per history
// token), then, overwritten in place by the thread that read the count, the candidates' p
// (0 = not a candidate). Vocabulary passes are strided by 512 (coalesced); block reductions
// are xor-butterflies in each warp plus a fixed tree over the 16 warps (deterministic).
// Radix select: 8 passes of 8-bit digits, MSB first, with a 256-bin shared histogram
// (atomicAdd on counts: order-free) and a warp scan over the bins.
// Cost per row: O(vocab) parallel passes (a few tens per walk chunk) plus the sequential
// id-order sums (one double add per token per sum; a sum is needed for top-p and for the
// draw), which dominate for large vocabularies: the price of the CPU's exact order.
// Bounds: vocab < 2^31 (ids are int32); history ids outside [0, vocab) are skipped; every
// vocabulary access is guarded by v < vocab; offsets are int64.
// Alignment: none beyond 4 / 8 bytes (scalar loads of floats, int32, the row descriptors).
// Shared memory: static, ~17.5 KiB: a 16 KiB union (2048 sort keys / 4096 staged floats),
// the 256-bin histogram, reduction slots and broadcasts.
// Compiled with --fmad=false: no contraction of the shared per-token arithmetic.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/sampling.cuh"
#include "kernels/device_math.h"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 2048;  // candidates per walk step: a power of two
constexpr int kTile = 4096;   // floats per staged tile of the sequential sums
constexpr uint32_t kPromptBit = 0x80000000u;
constexpr uint32_t kCountMask = 0x7fffffffu;
constexpr int64_t kMaxHistory = int64_t{1} << 31;

enum RowFlags : uint32_t { kRepetition = 1, kOutputPenalties = 2, kGreedy = 4 };

// A row as the kernel sees it: its parameters and where its history is in the staging buffer.
struct RowDesc {
  SamplingRowParams params;
  int64_t prompt_offset;
  int64_t prompt_len;
  int64_t output_offset;
  int64_t output_len;
  uint32_t flags;
  uint32_t unused;
};

struct SharedState {
  union {
    uint64_t keys[kChunk];
    float tile[kTile];
  } buf;
  uint32_t hist[256];
  float red_f[kWarps];
  int32_t red_i[kWarps];
  double red_d[kWarps];
  long long red_l[kWarps];
  double bcast_d;
  uint64_t bcast_u;
  long long bcast_l;
  uint32_t count;
};

// ---- Keys: the CPU's Better order (p descending, id ascending) as one integer ----

__device__ __forceinline__ uint64_t KeyOf(float p, int64_t v) {
  return (static_cast<uint64_t>(__float_as_uint(p)) << 32) |
         (0xffffffffu - static_cast<uint32_t>(v));
}
__device__ __forceinline__ float KeyProb(uint64_t key) {
  return __uint_as_float(static_cast<uint32_t>(key >> 32));
}
__device__ __forceinline__ int32_t KeyId(uint64_t key) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key));
}

// ---- Block reductions (all threads get the result; fixed order: deterministic) ----

__device__ __forceinline__ bool BetterLogit(float a, int32_t a_id, float b, int32_t b_id) {
  return a > b || (a == b && a_id < b_id);
}

// (*value, *id) becomes the best pair of the warp's lanes (max value, lowest id among equal
// values) by an xor butterfly over offsets 16, 8, 4, 2, 1.
__device__ __forceinline__ void WarpArgMax(float* value, int32_t* id) {
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, *value, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, *id, off);
    if (BetterLogit(ov, oi, *value, *id)) {
      *value = ov;
      *id = oi;
    }
  }
}

// Max value, lowest id among equal values.
__device__ void BlockArgMax(float* value, int32_t* id, SharedState& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float v = *value;
  int32_t i = *id;
  WarpArgMax(&v, &i);
  if (lane == 0) {
    sh.red_f[warp] = v;
    sh.red_i[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sh.red_f[lane] : -INFINITY;
    i = lane < kWarps ? sh.red_i[lane] : INT_MAX;
    WarpArgMax(&v, &i);
    if (lane == 0) {
      sh.red_f[0] = v;
      sh.red_i[0] = i;
    }
  }
  __syncthreads();
  *value = sh.red_f[0];
  *id = sh.red_i[0];
  __syncthreads();
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// op over v of every thread: v = op(v, partner's v) over xor offsets 16, 8, 4, 2, 1 in each
// warp, the warps' results through slots[0, kWarps) (shared memory), then the same butterfly
// over them in warp 0 (identity in lanes >= kWarps); the result is broadcast through slots[0].
template <typename T, typename Op>
__device__ T BlockReduce(T v, T identity, Op op, T* slots) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? slots[lane] : identity;
    for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) slots[0] = v;
  }
  __syncthreads();
  v = slots[0];
  __syncthreads();
  return v;
}

__device__ float BlockMax(float v, SharedState& sh) {
  return BlockReduce(v, -INFINITY, MaxOp{}, sh.red_f);
}
__device__ long long BlockCount(long long v, SharedState& sh) {
  return BlockReduce(v, 0LL, AddOp{}, sh.red_l);
}
__device__ double BlockSum(double v, SharedState& sh) {
  return BlockReduce(v, 0.0, AddOp{}, sh.red_d);
}

// ---- The CPU's order-dependent steps ----

// sum_v p[v] in double, v = 0, 1, ... (SumInIdOrder: removed candidates hold 0).
__device__ double SumInIdOrder(const float* p, int64_t vocab, SharedState& sh) {
  double total = 0.0;
  for (int64_t base = 0; base < vocab; base += kTile) {
    const int len = static_cast<int>(vocab - base < kTile ? vocab - base : kTile);
    for (int i = threadIdx.x; i < len; i += kThreads) sh.buf.tile[i] = p[base + i];
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll 8
      for (int i = 0; i < len; ++i) total += sh.buf.tile[i];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) sh.bcast_d = total;
  __syncthreads();
  total = sh.bcast_d;
  __syncthreads();
  return total;
}

// The rank-th largest key (rank >= 1) among the candidates whose key is below `bound`
// (there are at least rank of them): radix select, 8 bits per pass, MSB first.
__device__ uint64_t SelectKey(const float* p, int64_t vocab, uint32_t rank, uint64_t bound,
                              SharedState& sh) {
  uint64_t prefix = 0, mask = 0;
  uint32_t remaining = rank;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float q = p[v];
      if (q > 0.0f) {
        const uint64_t key = KeyOf(q, v);
        if (key < bound && (key & mask) == prefix) {
          atomicAdd(&sh.hist[(key >> shift) & 0xff], 1u);
        }
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l covers digits 255 - 8 l down to 248 - 8 l: lanes in descending digit order.
      const int lane = threadIdx.x;
      uint32_t local = 0;
      for (int j = 0; j < 8; ++j) local += sh.hist[255 - 8 * lane - j];
      uint32_t incl = local;
      for (int off = 1; off < 32; off *= 2) {
        const uint32_t o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      uint32_t before = incl - local;
      if (before < remaining && remaining <= incl) {  // exactly one lane
        for (int j = 0; j < 8; ++j) {
          const int digit = 255 - 8 * lane - j;
          const uint32_t h = sh.hist[digit];
          if (before + h >= remaining) {
            sh.bcast_u = static_cast<uint64_t>(digit);
            sh.bcast_l = remaining - before;
            break;
          }
          before += h;
        }
      }
    }
    __syncthreads();
    prefix |= sh.bcast_u << shift;
    mask |= uint64_t{0xff} << shift;
    remaining = static_cast<uint32_t>(sh.bcast_l);
    __syncthreads();  // hist and the broadcasts are rewritten by the next pass
  }
  return prefix;
}

// Sorts keys[0, size) (size a power of two <= kChunk) in descending order.
__device__ void BitonicSortDescending(uint64_t* keys, int size) {
  for (int k = 2; k <= size; k *= 2) {
    for (int j = k / 2; j > 0; j /= 2) {
      for (int i = threadIdx.x; i < size; i += kThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const uint64_t a = keys[i], b = keys[partner];
          const bool descending = (i & k) == 0;
          if (descending ? a < b : a > b) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

struct WalkResult {
  bool found;
  int64_t rank;  // 0-based position in best-first order
  uint64_t key;  // of the candidate found, else of the last (worst) candidate
};

// Walks the n candidates best-first accumulating p in double (thread 0, the CPU's order)
// until cumulative >= threshold (strict: > threshold).
__device__ WalkResult WalkBestFirst(const float* p, int64_t vocab, int64_t n, double threshold,
                                    bool strict, SharedState& sh) {
  uint64_t bound = ~uint64_t{0};
  double cumulative = 0.0;  // thread 0's
  WalkResult result{false, n - 1, 0};
  for (int64_t done = 0; done < n;) {
    const int c = static_cast<int>(n - done < kChunk ? n - done : kChunk);
    const uint64_t low = SelectKey(p, vocab, static_cast<uint32_t>(c), bound, sh);
    if (threadIdx.x == 0) sh.count = 0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float q = p[v];
      if (q > 0.0f) {
        const uint64_t key = KeyOf(q, v);
        if (key >= low && key < bound) sh.buf.keys[atomicAdd(&sh.count, 1u)] = key;
      }
    }
    __syncthreads();
    int size = 1;
    while (size < c) size *= 2;
    for (int i = c + threadIdx.x; i < size; i += kThreads) sh.buf.keys[i] = 0;
    __syncthreads();
    BitonicSortDescending(sh.buf.keys, size);
    if (threadIdx.x == 0) {
      long long hit = -1;
      for (int i = 0; i < c; ++i) {
        cumulative += KeyProb(sh.buf.keys[i]);
        if (strict ? cumulative > threshold : cumulative >= threshold) {
          hit = i;
          break;
        }
      }
      sh.bcast_l = hit;
      sh.bcast_u = sh.buf.keys[hit >= 0 ? hit : c - 1];
    }
    __syncthreads();
    const long long hit = sh.bcast_l;
    const uint64_t key = sh.bcast_u;
    __syncthreads();
    if (hit >= 0) return WalkResult{true, done + hit, key};
    result.key = key;
    done += c;
    bound = low;
  }
  return result;
}

// Removes (p = 0) the candidates whose key is below `keep_from`.
__device__ void KeepKeysFrom(float* p, int64_t vocab, uint64_t keep_from) {
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float q = p[v];
    if (q > 0.0f && KeyOf(q, v) < keep_from) p[v] = 0.0f;
  }
  __syncthreads();
}

// ---- Per-token arithmetic ----

__device__ __forceinline__ float PenalisedLogit(const float* x, const uint32_t* counts, int64_t v,
                                                const RowDesc& d) {
  float logit = math::SampleSanitize(x[v]);
  if ((d.flags & (kRepetition | kOutputPenalties)) == 0) return logit;
  const uint32_t c = counts[v];
  const uint32_t in_output = c & kCountMask;
  if ((d.flags & kRepetition) != 0 && c != 0) {
    logit = math::ApplyRepetitionPenalty(logit, d.params.repetition_penalty);
  }
  if ((d.flags & kOutputPenalties) != 0 && in_output > 0) {
    logit = math::ApplyOutputPenalties(logit, static_cast<float>(in_output),
                                       d.params.frequency_penalty, d.params.presence_penalty);
  }
  return logit;
}

// Temperature, top-k, top-p, min-p and the draw over the penalised logits (whose max is
// max_logit); p holds the history counts on entry and the candidates' p afterwards.
__device__ int32_t SampleRandom(const float* x, float* p, int64_t vocab, const RowDesc& d,
                                float max_logit, SharedState& sh) {
  const uint32_t* counts = reinterpret_cast<const uint32_t*>(p);
  const double temperature = d.params.temperature;
  long long local = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    // The count of v is read before p[v] overwrites it, by the same thread.
    const float q =
        math::SampleRelativeProb(PenalisedLogit(x, counts, v, d), max_logit, temperature);
    p[v] = q;
    local += q > 0.0f ? 1 : 0;
  }
  int64_t n = BlockCount(local, sh);  // >= 1: the max has p == 1

  if (d.params.top_k > 0 && d.params.top_k < n) {
    KeepKeysFrom(p, vocab,
                 SelectKey(p, vocab, static_cast<uint32_t>(d.params.top_k), ~uint64_t{0}, sh));
    n = d.params.top_k;
  }
  if (d.params.top_p < 1.0f) {
    const double threshold = math::TopPThreshold(d.params.top_p, SumInIdOrder(p, vocab, sh));
    const WalkResult cut = WalkBestFirst(p, vocab, n, threshold, /*strict=*/false, sh);
    if (cut.found) {  // else rounding kept the prefix short of the threshold: keep all
      KeepKeysFrom(p, vocab, cut.key);
      n = cut.rank + 1;
    }
  }
  if (d.params.min_p > 0.0f) {
    float local_max = 0.0f;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) local_max = fmaxf(local_max, p[v]);
    const float threshold = math::MinPThreshold(d.params.min_p, BlockMax(local_max, sh));
    long long kept = 0;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float q = p[v];
      if (q < threshold) {
        if (q > 0.0f) p[v] = 0.0f;
      } else {
        kept += q > 0.0f ? 1 : 0;
      }
    }
    n = BlockCount(kept, sh);  // its barrier also publishes the p writes
  }
  const double u = math::SampleUniform(d.params.seed, d.params.position);
  const double target = math::DrawTarget(u, SumInIdOrder(p, vocab, sh));
  return KeyId(WalkBestFirst(p, vocab, n, target, /*strict=*/true, sh).key);
}

// Log-softmax of the raw (sanitised) logits at `token`.
__device__ float RawLogProb(const float* x, int64_t vocab, int32_t token, SharedState& sh) {
  float local_max = -INFINITY;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    local_max = fmaxf(local_max, math::SampleSanitize(x[v]));
  }
  const float max_logit = BlockMax(local_max, sh);
  double local = 0.0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    local += exp(math::LogSoftmaxShift(math::SampleSanitize(x[v]), max_logit));
  }
  const double log_sum = log(BlockSum(local, sh));
  return math::LogSoftmaxValue(math::LogSoftmaxShift(math::SampleSanitize(x[token]), max_logit),
                               log_sum);
}

__global__ void __launch_bounds__(kThreads)
    SampleRowsKernel(const float* logits, int64_t rows, int64_t vocab, const RowDesc* descs,
                     const int32_t* history, float* scratch, int32_t* tokens, float* logprobs) {
  __shared__ SharedState sh;
  float* p = scratch + static_cast<int64_t>(blockIdx.x) * vocab;
  uint32_t* counts = reinterpret_cast<uint32_t*>(p);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowDesc d = descs[row];
    const float* x = logits + row * vocab;
    if ((d.flags & (kRepetition | kOutputPenalties)) != 0) {
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) counts[v] = 0;
      __syncthreads();
      const int32_t* out = history + d.output_offset;
      for (int64_t j = threadIdx.x; j < d.output_len; j += kThreads) {
        const int32_t id = out[j];
        if (id >= 0 && id < vocab) atomicAdd(&counts[id], 1u);
      }
      if ((d.flags & kRepetition) != 0) {
        const int32_t* prompt = history + d.prompt_offset;
        for (int64_t j = threadIdx.x; j < d.prompt_len; j += kThreads) {
          const int32_t id = prompt[j];
          if (id >= 0 && id < vocab) atomicOr(&counts[id], kPromptBit);
        }
      }
      __syncthreads();
    }
    float best = -INFINITY;
    int32_t best_id = INT_MAX;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float logit = PenalisedLogit(x, counts, v, d);
      if (BetterLogit(logit, static_cast<int32_t>(v), best, best_id)) {
        best = logit;
        best_id = static_cast<int32_t>(v);
      }
    }
    BlockArgMax(&best, &best_id, sh);
    const int32_t token =
        (d.flags & kGreedy) != 0 ? best_id : SampleRandom(x, p, vocab, d, best, sh);
    if (threadIdx.x == 0) tokens[row] = token;
    if (logprobs != nullptr) {
      const float lp = RawLogProb(x, vocab, token, sh);
      if (threadIdx.x == 0) logprobs[row] = lp;
    }
    __syncthreads();  // the scratch row is rewritten by the next row
  }
}

absl::Status Invalid(size_t row, const char* field, const char* requirement, float value) {
  return absl::InvalidArgumentError(
      absl::StrCat("rows[", row, "].", field, " must be ", requirement, ", got ", value));
}

absl::Status ValidateRow(size_t i, const SamplingRow& row) {
  const SamplingRowParams& p = row.params;
  if (!std::isfinite(p.temperature)) return Invalid(i, "temperature", "finite", p.temperature);
  if (p.temperature < 0.0f) return Invalid(i, "temperature", ">= 0", p.temperature);
  if (p.top_k < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows[", i, "].top_k must be -1 or >= 0, got ", p.top_k));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) return Invalid(i, "top_p", "in (0, 1]", p.top_p);
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) return Invalid(i, "min_p", "in [0, 1]", p.min_p);
  if (!(p.repetition_penalty > 0.0f) || std::isinf(p.repetition_penalty)) {
    return Invalid(i, "repetition_penalty", "finite and > 0", p.repetition_penalty);
  }
  if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f)) {
    return Invalid(i, "frequency_penalty", "in [-2, 2]", p.frequency_penalty);
  }
  if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f)) {
    return Invalid(i, "presence_penalty", "in [-2, 2]", p.presence_penalty);
  }
  if (static_cast<int64_t>(row.prompt_tokens.size() + row.output_tokens.size()) >= kMaxHistory) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows[", i, "]: history of ", row.prompt_tokens.size(), " + ",
                     row.output_tokens.size(), " tokens (must be < 2^31)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateSamplingRow(const SamplingRow& row) { return ValidateRow(0, row); }

struct Sampler::Impl {
  int device = 0;
  int64_t max_rows = 0;
  int64_t vocab = 0;
  int ctas = 0;
  float* scratch = nullptr;  // ctas rows of vocab floats
  void* staging = nullptr;   // RowDesc[rows], then the histories (int32)
  size_t staging_bytes = 0;
  std::vector<uint8_t> host;  // host image of the staging buffer

  ~Impl() {
    if (scratch != nullptr) (void)cudaFree(scratch);
    if (staging != nullptr) (void)cudaFree(staging);
  }

  absl::Status ReserveStaging(size_t bytes, cudaStream_t stream) {
    if (bytes <= staging_bytes) return absl::OkStatus();
    const size_t grown = std::max(bytes, 2 * staging_bytes);
    if (staging != nullptr) {
      KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));  // queued work may read it
      KVR_CUDA_RETURN_IF_ERROR(cudaFree(staging));
      staging = nullptr;
      staging_bytes = 0;
    }
    KVR_CUDA_RETURN_IF_ERROR(cudaMalloc(&staging, grown));
    staging_bytes = grown;
    return absl::OkStatus();
  }
};

Sampler::Sampler(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Sampler::~Sampler() = default;
int64_t Sampler::max_rows() const { return impl_->max_rows; }
int64_t Sampler::vocab() const { return impl_->vocab; }

absl::StatusOr<std::unique_ptr<Sampler>> Sampler::Create(int64_t max_rows, int64_t vocab) {
  if (max_rows < 1 || vocab < 1 || vocab >= kMaxHistory) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::Sampler: need max_rows >= 1 and 1 <= vocab < 2^31, got max_rows ",
                     max_rows, ", vocab ", vocab));
  }
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    return absl::UnavailableError(absl::StrCat("cuda::Sampler: no CUDA device (", why, ")"));
  }
  auto impl = std::make_unique<Impl>();
  impl->max_rows = max_rows;
  impl->vocab = vocab;
  KVR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&impl->device));
  int sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, impl->device));
  impl->ctas = static_cast<int>(std::min<int64_t>(max_rows, std::max(sms, 1)));
  KVR_CUDA_RETURN_IF_ERROR(
      cudaMalloc(&impl->scratch, sizeof(float) * static_cast<size_t>(impl->ctas * vocab)));
  return std::unique_ptr<Sampler>(new Sampler(std::move(impl)));
}

absl::Status Sampler::Sample(const float* logits, absl::Span<const SamplingRow> rows,
                             int32_t* tokens, float* logprobs, cudaStream_t stream) {
  Impl& s = *impl_;
  const auto n = static_cast<int64_t>(rows.size());
  if (n > s.max_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::Sampler: ", n, " rows, more than max_rows ", s.max_rows));
  }
  if (n == 0) return absl::OkStatus();
  if (logits == nullptr || tokens == nullptr) {
    return absl::InvalidArgumentError("cuda::Sampler: null pointer");
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const absl::Status st = ValidateRow(i, rows[i]);
    if (!st.ok()) return st;
  }
  int device = -1;
  KVR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device != s.device) {
    return absl::FailedPreconditionError(absl::StrCat("cuda::Sampler: created on device ", s.device,
                                                      ", called with device ", device, " current"));
  }

  // Row descriptors, then the histories the penalties need, in one host image.
  std::vector<RowDesc> descs(rows.size());
  std::vector<int32_t> history;
  for (size_t i = 0; i < rows.size(); ++i) {
    const SamplingRow& row = rows[i];
    const SamplingRowParams& p = row.params;
    RowDesc& d = descs[i];  // value-initialised: offsets, lengths and flags are 0
    d.params = p;
    if (!(p.temperature > 0.0f) || p.top_k == 1) d.flags |= kGreedy;
    if (p.repetition_penalty != 1.0f) d.flags |= kRepetition;
    if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) d.flags |= kOutputPenalties;
    if ((d.flags & kRepetition) != 0) {
      d.prompt_offset = static_cast<int64_t>(history.size());
      d.prompt_len = static_cast<int64_t>(row.prompt_tokens.size());
      history.insert(history.end(), row.prompt_tokens.begin(), row.prompt_tokens.end());
    }
    if ((d.flags & (kRepetition | kOutputPenalties)) != 0) {
      d.output_offset = static_cast<int64_t>(history.size());
      d.output_len = static_cast<int64_t>(row.output_tokens.size());
      history.insert(history.end(), row.output_tokens.begin(), row.output_tokens.end());
    }
  }
  const size_t desc_bytes = sizeof(RowDesc) * descs.size();
  const size_t bytes = desc_bytes + sizeof(int32_t) * history.size();
  s.host.resize(bytes);
  std::memcpy(s.host.data(), descs.data(), desc_bytes);
  if (!history.empty()) {
    std::memcpy(s.host.data() + desc_bytes, history.data(), sizeof(int32_t) * history.size());
  }
  const absl::Status reserved = s.ReserveStaging(bytes, stream);
  if (!reserved.ok()) return reserved;
  // From pageable memory: returns once the bytes are staged, so s.host may be reused.
  KVR_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(s.staging, s.host.data(), bytes, cudaMemcpyHostToDevice, stream));

  auto* dev = static_cast<uint8_t*>(s.staging);
  const auto grid = static_cast<unsigned>(std::min<int64_t>(n, s.ctas));
  SampleRowsKernel<<<grid, kThreads, 0, stream>>>(
      logits, n, s.vocab, reinterpret_cast<const RowDesc*>(dev),
      reinterpret_cast<const int32_t*>(dev + desc_bytes), s.scratch, tokens, logprobs);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels::cuda
