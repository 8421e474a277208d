// XXH3_64bits (default secret, seed 0) of each listed KV block (CPU twin:
// transfer::BlockChecksums in common/transfer/checksum.cc, which calls libxxhash 0.8). A port
// of xxhash.h's scalar code paths, bit-identical by construction: only 64-bit integer
// arithmetic (wrapping adds, xors, shifts, 32x32->64 and 64x64->128 multiplies), no floating
// point, so there is no rounding to differ and the result does not depend on the order the
// stripe contributions are added in (addition mod 2^64 is associative and commutative).
//
// XXH3's long path (> 240 bytes) has 8 independent 64-bit accumulators ("lanes"). A 64-byte
// stripe adds to lane l: data[l ^ 1] + lo32(k) * hi32(k), k = data[l] ^ secret[8 s + 8 l]
// (s = stripe index within its 1024-byte block). After each full 1024-byte block (16 stripes)
// every lane is scrambled (xorshift 47, xor secret, multiply), which is not additive, so
// the blocks chain; lanes never mix until the final merge.
//
// Grid/block: one CTA per listed block (block b handles list entries b, b + gridDim.x, ...;
// grid = min(n, kMaxGridBlocks)); kThreads = 256 threads = 32 groups of 8 lanes.
//  - Round r: group g computes, for 1024-byte block 32 r + g, its lane's sum over the 16
//    stripes (thread = (group, lane)); the 8 lanes of a group read one stripe's 64 contiguous
//    bytes per step (each lane also reads its pair's word, an L1 hit). The 32 x 8 sums go to
//    shared memory; then threads 0..7 (one per lane) fold them into their accumulator in
//    block order: acc = scramble(acc + sum). 32 KiB per round, any number of rounds.
//  - Threads 0..7 then add the last partial block's stripes and the last stripe (input +
//    len - 64, secret offset 121); thread 0 merges the 8 accumulators.
//  - len <= 240 (XXH3's short and mid-size paths, 0 / 1-3 / 4-8 / 9-16 / 17-128 / 129-240
//    bytes): thread 0 alone, the sizes are tiny.
// The per-thread functions below are __host__ __device__; internal::Xxh3_64HostModel runs
// them serially in the same decomposition so the host checks of tests/gpu/parity_checksum.cc
// compare this port against libxxhash without a GPU.
// Bounds: ids are checked against [0, pool_blocks); offsets are uint64 (id * block_bytes).
// Every read stays inside [block, block + len): stripes start at most at len - 64.
// Alignment: a block whose address is 8-byte aligned is read with 64-bit loads (the last
// stripe too when len % 8 == 0); any other address byte by byte (little-endian assembly).
// Shared memory: static, 24 secret words + 32 x 8 lane sums + 8 accumulators = 2.3 KiB.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/checksum.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"

#define KVR_XXH_HD __host__ __device__ __forceinline__

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 8;
constexpr int kGroups = kThreads / kLanes;

constexpr uint64_t kStripeLen = 64;
constexpr uint64_t kBlockLen = 1024;  // 16 stripes: (192 - 64) / 8 per scramble
constexpr int kStripesPerBlock = 16;
constexpr uint64_t kMidSizeMax = 240;

constexpr uint64_t kPrime32_1 = 0x9E3779B1U;
constexpr uint64_t kPrime32_2 = 0x85EBCA77U;
constexpr uint64_t kPrime32_3 = 0xC2B2AE3DU;
constexpr uint64_t kPrime64_1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kPrime64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kPrime64_3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kPrime64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kPrime64_5 = 0x27D4EB2F165667C5ULL;

// XXH3_kSecret (192 bytes) as 24 little-endian 64-bit words.
#define KVR_XXH3_SECRET_WORDS                                                                   \
  {                                                                                             \
    0xbe4ba423396cfeb8ULL, 0x1cad21f72c81017cULL, 0xdb979083e96dd4deULL, 0x1f67b3b7a4a44072ULL, \
        0x78e5c0cc4ee679cbULL, 0x2172ffcc7dd05a82ULL, 0x8e2443f7744608b8ULL,                    \
        0x4c263a81e69035e0ULL, 0xcb00c391bb52283cULL, 0xa32e531b8b65d088ULL,                    \
        0x4ef90da297486471ULL, 0xd8acdea946ef1938ULL, 0x3f349ce33f76faa8ULL,                    \
        0x1d4f0bc7c7bbdcf9ULL, 0x3159b4cd4be0518aULL, 0x647378d9c97e9fc8ULL,                    \
        0xc3ebd33483acc5eaULL, 0xeb6313faffa081c5ULL, 0x49daf0b751dd0d17ULL,                    \
        0x9e68d429265516d3ULL, 0xfca1477d58be162bULL, 0xce31d07ad1b8f88fULL,                    \
        0x280416958f3acb45ULL, 0x7e404bbbcafbd7afULL                                            \
  }
