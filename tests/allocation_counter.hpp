#pragma once
// Counts heap allocations (operator new) while `counting` is set, for the checks that a warm
// step does not allocate. ASan owns operator new, so there the counter is off and
// MULTIPOLE_COUNT_ALLOCATIONS is left undefined. The replacements themselves are defined in
// the one file per test binary that defines MULTIPOLE_DEFINE_ALLOCATION_COUNTER before
// including this header.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace multipole::test {
inline std::atomic<bool> counting{false};
inline std::atomic<int64_t> allocations{0};
}  // namespace multipole::test

#if !defined(__SANITIZE_ADDRESS__)
#define MULTIPOLE_COUNT_ALLOCATIONS 1
#ifdef MULTIPOLE_DEFINE_ALLOCATION_COUNTER
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"  // the replacements pair malloc with free
void* operator new(size_t n) {
  if (multipole::test::counting.load(std::memory_order_relaxed))
    multipole::test::allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
#endif
#endif
