#include "commands.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cli {

// Placeholder until the command lands; it refuses to run rather than pretend.
void add_tokenize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "(not implemented yet)");
  cmd->callback([] { fail("'tokenize' is not implemented yet"); });
}

}  // namespace multipole::cli
