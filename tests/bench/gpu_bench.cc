// GPU benchmark (issue 8): the CUDA backend against the hardware's limits, on the ~134M bench
// model (tests/bench/bench_model.h; bf16 weights) or --model DIR.
//
//   1. Decode step time vs the memory-bandwidth floor: B sequences prefilled to C tokens, then
//      Model::Forward with B one-token chunks (each step at position C, so every sequence
//      attends over exactly C + 1 tokens). Bytes read per step = every weight the step reads
//      once (all layers, final norm, lm_head; one embedding row per token) + the K and V of
//      C + 1 tokens of every sequence in every layer (int8: plus the scales). The floor is
//      bytes / peak bandwidth; "% peak" = floor / step time, against both the theoretical peak
//      (cudaDevAttrMemoryClockRate * 2 * cudaDevAttrGlobalMemoryBusWidth / 8) and the measured
//      one (read + write traffic of a large cudaMemcpyAsync D2D).
//   2. Prefill TFLOP/s: Forward on one chunk of N tokens (logits of the last token only):
//      FLOPs = 2 * W * N + 2 * V * H + 4 * L * heads * head_dim * N (N + 1) / 2, with W the
//      weights of the layers' linear layers (q/k/v, o, gate/up, down), V * H the lm_head
//      (one row of logits) and the last term causal attention (QK^T and PV, 2 FLOPs per
//      multiply-add, each query attending over its own position and those before it).
//   3. Device-to-device transfer GB/s: cudaMemcpyAsync D2D of a large buffer; the KV block
//      gather / scatter kernels (kernels/cuda/block_copy.cuh) moving --gather_blocks blocks of
//      the model's KV block size between a pool (random distinct block ids) and a staging
//      buffer; with two or more GPUs, cudaMemcpyPeerAsync between devices 0 and 1.
//
// Timing: Forward returns only once its logits are in host memory, so a decode step / prefill
// is timed on the host clock (steady_clock) and includes what the engine pays per step:
// host-side batch preparation, the metadata upload and the logits download (whose cost is
// shown separately, "logits D2H", measured as a Backend::Download of the same size). Copies
// are timed with CUDA events on their stream. Every measurement: --warmup untimed runs, then
// --reps timed runs, median reported (and the min).
//
// Without a usable GPU: prints "gpu_bench: skipped: <why>" and exits 77.
//
//   build/bin/gpu_bench [--model DIR] [--batches 1,8,32,64] [--contexts 512,2048]
//                       [--prefill_tokens 512,2048] [--kv_dtype bf16] [--reps 20]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "common/model/model.h"
#include "common/util/status.h"
#include "kernels/backend.h"
#include "kernels/cuda/block_copy.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/paged_kv.h"
#include "tests/bench/bench_model.h"

ABSL_FLAG(std::string, model, "",
          "model folder (default: the ~134M bench model, written once to "
          "$KVRELAY_BENCH_DIR/kvrelay-bench-100m)");
ABSL_FLAG(std::string, batches, "1,8,32,64", "decode batch sizes");
ABSL_FLAG(std::string, contexts, "512,2048", "decode context lengths (tokens per sequence)");
ABSL_FLAG(std::string, prefill_tokens, "512,2048", "prefill chunk lengths");
ABSL_FLAG(std::string, kv_dtype, "bf16", "KV dtype: f32 | f16 | bf16 | int8");
ABSL_FLAG(int, block_size, 16, "tokens per KV block");
ABSL_FLAG(int, warmup, 3, "untimed runs before each measurement");
ABSL_FLAG(int, reps, 20, "timed runs per measurement (the median is reported)");
ABSL_FLAG(int64_t, copy_mib, 1024, "buffer size of the D2D and peer copies, MiB");
ABSL_FLAG(int, gather_blocks, 256, "KV blocks per gather / scatter (pool: 4x as many)");
ABSL_FLAG(std::string, parts, "decode,prefill,copy", "which parts to run: decode, prefill, copy");
ABSL_FLAG(bool, cuda_split_k_decode, false,
          "decode steps through the split-K flash-decoding kernel (as the workers' flag); run "
          "once with and once without to compare the two attention paths");

namespace kvrelay::bench {
namespace {

constexpr int kSkip = 77;
constexpr double kMB = 1e6, kGB = 1e9;

// For cleanup paths (destructors) that cannot return a status: print and go on.
void WarnIfError(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "gpu_bench: warning: %s: %s (%s)\n", what, cudaGetErrorName(err),
                 cudaGetErrorString(err));
  }
}

