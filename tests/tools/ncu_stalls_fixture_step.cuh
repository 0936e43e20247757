// A kernel's source as scripts/ncu-stalls-by-phase.py reads it: its pc.mark(k) lines (tests/CMakeLists.txt).
void kernel() {
  load();
  pc.mark(0);
  score();
  pc.mark(1);
  wait();
  pc.mark(2);
}
