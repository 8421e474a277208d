// safetensors header parsing (issue 17): the input is a whole .safetensors file, held
// in memory (memfd) and opened as a file; whatever Open accepts is read tensor by tensor.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "common/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = ::memfd_create("fuzz.safetensors", 0);
  if (fd < 0) return 0;
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  auto f = kvrelay::model::SafetensorsFile::Open("/proc/self/fd/" + std::to_string(fd));
  if (f.ok()) {
    uint64_t sum = 0;
    for (const auto& [name, info] : (*f)->tensors()) {
      sum += name.size() + info.shape.size();
      if (info.nbytes > 0) {  // the first and last byte: inside the mapping (ASan checks)
        const auto* p = static_cast<const uint8_t*>(info.data);
        sum += p[0] + p[info.nbytes - 1];
      }
    }
    for (const auto& [k, v] : (*f)->metadata()) sum += k.size() + v.size();
    if (sum == 0xffffffffffffffffull) ::abort();  // keep the loop
  }
  ::close(fd);
  return 0;
}
