// Parity cases: RoPE fused with the paged KV write (cuda::RopeWriteKv) against what
// Model::Forward does per token on the CPU: kernels::Rope on q and k, then kernels::WriteKv.
// Each case compares the rotated q, and the whole pool (every block, layer, K/V, slot, head
// and element, decoded to f32; int8 as raw * scale): other layers and slots start from the
// same random bytes on both sides, so a write to a wrong offset shows up as a mismatch.
#include <cmath>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/rope_kv.cuh"
#include "kernels/device_math.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/paged_kv.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

// Tolerances, with rotation. The angle is the CPU's bit for bit and the rotation is the same
// multiply-then-add (--fmad=false); only CUDA's cos / sin (within 2 ulp) differ from libm's
// (within 1), so a rotated f32 value (inputs in [-1, 1]) moves by at most ~3 ulp of 1 on each
// of its two products: 1e-6 absolute. A stored value may then round the other way:
//  - f16: one f16 ulp, <= 2^-10 |x| (relative 1e-3; the absolute term covers subnormals);
//  - bf16: one bf16 ulp, <= 2^-7 |x| (relative 8e-3);
//  - int8: one quantization level, the row's scale = amax / 127 <= sqrt(2) / 127 (0.012
//    absolute); the scale itself moves by an ulp or two of amax (relative 1e-5).
// Without rotation (GPT-2, inv_freq null) every stored byte is the CPU's: kExact.
Tolerance RopeTolerance(DType t) {
  switch (t) {
    case DType::kF16:
      return {1e-6, 1e-3};
    case DType::kBF16:
      return {1e-6, 8e-3};
    case DType::kI8:
      return {0.012, 1e-5};
    default:
      return {1e-6, 1e-6};
  }
}

struct RopeShape {
  int nh, nkv, hd, bs;
  int64_t n;
  bool rope, llama3;
  bool fused;  // q, k, v as parts of one QKV row (the model's layout), else separate buffers
  int layer;
};

// The model's inv_freq table (common/model RopeInvFreq): Llama-3 scaling as Llama 3.1.
std::vector<float> InvFreq(int hd, bool llama3) {
  std::vector<float> inv(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    inv[i] = math::RopeBaseInvFreq(i, hd, llama3 ? 500000.0f : 10000.0f);
    if (llama3) inv[i] = math::Llama3ScaleInvFreq(inv[i], 8.0f, 1.0f, 4.0f, 8192);
  }
  return inv;
}

// Every element of the pool as f32, in [block][layer][kv][slot][head][d] order, then (int8)
// every scale.
void DecodePool(const PagedKvView& kv, std::vector<float>* out) {
  const PagedKvLayout& L = kv.layout;
  for (int64_t b = 0; b < kv.num_blocks; ++b) {
    for (int layer = 0; layer < L.num_layers; ++layer) {
      for (int side = 0; side < 2; ++side) {
        for (int slot = 0; slot < L.block_size; ++slot) {
          for (int h = 0; h < L.num_kv_heads; ++h) {
            const uint8_t* row = kv.row(b, layer, side, slot, h);
            float s = 1.0f;
            if (L.dtype == DType::kI8) {
              std::memcpy(&s, kv.scale(b, layer, side, slot, h), sizeof(float));
              out->push_back(s);
            }
            for (int d = 0; d < L.head_dim; ++d) {
              float x = 0;
              switch (L.dtype) {
                case DType::kF32:
                  std::memcpy(&x, row + 4 * d, 4);
                  break;
                case DType::kF16:
                case DType::kBF16: {
                  uint16_t h16;
                  std::memcpy(&h16, row + 2 * d, 2);
                  x = L.dtype == DType::kF16 ? F16ToF32(h16) : Bf16ToF32(h16);
                  break;
                }
                case DType::kI8:
                  x = math::I8KvDequantize(static_cast<int8_t>(row[d])) * s;
                  break;
              }
              out->push_back(x);
            }
          }
        }
      }
    }
  }
}

// Inputs of one case, shared by the CPU and GPU runs.
struct RopeInputs {
  PagedKvLayout layout;
  int64_t num_blocks = 0;
  std::vector<uint8_t> pool;  // initial bytes (random)
  std::vector<float> qkv;     // fused: [n][(nh + 2 nkv) hd]; else q | k | v one after another
  int64_t ldq = 0, ldk = 0, ldv = 0;
  int64_t q_off = 0, k_off = 0, v_off = 0;  // first element of token 0's q / k / v in qkv
  std::vector<int64_t> positions;
  std::vector<int32_t> blocks, slots;
  std::vector<float> inv_freq;  // empty: no rotation
};

