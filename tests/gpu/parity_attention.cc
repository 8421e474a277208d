// Parity cases: paged attention, decode (cuda::PagedAttentionDecode) and causal prefill
// (cuda::PagedPrefillAttention), against kernels::PagedAttention on the same pool bytes (the
// KV cache is written once, by the CPU's WriteKv, and uploaded), over GQA ratios 1-16, block
// sizes 8 / 16 / 32, head_dim 64 / 80 / 96 / 128 / 256, all four KV dtypes, several sequences
// of different, odd lengths in one batch (1 to 5 decode partitions), scattered block tables,
// layer 1 of 3. Plus GPU-only exact checks of batch and chunking invariance, and a pipeline
// case: cuda::RopeWriteKv then prefill against Model::Forward's CPU sequence.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/paged_attention.cuh"
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/rope_kv.cuh"
#include "kernels/device_math.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/paged_kv.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

// Both sides read the same stored K/V, so the KV dtype adds no difference; what differs:
//  - score order: fp32 dot products over head_dim summed in another order (CPU: 8 or 16 lanes
//    then a tree; GPU: per-lane fmaf chains then a shuffle tree, or sequential over d), ~1e-7
//    relative to sum |q_i k_i| times the scale: ~1e-6 on a score;
//  - exp: CUDA's expf (2 ulp) vs libm's, and the split softmax: exp(s - m_part) *
//    exp(m_part - M) vs exp(s - M) (decode), online rescaling by exp(m_old - m_new)
//    (prefill): a few ulp relative on each weight;
//  - the weighted sum of V in fp32 in another grouping (per partition / key tile, then
//    merged): ~sqrt(len) ulp of sum |w v|.
// With |q| <= 2, |k|, |v| <= 1 and contexts up to ~1000 keys, these stay below ~5e-6 on an
// output element; 2e-5 absolute (+1e-4 relative) leaves a margin while a mask or offset error
// (one key too many or too few moves an output by ~|v| / len >= 1e-3) still fails.
constexpr Tolerance kAttnTol{2e-5, 1e-4};
// The pipeline case adds the RoPE differences (f32 KV: ~3 ulp of 1 on k, so ~1e-6 on a score).
constexpr Tolerance kPipelineTol{3e-5, 1e-4};
constexpr int kLayers = 3;
constexpr int kLayer = 1;

struct KvConfig {
  int nkv, group, hd, bs;
};

std::string ConfigName(DType dt, const KvConfig& c) {
  return absl::StrFormat("%s,nkv=%d,gqa=%d,hd=%d,bs=%d", DTypeName(dt), c.nkv, c.group, c.hd, c.bs);
}

// A sequence: positions [0, context) are in the cache, in its (shuffled) blocks.
struct Seq {
  int64_t context = 0;
  std::vector<int32_t> blocks;
};

struct Pool {
  PagedKvLayout layout;
  int64_t num_blocks = 0;
  std::vector<uint8_t> bytes;
  PagedKvView view() { return PagedKvView{layout, bytes.data(), num_blocks}; }
};

// Gives each sequence ceil(context / bs) blocks from a shuffled list of ids (never
// contiguous in order) and writes random K/V (uniform [-1, 1]) for all its positions in every
// layer with kernels::WriteKv.
Pool MakePool(DType dt, const KvConfig& c, std::vector<Seq>* seqs, std::mt19937* rng) {
  Pool p;
  p.layout = PagedKvLayout{dt, kLayers, c.bs, c.nkv, c.hd};
  int64_t need = 0;
  for (const Seq& s : *seqs) need += (s.context + c.bs - 1) / c.bs;
  p.num_blocks = need + 3;
  p.bytes.assign(p.num_blocks * p.layout.block_bytes(), 0);
  std::vector<int32_t> ids(p.num_blocks);
  for (int32_t i = 0; i < p.num_blocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), *rng);
  size_t next = 0;
  const PagedKvView kv = p.view();
  for (Seq& s : *seqs) {
    s.blocks.clear();
    for (int64_t b = 0; b < (s.context + c.bs - 1) / c.bs; ++b) s.blocks.push_back(ids[next++]);
    for (int64_t pos = 0; pos < s.context; ++pos) {
      for (int layer = 0; layer < kLayers; ++layer) {
        const auto k = Uniform(rng, static_cast<size_t>(c.nkv) * c.hd, -1, 1);
        const auto v = Uniform(rng, static_cast<size_t>(c.nkv) * c.hd, -1, 1);
        WriteKv(kv, s.blocks[pos / c.bs], static_cast<int>(pos % c.bs), layer, k.data(), v.data());
      }
    }
  }
  return p;
}

