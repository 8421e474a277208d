// Parity cases: embedding gather.
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/embedding.cuh"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

void AddEmbeddingCases(std::vector<Case>* cases) {
  struct Shape {
    int64_t vocab, dim, n;
  };
  const Shape shapes[] = {{10, 1, 3}, {100, 33, 17}, {1000, 4097, 5}, {50, 256, 300}};
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (const Shape& s : shapes) {
      cases->push_back(
          {"embedding",
           absl::StrFormat("%s,vocab=%d,dim=%d,n=%d", DTypeName(t), s.vocab, s.dim, s.n), kExact,
           [s, t](cudaStream_t st, Outputs* o) -> absl::Status {
             std::mt19937 rng(static_cast<uint32_t>(s.vocab + s.dim + s.n));
             const auto values = Uniform(&rng, s.vocab * s.dim, -70000, 70000);
             const std::vector<uint8_t> table = Encode(values, t);
             std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(s.vocab - 1));
             std::vector<int32_t> ids(s.n);
             for (int32_t& id : ids) id = pick(rng);
             ids.back() = static_cast<int32_t>(s.vocab - 1);  // the last row
             o->cpu.resize(s.n * s.dim);
             EmbeddingGather(ids.data(), s.n, table.data(), t, s.dim, o->cpu.data());
             ASSIGN_OR_RETURN_BUF(dids, DeviceBuffer::Upload(ids, st));
             ASSIGN_OR_RETURN_BUF(dtable, DeviceBuffer::Upload(table, st));
             ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * o->cpu.size()));
             RETURN_IF_ERROR(cuda::EmbeddingGather(dids.as<int32_t>(), s.n, dtable.as<void>(), t,
                                                   s.vocab, s.dim, dout.as<float>(), nullptr, st));
             return dout.Download(&o->gpu, st);
           }});
    }
  }
  // Out-of-range ids: zero rows, counted; the other rows as the CPU gathers them.
  cases->push_back({"embedding_bad_ids", "f32,vocab=20,dim=40,ids={3,-1,20,19,2147483647,0}",
                    kExact, [](cudaStream_t st, Outputs* o) -> absl::Status {
                      const int64_t vocab = 20, dim = 40;
                      std::mt19937 rng(5);
                      const auto table = Uniform(&rng, vocab * dim, -1, 1);
                      const std::vector<int32_t> ids = {3, -1, 20, 19, 2147483647, 0};
                      const int64_t n = static_cast<int64_t>(ids.size());
                      o->cpu.assign(n * dim, 0.0f);
                      for (int64_t t = 0; t < n; ++t) {
                        if (ids[t] >= 0 && ids[t] < vocab) {
                          EmbeddingGather(&ids[t], 1, table.data(), DType::kF32, dim,
                                          &o->cpu[t * dim]);
                        }
                      }
                      ASSIGN_OR_RETURN_BUF(dids, DeviceBuffer::Upload(ids, st));
                      ASSIGN_OR_RETURN_BUF(dtable, DeviceBuffer::Upload(table, st));
                      ASSIGN_OR_RETURN_BUF(dout, DeviceBuffer::Alloc(sizeof(float) * n * dim));
                      ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
                      RETURN_IF_ERROR(cuda::EmbeddingGather(
                          dids.as<int32_t>(), n, dtable.as<float>(), DType::kF32, vocab, dim,
                          dout.as<float>(), dbad.as<int32_t>(), st));
                      std::vector<int32_t> bad;
                      RETURN_IF_ERROR(dbad.Download(&bad, st));
                      if (bad.size() != 1 || bad[0] != 3) {
                        return absl::InternalError(
                            absl::StrCat("bad-id count ", bad.empty() ? -1 : bad[0], ", want 3"));
                      }
                      return dout.Download(&o->gpu, st);
                    }});
}

void EmbeddingHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  auto code = [](const absl::Status& s) { return s.code(); };
  using absl::StatusCode;
  float* bogus = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced on these paths
  int32_t* ids = reinterpret_cast<int32_t*>(uintptr_t{64});
  expect(code(cuda::EmbeddingGather(ids, 2, bogus, DType::kI8, 4, 4, bogus, nullptr, nullptr)) ==
             StatusCode::kInvalidArgument,
         "EmbeddingGather int8 table -> INVALID_ARGUMENT");
  expect(code(cuda::EmbeddingGather(ids, 2, bogus, DType::kF32, -4, 4, bogus, nullptr, nullptr)) ==
             StatusCode::kInvalidArgument,
         "EmbeddingGather vocab < 0 -> INVALID_ARGUMENT");
}

}  // namespace
KVR_PARITY_CASES(AddEmbeddingCases);
KVR_PARITY_HOST_CHECKS(EmbeddingHostChecks);
}  // namespace kvrelay::kernels::parity
