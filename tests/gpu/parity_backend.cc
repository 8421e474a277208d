// Parity cases: the CUDA backend (kernels/cuda/cuda_backend.h) as the forward pass uses it,
// through the Backend interface, against the CPU backend: memory round trips, Zero, block
// checksums of a device pool (the decode worker's verification of a GPU pool), the bad-index
// counter reported at the next sync, and refusing a pool in host memory.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

using cuda::CudaBackend;

absl::StatusOr<std::unique_ptr<CudaBackend>> Gpu() { return CudaBackend::Create(0); }

void AddBackendCases(std::vector<Case>* cases) {
  cases->push_back(
      {"backend_memory", "upload/download/zero round trip", kExact,
       [](cudaStream_t, Outputs* o) -> absl::Status {
         absl::StatusOr<std::unique_ptr<CudaBackend>> be = Gpu();
         if (!be.ok()) return be.status();
         std::mt19937 rng(5);
         const std::vector<float> host = Uniform(&rng, 100003, -1, 1);
         absl::StatusOr<Buffer> buf = (*be)->Allocate(sizeof(float) * host.size());
         if (!buf.ok()) return buf.status();
         RETURN_IF_ERROR((*be)->Upload(host.data(), sizeof(float) * host.size(), buf->data()));
         RETURN_IF_ERROR((*be)->Zero(buf->as<float>() + 10, sizeof(float) * 20));
         o->cpu = host;
         std::fill(o->cpu.begin() + 10, o->cpu.begin() + 30, 0.0f);
         o->gpu.resize(host.size());
         RETURN_IF_ERROR((*be)->Download(buf->data(), sizeof(float) * host.size(), o->gpu.data()));
         absl::StatusOr<Buffer> c = (*be)->UploadConstant(host.data(), sizeof(float) * 7);
         if (!c.ok()) return c.status();
         if (c->data() == host.data()) return absl::InternalError("constant not copied");
         return absl::OkStatus();
       }});
  for (uint64_t block_bytes : {uint64_t{64}, uint64_t{4096 + 8}, uint64_t{590 * 1024}}) {
    cases->push_back(
        {"backend_block_checksums", absl::StrFormat("block_bytes=%d", block_bytes), kExact,
         [block_bytes](cudaStream_t, Outputs* o) -> absl::Status {
           absl::StatusOr<std::unique_ptr<CudaBackend>> be = Gpu();
           if (!be.ok()) return be.status();
           const int64_t blocks = 9;
           std::vector<uint8_t> pool(block_bytes * blocks);
           std::mt19937 rng(static_cast<uint32_t>(block_bytes));
           for (uint8_t& b : pool) b = static_cast<uint8_t>(rng());
           absl::StatusOr<Buffer> dpool = (*be)->Allocate(pool.size());
           if (!dpool.ok()) return dpool.status();
           RETURN_IF_ERROR((*be)->Upload(pool.data(), pool.size(), dpool->data()));
           const std::vector<int32_t> ids = {8, 0, 3, 3, 5};
           std::vector<uint64_t> want(ids.size()), got(ids.size());
           CpuBackend cpu(nullptr);
           RETURN_IF_ERROR(cpu.BlockChecksums(pool.data(), blocks, block_bytes, ids, want.data()));
           RETURN_IF_ERROR(
               (*be)->BlockChecksums(dpool->data(), blocks, block_bytes, ids, got.data()));
           for (size_t i = 0; i < ids.size(); ++i) {  // 64-bit values as 16-bit pieces (exact)
             for (int shift = 48; shift >= 0; shift -= 16) {
               o->cpu.push_back(static_cast<float>((want[i] >> shift) & 0xffff));
               o->gpu.push_back(static_cast<float>((got[i] >> shift) & 0xffff));
             }
           }
           // A block outside the pool is refused on the host, before anything runs.
           const int32_t outside[] = {9};
           const absl::Status s =
               (*be)->BlockChecksums(dpool->data(), blocks, block_bytes, outside, got.data());
           if (!absl::IsInvalidArgument(s)) return absl::InternalError("block 9 not refused");
           return absl::OkStatus();
         }});
  }
  cases->push_back(
      {"backend_bad_index_count", "reported at the next sync, then reset", kExact,
       [](cudaStream_t, Outputs* o) -> absl::Status {
         absl::StatusOr<std::unique_ptr<CudaBackend>> be = Gpu();
         if (!be.ok()) return be.status();
         const int64_t dim = 4;
         const std::vector<float> x(3 * dim, 1.0f);
         const std::vector<int64_t> rows = {0, 7};  // 7: outside the 3 rows
         absl::StatusOr<Buffer> dx = (*be)->Allocate(sizeof(float) * x.size());
         absl::StatusOr<Buffer> drows = (*be)->Allocate(sizeof(int64_t) * rows.size());
         absl::StatusOr<Buffer> dout = (*be)->Allocate(sizeof(float) * 2 * dim);
         if (!dx.ok() || !drows.ok() || !dout.ok()) return absl::InternalError("allocate");
         RETURN_IF_ERROR((*be)->Upload(x.data(), sizeof(float) * x.size(), dx->data()));
         RETURN_IF_ERROR((*be)->Upload(rows.data(), sizeof(int64_t) * rows.size(), drows->data()));
         RETURN_IF_ERROR((*be)->GatherRows(dx->as<float>(), 3, dim, drows->as<int64_t>(), 2,
                                           dout->as<float>()));
         const absl::Status first = (*be)->Synchronize();
         const absl::Status second = (*be)->Synchronize();
         o->cpu = {1, 1};
         o->gpu = {absl::IsInvalidArgument(first) ? 1.0f : 0.0f, second.ok() ? 1.0f : 0.0f};
         return absl::OkStatus();
       }});
}
KVR_PARITY_CASES(AddBackendCases);

void BackendHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  absl::StatusOr<std::unique_ptr<CudaBackend>> be = CudaBackend::Create(0);
  if (!be.ok()) {
    expect(absl::IsUnavailable(be.status()), "backend: no GPU is UNAVAILABLE");
    expect(absl::IsFailedPrecondition(CreateBackend(Device::kCuda, nullptr).status()) ||
               absl::IsUnavailable(CreateBackend(Device::kCuda, nullptr).status()),
           "backend: CreateBackend(kCuda) without a GPU says why");
    return;
  }
  expect((*be)->device() == Device::kCuda && (*be)->memory_kind() == MemoryKind::kCuda,
         "backend: device and memory kind are cuda");
  expect(absl::IsInvalidArgument(CudaBackend::Create(1 << 20).status()),
         "backend: device ordinal out of range");
  // A pool in host memory is refused before anything is queued.
  PagedKvView host_pool;
  host_pool.layout.num_layers = 1;
  host_pool.layout.block_size = 4;
  host_pool.layout.num_kv_heads = 1;
  host_pool.layout.head_dim = 8;
  TokenBatch tb;
  tb.num_tokens = 1;
  float f = 0;
  expect(absl::IsFailedPrecondition((*be)->RopeAndWriteKv(host_pool, 0, tb, &f, 1, nullptr, &f)),
         "backend: RopeAndWriteKv refuses a host pool");
  expect(absl::IsFailedPrecondition((*be)->PagedAttention(host_pool, 0, tb, &f, 1, 1.0f, &f)),
         "backend: PagedAttention refuses a host pool");
}
KVR_PARITY_HOST_CHECKS(BackendHostChecks);

}  // namespace
}  // namespace kvrelay::kernels::parity
