// The per-ISA inner-loop tables (internal to kernels/).
#pragma once

#include "kernels/ops.h"

namespace kvrelay::kernels::cpu {

extern const KernelTable kScalarTable;
// Defined only when the compiler can target AVX2 (x86-64); use only if the CPU has it.
extern const KernelTable kAvx2Table;
extern const bool kHaveAvx2Table;

}  // namespace kvrelay::kernels::cpu
