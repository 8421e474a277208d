// Grid shapes shared by the element-wise and row-wise kernels of kernels/cuda/ (activations,
// embedding, GEMM epilogues, rows): 256-thread blocks over a grid-stride loop, and a 2-D grid
// of columns x rows. Host-side only; includable from .cu and .cc files.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace kvrelay::kernels::cuda {

// Threads per block of the element-wise kernels (their __launch_bounds__).
inline constexpr int kElementThreads = 256;
// Cap on the blocks of a grid-stride loop (more would only add loop-free blocks); also the
// hardware limit of gridDim.y and gridDim.z.
inline constexpr int64_t kMaxGridBlocks = 65535;

// Blocks of kElementThreads covering n elements in a grid-stride loop: ceil(n / 256), capped.
inline unsigned GridStrideBlocks(int64_t n) {
  return static_cast<unsigned>(
      std::min((n + kElementThreads - 1) / kElementThreads, kMaxGridBlocks));
}

// grid.x: GridStrideBlocks(cols) over a row's columns; grid.y: rows, striding by gridDim.y
// beyond kMaxGridBlocks.
inline dim3 RowColumnGrid(int64_t rows, int64_t cols) {
  return dim3(GridStrideBlocks(cols), static_cast<unsigned>(std::min(rows, kMaxGridBlocks)));
}

}  // namespace kvrelay::kernels::cuda