// Rows of a [rows, max_blocks] device table (unused entries 0: a valid id, never read).
std::vector<int32_t> Table2D(const std::vector<const Seq*>& rows, int64_t max_blocks) {
  std::vector<int32_t> t(rows.size() * max_blocks, 0);
  for (size_t r = 0; r < rows.size(); ++r) {
    std::copy(rows[r]->blocks.begin(), rows[r]->blocks.end(), t.begin() + r * max_blocks);
  }
  return t;
}

// ---- Decode ----

// One query token per entry of `seqs`, at position context - 1 (q: [n, nh, hd]).
absl::Status GpuDecode(cudaStream_t st, Pool& pool, const std::vector<const Seq*>& seqs,
                       const std::vector<float>& q, int nh, float scale, std::vector<float>* out,
                       int64_t context_slack = 0) {
  const int64_t n = static_cast<int64_t>(seqs.size());
  const int hd = pool.layout.head_dim, bs = pool.layout.block_size;
  int64_t max_context = 1;
  std::vector<int64_t> positions;
  for (const Seq* s : seqs) {
    max_context = std::max(max_context, s->context);
    positions.push_back(s->context - 1);
  }
  max_context += context_slack;
  const int64_t max_blocks = (max_context + bs - 1) / bs;
  const size_t ws_bytes = cuda::PagedAttentionDecodeWorkspaceBytes(n, nh, hd, max_context);
  ASSIGN_OR_RETURN_BUF(dpool, DeviceBuffer::Upload(pool.bytes, st));
  ASSIGN_OR_RETURN_BUF(dq, DeviceBuffer::Upload(q, st));
  ASSIGN_OR_RETURN_BUF(dtab, DeviceBuffer::Upload(Table2D(seqs, max_blocks), st));
  ASSIGN_OR_RETURN_BUF(dpos, DeviceBuffer::Upload(positions, st));
  ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * q.size()));
  ASSIGN_OR_RETURN_BUF(dws, DeviceBuffer::Alloc(ws_bytes));
  const PagedKvView kv{pool.layout, dpool.as<uint8_t>(), pool.num_blocks};
  RETURN_IF_ERROR(cuda::PagedAttentionDecode(kv, kLayer, dq.as<float>(), n, dtab.as<int32_t>(),
                                             max_blocks, dpos.as<int64_t>(), max_context, nh, scale,
                                             dout.as<float>(), dws.as<void>(), ws_bytes, st));
  return dout.Download(out, st);
}

absl::Status RunDecode(cudaStream_t st, DType dt, const KvConfig& c,
                       const std::vector<int64_t>& lengths, uint32_t seed, Outputs* o) {
  std::mt19937 rng(seed);
  std::vector<Seq> seqs(lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) seqs[i].context = lengths[i];
  Pool pool = MakePool(dt, c, &seqs, &rng);
  const int nh = c.nkv * c.group;
  const int64_t n = static_cast<int64_t>(seqs.size());
  const auto q = Uniform(&rng, n * nh * c.hd, -2, 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
  std::vector<const int32_t*> tables;
  std::vector<int64_t> positions;
  std::vector<const Seq*> rows;
  for (const Seq& s : seqs) {
    tables.push_back(s.blocks.data());
    positions.push_back(s.context - 1);
    rows.push_back(&s);
  }
  o->cpu.resize(q.size());
  PagedAttention(nullptr, pool.view(), kLayer, q.data(), n, tables.data(), positions.data(), nh,
                 scale, o->cpu.data());
  return GpuDecode(st, pool, rows, q, nh, scale, &o->gpu, /*context_slack=*/3);
}

// ---- Prefill ----

// A chunk: `qlen` query tokens at positions [start, start + qlen) of a sequence whose cache
// holds [0, start + qlen).
struct Chunk {
  int64_t start, qlen;
};

// One sequence per chunk, whose context ends with the chunk; *tokens = the chunks' tokens.
std::vector<Seq> SeqsFor(const std::vector<Chunk>& chunks, int64_t* tokens) {
  std::vector<Seq> seqs(chunks.size());
  *tokens = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    seqs[i].context = chunks[i].start + chunks[i].qlen;
    *tokens += chunks[i].qlen;
  }
  return seqs;
}

