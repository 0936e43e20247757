#pragma once
// Slots of a kernel's phase-clock buffer (PhaseClock in common.cuh), shared with the host
// code that reads them back (bench.cpp): [kPhaseClockSlots] u64, phases from slot 0.
namespace multipole::cuda::detail {
constexpr int kPhaseClockSlots = 32, kPhaseClockNs = 30, kPhaseClockCtas = 31;
// The fused select_attend_kernel (select_attend.cuh) in the selection's slots: globaltimer ns
// of thread 0 of the leader (selection, waits at the two cluster barriers, merge) and of
// worker 1 (start to the first barrier, attention), and its launches.
enum : int {
  kProfFusedLaunches = 19, kProfFusedWorkerWait = 23, kProfFusedSelect = 25, kProfFusedSync1 = 26,
  kProfFusedAttend = 27, kProfFusedSync2 = 28, kProfFusedMerge = 29
};
}  // namespace multipole::cuda::detail
