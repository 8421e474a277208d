// Parity cases: KV block gather / scatter (kernels/cuda/block_copy.cuh) vs a memcpy per block.
// Exact: every byte is compared (stored as a float 0..255, so any difference fails kExact).
// Each case gathers a list of blocks from a random pool into a staging buffer, then scatters
// the staging buffer into a second pool (another random image): the output is the staging
// bytes followed by the whole second pool, so both directions, the untouched blocks, the
// zero-filled slots of bad ids and the skipped bad ids on scatter are all checked.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/block_copy.cuh"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (uint8_t& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

void AppendBytes(const uint8_t* p, size_t n, std::vector<float>* out) {
  for (size_t i = 0; i < n; ++i) out->push_back(static_cast<float>(p[i]));
}

struct CopyCase {
  uint64_t block_bytes;
  int64_t pool_blocks;
  std::vector<int32_t> ids;
  size_t pool_offset, staging_offset;  // bytes into the allocations (alignment)
};

absl::Status RunCopy(const CopyCase& c, cudaStream_t st, Outputs* o) {
  const size_t bb = c.block_bytes;
  const size_t n = c.ids.size();
  const size_t pool_bytes = bb * static_cast<size_t>(c.pool_blocks);
  const std::vector<uint8_t> src = RandomBytes(pool_bytes + c.pool_offset, 1);
  const std::vector<uint8_t> dst = RandomBytes(pool_bytes + c.pool_offset, 2);
  const std::vector<uint8_t> staging0 = RandomBytes(bb * n + c.staging_offset, 3);

  // CPU twin.
  int32_t want_bad = 0;
  std::vector<uint8_t> staging(bb * n, 0);
  std::vector<uint8_t> pool2(dst.begin() + c.pool_offset, dst.end());
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = c.ids[i];
    if (id < 0 || id >= c.pool_blocks) {
      ++want_bad;
      continue;  // gather: zeros; scatter: skipped
    }
    std::memcpy(&staging[i * bb], src.data() + c.pool_offset + id * bb, bb);
  }
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = c.ids[i];
    if (id >= 0 && id < c.pool_blocks) std::memcpy(&pool2[id * bb], &staging[i * bb], bb);
  }
  AppendBytes(staging.data(), staging.size(), &o->cpu);
  AppendBytes(pool2.data(), pool2.size(), &o->cpu);

  ASSIGN_OR_RETURN_BUF(dsrc, DeviceBuffer::Upload(src, st));
  ASSIGN_OR_RETURN_BUF(ddst, DeviceBuffer::Upload(dst, st));
  ASSIGN_OR_RETURN_BUF(dstaging, DeviceBuffer::Upload(staging0, st));
  ASSIGN_OR_RETURN_BUF(dids, DeviceBuffer::Upload(c.ids, st));
  ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
  uint8_t* const stage = dstaging.as<uint8_t>() + c.staging_offset;
  RETURN_IF_ERROR(cuda::GatherBlocks(dsrc.as<uint8_t>() + c.pool_offset, c.pool_blocks, bb,
                                     dids.as<int32_t>(), static_cast<int64_t>(n), stage,
                                     dbad.as<int32_t>(), st));
  RETURN_IF_ERROR(cuda::ScatterBlocks(stage, dids.as<int32_t>(), static_cast<int64_t>(n), bb,
                                      ddst.as<uint8_t>() + c.pool_offset, c.pool_blocks,
                                      dbad.as<int32_t>(), st));
  std::vector<uint8_t> got_staging, got_pool;
  RETURN_IF_ERROR(dstaging.Download(&got_staging, st));
  RETURN_IF_ERROR(ddst.Download(&got_pool, st));
  std::vector<int32_t> bad;
  RETURN_IF_ERROR(dbad.Download(&bad, st));
  if (bad.size() != 1 || bad[0] != 2 * want_bad) {  // counted once per direction
    return absl::InternalError(
        absl::StrCat("bad-id count ", bad.empty() ? -1 : bad[0], ", want ", 2 * want_bad));
  }
  AppendBytes(got_staging.data() + c.staging_offset, bb * n, &o->gpu);
  AppendBytes(got_pool.data() + c.pool_offset, pool_bytes, &o->gpu);
  return absl::OkStatus();
}

