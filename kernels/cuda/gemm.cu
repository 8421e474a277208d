// y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ bias) through cuBLASLt (CPU twin: kernels::MatMul
// in kernels/cpu/ops.cc).
//
// Layout: cuBLASLt is column-major, so the row-major matrices are read as their transposes:
// w [out, in] row-major is A = column-major [in, out] (lda = in), x [rows, in] is
// B = column-major [in, rows] (ldb = in), y [rows, out] is D = column-major [out, rows]
// (ldd = out), and D = op(A) · B with op(A) = Aᵀ: the "TN" GEMM, m = out, n = rows, k = in.
// C = D with beta = 0 (C is never read).
// Types: A and B share the weight dtype (CUDA_R_16BF, CUDA_R_16F or CUDA_R_32F), D is
// CUDA_R_32F, compute CUBLAS_COMPUTE_32F with f32 scale (alpha = 1, beta = 0): 16-bit inputs
// accumulate in f32 on the tensor cores; f32 inputs run full-precision FP32 (the _FAST_TF32
// compute type is never used, so TF32 never is either).
// Plans and batch invariance (DESIGN §6: a token's result must not depend on the batch).
// cuBLASLt's heuristic answers per shape: asked for each rows it may pick another kernel, tile
// or split-K factor, and with it another summation order, so a token's output row would change
// bits with the number of rows in the call. So the algorithm is chosen once per (weight dtype,
// in, out, alignment of w / converted x / y), not per rows: the best of cuBLASLt's heuristic
// answers (up to kHeuristicCandidates) for a representative n = Gemm::kPlanningRows rows that,
// with split-K forced off (CUBLASLT_ALGO_CONFIG_SPLITK_NUM = 1 and
// CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME = CUBLASLT_REDUCTION_SCHEME_NONE, set with
// cublasLtMatmulAlgoConfigSetAttribute), passes cublasLtMatmulAlgoCheck within the workspace.
// Every rows then runs that same configuration; the first call for a rows checks that it
// applies (cublasLtMatmulAlgoCheck on that rows' layouts) and caches the plan (descriptors and
// algorithm), so later calls of that shape only launch.
// Why that is batch-invariant: with the algorithm id, tile, stages, inner and cluster shape,
// CTA swizzling and split-K all fixed, each output element y[r][o] is one CTA's dot product
// over the whole k = in, and its order (which k-slices, in which sequence, and the sums inside
// each MMA) is set by the kernel's K tiling alone. n = rows only sets how many CTAs tile the n
// extent and which of them owns row r, not the arithmetic of (r, o); with split-K off no
// partial sums are reduced across CTAs (where a K split could depend on the grid); alpha = 1
// and beta = 0 (C never read) make the epilogue exact, and the x conversion and the bias add
// are element-wise. So row r's bits depend on x[r], w and bias only.
// Fallback: when the fixed configuration does not apply to some rows (AlgoCheck fails or needs
// more workspace), or no candidate applies to the key at all, that rows gets cuBLASLt's
// heuristic answer for its own shape: correct and deterministic, but NOT batch-invariant.
// Gemm::num_fallback_plans() counts those plans. The alignments are part of the key: the same
// row through pointers of another alignment (e.g. an f32 x offset by an odd number of floats)
// may run another algorithm. This rests on cuBLASLt's kernels being data-parallel over n once
// split-K is off; the gemm_invariance parity cases check it bit for bit on each GPU they run on.
// Cost: small batches (decode) lose the extra CTAs split-K would give them on a long k.
//
// Kernels (both compiled with --fmad=false like every kernel here):
//  - GemmConvertXKernel<T>: x f32 -> T (bf16 / f16, round to nearest even: the values
//    kernels::F32ToBf16 / F32ToF16 give, NaN stays NaN) into the Gemm's conversion buffer.
//    1-D grid-stride over rows * in elements, kThreads = 256, grid = min(ceil(n / 256),
//    kMaxGridBlocks); one element per thread per step, coalesced; no alignment beyond float's.
//  - GemmBiasEpilogueKernel: y[r][o] += bias[o], the CPU's own f32 add after its dot product.
//    2-D grid: blockIdx.x * 256 + threadIdx.x is the column o < out (striding by
//    gridDim.x * 256), blockIdx.y the row (striding by gridDim.y): no division by out;
//    grid.x = min(ceil(out / 256), kMaxGridBlocks), grid.y = min(rows, kMaxGridBlocks). Each
//    element read and written once by one thread; loads coalesced along o.
// Bounds: every access is guarded (i < n; o < out, r < rows); indices are int64.
// Shared memory: none.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cublaslt_api.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/launch.cuh"