constexpr int kSecretWords = 24;
__constant__ uint64_t kSecretDevice[kSecretWords] = KVR_XXH3_SECRET_WORDS;
const uint64_t kSecretHost[kSecretWords] = KVR_XXH3_SECRET_WORDS;

// ---- Per-thread XXH3 pieces (host and device) ----

// 8 bytes at p, little-endian; `aligned` promises p % 8 == 0.
KVR_XXH_HD uint64_t LoadLE64(const uint8_t* p, bool aligned) {
  if (aligned) return *reinterpret_cast<const uint64_t*>(p);
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
KVR_XXH_HD uint32_t LoadLE32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// XXH_readLE64(kSecret + offset) for any byte offset <= 184.
KVR_XXH_HD uint64_t SecretAt(const uint64_t* secret, int offset) {
  const int q = offset / 8, r = offset % 8;
  if (r == 0) return secret[q];
  return (secret[q] >> (8 * r)) | (secret[q + 1] << (64 - 8 * r));
}

KVR_XXH_HD uint64_t MulFold64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return (a * b) ^ __umul64hi(a, b);
#else
  const unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
  return static_cast<uint64_t>(p) ^ static_cast<uint64_t>(p >> 64);
#endif
}

KVR_XXH_HD uint64_t Swap64(uint64_t x) {
  uint64_t r = 0;
  for (int i = 0; i < 8; ++i) r = (r << 8) | ((x >> (8 * i)) & 0xff);
  return r;
}

KVR_XXH_HD uint64_t Rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

KVR_XXH_HD uint64_t Xxh64Avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= kPrime64_2;
  h ^= h >> 29;
  h *= kPrime64_3;
  h ^= h >> 32;
  return h;
}

KVR_XXH_HD uint64_t Xxh3Avalanche(uint64_t h) {
  h ^= h >> 37;
  h *= 0x165667919E3779F9ULL;
  h ^= h >> 32;
  return h;
}

KVR_XXH_HD uint64_t Rrmxmx(uint64_t h, uint64_t len) {
  h ^= Rotl64(h, 49) ^ Rotl64(h, 24);
  h *= 0x9FB21C651E98DF25ULL;
  h ^= (h >> 35) + len;
  h *= 0x9FB21C651E98DF25ULL;
  return h ^ (h >> 28);
}

// XXH3_mix16B with seed 0.
KVR_XXH_HD uint64_t Mix16B(const uint8_t* in, const uint64_t* secret, int secret_offset) {
  return MulFold64(LoadLE64(in, false) ^ SecretAt(secret, secret_offset),
                   LoadLE64(in + 8, false) ^ SecretAt(secret, secret_offset + 8));
}

// XXH3_64bits for len <= 240 (seed 0, default secret).
KVR_XXH_HD uint64_t HashShort(const uint8_t* in, uint64_t len, const uint64_t* secret) {
  if (len == 0) return Xxh64Avalanche(SecretAt(secret, 56) ^ SecretAt(secret, 64));
  if (len <= 3) {
    const uint32_t c1 = in[0], c2 = in[len >> 1], c3 = in[len - 1];
    const uint32_t combined = (c1 << 16) | (c2 << 24) | c3 | (static_cast<uint32_t>(len) << 8);
    const uint64_t s0 = secret[0];
    const uint64_t bitflip = static_cast<uint32_t>(s0) ^ static_cast<uint32_t>(s0 >> 32);
    return Xxh64Avalanche(static_cast<uint64_t>(combined) ^ bitflip);
  }
  if (len <= 8) {
    const uint64_t input1 = LoadLE32(in);
    const uint64_t input2 = LoadLE32(in + len - 4);
    const uint64_t bitflip = secret[1] ^ secret[2];
    return Rrmxmx((input2 + (input1 << 32)) ^ bitflip, len);
  }
  if (len <= 16) {
    const uint64_t lo = LoadLE64(in, false) ^ (secret[3] ^ SecretAt(secret, 32));
    const uint64_t hi = LoadLE64(in + len - 8, false) ^ (SecretAt(secret, 40) ^ secret[6]);
    return Xxh3Avalanche(len + Swap64(lo) + hi + MulFold64(lo, hi));
  }
  uint64_t acc = len * kPrime64_1;
  if (len <= 128) {
    if (len > 32) {
      if (len > 64) {
        if (len > 96) {
          acc += Mix16B(in + 48, secret, 96);
          acc += Mix16B(in + len - 64, secret, 112);
        }
        acc += Mix16B(in + 32, secret, 64);
        acc += Mix16B(in + len - 48, secret, 80);
      }
      acc += Mix16B(in + 16, secret, 32);
      acc += Mix16B(in + len - 32, secret, 48);
    }
    acc += Mix16B(in, secret, 0);
    acc += Mix16B(in + len - 16, secret, 16);
    return Xxh3Avalanche(acc);
  }
  // 129..240 bytes.
  const int rounds = static_cast<int>(len / 16);
  for (int i = 0; i < 8; ++i) acc += Mix16B(in + 16 * i, secret, 16 * i);
  acc = Xxh3Avalanche(acc);
  for (int i = 8; i < rounds; ++i) acc += Mix16B(in + 16 * i, secret, 16 * (i - 8) + 3);
  acc += Mix16B(in + len - 16, secret, 136 - 17);
  return Xxh3Avalanche(acc);
}