// cudaMalloc'd memory on one device, freed on destruction.
class DeviceMem {
 public:
  DeviceMem() = default;
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  ~DeviceMem() {
    if (ptr_ == nullptr) return;
    int prev = 0;
    WarnIfError(cudaGetDevice(&prev), "cudaGetDevice");
    WarnIfError(cudaSetDevice(device_), "cudaSetDevice");
    WarnIfError(cudaFree(ptr_), "cudaFree");
    WarnIfError(cudaSetDevice(prev), "cudaSetDevice");
  }
  // Allocates on `device` and leaves the current device as it was.
  absl::Status Alloc(int device, size_t bytes) {
    int prev = 0;
    KVR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&prev));
    KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    KVR_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes));
    device_ = device;
    bytes_ = bytes;
    KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(prev));
    return absl::OkStatus();
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  int device_ = 0;
};

// A non-blocking stream on the current device.
class Stream {
 public:
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (s_ != nullptr) WarnIfError(cudaStreamDestroy(s_), "cudaStreamDestroy");
  }
  absl::Status Create() {
    KVR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
    return absl::OkStatus();
  }
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

struct EventPair {
  cudaEvent_t start = nullptr, stop = nullptr;
  EventPair() = default;
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
  ~EventPair() {
    if (start != nullptr) WarnIfError(cudaEventDestroy(start), "cudaEventDestroy");
    if (stop != nullptr) WarnIfError(cudaEventDestroy(stop), "cudaEventDestroy");
  }
};

struct Stats {
  double median_ms = 0;
  double min_ms = 0;
};

Stats Summarize(std::vector<double> ms) {
  Stats s;
  if (ms.empty()) return s;
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  s.median_ms = n % 2 == 1 ? ms[n / 2] : (ms[n / 2 - 1] + ms[n / 2]) / 2;
  s.min_ms = ms.front();
  return s;
}

double NowMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// `enqueue` queues work on `stream` (asynchronously); each run is timed with CUDA events.
absl::StatusOr<Stats> TimeOnStream(cudaStream_t stream, int warmup, int reps,
                                   const std::function<absl::Status()>& enqueue) {
  EventPair ev;
  KVR_CUDA_RETURN_IF_ERROR(cudaEventCreate(&ev.start));
  KVR_CUDA_RETURN_IF_ERROR(cudaEventCreate(&ev.stop));
  for (int i = 0; i < warmup; ++i) KVR_RETURN_IF_ERROR(enqueue());
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    KVR_CUDA_RETURN_IF_ERROR(cudaEventRecord(ev.start, stream));
    KVR_RETURN_IF_ERROR(enqueue());
    KVR_CUDA_RETURN_IF_ERROR(cudaEventRecord(ev.stop, stream));
    KVR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ev.stop));
    float t = 0;
    KVR_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&t, ev.start, ev.stop));
    ms.push_back(t);
  }
  return Summarize(std::move(ms));
}

// `run` is synchronous (returns once its work is done); timed on the host clock.
absl::StatusOr<Stats> TimeSync(int warmup, int reps, const std::function<absl::Status()>& run) {
  for (int i = 0; i < warmup; ++i) KVR_RETURN_IF_ERROR(run());
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const double t0 = NowMs();
    KVR_RETURN_IF_ERROR(run());
    ms.push_back(NowMs() - t0);
  }
  return Summarize(std::move(ms));
}

absl::StatusOr<std::vector<int>> ParseIntList(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flag, ": want positive integers separated by commas, got '", text, "'"));
    }
    out.push_back(v);
  }
  return out;
}

bool HasPart(const std::string& parts, absl::string_view name) {
  for (absl::string_view p : absl::StrSplit(parts, ',', absl::SkipWhitespace())) {
    if (p == name) return true;
  }
  return false;
}

struct Options {
  std::string model_dir;
  std::vector<int> batches, contexts, prefill_tokens;
  kernels::DType kv_dtype = kernels::DType::kBF16;
  int block_size = 16;
  int warmup = 3;
  int reps = 20;
  size_t copy_bytes = 0;
  int gather_blocks = 256;
  bool decode = true, prefill = true, copy = true;
  kernels::BackendOptions backend;
};