namespace kvrelay::kernels::cuda {
namespace {

constexpr int kThreads = kElementThreads;

template <typename T>
__device__ __forceinline__ T FromF32(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromF32<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) GemmConvertXKernel(const float* x, int64_t n, T* xt) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    xt[i] = FromF32<T>(x[i]);
  }
}

__global__ void __launch_bounds__(kThreads)
    GemmBiasEpilogueKernel(float* y, int64_t rows, int64_t out, const float* bias) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float* yr = y + r * out;
    for (int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; o < out;
         o += stride) {
      yr[o] += bias[o];
    }
  }
}

absl::Status LaunchBias(float* y, int64_t rows, int64_t out, const float* bias,
                        cudaStream_t stream) {
  const dim3 grid = RowColumnGrid(rows, out);
  GemmBiasEpilogueKernel<<<grid, kThreads, 0, stream>>>(y, rows, out, bias);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// Largest power of two (<= 256, cuBLASLt's default requirement) dividing the address.
uint32_t AlignmentOf(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

cudaDataType_t CudaType(DType t) {
  switch (t) {
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kBF16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

// How many of cuBLASLt's heuristic answers for the representative shape are tried, best first,
// for one that still applies with split-K off.
constexpr int kHeuristicCandidates = 8;

// cuBLASLt's "no algorithm for this" answers are results, not failures: NOT_SUPPORTED (from
// cublasLtMatmulAlgoGetHeuristic: no heuristic for the configuration; from
// cublasLtMatmulAlgoCheck: the configuration is not supported on this device) and, from
// cublasLtMatmulAlgoCheck only (algo_check), INVALID_VALUE (the descriptors do not match the
// algo) and ARCH_MISMATCH (the device cannot run it). *none tells whether st was one of them
// (then SUCCESS is returned); any other failure is passed on for KVR_CUBLAS_RETURN_IF_ERROR.
cublasStatus_t NoAlgorithmIsResult(cublasStatus_t st, bool algo_check, bool* none) {
  *none = st == CUBLAS_STATUS_NOT_SUPPORTED ||
          (algo_check && (st == CUBLAS_STATUS_INVALID_VALUE || st == CUBLAS_STATUS_ARCH_MISMATCH));
  return *none ? CUBLAS_STATUS_SUCCESS : st;
}

// Split-K off: one CTA sums the whole K extent of each output element, nothing is reduced
// across CTAs.
absl::Status DisableSplitK(cublasLtMatmulAlgo_t* algo) {
  const int32_t splits = 1;
  const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
  KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulAlgoConfigSetAttribute(
      algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits)));
  KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulAlgoConfigSetAttribute(
      algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)));
  return absl::OkStatus();
}

// A cached cuBLASLt plan: owns its descriptors; holds the algorithm it runs and whether that
// is the (dtype, in, out, alignments)'s fixed one (batch-invariant) or a per-shape fallback.
class Plan {
 public:
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  Plan(Plan&& o) noexcept
      : op_(std::exchange(o.op_, nullptr)),
        a_(std::exchange(o.a_, nullptr)),
        b_(std::exchange(o.b_, nullptr)),
        d_(std::exchange(o.d_, nullptr)),
        algo_(o.algo_),
        invariant_(o.invariant_) {}
  ~Plan() {
    if (d_ != nullptr) (void)CublasLt().MatrixLayoutDestroy(d_);
    if (b_ != nullptr) (void)CublasLt().MatrixLayoutDestroy(b_);
    if (a_ != nullptr) (void)CublasLt().MatrixLayoutDestroy(a_);
    if (op_ != nullptr) (void)CublasLt().MatmulDescDestroy(op_);
  }

  struct Shape {
    DType wt;
    int64_t rows, in, out;
    uint32_t align_a, align_b, align_d;
  };