void AddBlockCopyCases(std::vector<Case>* cases) {
  // Element widths 16 / 8 / 4 / 1 from block_bytes and from the two base offsets.
  const uint64_t sizes[] = {1, 3, 4, 8, 12, 16, 48, 1000, 1002, 4096, 4097, 65536, 1u << 20};
  const std::pair<size_t, size_t> offsets[] = {{0, 0}, {8, 0}, {0, 4}, {1, 0}, {0, 3}};
  for (uint64_t bb : sizes) {
    for (const auto& [po, so] : offsets) {
      if (bb >= (1u << 20) && (po != 0 || so != 0)) continue;  // one large case is enough
      CopyCase c{bb, 11, {7, 0, 10, 3, 4, 9}, po, so};
      cases->push_back({"block_copy",
                        absl::StrFormat("block_bytes=%d,blocks=6/11,offsets=%d/%d", bb, po, so),
                        kExact, [c](cudaStream_t st, Outputs* o) { return RunCopy(c, st, o); }});
    }
  }
  CopyCase bad{1000, 8, {2, -1, 7, 8, 2147483647, 0}, 0, 0};
  cases->push_back({"block_copy_bad_ids", "block_bytes=1000,ids={2,-1,7,8,2147483647,0}", kExact,
                    [bad](cudaStream_t st, Outputs* o) { return RunCopy(bad, st, o); }});
  // Many listed blocks (grid.y strides) of a larger pool.
  CopyCase many{4096, 600, {}, 0, 0};
  for (int i = 0; i < 500; ++i) many.ids.push_back((i * 7) % 600);
  cases->push_back({"block_copy", "block_bytes=4096,blocks=500/600", kExact,
                    [many](cudaStream_t st, Outputs* o) { return RunCopy(many, st, o); }});
}

void BlockCopyHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  using absl::StatusCode;
  void* bogus = reinterpret_cast<void*>(uintptr_t{64});  // never dereferenced here
  const auto* ids = reinterpret_cast<const int32_t*>(uintptr_t{64});
  expect(cuda::GatherBlocks(bogus, 4, 64, ids, -1, bogus, nullptr, nullptr).code() ==
             StatusCode::kInvalidArgument,
         "GatherBlocks n < 0 -> INVALID_ARGUMENT");
  expect(cuda::GatherBlocks(bogus, 4, 64, nullptr, 2, bogus, nullptr, nullptr).code() ==
             StatusCode::kInvalidArgument,
         "GatherBlocks null ids -> INVALID_ARGUMENT");
  expect(cuda::ScatterBlocks(nullptr, ids, 2, 64, bogus, 4, nullptr, nullptr).code() ==
             StatusCode::kInvalidArgument,
         "ScatterBlocks null staging -> INVALID_ARGUMENT");
  expect(cuda::ScatterBlocks(bogus, ids, 2, 64, bogus, -4, nullptr, nullptr).code() ==
             StatusCode::kInvalidArgument,
         "ScatterBlocks pool_blocks < 0 -> INVALID_ARGUMENT");
  expect(cuda::GatherBlocks(nullptr, 4, 64, nullptr, 0, nullptr, nullptr, nullptr).ok() &&
             cuda::ScatterBlocks(bogus, ids, 2, 0, bogus, 4, nullptr, nullptr).ok(),
         "Gather/ScatterBlocks n == 0 or block_bytes == 0 -> OK, nothing launched");
}

}  // namespace
KVR_PARITY_CASES(AddBlockCopyCases);
KVR_PARITY_HOST_CHECKS(BlockCopyHostChecks);
}  // namespace kvrelay::kernels::parity
