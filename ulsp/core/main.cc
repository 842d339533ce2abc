// ulsp: the command line (DESIGN.md, "Command line"). Subcommands arrive with the
// issues that build them; this one parses, prints help and version, and refuses what
// it does not know with a one-line error.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "version.h"

int main(int argc, char** argv) {
  CLI::App app{"ulsp: user-level server processes for file-system and network requests"};
  app.set_version_flag("--version", std::string("ulsp ") + ULSP_VERSION);
  app.require_subcommand(0, 1);
  app.footer(
      "Subcommands (mount, umount, run, policy, agent, ps) arrive as they are built; see README.md.\n"
      "The message-port benchmark: ulsp-msgport-bench (bench/).");
  CLI11_PARSE(app, argc, argv);
  if (app.get_subcommands().empty()) {
    std::fputs(app.help().c_str(), stdout);
  }
  return 0;
}
