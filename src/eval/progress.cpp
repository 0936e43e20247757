#include "multipole/eval/progress.hpp"

#include <cmath>
#include <cstdio>
#include <exception>

#include <fmt/format.h>
#include <unistd.h>

namespace multipole::eval {

Progress::Progress(std::string label, int64_t total, bool enabled, std::function<Clock::time_point()> now)
    : label_(std::move(label)), total_(total), enabled_(enabled), tty_(isatty(2) != 0),
      uncaught_(std::uncaught_exceptions()), now_(std::move(now)) {
  start_ = now_();
  last_draw_ = start_ - std::chrono::hours(1);
}

Progress::~Progress() {
  if (finished_) return;
  if (std::uncaught_exceptions() == uncaught_) {
    finish();
  } else if (tty_ && drawn_) {
    std::fputc('\n', stderr);
  }
}

std::string Progress::format_duration(double s) {
  if (!std::isfinite(s) || s < 0 || s > 1e9) return "?";
  const int64_t t = int64_t(std::llround(s));
  if (t < 60) return fmt::format("{}s", t);
  if (t < 3600) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
}

std::string Progress::line() const {
  const auto now = now_();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const int64_t worked = done_ - skipped_;
  const int64_t left = total_ - done_;
  std::string eta = "ETA ?";
  if (left <= 0) {
    eta = "done";
  } else if (first_unit_worked_ >= 0 && worked > first_unit_worked_) {
    const double since = std::chrono::duration<double>(now - first_unit_time_).count();
    eta = "ETA " + format_duration(since / double(worked - first_unit_worked_) * double(left));
  } else if (worked > 0 && elapsed > 0) {
    eta = "ETA " + format_duration(elapsed / double(worked) * double(left));  // one unit so far
  }
  const double pct = total_ > 0 ? 100.0 * double(done_) / double(total_) : 100.0;
  std::string s = fmt::format("{} {}/{} ({:.0f}%) | {} elapsed, {}", label_, done_, total_, pct,
                              format_duration(elapsed), eta);
  if (!what_.empty()) s += " | " + what_;
  return s;
}

void Progress::draw(bool force) {
  if (!enabled_) return;
  const auto now = now_();
  if (!force && now - last_draw_ < (tty_ ? std::chrono::milliseconds(250) : std::chrono::milliseconds(10000))) return;
  last_draw_ = now;
  drawn_ = true;
  const std::string s = line();
  if (tty_)
    std::fprintf(stderr, "\r\033[K%s", s.c_str());
  else
    std::fprintf(stderr, "%s\n", s.c_str());
  std::fflush(stderr);
}

void Progress::advance(int64_t units, std::string_view what) {
  done_ += units;
  if (units > 0 && first_unit_worked_ < 0) {
    first_unit_time_ = now_();
    first_unit_worked_ = done_ - skipped_;
  }
  if (!what.empty()) what_ = std::string(what);
  draw(false);
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  what_.clear();
  draw(true);
  if (enabled_ && tty_) std::fputc('\n', stderr);
}

}  // namespace multipole::eval
