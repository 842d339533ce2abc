// ulsp: the command line (DESIGN.md, "Command line"). Subcommands arrive with the
// issues that build them; unknown ones are refused with a one-line error.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "ulsp/core/isolated.h"
#include "ulsp/core/mount.h"
#include "version.h"

int main(int argc, char** argv) {
  CLI::App app{"ulsp: user-level server processes for file-system and network requests"};
  app.set_version_flag("--version", std::string("ulsp ") + ULSP_VERSION);
  app.require_subcommand(0, 1);
  app.footer("Subcommands still to come: run, policy, agent, ps (see README.md).");

  ulsp::core::MountArgs mount;
  CLI::App* mount_cmd = app.add_subcommand("mount", "Mount a layer stack on a directory; returns once it is live");
  mount_cmd->add_option("--stack", mount.stack, "Layers, top first: e.g. trace:/tmp/t.jsonl,passthrough:/src");
  mount_cmd->add_flag("--isolated", mount.isolated, "Serve the stack in its own process (restarted if it dies)");
  mount_cmd->add_flag("-f,--foreground", mount.foreground, "Serve in this process, logging to stderr");
  mount_cmd->add_flag("-d,--debug", mount.debug, "Log every kernel request (implies -f)");
  mount_cmd->add_option("--timeout", mount.timeout, "Seconds the kernel caches entries and attributes")
      ->capture_default_str();
  mount_cmd->add_option("--log", mount.log_file, "Where a background server writes its log");
  std::vector<std::string> mount_positional;
  mount_cmd->add_option("args", mount_positional, "[SOURCE] MOUNTPOINT")->required()->expected(1, 2);

  std::string umount_point;
  CLI::App* umount_cmd = app.add_subcommand("umount", "Unmount a ulsp mount");
  umount_cmd->add_option("MOUNTPOINT", umount_point)->required();

  // The isolated server's entry (ulsp mount --isolated starts it): hidden from help.
  std::string serve_segment, serve_spec;
  int serve_fd = -1;
  CLI::App* serve_cmd = app.add_subcommand("__serve-vfs", "")->group("");
  serve_cmd->add_option("SEGMENT", serve_segment)->required();
  serve_cmd->add_option("SOCKET_FD", serve_fd)->required();
  serve_cmd->add_option("SPEC", serve_spec)->required();

  CLI11_PARSE(app, argc, argv);
  if (serve_cmd->parsed()) return ulsp::core::ServeIsolated(serve_segment, serve_fd, serve_spec);
  if (mount_cmd->parsed()) {
    mount.mountpoint = mount_positional.back();
    if (mount_positional.size() == 2) mount.source = mount_positional.front();
    return ulsp::core::Mount(mount);
  }
  if (umount_cmd->parsed()) return ulsp::core::Umount(umount_point);
  std::fputs(app.help().c_str(), stdout);
  return 0;
}
