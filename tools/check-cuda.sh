#!/usr/bin/env bash
# CUDA CI check. When nvcc exists: builds every CUDA target of a build directory, then
# compiles each .cu of that build once more with `ptxas -v` for sm_80 and sm_90 and prints
# every kernel's registers, shared memory, stack frame and spill stores / loads. Fails when
# the build fails, or when a hot kernel (name matching $KVRELAY_HOT_KERNELS, case-insensitive
# extended regex; default: attention, gemm epilogue, norms) spills or uses local memory
# (stack frame > 0). Without nvcc it prints a skip and exits 0.
#
# Usage: tools/check-cuda.sh [build-dir]     (default build-cuda)
#   A missing build dir is configured with -DKVRELAY_CUDA=ON; an existing one must have been
#   configured with the CUDA backend. JOBS (default 2) is the build parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build-cuda}
JOBS=${JOBS:-2}
HOT=${KVRELAY_HOT_KERNELS:-attention|attn|gemm|epilogue|norm}
ARCHS="80;90"
CUDA_TARGETS=(kvrelay_kernels_cuda cuda_parity_test)

nvcc=${CUDACXX:-}
if [[ -z "$nvcc" ]]; then nvcc=$(command -v nvcc || true); fi
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  echo "check-cuda: nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin): skipped"
  exit 0
fi

if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DKVRELAY_CUDA=ON >/dev/null
fi
if ! grep -q '^KVRELAY_HAVE_CUDA:INTERNAL=ON$' "$BUILD_DIR/CMakeCache.txt"; then
  if grep -qi '^KVRELAY_CUDA:STRING=OFF$' "$BUILD_DIR/CMakeCache.txt"; then
    echo "check-cuda: $BUILD_DIR is configured with KVRELAY_CUDA=OFF: skipped"
    exit 0
  fi
  # nvcc exists but KVRELAY_CUDA=AUTO did not enable the backend: a broken toolchain.
  echo "check-cuda: nvcc ($nvcc) exists but $BUILD_DIR was configured without the CUDA" \
    "backend (see the 'CUDA backend:' line of its cmake output)" >&2
  exit 1
fi

# 1. Build every CUDA target the build defines (tests/gpu only exists once it is wired in).
available=$(cmake --build "$BUILD_DIR" --target help 2>/dev/null || true)
targets=()
for t in "${CUDA_TARGETS[@]}"; do
  if grep -qE "(^|[ .])$t(:|$| )" <<<"$available"; then targets+=("$t"); fi