absl::Status GpuPrefill(cudaStream_t st, Pool& pool, const std::vector<const Seq*>& seqs,
                        const std::vector<Chunk>& chunks, const std::vector<float>& q, int nh,
                        float scale, std::vector<float>* out) {
  const int bs = pool.layout.block_size;
  std::vector<int32_t> starts{0};
  std::vector<int64_t> start_pos;
  int64_t max_q = 0, max_blocks = 1;
  for (size_t i = 0; i < chunks.size(); ++i) {
    starts.push_back(starts.back() + static_cast<int32_t>(chunks[i].qlen));
    start_pos.push_back(chunks[i].start);
    max_q = std::max(max_q, chunks[i].qlen);
    max_blocks = std::max(max_blocks, (chunks[i].start + chunks[i].qlen + bs - 1) / bs);
  }
  ASSIGN_OR_RETURN_BUF(dpool, DeviceBuffer::Upload(pool.bytes, st));
  ASSIGN_OR_RETURN_BUF(dq, DeviceBuffer::Upload(q, st));
  ASSIGN_OR_RETURN_BUF(dtab, DeviceBuffer::Upload(Table2D(seqs, max_blocks), st));
  ASSIGN_OR_RETURN_BUF(dstarts, DeviceBuffer::Upload(starts, st));
  ASSIGN_OR_RETURN_BUF(dstart_pos, DeviceBuffer::Upload(start_pos, st));
  ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * q.size()));
  const PagedKvView kv{pool.layout, dpool.as<uint8_t>(), pool.num_blocks};
  RETURN_IF_ERROR(cuda::PagedPrefillAttention(
      kv, kLayer, dq.as<float>(), static_cast<int>(chunks.size()), dstarts.as<int32_t>(),
      dstart_pos.as<int64_t>(), dtab.as<int32_t>(), max_blocks, max_q, nh, scale, dout.as<float>(),
      st));
  return dout.Download(out, st);
}

// The CPU's view of the same tokens: per token its sequence's table and its position.
void CpuPrefill(Pool& pool, const std::vector<const Seq*>& seqs, const std::vector<Chunk>& chunks,
                const std::vector<float>& q, int nh, float scale, std::vector<float>* out) {
  std::vector<const int32_t*> tables;
  std::vector<int64_t> positions;
  for (size_t i = 0; i < chunks.size(); ++i) {
    for (int64_t t = 0; t < chunks[i].qlen; ++t) {
      tables.push_back(seqs[i]->blocks.data());
      positions.push_back(chunks[i].start + t);
    }
  }
  out->resize(q.size());
  PagedAttention(nullptr, pool.view(), kLayer, q.data(), static_cast<int64_t>(tables.size()),
                 tables.data(), positions.data(), nh, scale, out->data());
}