RopeInputs MakeInputs(DType dt, const RopeShape& s, std::mt19937* rng, bool specials) {
  RopeInputs in;
  in.layout = PagedKvLayout{dt, 3, s.bs, s.nkv, s.hd};
  in.num_blocks = (s.n + s.bs - 1) / s.bs + 2;
  in.pool.resize(in.num_blocks * in.layout.block_bytes());
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : in.pool) b = static_cast<uint8_t>(byte(*rng));
  const int64_t qw = static_cast<int64_t>(s.nh) * s.hd, kw = static_cast<int64_t>(s.nkv) * s.hd;
  if (s.fused) {
    in.ldq = in.ldk = in.ldv = qw + 2 * kw;
    in.q_off = 0, in.k_off = qw, in.v_off = qw + kw;
  } else {
    in.ldq = qw, in.ldk = kw, in.ldv = kw;
    in.q_off = 0, in.k_off = s.n * qw, in.v_off = s.n * (qw + kw);
  }
  in.qkv = Uniform(rng, s.n * (qw + 2 * kw), -1, 1);
  if (specials) SprinkleSpecials(&in.qkv);
  // Distinct (block, slot) pairs, scattered over the pool.
  std::vector<int64_t> cells(in.num_blocks * s.bs);
  for (size_t i = 0; i < cells.size(); ++i) cells[i] = static_cast<int64_t>(i);
  std::shuffle(cells.begin(), cells.end(), *rng);
  std::uniform_int_distribution<int64_t> pos(0, 140000);
  for (int64_t t = 0; t < s.n; ++t) {
    in.blocks.push_back(static_cast<int32_t>(cells[t] / s.bs));
    in.slots.push_back(static_cast<int32_t>(cells[t] % s.bs));
    in.positions.push_back(t == 0 ? 0 : (t == 1 ? 131071 : pos(*rng)));
  }
  if (s.rope) in.inv_freq = InvFreq(s.hd, s.llama3);
  return in;
}

// Model::Forward's per-token loop on the CPU. Tokens with a bad (block, slot) are not
// written (the GPU skips and counts them).
void CpuRopeWriteKv(const RopeShape& s, RopeInputs in, std::vector<float>* q_out,
                    std::vector<float>* pool_out) {
  const PagedKvView kv{in.layout, in.pool.data(), in.num_blocks};
  for (int64_t t = 0; t < s.n; ++t) {
    float* q = &in.qkv[in.q_off + t * in.ldq];
    float* k = &in.qkv[in.k_off + t * in.ldk];
    const float* v = &in.qkv[in.v_off + t * in.ldv];
    if (!in.inv_freq.empty()) {
      Rope(q, s.nh, s.hd, in.positions[t], in.inv_freq.data());
      Rope(k, s.nkv, s.hd, in.positions[t], in.inv_freq.data());
    }
    if (in.blocks[t] >= 0 && in.blocks[t] < in.num_blocks && in.slots[t] >= 0 &&
        in.slots[t] < s.bs) {
      WriteKv(kv, in.blocks[t], in.slots[t], s.layer, k, v);
    }
  }
  for (int64_t t = 0; t < s.n; ++t) {
    const float* q = &in.qkv[in.q_off + t * in.ldq];
    q_out->insert(q_out->end(), q, q + static_cast<int64_t>(s.nh) * s.hd);
  }
  DecodePool(kv, pool_out);
}

