// The per-ISA inner-loop tables (internal to kernels/).
#pragma once

#include <type_traits>

#include "kernels/ops.h"

namespace kvrelay::kernels::cpu {

extern const KernelTable kScalarTable;
// Defined only when the compiler can target AVX2 (x86-64); use only if the CPU has it.
extern const KernelTable kAvx2Table;
extern const bool kHaveAvx2Table;

// Calls f(std::integral_constant<DType, t>{}) so inner loops can be templates on the
// element type: WithDType(t, [&](auto T) { return Loop<decltype(T)::value>(...); }).
template <typename F>
inline auto WithDType(DType t, F&& f) {
  switch (t) {
    case DType::kF16:
      return f(std::integral_constant<DType, DType::kF16>{});
    case DType::kBF16:
      return f(std::integral_constant<DType, DType::kBF16>{});
    case DType::kI8:
      return f(std::integral_constant<DType, DType::kI8>{});
    case DType::kF32:
      break;
  }
  return f(std::integral_constant<DType, DType::kF32>{});
}

}  // namespace kvrelay::kernels::cpu
