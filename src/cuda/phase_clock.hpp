#pragma once
// Slots of a kernel's phase-clock buffer (PhaseClock in common.cuh), shared with the host
// code that reads them back (bench.cpp): [kPhaseClockSlots] u64, phases from slot 0.
namespace multipole::cuda::detail {
constexpr int kPhaseClockSlots = 32, kPhaseClockNs = 30, kPhaseClockCtas = 31;
// A launch's span (PhaseClock::record_span, in the first CTA's slots, globaltimer ns): the
// earliest CTA start and end (the caller sets them to ~0 first), the latest start and end (to 0).
constexpr int kSpanFirstStart = 26, kSpanFirstEnd = 27, kSpanLastStart = 28, kSpanLastEnd = 29;
// record_span also puts each CTA's SM, start and end in its own slots (the last launch's).
constexpr int kCtaSm = 23, kCtaStart = 24, kCtaEnd = 25;
}  // namespace multipole::cuda::detail
