// Parity cases: residual add, position-embedding add and row gather (kernels/cuda/rows.cu)
// against the CPU backend's ops (one float add per element / a copy: exact).
#include <cstdint>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/rows.cuh"
#include "tests/gpu/parity.h"

namespace kvrelay::kernels::parity {
namespace {

void AddRowsCases(std::vector<Case>* cases) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4099}, int64_t{1} << 20}) {
    cases->push_back({"add_in_place", absl::StrFormat("n=%d", n), kExact,
                      [n](cudaStream_t st, Outputs* o) -> absl::Status {
                        std::mt19937 rng(static_cast<uint32_t>(n));
                        std::vector<float> x = Uniform(&rng, n, -10, 10);
                        const std::vector<float> y = Uniform(&rng, n, -10, 10);
                        if (n > 64) SprinkleSpecials(&x);
                        ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
                        ASSIGN_OR_RETURN_BUF(dy, DeviceBuffer::Upload(y, st));
                        CpuBackend cpu(nullptr);
                        RETURN_IF_ERROR(cpu.AddInPlace(x.data(), y.data(), n));
                        o->cpu = x;
                        RETURN_IF_ERROR(cuda::AddInPlace(dx.as<float>(), dy.as<float>(), n, st));
                        return dx.Download(&o->gpu, st);
                      }});
  }
  struct Shape {
    int64_t n, dim, table_rows;
  };
  for (const Shape s :
       {Shape{1, 1, 1}, Shape{5, 768, 1024}, Shape{300, 257, 300}, Shape{70000, 3, 70001}}) {
    const std::string params = absl::StrFormat("n=%d,dim=%d,rows=%d", s.n, s.dim, s.table_rows);
    for (bool gather : {false, true}) {
      cases->push_back(
          {gather ? "gather_rows" : "add_position_embedding", params, kExact,
           [s, gather](cudaStream_t st, Outputs* o) -> absl::Status {
             std::mt19937 rng(static_cast<uint32_t>(s.n * 31 + s.dim));
             const std::vector<float> table = Uniform(&rng, s.table_rows * s.dim, -2, 2);
             std::vector<int64_t> index(static_cast<size_t>(s.n));
             std::uniform_int_distribution<int64_t> pick(0, s.table_rows - 1);
             for (int64_t& i : index) i = pick(rng);
             std::vector<float> x = Uniform(&rng, s.n * s.dim, -2, 2);
             ASSIGN_OR_RETURN_BUF(dtable, DeviceBuffer::Upload(table, st));
             ASSIGN_OR_RETURN_BUF(dindex, DeviceBuffer::Upload(index, st));
             ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
             ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
             CpuBackend cpu(nullptr);
             if (gather) {
               o->cpu.resize(x.size());
               RETURN_IF_ERROR(cpu.GatherRows(table.data(), s.table_rows, s.dim, index.data(), s.n,
                                              o->cpu.data()));
               RETURN_IF_ERROR(cuda::GatherRows(dtable.as<float>(), s.table_rows, s.dim,
                                                dindex.as<int64_t>(), s.n, dx.as<float>(),
                                                dbad.as<int32_t>(), st));
             } else {
               RETURN_IF_ERROR(cpu.AddPositionEmbedding(table.data(), s.table_rows, index.data(),
                                                        s.n, s.dim, x.data()));
               o->cpu = x;
               RETURN_IF_ERROR(cuda::AddPositionEmbedding(dtable.as<float>(), s.table_rows,
                                                          dindex.as<int64_t>(), s.n, s.dim,
                                                          dx.as<float>(), dbad.as<int32_t>(), st));
             }
             std::vector<int32_t> bad;
             RETURN_IF_ERROR(dbad.Download(&bad, st));
             if (bad[0] != 0) return absl::InternalError("in-range rows were counted as bad");
             return dx.Download(&o->gpu, st);
           }});
    }
  }
  // Rows outside the table: counted, and the row left alone (add) or zeroed (gather), never
  // read out of bounds. The CPU side is what the kernel promises.
  for (bool gather : {false, true}) {
    cases->push_back(
        {gather ? "gather_rows" : "add_position_embedding", "bad rows counted", kExact,
         [gather](cudaStream_t st, Outputs* o) -> absl::Status {
           const int64_t dim = 5, rows = 4;
           const std::vector<int64_t> index = {1, -1, 4, 3, int64_t{1} << 40};
           std::mt19937 rng(3);
           const std::vector<float> table = Uniform(&rng, rows * dim, -1, 1);
           std::vector<float> x = Uniform(&rng, index.size() * dim, -1, 1);
           o->cpu = x;
           for (size_t t = 0; t < index.size(); ++t) {
             const bool ok = index[t] >= 0 && index[t] < rows;
             for (int64_t c = 0; c < dim; ++c) {
               float& v = o->cpu[t * dim + c];
               if (gather) v = ok ? table[index[t] * dim + c] : 0.0f;
               if (!gather && ok) v = v + table[index[t] * dim + c];
             }
           }
           o->cpu.push_back(3);  // the count of bad rows
           ASSIGN_OR_RETURN_BUF(dtable, DeviceBuffer::Upload(table, st));
           ASSIGN_OR_RETURN_BUF(dindex, DeviceBuffer::Upload(index, st));
           ASSIGN_OR_RETURN_BUF(dx, DeviceBuffer::Upload(x, st));
           ASSIGN_OR_RETURN_BUF(dbad, DeviceBuffer::Upload(std::vector<int32_t>{0}, st));
           const int64_t n = static_cast<int64_t>(index.size());
           RETURN_IF_ERROR(
               gather ? cuda::GatherRows(dtable.as<float>(), rows, dim, dindex.as<int64_t>(), n,
                                         dx.as<float>(), dbad.as<int32_t>(), st)
                      : cuda::AddPositionEmbedding(dtable.as<float>(), rows, dindex.as<int64_t>(),
                                                   n, dim, dx.as<float>(), dbad.as<int32_t>(), st));
           RETURN_IF_ERROR(dx.Download(&o->gpu, st));
           std::vector<int32_t> bad;
           RETURN_IF_ERROR(dbad.Download(&bad, st));
           o->gpu.push_back(static_cast<float>(bad[0]));
           return absl::OkStatus();
         }});
  }
}
KVR_PARITY_CASES(AddRowsCases);