absl::StatusOr<Options> ReadFlags() {
  Options o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  KVR_ASSIGN_OR_RETURN(o.batches, ParseIntList("batches", absl::GetFlag(FLAGS_batches)));
  KVR_ASSIGN_OR_RETURN(o.contexts, ParseIntList("contexts", absl::GetFlag(FLAGS_contexts)));
  KVR_ASSIGN_OR_RETURN(o.prefill_tokens,
                       ParseIntList("prefill_tokens", absl::GetFlag(FLAGS_prefill_tokens)));
  if (!kernels::ParseDType(absl::GetFlag(FLAGS_kv_dtype), &o.kv_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_dtype: unknown dtype '", absl::GetFlag(FLAGS_kv_dtype), "'"));
  }
  o.block_size = absl::GetFlag(FLAGS_block_size);
  o.warmup = absl::GetFlag(FLAGS_warmup);
  o.reps = absl::GetFlag(FLAGS_reps);
  const int64_t mib = absl::GetFlag(FLAGS_copy_mib);
  o.gather_blocks = absl::GetFlag(FLAGS_gather_blocks);
  o.backend.cuda_split_k_decode = absl::GetFlag(FLAGS_cuda_split_k_decode);
  if (o.block_size <= 0 || o.warmup < 0 || o.reps <= 0 || mib <= 0 || o.gather_blocks <= 0) {
    return absl::InvalidArgumentError(
        "--block_size, --reps, --copy_mib and --gather_blocks must be positive, --warmup >= 0");
  }
  o.copy_bytes = static_cast<size_t>(mib) << 20;
  const std::string parts = absl::GetFlag(FLAGS_parts);
  o.decode = HasPart(parts, "decode");
  o.prefill = HasPart(parts, "prefill");
  o.copy = HasPart(parts, "copy");
  std::sort(o.batches.begin(), o.batches.end());
  std::sort(o.contexts.begin(), o.contexts.end());
  return o;
}

// ---- Device ----

struct DeviceInfo {
  int count = 0;
  double peak_bw = 0;      // theoretical, bytes/s
  double measured_bw = 0;  // read + write traffic of a large D2D copy, bytes/s (0: not run)
};

absl::StatusOr<DeviceInfo> PrintDevices() {
  DeviceInfo info;
  KVR_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&info.count));
  int driver = 0, runtime = 0;
  KVR_CUDA_RETURN_IF_ERROR(cudaDriverGetVersion(&driver));
  KVR_CUDA_RETURN_IF_ERROR(cudaRuntimeGetVersion(&runtime));
  std::printf("CUDA driver %d.%d, runtime %d.%d, %d device(s)\n", driver / 1000,
              (driver % 1000) / 10, runtime / 1000, (runtime % 1000) / 10, info.count);
  for (int d = 0; d < info.count; ++d) {
    cudaDeviceProp p;
    KVR_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&p, d));
    // memoryClockRate / memoryBusWidth of cudaDeviceProp are deprecated (gone in CUDA 13):
    // the attributes give the same numbers.
    int mem_clock_khz = 0, bus_bits = 0;
    KVR_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, d));
    KVR_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, d));
    // Double data rate: two transfers per memory clock.
    const double peak = mem_clock_khz * 1e3 * 2.0 * bus_bits / 8.0;
    if (d == 0) info.peak_bw = peak;
    std::printf(
        "  device %d: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.1f MiB, memory clock %d MHz x %d-bit "
        "bus -> theoretical peak %.1f GB/s\n",
        d, p.name, p.major, p.minor, p.multiProcessorCount,
        static_cast<double>(p.totalGlobalMem) / (1 << 30),
        static_cast<double>(p.l2CacheSize) / (1 << 20), mem_clock_khz / 1000, bus_bits, peak / kGB);
  }
  std::printf(
      "(all runs on device 0; theoretical peak = memory clock x 2 (DDR) x bus width / 8)\n");
  return info;
}

// ---- 3a. Large D2D copy (also the measured bandwidth for part 1) ----

