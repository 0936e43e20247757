#pragma once
// A one-line progress display on stderr: units done of the total, elapsed time and an ETA
// from the rate so far, and what is running now. On a terminal the line is redrawn in place
// (at most 4 times a second); otherwise a full line is printed at most every 10 seconds. The
// ETA is the rate since the first unit done times the units left.
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace multipole::eval {

class Progress {
 public:
  using Clock = std::chrono::steady_clock;
  // enabled = false: silent. Units are whatever the caller counts (decoded tokens, cases).
  // `now` is the clock (tests pass a fake one).
  Progress(std::string label, int64_t total, bool enabled, std::function<Clock::time_point()> now = Clock::now);
  // Draws the final line, unless an exception is leaving the scope: then a "done" line would
  // be wrong, so a terminal's line is only ended where it stopped.
  ~Progress();
  void add_total(int64_t units) { total_ += units; }
  // Marks `units` more as done and shows `what` as the current work.
  void advance(int64_t units, std::string_view what = {});
  void skip(int64_t units) { skipped_ += units, done_ += units; }  // resumed work: not in the rate
  void finish();  // final line (and newline on a terminal)

  // "label 12/40 (30%) | 1m05s elapsed, ETA 2m31s | what"; testable.
  std::string line() const;
  static std::string format_duration(double seconds);  // "45s", "3m07s", "2h05m"

 private:
  void draw(bool force);
  std::string label_;
  int64_t total_ = 0, done_ = 0, skipped_ = 0;
  bool enabled_, tty_;
  bool finished_ = false, drawn_ = false;
  int uncaught_ = 0;  // std::uncaught_exceptions() at construction
  std::string what_;
  std::function<Clock::time_point()> now_;
  Clock::time_point start_, last_draw_;
  // The rate is measured from the first unit done, so that set-up before it (a long prefill)
  // does not inflate the ETA of the units after it.
  Clock::time_point first_unit_time_;
  int64_t first_unit_worked_ = -1;
};

}  // namespace multipole::eval
