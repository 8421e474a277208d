// Parity cases: per-block XXH3_64bits checksums (kernels/cuda/checksum.cuh) vs the CPU's
// transfer::BlockChecksums. Exact: integer arithmetic on both sides. Each 64-bit checksum is
// compared as four 16-bit halves stored in floats (exact), so any differing bit fails.
#include <xxhash.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/transfer/checksum.h"
#include "kernels/cuda/checksum.cuh"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

void AppendHash(uint64_t h, std::vector<float>* out) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<float>((h >> (16 * i)) & 0xffff));
}

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (uint8_t& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// Checksums of `ids` (null: blocks 0..n-1) of a pool of `pool_blocks` blocks placed at byte
// `offset` of its allocation (to test unaligned blocks). A bad id must give 0 and be counted.
absl::Status RunChecksums(uint64_t block_bytes, int64_t pool_blocks,
                          const std::vector<int32_t>& ids, bool null_ids, size_t offset,
                          cudaStream_t st, Outputs* o) {
  const size_t pool_bytes = block_bytes * static_cast<size_t>(pool_blocks);
  const std::vector<uint8_t> bytes =
      RandomBytes(pool_bytes + offset, static_cast<uint32_t>(block_bytes * 7 + offset));
  const uint8_t* pool = bytes.data() + offset;
  std::vector<int32_t> list = ids;
  if (null_ids) {
    list.resize(static_cast<size_t>(pool_blocks));
    for (int64_t i = 0; i < pool_blocks; ++i) list[i] = static_cast<int32_t>(i);
  }
  int32_t want_bad = 0;
  for (int32_t id : list) {
    if (id >= 0 && id < pool_blocks) {
      AppendHash(transfer::BlockChecksums(pool, block_bytes, absl::MakeConstSpan(&id, 1))[0],
                 &o->cpu);
    } else {
      AppendHash(0, &o->cpu);
      ++want_bad;
    }
  }
  ASSIGN_OR_RETURN_BUF(dpool, DeviceBuffer::Upload(bytes, st));
  ASSIGN_OR_RETURN_BUF(dids, DeviceBuffer::Upload(list, st));
  ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(uint64_t) * list.size()));
  ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
  RETURN_IF_ERROR(cuda::BlockChecksums(dpool.as<uint8_t>() + offset, pool_blocks, block_bytes,
                                       null_ids ? nullptr : dids.as<int32_t>(),
                                       static_cast<int64_t>(list.size()), dout.as<uint64_t>(),
                                       dbad.as<int32_t>(), st));
  std::vector<uint64_t> got;
  RETURN_IF_ERROR(dout.Download(&got, st));
  std::vector<int32_t> bad;
  RETURN_IF_ERROR(dbad.Download(&bad, st));
  if (bad.size() != 1 || bad[0] != want_bad) {
    return absl::InternalError(
        absl::StrCat("bad-id count ", bad.empty() ? -1 : bad[0], ", want ", want_bad));
  }
  for (uint64_t h : got) AppendHash(h, &o->gpu);
  return absl::OkStatus();
}