void RowsHostChecks(const std::function<void(bool, const std::string&)>& expect) {
  auto invalid = [](const absl::Status& s) { return absl::IsInvalidArgument(s); };
  float f = 0;
  int64_t i = 0;
  expect(cuda::AddInPlace(nullptr, nullptr, 0, nullptr).ok(), "rows: empty add is a no-op");
  expect(invalid(cuda::AddInPlace(&f, &f, -1, nullptr)), "rows: negative add size");
  expect(invalid(cuda::AddInPlace(nullptr, &f, 4, nullptr)), "rows: null add operand");
  expect(cuda::GatherRows(nullptr, 4, 8, nullptr, 0, nullptr, nullptr, nullptr).ok(),
         "rows: empty gather is a no-op");
  expect(invalid(cuda::GatherRows(&f, -4, 8, &i, 1, &f, nullptr, nullptr)),
         "rows: negative table rows");
  expect(invalid(cuda::AddPositionEmbedding(&f, 4, nullptr, 2, 8, &f, nullptr, nullptr)),
         "rows: null positions");
  expect(invalid(cuda::AddPositionEmbedding(&f, 4, &i, 2, -8, &f, nullptr, nullptr)),
         "rows: negative dim");
}
KVR_PARITY_HOST_CHECKS(RowsHostChecks);

}  // namespace
}  // namespace kvrelay::kernels::parity