absl::Status MeasureD2D(const Options& o, DeviceInfo* info) {
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  DeviceMem src, dst;
  KVR_RETURN_IF_ERROR(src.Alloc(0, o.copy_bytes));
  KVR_RETURN_IF_ERROR(dst.Alloc(0, o.copy_bytes));
  Stream stream;
  KVR_RETURN_IF_ERROR(stream.Create());
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(src.get(), 1, o.copy_bytes, stream.get()));
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst.get(), 2, o.copy_bytes, stream.get()));
  KVR_ASSIGN_OR_RETURN(
      const Stats s, TimeOnStream(stream.get(), o.warmup, o.reps, [&]() -> absl::Status {
        KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst.get(), src.get(), o.copy_bytes,
                                                 cudaMemcpyDeviceToDevice, stream.get()));
        return absl::OkStatus();
      }));
  const double copied = static_cast<double>(o.copy_bytes) / (s.median_ms / 1e3);
  info->measured_bw = 2 * copied;
  std::printf(
      "\n== D2D copy (cudaMemcpyAsync, %zu MiB, device 0) ==\n"
      "  median %.3f ms (min %.3f): %.1f GB/s copied, %.1f GB/s memory traffic (read + write) "
      "= %.0f%% of the theoretical peak\n",
      o.copy_bytes >> 20, s.median_ms, s.min_ms, copied / kGB, info->measured_bw / kGB,
      100.0 * info->measured_bw / info->peak_bw);
  std::printf("  measured peak used below: %.1f GB/s (the read + write traffic)\n",
              info->measured_bw / kGB);
  return absl::OkStatus();
}

// ---- Model arithmetic ----

double LinearBytes(const model::Linear& l) {
  return static_cast<double>(l.out) * l.in * kernels::DTypeSize(l.dtype) +
         (l.bias != nullptr ? 4.0 * l.out : 0.0);
}
double LinearMacs(const model::Linear& l) { return static_cast<double>(l.out) * l.in; }

// Bytes of weights one decode step of `batch` tokens reads: every layer's weights, the final
// norm and the lm_head once, plus one embedding row (and, GPT-2, one position row) per token.
double WeightBytesPerStep(const model::Model& m, int batch) {
  const model::Weights& w = m.weights();
  const model::ModelConfig& c = m.config();
  double b = 0;
  for (const model::LayerWeights& l : w.layers) {
    b += LinearBytes(l.qkv) + LinearBytes(l.o) + LinearBytes(l.up) + LinearBytes(l.down);
    b += 4.0 * (l.norm1_w.size() + l.norm1_b.size() + l.norm2_w.size() + l.norm2_b.size());
  }
  b += 4.0 * (w.final_norm_w.size() + w.final_norm_b.size());
  b += LinearBytes(w.lm_head);
  b += static_cast<double>(batch) * c.hidden_size * kernels::DTypeSize(w.embed_dtype);
  if (!w.pos_embed.empty()) b += 4.0 * batch * c.hidden_size;
  return b;
}

// K + V bytes of one token in every layer (int8: with its scales).
double KvBytesPerToken(const kernels::PagedKvLayout& L) {
  const double scales =
      L.dtype == kernels::DType::kI8 ? static_cast<double>(sizeof(float)) * L.num_kv_heads : 0.0;
  return 2.0 * L.num_layers * (static_cast<double>(L.token_bytes()) + scales);
}

// Multiply-adds per token of the layers' linear layers.
double LayerMacsPerToken(const model::Model& m) {
  double macs = 0;
  for (const model::LayerWeights& l : m.weights().layers) {
    macs += LinearMacs(l.qkv) + LinearMacs(l.o) + LinearMacs(l.up) + LinearMacs(l.down);
  }
  return macs;
}

std::vector<int32_t> Tokens(int64_t n, int seed, int vocab) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>((i * 7919 + seed * 104729) % vocab);
  return t;
}

std::vector<int32_t> BlockRange(int64_t first, int64_t n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), static_cast<int32_t>(first));
  return t;
}

bool AllFinite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// ---- 1. Decode step time vs the bandwidth floor ----

