#pragma once
// Slots of a kernel's phase-clock buffer (PhaseClock in common.cuh), shared with the host
// code that reads them back (bench.cpp): [kPhaseClockSlots] u64, phases from slot 0.
namespace multipole::cuda::detail {
constexpr int kPhaseClockSlots = 32, kPhaseClockNs = 30, kPhaseClockCtas = 31;
}  // namespace multipole::cuda::detail
