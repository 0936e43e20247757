#pragma once
// Running the `multipole` CLI from tests: one command line through the shell, stdin from a
// string, stdout and stderr captured to files in a scratch folder.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace multipole::test {

struct CliResult {
  int code = -1;  // exit code; -1 when killed by a signal (the shell reports signal n as 128 + n)
  std::string out, err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// `s` as one single-quoted shell word.
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs `ENV multipole ARGS` (env e.g. "PATH=/x ") with `input` on stdin; the streams go
// through files in `scratch`.
inline CliResult run_cli(const std::string& scratch, const std::string& args, const std::string& input = "",
                         const std::string& env = "") {
  const std::string in = scratch + "/cli.in", out = scratch + "/cli.out", err = scratch + "/cli.err";
  std::ofstream(in, std::ios::binary) << input;
  const std::string cmd =
      env + std::string(MULTIPOLE_CLI_PATH) + " " + args + " <" + in + " >" + out + " 2>" + err;
  const int status = std::system(cmd.c_str());
  CliResult r;
  if (WIFEXITED(status) && WEXITSTATUS(status) < 128) r.code = WEXITSTATUS(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

}  // namespace multipole::test