absl::Status RunDecode(const Options& o, const DeviceInfo& info, const model::Model& m,
                       kernels::Backend* be) {
  const model::ModelConfig& c = m.config();
  const kernels::PagedKvLayout layout = m.KvLayout(o.kv_dtype, o.block_size);
  const double kv_token = KvBytesPerToken(layout);
  std::printf(
      "\n== Decode step vs memory-bandwidth floor (KV %s, block %d, %.3f MB per KV block) ==\n"
      "  bytes/step = weights read once (%.1f MB at batch 1) + K/V of (C + 1) tokens x B "
      "sequences x %d layers (%.1f KB per token)\n"
      "  floor = bytes / peak; %%peak = floor / step time (theoretical %.0f GB/s; measured "
      "%.0f GB/s)\n"
      "  step_ms: Forward of B one-token chunks incl. metadata upload and logits download "
      "(logits_d2h: a Download of the B x %d f32 logits alone)\n",
      kernels::DTypeName(o.kv_dtype), o.block_size, layout.block_bytes() / kMB,
      WeightBytesPerStep(m, 1) / kMB, layout.num_layers, kv_token / 1e3, info.peak_bw / kGB,
      info.measured_bw / kGB, c.vocab_size);
  std::printf("  %5s %6s %10s %10s %12s %10s %10s %10s %9s %9s %11s\n", "B", "C", "step_ms",
              "min_ms", "tokens/s", "MB/step", "floor_ms", "floor_meas", "%peak", "%meas",
              "logits_d2h");
  for (const int ctx : o.contexts) {
    if (ctx + 1 > c.max_position_embeddings) {
      std::printf("  C=%d: skipped (the model's max_position_embeddings is %d)\n", ctx,
                  c.max_position_embeddings);
      continue;
    }
    const int64_t blocks_per_seq = (ctx + 1 + o.block_size - 1) / o.block_size;
    const size_t seq_bytes = static_cast<size_t>(blocks_per_seq) * layout.block_bytes();
    // The largest batch whose pool fits in what is free, leaving room for activations.
    size_t free_bytes = 0, total_bytes = 0;
    KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
    KVR_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
    const size_t reserve = std::max<size_t>(size_t{1} << 30, free_bytes / 10);
    const size_t budget = free_bytes > reserve ? free_bytes - reserve : 0;
    int fit = 0;
    for (const int b : o.batches) {
      if (static_cast<size_t>(b) * seq_bytes <= budget) fit = b;
    }
    if (fit == 0) {
      std::printf("  C=%d: skipped (one sequence's KV, %.1f MB, does not fit in %.1f MB free)\n",
                  ctx, seq_bytes / kMB, free_bytes / kMB);
      continue;
    }
    const int64_t num_blocks = blocks_per_seq * fit;
    KVR_ASSIGN_OR_RETURN(kernels::Buffer pool, be->Allocate(num_blocks * layout.block_bytes()));
    kernels::PagedKvView kv;
    kv.layout = layout;
    kv.base = pool.as<uint8_t>();
    kv.num_blocks = num_blocks;
    kv.memory = kernels::MemoryKind::kCuda;

    // Prefill `fit` sequences of ctx tokens, several per Forward (up to ~8K tokens a pass).
    std::vector<std::vector<int32_t>> prompts(fit), tables(fit);
    for (int s = 0; s < fit; ++s) {
      prompts[s] = Tokens(ctx, s, c.vocab_size);
      tables[s] = BlockRange(s * blocks_per_seq, blocks_per_seq);
    }
    {
      std::vector<model::SeqChunk> group;
      int64_t group_tokens = 0;
      std::vector<float> logits;
      for (int s = 0; s < fit; ++s) {
        group.push_back(model::SeqChunk{prompts[s], 0, tables[s], false});
        group_tokens += ctx;
        if (group_tokens >= 8192 || s == fit - 1) {
          KVR_RETURN_IF_ERROR(m.Forward(group, kv, &logits));
          group.clear();
          group_tokens = 0;
        }
      }
      KVR_RETURN_IF_ERROR(be->Synchronize());
    }

    for (const int b : o.batches) {
      if (b > fit) {
        std::printf("  %5d %6d skipped: KV pool of %.1f GB does not fit in %.1f GB free\n", b, ctx,
                    static_cast<double>(b) * seq_bytes / kGB, free_bytes / kGB);
        continue;
      }
      std::vector<int32_t> next(b);
      for (int s = 0; s < b; ++s) next[s] = static_cast<int32_t>((s * 131 + 7) % c.vocab_size);
      std::vector<model::SeqChunk> step;
      for (int s = 0; s < b; ++s) {
        // Always position ctx: every step attends over exactly ctx + 1 tokens (rewriting the
        // same KV slot each time).
        step.push_back(model::SeqChunk{absl::MakeConstSpan(&next[s], 1), ctx, tables[s], true});
      }
      std::vector<float> logits;
      KVR_ASSIGN_OR_RETURN(const Stats st, TimeSync(o.warmup, o.reps, [&]() -> absl::Status {
                             logits.clear();
                             return m.Forward(step, kv, &logits);
                           }));
      if (logits.size() != static_cast<size_t>(b) * c.vocab_size || !AllFinite(logits)) {
        std::printf("  warning: B=%d C=%d: %zu logits, %s\n", b, ctx, logits.size(),
                    AllFinite(logits) ? "all finite" : "NOT all finite");
      }
      // What the logits download alone costs (same size, same path).
      const size_t logit_bytes = sizeof(float) * logits.size();
      KVR_ASSIGN_OR_RETURN(kernels::Buffer dev_logits, be->Allocate(logit_bytes));
      std::vector<float> host(logits.size());
      KVR_ASSIGN_OR_RETURN(const Stats d2h, TimeSync(o.warmup, o.reps, [&]() -> absl::Status {
                             return be->Download(dev_logits.data(), logit_bytes, host.data());
                           }));
      const double bytes = WeightBytesPerStep(m, b) + kv_token * (ctx + 1.0) * b;
      const double floor_ms = bytes / info.peak_bw * 1e3;
      const double floor_measured_ms = info.measured_bw > 0 ? bytes / info.measured_bw * 1e3 : 0;
      std::printf("  %5d %6d %10.3f %10.3f %12.0f %10.1f %10.3f %10.3f %8.1f%% %8.1f%% %8.3f ms\n",
                  b, ctx, st.median_ms, st.min_ms, b / (st.median_ms / 1e3), bytes / kMB, floor_ms,
                  floor_measured_ms, 100.0 * floor_ms / st.median_ms,
                  100.0 * floor_measured_ms / st.median_ms, d2h.median_ms);
    }
  }
  std::printf(
      "  (floor_ms: bytes / theoretical peak; floor_meas: bytes / measured peak; %%peak, "
      "%%meas: the floor / step_ms)\n");
  return absl::OkStatus();
}