done
if ((${#targets[@]} == 0)); then
  echo "check-cuda: no CUDA target in $BUILD_DIR" >&2
  exit 1
fi
start=$SECONDS
cmake --build "$BUILD_DIR" -j"$JOBS" --target "${targets[@]}"
echo "check-cuda: built ${targets[*]} in $((SECONDS - start)) s"

# 2. Recompile each .cu with ptxas -v for every architecture in ARCHS (the build's own
#    flags otherwise, from compile_commands.json; objects go to a scratch dir).
db="$BUILD_DIR/compile_commands.json"
if [[ ! -f "$db" ]]; then
  echo "check-cuda: $db missing (CMAKE_EXPORT_COMPILE_COMMANDS is on in CMakeLists.txt)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/ptxas.cmake" <<'EOF'
file(READ "${DB}" json)
string(JSON count LENGTH "${json}")
set(compiled 0)
if(count GREATER 0)
  math(EXPR last "${count} - 1")
  foreach(i RANGE ${last})
    string(JSON file GET "${json}" ${i} file)
    if(NOT file MATCHES "\\.cu$")
      continue()
    endif()
    string(JSON dir GET "${json}" ${i} directory)
    string(JSON cmd GET "${json}" ${i} command)
    separate_arguments(args UNIX_COMMAND "${cmd}")
    set(new "")
    set(skip_next FALSE)
    foreach(a IN LISTS args)
      if(skip_next)
        set(skip_next FALSE)
      elseif(a MATCHES "^(-o|-gencode|--generate-code|-arch|--gpu-architecture|-code|--gpu-code)$")
        set(skip_next TRUE)  # the flag's value is the next argument
      elseif(NOT a MATCHES "^(-gencode|--generate-code|-arch|--gpu-architecture|-code|--gpu-code)=")
        list(APPEND new "${a}")
      endif()
    endforeach()
    foreach(arch IN LISTS ARCHS)
      list(APPEND new "--generate-code=arch=compute_${arch},code=sm_${arch}")
    endforeach()
    list(APPEND new -Xptxas=-v -o "${OUT}/${i}.o")
    execute_process(COMMAND ${new} WORKING_DIRECTORY "${dir}" RESULT_VARIABLE rc
                    OUTPUT_VARIABLE out ERROR_VARIABLE err)
    file(APPEND "${OUT}/ptxas.log" "${out}${err}")
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "check-cuda: recompiling ${file} failed:\n${out}${err}")
    endif()
    math(EXPR compiled "${compiled} + 1")
  endforeach()
endif()
message(STATUS "${compiled}")
EOF
start=$SECONDS
compiled=$(cmake -DDB="$db" -DOUT="$tmp" -DARCHS="$ARCHS" -P "$tmp/ptxas.cmake" | sed -n 's/^-- //p')
echo "check-cuda: ptxas -v over $compiled CUDA source(s) for sm_${ARCHS//;/, sm_} in $((SECONDS - start)) s"
if [[ "$compiled" == "0" || ! -s "$tmp/ptxas.log" ]]; then
  echo "check-cuda: no CUDA source in $db" >&2
  exit 1
fi

# 3. One row per (kernel, arch). Stack frames and spills of non-inlined callees are charged
#    to the entry function being compiled (conservative).
awk '
  function flush() {
    if (fn != "") print arch, regs, smem, stack, sst, sld, lmem, fn
    fn = ""
  }
  /Compiling entry function/ {
    flush()
    split($0, q, sprintf("%c", 39)); fn = q[2]; arch = q[4]
    regs = smem = stack = sst = sld = lmem = 0
    next
  }
  fn != "" && /bytes stack frame/ {
    for (i = 1; i <= NF; ++i) {
      if ($(i + 1) == "bytes" && $(i + 2) == "stack") stack = ($i > stack ? $i : stack)
      if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) ~ /^stores/) sst += $i
      if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) ~ /^loads/) sld += $i
    }
  }
  fn != "" && /Used [0-9]+ registers/ {
    for (i = 1; i <= NF; ++i) {
      if ($i == "Used") regs = $(i + 1)
      if ($(i + 1) == "bytes" && $(i + 2) ~ /^smem/) smem = $i
      if ($(i + 1) == "bytes" && $(i + 2) ~ /^lmem/) lmem = $i
    }
  }
  END { flush() }
' "$tmp/ptxas.log" | sort -u -k1,1 -k8,8 >"$tmp/rows"

printf '%-6s %5s %6s %6s %9s %9s %5s  %s\n' arch regs smem stack spill_st spill_ld lmem kernel
fail=0
while read -r arch regs smem stack sst sld lmem mangled; do
  name=$(c++filt "$mangled" 2>/dev/null || echo "$mangled")
  name=${name//kvrelay::kernels::cuda::/}
  name=${name//(anonymous namespace)::/}
  mark=""
  if grep -qiE "$HOT" <<<"$name"; then
    mark=" [hot]"
    if ((sst > 0 || sld > 0 || stack > 0 || lmem > 0)); then
      mark=" [hot] SPILLS / LOCAL MEMORY"
      fail=1
    fi
  fi
  printf '%-6s %5s %6s %6s %9s %9s %5s  %s%s\n' "$arch" "$regs" "$smem" "$stack" "$sst" "$sld" \
    "$lmem" "$name" "$mark"
done <"$tmp/rows"
if ((fail)); then
  echo "check-cuda: FAILED: a hot kernel (matching '$HOT') spills or uses local memory" >&2
  exit 1
fi
echo "check-cuda: OK ($(wc -l <"$tmp/rows") kernel/arch entries; no hot kernel spills)"
