#pragma once
// Slots of a kernel's phase-clock buffer (PhaseClock in common.cuh), shared with the host
// code that reads them back (bench.cpp): [kPhaseClockSlots] u64, phases from slot 0.
namespace multipole::cuda::detail {
constexpr int kPhaseClockSlots = 40, kPhaseClockNs = 38, kPhaseClockCtas = 39;
// A launch's span (PhaseClock::record_span, in the first CTA's slots, globaltimer ns): the
// earliest CTA start and end (the caller sets them to ~0 first), the latest start and end (to 0).
constexpr int kSpanFirstStart = 34, kSpanFirstEnd = 35, kSpanLastStart = 36, kSpanLastEnd = 37;
// record_span also puts each CTA's SM, start and end in its own slots (the last launch's).
constexpr int kCtaSm = 31, kCtaStart = 32, kCtaEnd = 33;
}  // namespace multipole::cuda::detail