// ---- 2. Prefill TFLOP/s ----

absl::Status RunPrefill(const Options& o, const model::Model& m, kernels::Backend* be) {
  const model::ModelConfig& c = m.config();
  const kernels::PagedKvLayout layout = m.KvLayout(o.kv_dtype, o.block_size);
  const double layer_macs = LayerMacsPerToken(m);
  const double lm_head_macs = LinearMacs(m.weights().lm_head);
  std::printf(
      "\n== Prefill: one chunk of N tokens from position 0, logits of the last token ==\n"
      "  FLOPs = 2*W*N + 2*V*H + 4*L*heads*head_dim*N(N+1)/2  (W = %.1fM layer linear weights, "
      "V*H = %.1fM lm_head, L = %d, heads = %d, head_dim = %d)\n",
      layer_macs / 1e6, lm_head_macs / 1e6, c.num_layers, c.num_heads, c.head_dim);
  std::printf("  %6s %10s %10s %12s %10s %10s\n", "N", "ms", "min_ms", "tokens/s", "GFLOP",
              "TFLOP/s");
  for (const int n : o.prefill_tokens) {
    if (n > c.max_position_embeddings) {
      std::printf("  %6d skipped (the model's max_position_embeddings is %d)\n", n,
                  c.max_position_embeddings);
      continue;
    }
    const int64_t num_blocks = (n + o.block_size - 1) / o.block_size;
    KVR_ASSIGN_OR_RETURN(kernels::Buffer pool, be->Allocate(num_blocks * layout.block_bytes()));
    kernels::PagedKvView kv;
    kv.layout = layout;
    kv.base = pool.as<uint8_t>();
    kv.num_blocks = num_blocks;
    kv.memory = kernels::MemoryKind::kCuda;
    const std::vector<int32_t> prompt = Tokens(n, 1, c.vocab_size);
    const std::vector<int32_t> table = BlockRange(0, num_blocks);
    const model::SeqChunk chunk{prompt, 0, table, true};
    std::vector<float> logits;
    KVR_ASSIGN_OR_RETURN(const Stats st, TimeSync(o.warmup, o.reps, [&]() -> absl::Status {
                           logits.clear();
                           return m.Forward({chunk}, kv, &logits);
                         }));
    if (!AllFinite(logits)) std::printf("  warning: N=%d: logits NOT all finite\n", n);
    const double nn = n;
    const double flops = 2.0 * layer_macs * nn + 2.0 * lm_head_macs +
                         4.0 * c.num_layers * c.num_heads * c.head_dim * nn * (nn + 1) / 2;
    std::printf("  %6d %10.3f %10.3f %12.0f %10.1f %10.2f\n", n, st.median_ms, st.min_ms,
                nn / (st.median_ms / 1e3), flops / 1e9, flops / (st.median_ms / 1e3) / 1e12);
  }
  return absl::OkStatus();
}

// ---- 3b. KV block gather / scatter ----

