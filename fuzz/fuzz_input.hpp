#pragma once
// The parsers read files (they mmap them), so each fuzz input is written to an in-memory
// file (memfd) and handed to them by its /proc/self/fd path: no disk traffic per input.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace multipole::fuzz {

// Rewrites the one memfd of this process with `data` and returns its path.
inline const std::string& as_file(const uint8_t* data, size_t size) {
  static const int fd = [] {
    const int f = memfd_create("multipole-fuzz", 0);
    if (f < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    return f;
  }();
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    const ssize_t n = pwrite(fd, data + done, size - done, off_t(done));
    if (n <= 0) std::abort();
    done += size_t(n);
  }
  return path;
}

}  // namespace multipole::fuzz