absl::Status RunPrefill(cudaStream_t st, DType dt, const KvConfig& c,
                        const std::vector<Chunk>& chunks, uint32_t seed, Outputs* o) {
  std::mt19937 rng(seed);
  int64_t tokens = 0;
  std::vector<Seq> seqs = SeqsFor(chunks, &tokens);
  Pool pool = MakePool(dt, c, &seqs, &rng);
  const int nh = c.nkv * c.group;
  const auto q = Uniform(&rng, tokens * nh * c.hd, -2, 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
  std::vector<const Seq*> rows;
  for (const Seq& s : seqs) rows.push_back(&s);
  CpuPrefill(pool, rows, chunks, q, nh, scale, &o->cpu);
  return GpuPrefill(st, pool, rows, chunks, q, nh, scale, &o->gpu);
}

// ---- Pipeline: RoPE + KV write, then prefill (Model::Forward's order) ----

absl::Status RunPipeline(cudaStream_t st, const KvConfig& c, const std::vector<Chunk>& chunks,
                         uint32_t seed, Outputs* o) {
  std::mt19937 rng(seed);
  int64_t tokens = 0;
  std::vector<Seq> seqs = SeqsFor(chunks, &tokens);
  // The prefixes' K/V come from MakePool; the chunks' (there too, at random) are overwritten
  // in layer kLayer by the RoPE + write step on each side.
  Pool pool = MakePool(DType::kF32, c, &seqs, &rng);
  const int nh = c.nkv * c.group, nkv = c.nkv, hd = c.hd, bs = c.bs;
  const int64_t width = static_cast<int64_t>(nh + 2 * nkv) * hd;
  auto qkv = Uniform(&rng, tokens * width, -1, 1);
  std::vector<float> inv(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    inv[i] =
        math::Llama3ScaleInvFreq(math::RopeBaseInvFreq(i, hd, 500000.0f), 8.0f, 1.0f, 4.0f, 8192);
  }
  std::vector<int64_t> positions;
  std::vector<int32_t> blocks, slots;
  std::vector<const int32_t*> tables;
  for (size_t i = 0; i < chunks.size(); ++i) {
    for (int64_t t = 0; t < chunks[i].qlen; ++t) {
      const int64_t pos = chunks[i].start + t;
      positions.push_back(pos);
      blocks.push_back(seqs[i].blocks[pos / bs]);
      slots.push_back(static_cast<int32_t>(pos % bs));
      tables.push_back(seqs[i].blocks.data());
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // CPU: Model::Forward's per-token loop, then attention.
  Pool cpu_pool = pool;
  std::vector<float> cpu_qkv = qkv;
  std::vector<float> cpu_q(tokens * nh * hd);
  for (int64_t t = 0; t < tokens; ++t) {
    float* row = &cpu_qkv[t * width];
    Rope(row, nh, hd, positions[t], inv.data());
    Rope(row + nh * hd, nkv, hd, positions[t], inv.data());
    std::memcpy(&cpu_q[t * nh * hd], row, sizeof(float) * nh * hd);
    WriteKv(cpu_pool.view(), blocks[t], slots[t], kLayer, row + nh * hd, row + (nh + nkv) * hd);
  }
  o->cpu.resize(cpu_q.size());
  PagedAttention(nullptr, cpu_pool.view(), kLayer, cpu_q.data(), tokens, tables.data(),
                 positions.data(), nh, scale, o->cpu.data());

  // GPU: RopeWriteKv on the fused rows, q copied out, then prefill.
  ASSIGN_OR_RETURN_BUF(dpool, DeviceBuffer::Upload(pool.bytes, st));
  ASSIGN_OR_RETURN_BUF(dqkv, DeviceBuffer::Upload(qkv, st));
  ASSIGN_OR_RETURN_BUF(dpos, DeviceBuffer::Upload(positions, st));
  ASSIGN_OR_RETURN_BUF(dblk, DeviceBuffer::Upload(blocks, st));
  ASSIGN_OR_RETURN_BUF(dslot, DeviceBuffer::Upload(slots, st));
  ASSIGN_OR_RETURN_BUF(dinv, DeviceBuffer::Upload(inv, st));
  const PagedKvView kv{pool.layout, dpool.as<uint8_t>(), pool.num_blocks};
  float* base = dqkv.as<float>();
  RETURN_IF_ERROR(cuda::RopeWriteKv(
      kv, kLayer, tokens, base, width, nh, base + nh * hd, width, base + (nh + nkv) * hd, width,
      dpos.as<int64_t>(), dblk.as<int32_t>(), dslot.as<int32_t>(), dinv.as<float>(), nullptr, st));
  std::vector<float> gpu_qkv;
  RETURN_IF_ERROR(dqkv.Download(&gpu_qkv, st));
  std::vector<float> gpu_q(tokens * nh * hd);
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(&gpu_q[t * nh * hd], &gpu_qkv[t * width], sizeof(float) * nh * hd);
  }
  std::vector<uint8_t> written;
  RETURN_IF_ERROR(dpool.Download(&written, st));
  Pool gpu_pool = pool;
  gpu_pool.bytes = std::move(written);
  std::vector<const Seq*> rows;
  for (const Seq& s : seqs) rows.push_back(&s);
  return GpuPrefill(st, gpu_pool, rows, chunks, gpu_q, nh, scale, &o->gpu);
}

// ---- The table ----

const KvConfig kConfigs[] = {
    {4, 1, 64, 16},   // MHA
    {2, 2, 128, 8},   // GQA 2
    {2, 4, 80, 32},   // GQA 4, head_dim 80 (generic path, padded to 128)
    {1, 8, 128, 16},  // GQA 8, one kv head
    {2, 8, 64, 32},   // GQA 8
    {1, 4, 256, 16},  // head_dim 256
    {2, 3, 96, 8},    // GQA 3 (a padded row), head_dim 96
    {1, 16, 64, 16},  // GQA 16: two row chunks in decode
};

void AddAttentionCases(std::vector<Case>* cases) {
  // Decode: 1 to 5 partitions of 256 keys, odd lengths, partition edges.
  const std::vector<int64_t> lengths = {1, 2, 7, 31, 256, 257, 300, 513, 1029};
  // Prefill chunks: from position 0 and after a cached prefix, odd lengths, one token.
  const std::vector<Chunk> chunks = {{0, 1},   {0, 37}, {5, 64},  {100, 129},
                                     {300, 3}, {0, 77}, {17, 200}};
  uint32_t seed = 1000;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (const KvConfig& c : kConfigs) {
      ++seed;
      cases->push_back({"attn_decode", ConfigName(dt, c) + ",n=9,len=1..1029", kAttnTol,
                        [dt, c, lengths, seed](cudaStream_t st, Outputs* o) {
                          return RunDecode(st, dt, c, lengths, seed, o);
                        }});
      cases->push_back({"attn_prefill", ConfigName(dt, c) + ",seqs=7,q=1..200", kAttnTol,
                        [dt, c, chunks, seed](cudaStream_t st, Outputs* o) {
                          return RunPrefill(st, dt, c, chunks, seed, o);
                        }});
    }
  }

  // Batch invariance of decode (DESIGN §6): a token's output alone equals its row in a batch
  // of 7, bit for bit ("cpu" holds the GPU's single-token result here).
  for (DType dt : {DType::kBF16, DType::kI8}) {
    const KvConfig c{2, 4, 128, 16};
    cases->push_back({"attn_decode_batch_invariant", ConfigName(dt, c) + ",row=3 of 7", kExact,
                      [dt, c](cudaStream_t st, Outputs* o) -> absl::Status {
                        std::mt19937 rng(77);
                        std::vector<Seq> seqs(7);
                        const int64_t lens[] = {5, 900, 33, 700, 1, 256, 2048};
                        for (int i = 0; i < 7; ++i) seqs[i].context = lens[i];
                        Pool pool = MakePool(dt, c, &seqs, &rng);
                        const int nh = c.nkv * c.group;
                        const int64_t row = static_cast<int64_t>(nh) * c.hd;
                        const auto q = Uniform(&rng, 7 * row, -2, 2);
                        std::vector<const Seq*> all;
                        for (const Seq& s : seqs) all.push_back(&s);
                        std::vector<float> batch;
                        RETURN_IF_ERROR(GpuDecode(st, pool, all, q, nh, 0.09f, &batch));
                        const std::vector<float> q3(q.begin() + 3 * row, q.begin() + 4 * row);
                        RETURN_IF_ERROR(GpuDecode(st, pool, {&seqs[3]}, q3, nh, 0.09f, &o->cpu));
                        o->gpu.assign(batch.begin() + 3 * row, batch.begin() + 4 * row);
                        return absl::OkStatus();
                      }});
  }
  // Chunking and batch invariance of prefill: a 150-token prompt in one chunk equals the same
  // prompt as chunks [0, 47) + [47, 150) in one call next to another sequence, bit for bit.
  for (DType dt : {DType::kF16, DType::kI8}) {
    const KvConfig c{2, 4, 128, 16};
    cases->push_back(
        {"attn_prefill_chunk_invariant", ConfigName(dt, c) + ",150 = 47 + 103", kExact,
         [dt, c](cudaStream_t st, Outputs* o) -> absl::Status {
           std::mt19937 rng(78);
           std::vector<Seq> seqs(2);
           seqs[0].context = 150;
           seqs[1].context = 61;
           Pool pool = MakePool(dt, c, &seqs, &rng);
           const int nh = c.nkv * c.group;
           const int64_t row = static_cast<int64_t>(nh) * c.hd;
           const auto q = Uniform(&rng, 150 * row, -2, 2);
           const auto q_other = Uniform(&rng, 61 * row, -2, 2);
           RETURN_IF_ERROR(GpuPrefill(st, pool, {&seqs[0]}, {{0, 150}}, q, nh, 0.09f, &o->cpu));
           // [other sequence (61)] [prompt 0..47) [prompt 47..150)
           std::vector<float> q2 = q_other;
           q2.insert(q2.end(), q.begin(), q.end());
           std::vector<float> out;
           RETURN_IF_ERROR(GpuPrefill(st, pool, {&seqs[1], &seqs[0], &seqs[0]},
                                      {{0, 61}, {0, 47}, {47, 103}}, q2, nh, 0.09f, &out));
           o->gpu.assign(out.begin() + 61 * row, out.end());
           return absl::OkStatus();
         }});
  }
  // RoPE + KV write + prefill on the GPU against Model::Forward's CPU sequence (f32 KV).
  for (const KvConfig& c : {KvConfig{2, 4, 128, 16}, KvConfig{1, 8, 64, 8}}) {
    cases->push_back({"attn_pipeline", ConfigName(DType::kF32, c) + ",rope+write+prefill",
                      kPipelineTol, [c](cudaStream_t st, Outputs* o) {
                        return RunPipeline(st, c, {{0, 45}, {130, 17}, {9, 1}}, 79, o);
                      }});
  }
}

// ---- Host-side argument checks ----

void AttentionHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  using absl::StatusCode;
  float* f = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced on these paths
  const int32_t* tab = reinterpret_cast<const int32_t*>(uintptr_t{64});
  const int64_t* pos = reinterpret_cast<const int64_t*>(uintptr_t{64});
  void* ws = reinterpret_cast<void*>(uintptr_t{64});
  const PagedKvView kv{PagedKvLayout{DType::kBF16, 3, 16, 2, 128}, reinterpret_cast<uint8_t*>(f),
                       100};
  auto invalid = [](const absl::Status& s, const char* what) {
    return s.code() == StatusCode::kInvalidArgument && absl::StrContains(s.message(), what);
  };
  auto decode = [&](const PagedKvView& v, int layer, const float* q, int64_t n, int64_t max_blocks,
                    int64_t max_context, int nh, void* w, size_t ws_bytes) {
    return cuda::PagedAttentionDecode(v, layer, q, n, tab, max_blocks, pos, max_context, nh, 0.1f,
                                      f, w, ws_bytes, nullptr);
  };
  const size_t need = cuda::PagedAttentionDecodeWorkspaceBytes(4, 8, 128, 1000);
  expect(need == sizeof(float) * 4 * 8 * 4 * (128 + 2) &&
             cuda::PagedAttentionDecodeWorkspaceBytes(4, 8, 128, 256) == 0 &&
             cuda::PagedAttentionDecodeWorkspaceBytes(0, 8, 128, 1000) == 0,
         "PagedAttentionDecodeWorkspaceBytes: n*heads*partitions*(hd+2) floats, 0 for 1 part");
  expect(decode(kv, 1, f, 0, 63, 1000, 8, nullptr, 0).ok(),
         "PagedAttentionDecode n == 0 -> OK, nothing launched");
  expect(invalid(decode(kv, 1, f, -2, 63, 1000, 8, ws, need), "negative n (-2)"),
         "PagedAttentionDecode n < 0 -> INVALID_ARGUMENT naming n");
  expect(invalid(decode(kv, 1, nullptr, 4, 63, 1000, 8, ws, need), "q 0"),
         "PagedAttentionDecode null q -> INVALID_ARGUMENT naming q");
  expect(invalid(decode(kv, 1, f, 4, 63, 1000, 7, ws, need),
                 "num_heads 7 is not a positive multiple of num_kv_heads 2"),
         "PagedAttentionDecode num_heads % num_kv_heads != 0 -> INVALID_ARGUMENT");
  expect(invalid(decode(kv, 3, f, 4, 63, 1000, 8, ws, need), "layer 3 outside [0, 3)"),
         "PagedAttentionDecode layer >= num_layers -> INVALID_ARGUMENT naming the layer");
  expect(invalid(decode(kv, 1, f, 4, 63, 1000, 8, ws, need - 4), "workspace of"),
         "PagedAttentionDecode workspace too small -> INVALID_ARGUMENT");
  expect(invalid(decode(kv, 1, f, 4, 63, 1000, 8, nullptr, need), "workspace of 0 bytes"),
         "PagedAttentionDecode null workspace when one is needed -> INVALID_ARGUMENT");
  expect(invalid(decode(kv, 1, f, 4, 62, 1000, 8, ws, need), "max_blocks_per_seq 62 < 63"),
         "PagedAttentionDecode table rows too short for max_context -> INVALID_ARGUMENT");
  expect(invalid(decode(kv, 1, f, 4, 63, 0, 8, ws, need), "max_context 0"),
         "PagedAttentionDecode max_context <= 0 -> INVALID_ARGUMENT");
  PagedKvView wide = kv;
  wide.layout.head_dim = 320;
  expect(invalid(decode(wide, 1, f, 4, 63, 1000, 8, ws, need * 3), "head_dim 320 > 256"),
         "PagedAttentionDecode head_dim > 256 -> INVALID_ARGUMENT");
  PagedKvView misaligned = kv;
  misaligned.base = reinterpret_cast<uint8_t*>(uintptr_t{72});
  expect(invalid(decode(misaligned, 1, f, 4, 63, 1000, 8, ws, need), "16-byte aligned"),
         "PagedAttentionDecode pool base not 16-byte aligned -> INVALID_ARGUMENT");
  PagedKvView bad_layout = kv;
  bad_layout.layout.block_size = 0;
  expect(invalid(decode(bad_layout, 1, f, 4, 63, 1000, 8, ws, need), "block_size 0"),
         "PagedAttentionDecode block_size 0 -> INVALID_ARGUMENT");
  expect(
      invalid(cuda::PagedAttentionDecode(kv, 1, f, 4, tab, 63, nullptr, 1000, 8, 0.1f, f, ws, need,
                                         nullptr),
              "cuda::PagedAttentionDecode: null pointer (q 1, block_tables 1, positions 0, out 1)"),
      "PagedAttentionDecode null positions -> INVALID_ARGUMENT naming it");
  expect(invalid(cuda::PagedAttentionDecode(kv, 1, f, 4, tab, 63, pos, 1000, 8, 0.1f, nullptr, ws,
                                            need, nullptr),
                 "out 0"),
         "PagedAttentionDecode null out -> INVALID_ARGUMENT naming it");
  expect(cuda::PagedAttentionDecode(kv, 1, nullptr, 0, nullptr, 63, nullptr, 1000, 8, 0.1f, nullptr,
                                    nullptr, 0, nullptr)
             .ok(),
         "PagedAttentionDecode n == 0 needs no buffers -> OK");

  const int32_t* starts = tab;
  auto prefill = [&](const PagedKvView& v, int layer, const float* q, int num_seqs,
                     const int32_t* seq_starts, int64_t max_blocks, int64_t max_q, int nh) {
    return cuda::PagedPrefillAttention(v, layer, q, num_seqs, seq_starts, pos, tab, max_blocks,
                                       max_q, nh, 0.1f, f, nullptr);
  };
  expect(prefill(kv, 1, f, 0, starts, 8, 100, 8).ok(),
         "PagedPrefillAttention num_seqs == 0 -> OK, nothing launched");
  expect(invalid(prefill(kv, 1, f, -1, starts, 8, 100, 8), "negative size (num_seqs -1"),
         "PagedPrefillAttention num_seqs < 0 -> INVALID_ARGUMENT naming num_seqs");
  expect(invalid(prefill(kv, 1, f, 2, nullptr, 8, 100, 8), "seq_starts 0"),
         "PagedPrefillAttention null seq_starts -> INVALID_ARGUMENT naming it");
  expect(invalid(prefill(kv, 1, f, 2, starts, 8, 100, 0), "num_heads 0"),
         "PagedPrefillAttention num_heads 0 -> INVALID_ARGUMENT");
  expect(invalid(prefill(kv, -1, f, 2, starts, 8, 100, 8), "layer -1 outside"),
         "PagedPrefillAttention layer < 0 -> INVALID_ARGUMENT");
  expect(invalid(prefill(kv, 1, f, 2, starts, 0, 100, 8), "max_blocks_per_seq 0"),
         "PagedPrefillAttention max_blocks_per_seq 0 -> INVALID_ARGUMENT");
  expect(invalid(prefill(kv, 1, f, 70000, starts, 8, 100, 8), "num_seqs 70000"),
         "PagedPrefillAttention num_seqs > 65535 -> INVALID_ARGUMENT");
  expect(invalid(prefill(wide, 1, f, 2, starts, 8, 100, 8), "head_dim 320 > 256"),
         "PagedPrefillAttention head_dim > 256 -> INVALID_ARGUMENT");
  PagedKvView null_pool = kv;
  null_pool.base = nullptr;
  expect(invalid(prefill(null_pool, 1, f, 2, starts, 8, 100, 8), "null KV pool"),
         "PagedPrefillAttention null pool -> INVALID_ARGUMENT");
  expect(invalid(decode(null_pool, 1, f, 4, 63, 1000, 8, ws, need),
                 "cuda::PagedAttentionDecode: null KV pool"),
         "PagedAttentionDecode null pool -> INVALID_ARGUMENT naming the op");
  expect(invalid(prefill(kv, 1, f, 2, starts, 8, 100, 7),
                 "cuda::PagedPrefillAttention: num_heads 7 is not a positive multiple of "
                 "num_kv_heads 2"),
         "PagedPrefillAttention num_heads % num_kv_heads != 0 -> INVALID_ARGUMENT");
  expect(invalid(prefill(misaligned, 1, f, 2, starts, 8, 100, 8), "16-byte aligned"),
         "PagedPrefillAttention pool base not 16-byte aligned -> INVALID_ARGUMENT");
  expect(invalid(prefill(kv, 3, f, 2, starts, 8, 100, 8), "layer 3 outside [0, 3)"),
         "PagedPrefillAttention layer >= num_layers -> INVALID_ARGUMENT naming the layer");
  expect(invalid(cuda::PagedPrefillAttention(kv, 1, f, 2, starts, nullptr, tab, 8, 100, 8, 0.1f, f,
                                             nullptr),
                 "cuda::PagedPrefillAttention: null pointer (q 1, seq_starts 1, "
                 "start_positions 0, block_tables 1, out 1)"),
         "PagedPrefillAttention null start_positions -> INVALID_ARGUMENT naming it");
  expect(invalid(prefill(kv, 1, nullptr, 2, starts, 8, 100, 8), "q 0"),
         "PagedPrefillAttention null q -> INVALID_ARGUMENT naming it");
  expect(cuda::PagedPrefillAttention(kv, 1, nullptr, 2, nullptr, nullptr, nullptr, 8, 0, 8, 0.1f,
                                     nullptr, nullptr)
             .ok(),
         "PagedPrefillAttention max_query_len == 0 needs no buffers -> OK");
}

}  // namespace
KVR_PARITY_CASES(AddAttentionCases);
KVR_PARITY_HOST_CHECKS(AttentionHostChecks);
}  // namespace kvrelay::kernels::parity