absl::Status RunGatherScatter(const Options& o, const kernels::PagedKvLayout& layout) {
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  const int64_t n = o.gather_blocks;
  const int64_t pool_blocks = 4 * n;
  const uint64_t bb = layout.block_bytes();
  DeviceMem pool, staging, ids, bad;
  KVR_RETURN_IF_ERROR(pool.Alloc(0, bb * pool_blocks));
  KVR_RETURN_IF_ERROR(staging.Alloc(0, bb * n));
  KVR_RETURN_IF_ERROR(ids.Alloc(0, sizeof(int32_t) * n));
  KVR_RETURN_IF_ERROR(bad.Alloc(0, sizeof(int32_t)));
  Stream stream;
  KVR_RETURN_IF_ERROR(stream.Create());
  // n distinct block ids spread over the pool, in random order (as a sequence's blocks are).
  std::vector<int32_t> all = BlockRange(0, pool_blocks);
  std::mt19937 rng(8);
  std::shuffle(all.begin(), all.end(), rng);
  const std::vector<int32_t> host_ids(all.begin(), all.begin() + n);
  KVR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids.get(), host_ids.data(), sizeof(int32_t) * n,
                                           cudaMemcpyHostToDevice, stream.get()));
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(pool.get(), 3, pool.bytes(), stream.get()));
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(staging.get(), 4, staging.bytes(), stream.get()));
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(bad.get(), 0, sizeof(int32_t), stream.get()));
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream.get()));

  const double moved = static_cast<double>(bb) * n;
  std::printf(
      "\n== KV block gather / scatter (kernels/cuda/block_copy.cuh): %lld blocks of %.3f MB = "
      "%.1f MB, random distinct ids in a pool of %lld ==\n",
      static_cast<long long>(n), bb / kMB, moved / kMB, static_cast<long long>(pool_blocks));
  std::printf("  %-8s %10s %10s %14s %16s\n", "op", "ms", "min_ms", "GB/s moved", "GB/s traffic");
  KVR_ASSIGN_OR_RETURN(
      const Stats g, TimeOnStream(stream.get(), o.warmup, o.reps, [&]() -> absl::Status {
        return kernels::cuda::GatherBlocks(pool.get(), pool_blocks, bb, ids.get<int32_t>(), n,
                                           staging.get(), bad.get<int32_t>(), stream.get());
      }));
  KVR_ASSIGN_OR_RETURN(
      const Stats s, TimeOnStream(stream.get(), o.warmup, o.reps, [&]() -> absl::Status {
        return kernels::cuda::ScatterBlocks(staging.get(), ids.get<int32_t>(), n, bb, pool.get(),
                                            pool_blocks, bad.get<int32_t>(), stream.get());
      }));
  for (const auto& [name, st] : {std::make_pair("gather", g), std::make_pair("scatter", s)}) {
    const double bw = moved / (st.median_ms / 1e3);
    std::printf("  %-8s %10.3f %10.3f %14.1f %16.1f\n", name, st.median_ms, st.min_ms, bw / kGB,
                2 * bw / kGB);
  }
  KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream.get()));
  int32_t num_bad = 0;
  KVR_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(&num_bad, bad.get(), sizeof(int32_t), cudaMemcpyDeviceToHost));
  if (num_bad != 0) {
    return absl::InternalError(absl::StrCat("block copy counted ", num_bad, " bad ids"));
  }
  std::printf(
      "  (moved: block bytes copied / time; traffic: read + write, comparable to the "
      "peak)\n");
  return absl::OkStatus();
}

// ---- 3c. Peer copies between devices 0 and 1 ----