// XXH3_INIT_ACC[lane].
KVR_XXH_HD uint64_t InitAcc(int lane) {
  switch (lane) {
    case 0:
      return kPrime32_3;
    case 1:
      return kPrime64_1;
    case 2:
      return kPrime64_2;
    case 3:
      return kPrime64_3;
    case 4:
      return kPrime64_4;
    case 5:
      return kPrime32_2;
    case 6:
      return kPrime64_5;
    default:
      return kPrime32_1;
  }
}

// What XXH3_accumulate_512 adds to accumulator `lane` for the stripe at p with the secret
// word `key` (XXH_readLE64(secret + 8 * lane) of the stripe's secret).
KVR_XXH_HD uint64_t StripeLane(const uint8_t* p, int lane, uint64_t key, bool aligned) {
  const uint64_t data = LoadLE64(p + 8 * lane, aligned);
  const uint64_t pair = LoadLE64(p + 8 * (lane ^ 1), aligned);
  const uint64_t k = data ^ key;
  return pair + (k & 0xffffffffULL) * (k >> 32);
}

// Sum of a full 1024-byte block's 16 stripe contributions to accumulator `lane`.
KVR_XXH_HD uint64_t BlockLaneSum(const uint8_t* block, int lane, const uint64_t* secret,
                                 bool aligned) {
  uint64_t sum = 0;
  for (int s = 0; s < kStripesPerBlock; ++s) {
    sum += StripeLane(block + kStripeLen * s, lane, secret[s + lane], aligned);
  }
  return sum;
}

// XXH3_scrambleAcc for one lane (secret + 192 - 64).
KVR_XXH_HD uint64_t ScrambleLane(uint64_t acc, int lane, const uint64_t* secret) {
  acc ^= acc >> 47;
  acc ^= secret[16 + lane];
  return acc * kPrime32_1;
}

// The last partial block's stripes and the last stripe, for accumulator `lane`.
KVR_XXH_HD uint64_t TailLane(uint64_t acc, const uint8_t* in, uint64_t len, uint64_t nb_blocks,
                             int lane, const uint64_t* secret, bool aligned) {
  const uint64_t stripes = ((len - 1) - kBlockLen * nb_blocks) / kStripeLen;
  const uint8_t* partial = in + kBlockLen * nb_blocks;
  for (uint64_t s = 0; s < stripes; ++s) {
    acc += StripeLane(partial + kStripeLen * s, lane, secret[s + lane], aligned);
  }
  // XXH_SECRET_LASTACC_START = 7: secret + 192 - 64 - 7.
  const bool last_aligned = aligned && len % 8 == 0;
  return acc +
         StripeLane(in + len - kStripeLen, lane, SecretAt(secret, 121 + 8 * lane), last_aligned);
}

// XXH3_mergeAccs(acc, secret + 11, len * PRIME64_1).
KVR_XXH_HD uint64_t MergeAccs(const uint64_t* acc, uint64_t len, const uint64_t* secret) {
  uint64_t result = len * kPrime64_1;
  for (int i = 0; i < 4; ++i) {
    result += MulFold64(acc[2 * i] ^ SecretAt(secret, 11 + 16 * i),
                        acc[2 * i + 1] ^ SecretAt(secret, 11 + 16 * i + 8));
  }
  return Xxh3Avalanche(result);
}

