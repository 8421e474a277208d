// Non-x86 builds: there is no AVX2 table; IsaSupported(kAvx2) is false.
#include "kernels/cpu/kernel_tables.h"

namespace kvrelay::kernels::cpu {
const KernelTable kAvx2Table = kScalarTable;
const bool kHaveAvx2Table = false;
}  // namespace kvrelay::kernels::cpu