absl::Status RunPeer(const Options& o, const DeviceInfo& info) {
  if (info.count < 2) {
    std::printf("\n== Peer copy: skipped (one device) ==\n");
    return absl::OkStatus();
  }
  int can01 = 0, can10 = 0;
  KVR_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&can01, 0, 1));
  KVR_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&can10, 1, 0));
  // Peer access on, where the hardware allows it (otherwise the copies are staged through
  // the host by the driver).
  auto enable = [](int from, int to) -> absl::Status {
    KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(from));
    const cudaError_t err = cudaDeviceEnablePeerAccess(to, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // clear the non-sticky error just returned
    } else {
      KVR_CUDA_RETURN_IF_ERROR(err);
    }
    return absl::OkStatus();
  };
  if (can01) KVR_RETURN_IF_ERROR(enable(0, 1));
  if (can10) KVR_RETURN_IF_ERROR(enable(1, 0));
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  DeviceMem a, b;
  KVR_RETURN_IF_ERROR(a.Alloc(0, o.copy_bytes));
  KVR_RETURN_IF_ERROR(b.Alloc(1, o.copy_bytes));
  Stream stream;  // on device 0
  KVR_RETURN_IF_ERROR(stream.Create());
  KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.get(), 5, o.copy_bytes, stream.get()));
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(1));
  KVR_CUDA_RETURN_IF_ERROR(cudaMemset(b.get(), 6, o.copy_bytes));
  KVR_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  std::printf("\n== Peer copy (cudaMemcpyPeerAsync, %zu MiB; peer access 0->1 %s, 1->0 %s) ==\n",
              o.copy_bytes >> 20, can01 ? "on" : "not available", can10 ? "on" : "not available");
  std::printf("  %-8s %10s %10s %10s\n", "dir", "ms", "min_ms", "GB/s");
  for (const int dir : {0, 1}) {
    void* dst = dir == 0 ? b.get() : a.get();
    const void* src = dir == 0 ? a.get() : b.get();
    const int dst_dev = dir == 0 ? 1 : 0, src_dev = dir == 0 ? 0 : 1;
    KVR_ASSIGN_OR_RETURN(
        const Stats st, TimeOnStream(stream.get(), o.warmup, o.reps, [&]() -> absl::Status {
          KVR_CUDA_RETURN_IF_ERROR(
              cudaMemcpyPeerAsync(dst, dst_dev, src, src_dev, o.copy_bytes, stream.get()));
          return absl::OkStatus();
        }));
    std::printf("  %d -> %d   %10.3f %10.3f %10.1f\n", src_dev, dst_dev, st.median_ms, st.min_ms,
                static_cast<double>(o.copy_bytes) / (st.median_ms / 1e3) / kGB);
  }
  return absl::OkStatus();
}

absl::Status Run(const Options& o) {
  KVR_ASSIGN_OR_RETURN(DeviceInfo info, PrintDevices());
  KVR_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (o.decode || o.copy) KVR_RETURN_IF_ERROR(MeasureD2D(o, &info));

  KVR_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend,
                       kernels::CreateBackend(kernels::Device::kCuda, nullptr, o.backend));
  std::printf("\ndecode attention: %s\n", o.backend.cuda_split_k_decode
                                              ? "split-K flash-decoding (--cuda_split_k_decode)"
                                              : "the prefill kernel (default: exact across serving "
                                                "paths)");
  const std::string dir = o.model_dir.empty() ? EnsureBenchModel() : o.model_dir;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> m, model::Model::Load(dir, backend.get()));
  const model::ModelConfig& c = m->config();
  std::printf(
      "\nmodel %s: %s, %d layers, hidden %d, %d heads (%d kv), head_dim %d, vocab %d; %.1fM "
      "parameters, %.1f MB of weights (%s embeddings)\n",
      dir.c_str(), c.model_type.c_str(), c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
      c.head_dim, c.vocab_size, m->weights().parameter_count / 1e6,
      m->weights().parameter_bytes / kMB, c.tie_word_embeddings ? "tied" : "untied");

  if (o.decode) KVR_RETURN_IF_ERROR(RunDecode(o, info, *m, backend.get()));
  if (o.prefill) KVR_RETURN_IF_ERROR(RunPrefill(o, *m, backend.get()));
  if (o.copy) {
    KVR_RETURN_IF_ERROR(RunGatherScatter(o, m->KvLayout(o.kv_dtype, o.block_size)));
    KVR_RETURN_IF_ERROR(RunPeer(o, info));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvrelay::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "gpu_bench [--model DIR] [--batches 1,8,32,64] [--contexts 512,2048] "
      "[--prefill_tokens 512,2048] [--kv_dtype bf16] [--parts decode,prefill,copy]");
  absl::ParseCommandLine(argc, argv);
  // Flags are checked first, so that a bad command line fails even on a machine without a GPU.
  const absl::StatusOr<kvrelay::bench::Options> options = kvrelay::bench::ReadFlags();
  if (!options.ok()) {
    std::fprintf(stderr, "gpu_bench: %s\n", std::string(options.status().message()).c_str());
    return 2;
  }
  std::string why;
  if (kvrelay::kernels::cuda::CudaDeviceCount(&why) == 0) {
    std::printf("gpu_bench: skipped: %s\n", why.c_str());
    return kvrelay::bench::kSkip;
  }
  const absl::Status st = kvrelay::bench::Run(*options);
  if (!st.ok()) {
    std::fprintf(stderr, "gpu_bench: error: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}