// ---- The kernel ----

__global__ void __launch_bounds__(kThreads)
    BlockChecksumKernel(const uint8_t* base, int64_t pool_blocks, uint64_t len,
                        const int32_t* blocks, int64_t n, uint64_t* out, int32_t* num_bad_ids) {
  __shared__ uint64_t secret[kSecretWords];
  __shared__ uint64_t sums[kGroups][kLanes];
  __shared__ uint64_t accs[kLanes];
  const int tid = threadIdx.x;
  const int lane = tid % kLanes;
  const int group = tid / kLanes;
  if (tid < kSecretWords) secret[tid] = kSecretDevice[tid];
  __syncthreads();

  for (int64_t b = blockIdx.x; b < n; b += gridDim.x) {
    const int64_t id = blocks != nullptr ? blocks[b] : b;
    if (id < 0 || id >= pool_blocks) {  // the same for every thread of the block
      if (tid == 0) {
        out[b] = 0;
        if (num_bad_ids != nullptr) atomicAdd(num_bad_ids, 1);
      }
      continue;
    }
    const uint8_t* in = base + static_cast<uint64_t>(id) * len;
    if (len <= kMidSizeMax) {
      if (tid == 0) out[b] = HashShort(in, len, secret);
      continue;
    }
    const bool aligned = reinterpret_cast<uintptr_t>(in) % 8 == 0;
    const uint64_t nb_blocks = (len - 1) / kBlockLen;
    uint64_t acc = InitAcc(lane);  // meaningful in threads 0..7
    for (uint64_t first = 0; first < nb_blocks; first += kGroups) {
      const uint64_t blk = first + group;
      sums[group][lane] =
          blk < nb_blocks ? BlockLaneSum(in + kBlockLen * blk, lane, secret, aligned) : 0;
      __syncthreads();
      if (tid < kLanes) {
        const uint64_t count = nb_blocks - first < kGroups ? nb_blocks - first : kGroups;
        for (uint64_t g = 0; g < count; ++g) acc = ScrambleLane(acc + sums[g][lane], lane, secret);
      }
      __syncthreads();  // sums is rewritten by the next round
    }
    if (tid < kLanes) accs[lane] = TailLane(acc, in, len, nb_blocks, lane, secret, aligned);
    __syncthreads();
    if (tid == 0) out[b] = MergeAccs(accs, len, secret);
    __syncthreads();  // accs is rewritten by the next listed block
  }
}

}  // namespace

absl::Status BlockChecksums(const void* base, int64_t pool_blocks, uint64_t block_bytes,
                            const int32_t* blocks, int64_t n, uint64_t* out, int32_t* num_bad_ids,
                            cudaStream_t stream) {
  if (n < 0 || pool_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda::BlockChecksums: negative size (n ", n,
                                                   ", pool_blocks ", pool_blocks, ")"));
  }
  if (n == 0) return absl::OkStatus();
  if (base == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("cuda::BlockChecksums: null pointer");
  }
  const auto grid = static_cast<unsigned>(std::min(n, kMaxGridBlocks));
  BlockChecksumKernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(base), pool_blocks,
                                                     block_bytes, blocks, n, out, num_bad_ids);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

namespace internal {

uint64_t Xxh3_64HostModel(const void* data, uint64_t len) {
  const auto* in = static_cast<const uint8_t*>(data);
  const uint64_t* secret = kSecretHost;
  if (len <= kMidSizeMax) return HashShort(in, len, secret);
  // The host may not read a uint64_t through an arbitrary byte pointer: the model always
  // takes the byte-wise path for the data (the kernel's aligned loads read the same bytes).
  const bool aligned = false;
  const uint64_t nb_blocks = (len - 1) / kBlockLen;
  uint64_t acc[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    // Thread `lane` of the kernel: the chain over the blocks in order, then the tail.
    uint64_t a = InitAcc(lane);
    for (uint64_t blk = 0; blk < nb_blocks; ++blk) {
      a = ScrambleLane(a + BlockLaneSum(in + kBlockLen * blk, lane, secret, aligned), lane, secret);
    }
    acc[lane] = TailLane(a, in, len, nb_blocks, lane, secret, aligned);
  }
  return MergeAccs(acc, len, secret);
}

}  // namespace internal

}  // namespace kvrelay::kernels::cuda