  // Creates the matmul descriptor and the A, B and D layouts of shape s.
  absl::Status Describe(const Shape& s) {
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA,
                                                                 &trans_a, sizeof(trans_a)));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB,
                                                                 &trans_b, sizeof(trans_b)));
    const cudaDataType_t ab = CudaType(s.wt);
    const auto in = static_cast<uint64_t>(s.in), out = static_cast<uint64_t>(s.out);
    const auto rows = static_cast<uint64_t>(s.rows);
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatrixLayoutCreate(&a_, ab, in, out, s.in));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatrixLayoutCreate(&b_, ab, in, rows, s.in));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatrixLayoutCreate(&d_, CUDA_R_32F, out, rows, s.out));
    return absl::OkStatus();
  }

  // Up to max_results of cuBLASLt's heuristic answers for this plan's shape (s, as described),
  // best first, within the workspace and for s's alignments: *results holds the usable ones
  // (possibly none).
  absl::Status Heuristic(cublasLtHandle_t handle, const Shape& s, size_t workspace_bytes,
                         int max_results,
                         std::vector<cublasLtMatmulHeuristicResult_t>* results) const {
    cublasLtMatmulPreference_t pref = nullptr;
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceCreate(&pref));
    results->assign(static_cast<size_t>(max_results), cublasLtMatmulHeuristicResult_t{});
    int found = 0;
    const absl::Status st =
        HeuristicWith(handle, pref, s, workspace_bytes, max_results, results->data(), &found);
    if (!st.ok()) {
      (void)CublasLt().MatmulPreferenceDestroy(pref);  // the first error is the one to report
      return st;
    }
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceDestroy(pref));
    results->resize(static_cast<size_t>(std::clamp(found, 0, max_results)));
    results->erase(std::remove_if(results->begin(), results->end(),
                                  [](const cublasLtMatmulHeuristicResult_t& r) {
                                    return r.state != CUBLAS_STATUS_SUCCESS;
                                  }),
                   results->end());
    return absl::OkStatus();
  }

  // *fits: algo runs this plan's shape on this device within workspace_bytes
  // (cublasLtMatmulAlgoCheck; the alignments are the key's, for which algo was chosen).
  absl::Status Check(cublasLtHandle_t handle, const cublasLtMatmulAlgo_t& algo,
                     size_t workspace_bytes, bool* fits) const {
    cublasLtMatmulHeuristicResult_t result{};
    bool rejected = false;
    KVR_CUBLAS_RETURN_IF_ERROR(
        NoAlgorithmIsResult(CublasLt().MatmulAlgoCheck(handle, op_, a_, b_, d_, d_, &algo, &result),
                            /*algo_check=*/true, &rejected));
    *fits = !rejected && result.workspaceSize <= workspace_bytes;
    return absl::OkStatus();
  }

  void Use(const cublasLtMatmulAlgo_t& algo, bool invariant) {
    algo_ = algo;
    invariant_ = invariant;
  }

  cublasLtMatmulDesc_t op() const { return op_; }
  cublasLtMatrixLayout_t a() const { return a_; }
  cublasLtMatrixLayout_t b() const { return b_; }
  cublasLtMatrixLayout_t d() const { return d_; }
  const cublasLtMatmulAlgo_t* algo() const { return &algo_; }
  bool invariant() const { return invariant_; }

 private:
  absl::Status HeuristicWith(cublasLtHandle_t handle, cublasLtMatmulPreference_t pref,
                             const Shape& s, size_t workspace_bytes, int max_results,
                             cublasLtMatmulHeuristicResult_t* results, int* found) const {
    const uint64_t ws = workspace_bytes;
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &s.align_a, sizeof(s.align_a)));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &s.align_b, sizeof(s.align_b)));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &s.align_d, sizeof(s.align_d)));
    KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().MatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &s.align_d, sizeof(s.align_d)));
    bool none = false;
    KVR_CUBLAS_RETURN_IF_ERROR(
        NoAlgorithmIsResult(CublasLt().MatmulAlgoGetHeuristic(handle, op_, a_, b_, d_, d_, pref,
                                                              max_results, results, found),
                            /*algo_check=*/false, &none));
    if (none) *found = 0;
    return absl::OkStatus();
  }

  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
  bool invariant_ = false;
};

// (dtype, in, out, alignment of w, converted x, y): what the fixed algorithm is chosen for.
using AlgoKey = std::tuple<int, int64_t, int64_t, uint32_t, uint32_t, uint32_t>;
// AlgoKey's fields plus rows (after dtype): one plan each.
using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, uint32_t, uint32_t, uint32_t>;

// The algorithm every rows of an AlgoKey runs, split-K off; found == false when none of the
// heuristic's candidates applied (every rows of that key then falls back).
struct FixedAlgo {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};

std::string ShapeName(const Plan::Shape& s, size_t workspace_bytes) {
  return absl::StrCat(DTypeName(s.wt), " rows ", s.rows, " in ", s.in, " out ", s.out,
                      " (alignments w ", s.align_a, ", x ", s.align_b, ", y ", s.align_d,
                      ", workspace ", workspace_bytes, " bytes)");
}

}  // namespace