// The same on the GPU; also checks that k and v were not modified and the bad-pair count.
absl::Status GpuRopeWriteKv(cudaStream_t st, const RopeShape& s, const RopeInputs& in,
                            int32_t want_bad, std::vector<float>* q_out,
                            std::vector<float>* pool_out) {
  ASSIGN_OR_RETURN_BUF(dqkv, DeviceBuffer::Upload(in.qkv, st));
  ASSIGN_OR_RETURN_BUF(dpool, DeviceBuffer::Upload(in.pool, st));
  ASSIGN_OR_RETURN_BUF(dpos, DeviceBuffer::Upload(in.positions, st));
  ASSIGN_OR_RETURN_BUF(dblk, DeviceBuffer::Upload(in.blocks, st));
  ASSIGN_OR_RETURN_BUF(dslot, DeviceBuffer::Upload(in.slots, st));
  ASSIGN_OR_RETURN_BUF(dinv, DeviceBuffer::Upload(in.inv_freq, st));
  ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
  float* base = dqkv.as<float>();
  const PagedKvView kv{in.layout, dpool.as<uint8_t>(), in.num_blocks};
  RETURN_IF_ERROR(cuda::RopeWriteKv(
      kv, s.layer, s.n, base + in.q_off, in.ldq, s.nh, base + in.k_off, in.ldk, base + in.v_off,
      in.ldv, dpos.as<int64_t>(), dblk.as<int32_t>(), dslot.as<int32_t>(),
      in.inv_freq.empty() ? nullptr : dinv.as<float>(), dbad.as<int32_t>(), st));
  std::vector<float> qkv;
  std::vector<uint8_t> pool;
  std::vector<int32_t> bad;
  RETURN_IF_ERROR(dqkv.Download(&qkv, st));
  RETURN_IF_ERROR(dpool.Download(&pool, st));
  RETURN_IF_ERROR(dbad.Download(&bad, st));
  if (bad.size() != 1 || bad[0] != want_bad) {
    return absl::InternalError(
        absl::StrCat("bad (block, slot) count ", bad.empty() ? -1 : bad[0], ", want ", want_bad));
  }
  const int64_t kw = static_cast<int64_t>(s.nkv) * s.hd;
  for (int64_t t = 0; t < s.n; ++t) {
    for (int64_t i = 0; i < kw; ++i) {
      for (int64_t off : {in.k_off + t * in.ldk + i, in.v_off + t * in.ldv + i}) {
        if (std::memcmp(&qkv[off], &in.qkv[off], sizeof(float)) != 0) {
          return absl::InternalError(absl::StrCat("k or v input modified at element ", off));
        }
      }
    }
    const float* q = &qkv[in.q_off + t * in.ldq];
    q_out->insert(q_out->end(), q, q + static_cast<int64_t>(s.nh) * s.hd);
  }
  DecodePool(PagedKvView{in.layout, pool.data(), in.num_blocks}, pool_out);
  return absl::OkStatus();
}

absl::Status RunCase(cudaStream_t st, DType dt, const RopeShape& s, uint32_t seed, bool specials,
                     bool bad_pairs, Outputs* o) {
  std::mt19937 rng(seed);
  RopeInputs in = MakeInputs(dt, s, &rng, specials);
  int32_t want_bad = 0;
  if (bad_pairs) {  // block -1, block num_blocks, slot block_size
    in.blocks[1] = -1;
    in.blocks[s.n / 2] = static_cast<int32_t>(in.num_blocks);
    in.slots[s.n - 1] = s.bs;
    want_bad = 3;
  }
  std::vector<float> cpu_pool, gpu_pool;
  CpuRopeWriteKv(s, in, &o->cpu, &cpu_pool);
  RETURN_IF_ERROR(GpuRopeWriteKv(st, s, in, want_bad, &o->gpu, &gpu_pool));
  o->cpu.insert(o->cpu.end(), cpu_pool.begin(), cpu_pool.end());
  o->gpu.insert(o->gpu.end(), gpu_pool.begin(), gpu_pool.end());
  return absl::OkStatus();
}

std::string Params(DType dt, const RopeShape& s) {
  return absl::StrFormat("%s,nh=%d,nkv=%d,hd=%d,bs=%d,n=%d,%s%s,layer=%d", DTypeName(dt), s.nh,
                         s.nkv, s.hd, s.bs, s.n, s.rope ? (s.llama3 ? "llama3" : "rope") : "norope",
                         s.fused ? ",fused" : "", s.layer);
}

void AddRopeKvCases(std::vector<Case>* cases) {
  const RopeShape shapes[] = {
      {8, 2, 64, 16, 37, true, false, true, 1},     // GQA 4
      {32, 8, 128, 16, 50, true, true, true, 2},    // Llama-3 8B heads, Llama-3 scaling
      {12, 4, 80, 8, 19, true, false, false, 0},    // head_dim 80, separate buffers
      {4, 4, 256, 32, 33, true, true, false, 1},    // MHA, head_dim 256
      {14, 2, 96, 16, 7, true, false, true, 2},     // GQA 7
      {16, 1, 128, 8, 1, true, true, true, 1},      // MQA, one token
      {12, 12, 64, 16, 21, false, false, true, 1},  // GPT-2: no rotation
  };
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    uint32_t seed = 100;
    for (const RopeShape& s : shapes) {
      ++seed;
      cases->push_back({"rope_kv", Params(dt, s), s.rope ? RopeTolerance(dt) : kExact,
                        [dt, s, seed](cudaStream_t st, Outputs* o) {
                          return RunCase(st, dt, s, seed, false, false, o);
                        }});
    }
    // Special values (inf, NaN, 1e30, subnormals) without rotation: the stored bytes are the
    // CPU's exactly (int8: they must not set the scale; inf saturates, NaN stores 0).
    const RopeShape sp{6, 3, 72, 8, 29, false, false, true, 2};
    cases->push_back(
        {"rope_kv_specials", Params(dt, sp), kExact,
         [dt, sp](cudaStream_t st, Outputs* o) { return RunCase(st, dt, sp, 7, true, false, o); }});
    // Bad block ids / slots: not written, counted; q still rotated.
    const RopeShape bad{8, 2, 64, 16, 11, true, true, true, 1};
    cases->push_back({"rope_kv_bad_slots", Params(dt, bad), RopeTolerance(dt),
                      [dt, bad](cudaStream_t st, Outputs* o) {
                        return RunCase(st, dt, bad, 9, false, true, o);
                      }});
  }
}

void RopeKvHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  using absl::StatusCode;
  float* f = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced on these paths
  const int64_t* pos = reinterpret_cast<const int64_t*>(uintptr_t{64});
  const int32_t* ids = reinterpret_cast<const int32_t*>(uintptr_t{64});
  PagedKvView kv{PagedKvLayout{DType::kF16, 2, 16, 2, 64}, reinterpret_cast<uint8_t*>(f), 8};
  auto rope = [&](const PagedKvView& v, int layer, int64_t n, float* q, int64_t ldq, int nh,
                  const float* k, int64_t ldk, const float* inv) {
    return cuda::RopeWriteKv(v, layer, n, q, ldq, nh, k, ldk, f, 128, pos, ids, ids, inv, nullptr,
                             nullptr);
  };
  auto invalid = [](const absl::Status& s, const char* what) {
    return s.code() == StatusCode::kInvalidArgument && absl::StrContains(s.message(), what);
  };
  expect(invalid(rope(kv, 0, -1, f, 256, 4, f, 128, f), "negative size (n -1"),
         "RopeWriteKv n < 0 -> INVALID_ARGUMENT naming n");
  expect(invalid(rope(kv, 2, 4, f, 256, 4, f, 128, f), "layer 2 outside [0, 2)"),
         "RopeWriteKv layer >= num_layers -> INVALID_ARGUMENT naming the layer");
  expect(invalid(rope(kv, 0, 4, f, 256, 4, nullptr, 128, f), "k 0"),
         "RopeWriteKv null k -> INVALID_ARGUMENT naming k");
  expect(invalid(rope(kv, 0, 4, nullptr, 256, 4, f, 128, f), "q 0"),
         "RopeWriteKv null q while rotating -> INVALID_ARGUMENT naming q");
  expect(invalid(rope(kv, 0, 4, f, 256, 4, f, 127, f), "ldk 127"),
         "RopeWriteKv ldk < num_kv_heads * head_dim -> INVALID_ARGUMENT");
  expect(invalid(rope(kv, 0, 4, f, 255, 4, f, 128, f), "ldq 255"),
         "RopeWriteKv ldq < num_heads * head_dim -> INVALID_ARGUMENT");
  PagedKvView odd = kv;
  odd.layout.head_dim = 63;
  expect(invalid(rope(odd, 0, 4, f, 256, 4, f, 128, f), "head_dim 63 must be even"),
         "RopeWriteKv odd head_dim with rotation -> INVALID_ARGUMENT");
  expect(rope(odd, 0, 0, nullptr, 0, 4, nullptr, 128, nullptr).ok(),
         "RopeWriteKv odd head_dim without rotation, n == 0 -> OK, nothing launched");
  PagedKvView null_pool = kv;
  null_pool.base = nullptr;
  expect(invalid(rope(null_pool, 0, 4, f, 256, 4, f, 128, f), "null KV pool"),
         "RopeWriteKv null pool -> INVALID_ARGUMENT");
  PagedKvView misaligned = kv;
  misaligned.base = reinterpret_cast<uint8_t*>(uintptr_t{68});
  expect(invalid(rope(misaligned, 0, 4, f, 256, 4, f, 128, f), "16-byte aligned"),
         "RopeWriteKv pool base not 16-byte aligned -> INVALID_ARGUMENT");
  PagedKvView no_blocks = kv;
  no_blocks.num_blocks = 0;
  expect(invalid(rope(no_blocks, 0, 4, f, 256, 4, f, 128, f), "num_blocks 0"),
         "RopeWriteKv empty pool -> INVALID_ARGUMENT");
  expect(rope(kv, 0, 0, nullptr, 256, 4, nullptr, 128, f).ok(),
         "RopeWriteKv n == 0 -> OK, nothing launched");
}

}  // namespace
KVR_PARITY_CASES(AddRopeKvCases);
KVR_PARITY_HOST_CHECKS(RopeKvHostChecks);
}  // namespace kvrelay::kernels::parity