void AddChecksumCases(std::vector<Case>* cases) {
  // Every XXH3 path: 0, 1-3, 4-8, 9-16, 17-128, 129-240 (short), > 240 with 0 / 1 / many
  // full 1024-byte blocks, partial stripes, len % 8 != 0 (unaligned last stripe), and
  // more than 32 blocks (several rounds of the kernel's 32 groups).
  const uint64_t sizes[] = {0,    1,    3,    4,    8,     9,     16,    17,       100,
                            128,  129,  200,  240,  241,   255,   256,   1000,     1023,
                            1024, 1025, 2048, 4103, 32768, 33795, 65539, 1u << 20, 2u << 20};
  for (uint64_t bytes : sizes) {
    const int64_t pool_blocks = bytes >= (1u << 20) ? 3 : 9;
    const std::vector<int32_t> ids = {4 % static_cast<int32_t>(pool_blocks), 0,
                                      static_cast<int32_t>(pool_blocks - 1), 2, 2};
    for (size_t offset : {size_t{0}, size_t{3}}) {
      cases->push_back(
          {"checksum",
           absl::StrFormat("block_bytes=%d,blocks=%d,offset=%d", bytes, ids.size(), offset), kExact,
           [=](cudaStream_t st, Outputs* o) {
             return RunChecksums(bytes, pool_blocks, ids, false, offset, st, o);
           }});
    }
  }
  // A contiguous staging buffer (blocks == null), and bad ids (0, counted).
  cases->push_back(
      {"checksum", "block_bytes=4096,staging(ids=null),n=40", kExact,
       [](cudaStream_t st, Outputs* o) { return RunChecksums(4096, 40, {}, true, 0, st, o); }});
  cases->push_back({"checksum_bad_ids", "block_bytes=777,ids={1,-1,5,6,2147483647}", kExact,
                    [](cudaStream_t st, Outputs* o) {
                      return RunChecksums(777, 6, {1, -1, 5, 6, 2147483647}, false, 0, st, o);
                    }});
  // More listed blocks than one grid-stride round would need to be interesting: 300 blocks.
  cases->push_back(
      {"checksum", "block_bytes=2000,blocks=300", kExact, [](cudaStream_t st, Outputs* o) {
         std::vector<int32_t> ids(300);
         for (int i = 0; i < 300; ++i) ids[i] = (i * 37) % 300;
         return RunChecksums(2000, 300, ids, false, 0, st, o);
       }});
}

void ChecksumHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  using absl::StatusCode;
  // The kernel's XXH3 code, run serially on the host, against libxxhash: every length of the
  // short paths and of the first blocks, larger ones, and every alignment.
  const std::vector<uint8_t> data = RandomBytes((size_t{3} << 20) + 16, 12345);
  auto mismatches = [&](uint64_t from, uint64_t to, uint64_t step) {
    int bad = 0;
    for (uint64_t len = from; len <= to; len += step) {
      const uint8_t* p = data.data() + len % 8;
      if (cuda::internal::Xxh3_64HostModel(p, len) != XXH3_64bits(p, len)) ++bad;
    }
    return bad;
  };
  expect(mismatches(0, 240, 1) == 0, "Xxh3_64HostModel == XXH3_64bits, len 0..240 (all)");
  expect(mismatches(241, 4200, 1) == 0, "Xxh3_64HostModel == XXH3_64bits, len 241..4200 (all)");
  expect(mismatches(4201, (3u << 20) + 8, 65521) == 0,
         "Xxh3_64HostModel == XXH3_64bits, len 4201..3 MiB (sampled)");
  expect(
      cuda::internal::Xxh3_64HostModel(data.data(), 2u << 20) == XXH3_64bits(data.data(), 2u << 20),
      "Xxh3_64HostModel == XXH3_64bits, len 2 MiB");

  auto* bogus = reinterpret_cast<uint64_t*>(uintptr_t{64});  // never dereferenced here
  expect(cuda::BlockChecksums(nullptr, 4, 64, nullptr, 0, nullptr, nullptr, nullptr).ok(),
         "BlockChecksums n == 0 -> OK, nothing launched");
  expect(cuda::BlockChecksums(bogus, 4, 64, nullptr, -1, bogus, nullptr, nullptr).code() ==
             StatusCode::kInvalidArgument,
         "BlockChecksums n < 0 -> INVALID_ARGUMENT");
  expect(cuda::BlockChecksums(nullptr, 4, 64, nullptr, 2, bogus, nullptr, nullptr).code() ==
             StatusCode::kInvalidArgument,
         "BlockChecksums null base -> INVALID_ARGUMENT");
}

}  // namespace
KVR_PARITY_CASES(AddChecksumCases);
KVR_PARITY_HOST_CHECKS(ChecksumHostChecks);
}  // namespace kvrelay::kernels::parity