struct Gemm::Impl {
  int device = 0;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  void* xconv = nullptr;  // x converted to the weight dtype
  size_t xconv_bytes = 0;
  std::map<AlgoKey, FixedAlgo> fixed;
  std::map<PlanKey, Plan> plans;
  size_t fallback_plans = 0;  // plans not running their key's fixed algorithm

  ~Impl() {
    plans.clear();
    if (handle != nullptr) (void)CublasLt().Destroy(handle);
    if (workspace != nullptr) (void)cudaFree(workspace);
    if (xconv != nullptr) (void)cudaFree(xconv);
  }

  // Makes xconv hold at least `bytes`. A buffer still in use by queued work is freed only
  // after the stream drains.
  absl::Status ReserveConversion(size_t bytes, cudaStream_t stream) {
    if (bytes <= xconv_bytes) return absl::OkStatus();
    const size_t grown = std::max(bytes, 2 * xconv_bytes);
    if (xconv != nullptr) {
      KVR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      KVR_CUDA_RETURN_IF_ERROR(cudaFree(xconv));
      xconv = nullptr;
      xconv_bytes = 0;
    }
    KVR_CUDA_RETURN_IF_ERROR(cudaMalloc(&xconv, grown));
    xconv_bytes = grown;
    return absl::OkStatus();
  }

  // The fixed algorithm of s's (dtype, in, out, alignments), chosen on first use: the first of
  // the heuristic's answers for kPlanningRows rows that, split-K off, passes AlgoCheck for
  // that shape within the workspace.
  absl::StatusOr<const FixedAlgo*> FixedAlgoFor(const Plan::Shape& s) {
    const AlgoKey key{static_cast<int>(s.wt), s.in, s.out, s.align_a, s.align_b, s.align_d};
    auto it = fixed.find(key);
    if (it != fixed.end()) return &it->second;
    Plan::Shape rep = s;
    rep.rows = Gemm::kPlanningRows;
    Plan probe;
    const absl::Status described = probe.Describe(rep);
    if (!described.ok()) return described;
    std::vector<cublasLtMatmulHeuristicResult_t> candidates;
    const absl::Status asked =
        probe.Heuristic(handle, rep, workspace_bytes, kHeuristicCandidates, &candidates);
    if (!asked.ok()) return asked;
    FixedAlgo f;
    for (const cublasLtMatmulHeuristicResult_t& c : candidates) {
      cublasLtMatmulAlgo_t algo = c.algo;
      const absl::Status configured = DisableSplitK(&algo);
      if (!configured.ok()) return configured;
      bool fits = false;
      const absl::Status checked = probe.Check(handle, algo, workspace_bytes, &fits);
      if (!checked.ok()) return checked;
      if (fits) {
        f.found = true;
        f.algo = algo;
        break;
      }
    }
    return &fixed.emplace(key, f).first->second;
  }

  // The plan of shape s: its key's fixed algorithm when that applies to s.rows, else (counted
  // in fallback_plans) the heuristic's answer for s itself.
  absl::StatusOr<const Plan*> PlanFor(const Plan::Shape& s) {
    const PlanKey key{static_cast<int>(s.wt), s.rows, s.in, s.out, s.align_a, s.align_b, s.align_d};
    auto it = plans.find(key);
    if (it != plans.end()) return &it->second;
    Plan plan;
    const absl::Status described = plan.Describe(s);
    if (!described.ok()) return described;
    absl::StatusOr<const FixedAlgo*> f = FixedAlgoFor(s);
    if (!f.ok()) return f.status();
    bool fits = false;
    if ((*f)->found) {
      const absl::Status checked = plan.Check(handle, (*f)->algo, workspace_bytes, &fits);
      if (!checked.ok()) return checked;
    }
    if (fits) {
      plan.Use((*f)->algo, /*invariant=*/true);
    } else {
      std::vector<cublasLtMatmulHeuristicResult_t> results;
      const absl::Status asked = plan.Heuristic(handle, s, workspace_bytes, 1, &results);
      if (!asked.ok()) return asked;
      if (results.empty()) {
        return absl::UnimplementedError(absl::StrCat(
            "cuda::Gemm: cuBLASLt offers no algorithm for ", ShapeName(s, workspace_bytes)));
      }
      plan.Use(results[0].algo, /*invariant=*/false);
    }
    const Plan* p = &plans.emplace(key, std::move(plan)).first->second;
    if (!p->invariant()) ++fallback_plans;
    return p;
  }
};

absl::Status ValidateGemmArgs(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                              int64_t out, const float* bias, const float* y) {
  if (rows < 0 || in < 0 || out < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::Gemm: negative size (rows ", rows, ", in ", in, ", out ", out, ")"));
  }
  if (wt != DType::kF32 && wt != DType::kF16 && wt != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::Gemm: weight dtype must be f32, f16 or bf16, got ", DTypeName(wt)));
  }
  if (rows == 0 || out == 0) return absl::OkStatus();
  if (y == nullptr || (in > 0 && (x == nullptr || w == nullptr))) {
    return absl::InvalidArgumentError("cuda::Gemm: null pointer");
  }
  if (!Aligned(y, 4) || (x != nullptr && !Aligned(x, 4)) ||
      (bias != nullptr && !Aligned(bias, 4)) || (w != nullptr && !Aligned(w, DTypeSize(wt)))) {
    return absl::InvalidArgumentError(
        "cuda::Gemm: x, y and bias must be 4-byte aligned, w aligned to its element size");
  }
  return absl::OkStatus();
}

Gemm::Gemm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Gemm::~Gemm() = default;

absl::StatusOr<std::unique_ptr<Gemm>> Gemm::Create(size_t workspace_bytes) {
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    return absl::UnavailableError(absl::StrCat("cuda::Gemm: no CUDA device (", why, ")"));
  }
  // cuBLASLt is loaded here, on first use, not linked (kernels/cuda/cublaslt_api.h).
  if (absl::StatusOr<const CublasLtApi*> lt = LoadCublasLt(); !lt.ok()) {
    return absl::Status(lt.status().code(), absl::StrCat("cuda::Gemm: ", lt.status().message()));
  }
  auto impl = std::make_unique<Impl>();
  KVR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&impl->device));
  KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().Create(&impl->handle));
  if (workspace_bytes > 0) {
    KVR_CUDA_RETURN_IF_ERROR(cudaMalloc(&impl->workspace, workspace_bytes));
  }
  impl->workspace_bytes = workspace_bytes;
  return std::unique_ptr<Gemm>(new Gemm(std::move(impl)));
}

size_t Gemm::num_plans() const { return impl_->plans.size(); }
size_t Gemm::num_fallback_plans() const { return impl_->fallback_plans; }

absl::Status Gemm::MatMul(const float* x, int64_t rows, int64_t in, const void* w, DType wt,
                          int64_t out, const float* bias, float* y, cudaStream_t stream) {
  const absl::Status valid = ValidateGemmArgs(x, rows, in, w, wt, out, bias, y);
  if (!valid.ok()) return valid;
  if (rows == 0 || out == 0) return absl::OkStatus();
  int device = -1;
  KVR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device != impl_->device) {
    return absl::FailedPreconditionError(absl::StrCat("cuda::Gemm: created on device ",
                                                      impl_->device, ", called with device ",
                                                      device, " current"));
  }
  if (in == 0) {  // an empty dot product is 0, then the bias
    KVR_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(y, 0, sizeof(float) * static_cast<size_t>(rows * out), stream));
    return bias != nullptr ? LaunchBias(y, rows, out, bias, stream) : absl::OkStatus();
  }

  const void* xb = x;
  if (wt != DType::kF32) {
    const int64_t n = rows * in;
    const absl::Status reserved = impl_->ReserveConversion(static_cast<size_t>(n) * 2, stream);
    if (!reserved.ok()) return reserved;
    if (wt == DType::kBF16) {
      GemmConvertXKernel<__nv_bfloat16><<<GridStrideBlocks(n), kThreads, 0, stream>>>(
          x, n, static_cast<__nv_bfloat16*>(impl_->xconv));
    } else {
      GemmConvertXKernel<__half>
          <<<GridStrideBlocks(n), kThreads, 0, stream>>>(x, n, static_cast<__half*>(impl_->xconv));
    }
    KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    xb = impl_->xconv;
  }

  const Plan::Shape shape{wt, rows, in, out, AlignmentOf(w), AlignmentOf(xb), AlignmentOf(y)};
  absl::StatusOr<const Plan*> plan = impl_->PlanFor(shape);
  if (!plan.ok()) return plan.status();
  const float alpha = 1.0f, beta = 0.0f;
  const Plan& p = **plan;
  KVR_CUBLAS_RETURN_IF_ERROR(CublasLt().Matmul(impl_->handle, p.op(), &alpha, w, p.a(), xb, p.b(),
                                               &beta, y, p.d(), y, p.d(), p.algo(),
                                               impl_->workspace, impl_->workspace_bytes, stream));
  if (bias != nullptr) return LaunchBias(y, rows, out, bias, stream);
  return absl::OkStatus();
}

}  // namespace kvrelay::kernels::cuda
