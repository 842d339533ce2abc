// ulsp: the command line (DESIGN.md, "Command line"). Subcommands arrive with the
// issues that build them; unknown ones are refused with a one-line error.
#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "ulsp/core/agent.h"
#include "ulsp/core/group.h"
#include "ulsp/core/isolated.h"
#include "ulsp/core/mount.h"
#include "ulsp/core/registry.h"
#include "ulsp/vfs/stack.h"
#include "version.h"

int main(int argc, char** argv) {
  CLI::App app{"ulsp: user-level server processes for file-system and network requests"};
  app.set_version_flag("--version", std::string("ulsp ") + ULSP_VERSION);
  app.require_subcommand(0, 1);

  ulsp::core::MountArgs mount;
  CLI::App* mount_cmd = app.add_subcommand("mount", "Mount a layer stack on a directory; returns once it is live");
  mount_cmd->add_option("--stack", mount.stack, "Layers, top first: e.g. trace:/tmp/t.jsonl,passthrough:/src");
  mount_cmd->add_flag("--isolated", mount.isolated, "Serve the stack in its own process (restarted if it dies)");
  mount_cmd->add_flag("-f,--foreground", mount.foreground, "Serve in this process, logging to stderr");
  mount_cmd->add_flag("-d,--debug", mount.debug, "Log every kernel request (implies -f)");
  mount_cmd->add_flag("-r,--read-only", mount.read_only,
                      "Mount read-only: every change is refused (EROFS) by the kernel; reads need fewer requests");
  mount_cmd->add_option("--timeout", mount.timeout, "Seconds the kernel caches entries and attributes")
      ->capture_default_str();
  mount_cmd->add_flag("!--no-kernel-passthrough", mount.kernel_passthrough,
                      "Serve every read and write in the stack (by default the kernel reads and writes files a "
                      "passthrough stack opened by itself)");
  mount_cmd->add_flag("!--no-io-uring", mount.io_uring,
                      "Read kernel requests from /dev/fuse only (by default they come through FUSE over io_uring, one "
                      "queue per CPU, when the kernel offers it: /sys/module/fuse/parameters/enable_uring)");
  mount_cmd->add_option("--log", mount.log_file, "Where a background server writes its log");
  mount_cmd->add_option("--remote", mount.remote, "ADDR:PORT/NAME: a stack exported by `ulsp agent serve` on another host");
  mount_cmd->add_option("--token-file", mount.token_file, "The agent's shared token");
  mount_cmd->add_option("--tls-cert", mount.tls_cert, "This side's certificate (PEM), for mutual TLS");
  mount_cmd->add_option("--tls-key", mount.tls_key, "This side's private key (PEM)");
  mount_cmd->add_option("--tls-ca", mount.tls_ca, "The CA that signed the agent's certificate (PEM)");
  mount_cmd->add_option("--tls-name", mount.tls_name,
                        "The DNS name the agent's certificate must carry (default: ADDR of --remote)");
  mount_cmd->add_option("--deadline", mount.deadline, "Seconds a request may wait for the agent to be connected")->capture_default_str();
  std::vector<std::string> mount_positional;
  mount_cmd->add_option("MOUNTPOINT", mount_positional, "[SOURCE] MOUNTPOINT")->required()->expected(1, 2);

  ulsp::core::AgentOptions agent;
  std::string agent_listen;
  std::vector<std::string> agent_exports;
  CLI::App* agent_cmd = app.add_subcommand("agent", "Translation agents: ports across the network");
  agent_cmd->require_subcommand(1);
  CLI::App* serve_agent_cmd = agent_cmd->add_subcommand("serve", "Export layer stacks to other hosts (foreground)");
  serve_agent_cmd->add_option("--listen", agent_listen, "ADDR:PORT to listen on")->required();
  serve_agent_cmd->add_option("--export", agent_exports, "NAME=SPEC, as many as wanted")->required();
  serve_agent_cmd->add_option("--token-file", agent.token_file, "A shared token clients must present");
  serve_agent_cmd->add_option("--tls-cert", agent.tls_cert, "The agent's certificate (PEM): mutual TLS");
  serve_agent_cmd->add_option("--tls-key", agent.tls_key, "The agent's private key (PEM)");
  serve_agent_cmd->add_option("--tls-ca", agent.tls_ca, "The CA clients' certificates must be signed by (PEM)");

  std::string umount_point;
  CLI::App* umount_cmd = app.add_subcommand("umount", "Unmount a ulsp mount");
  umount_cmd->add_option("MOUNTPOINT", umount_point)->required();
  bool umount_lazy = false;
  umount_cmd->add_flag("-l,--lazy", umount_lazy,
                       "If busy, detach it now; it is served until the last program using it lets go");

  ulsp::core::RunArgs run;
  CLI::App* run_cmd = app.add_subcommand("run", "Run a command in a process group behind ULSPs; exits with its status");
  run_cmd->add_option("--policy", run.policy, "The policy file (TOML)")->required();
  run_cmd->add_option("--group", run.group, "The policy's group (may be left out when it has one)");
  run_cmd->add_option("COMMAND", run.command, "-- COMMAND [ARG...]")->required();

  CLI::App* policy_cmd = app.add_subcommand("policy", "Policy files");
  policy_cmd->require_subcommand(1);
  std::string check_file;
  CLI::App* check_cmd = policy_cmd->add_subcommand("check", "Validate a policy file; runs nothing");
  check_cmd->add_option("FILE", check_file)->required();

  bool ps_json = false;
  CLI::App* ps_cmd = app.add_subcommand("ps", "Live groups, mounts, ULSPs and ports, with their counters");
  ps_cmd->add_flag("--json", ps_json, "As JSON");

  // The isolated server's entry (ulsp mount --isolated starts it): hidden from help.
  std::string serve_segment, serve_spec;
  int serve_fd = -1;
  CLI::App* serve_cmd = app.add_subcommand("__serve-vfs", "")->group("");
  serve_cmd->add_option("SEGMENT", serve_segment)->required();
  serve_cmd->add_option("SOCKET_FD", serve_fd)->required();
  serve_cmd->add_option("SPEC", serve_spec)->required();

  // What a command prints is its answer: one lost (a full disk, a closed pipe) is an
  // error, not a success with nothing said.
  auto printed = [](int status) {
    if (std::fflush(stdout) == 0 && !std::ferror(stdout)) return status;
    std::fprintf(stderr, "ulsp: cannot write to standard output: %s\n", std::strerror(errno));
    return status == 0 ? 1 : status;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return printed(app.exit(e));
  } catch (const CLI::ParseError& e) {
    // One line that names the subcommand. `ulsp run` exits 125 when ulsp itself
    // fails (docs/groups.md), so a caller can tell it from the command's status;
    // the others exit 2, as usage errors conventionally do.
    const CLI::App* sub = nullptr;
    for (const CLI::App* c : {mount_cmd, umount_cmd, run_cmd, agent_cmd, policy_cmd, ps_cmd})
      if (argc > 1 && c->get_name() == argv[1]) sub = c;
    const std::string who = sub != nullptr ? "ulsp " + sub->get_name() : "ulsp";
    std::fprintf(stderr, "%s: %s (see %s --help)\n", who.c_str(), e.what(), who.c_str());
    return sub == run_cmd ? 125 : 2;
  }
  if (serve_cmd->parsed()) return ulsp::core::ServeIsolated(serve_segment, serve_fd, serve_spec);
  if (mount_cmd->parsed()) {
    mount.mountpoint = mount_positional.back();
    if (mount_positional.size() == 2) mount.source = mount_positional.front();
    return ulsp::core::Mount(mount);
  }
  if (umount_cmd->parsed()) return ulsp::core::Umount(umount_point, umount_lazy);
  if (run_cmd->parsed()) return ulsp::core::Run(run);
  if (serve_agent_cmd->parsed()) {
    if (!ulsp::core::SplitHostPort(agent_listen, agent.listen_host, agent.listen_port, /*zero_port=*/true)) {
      std::fprintf(stderr, "ulsp agent: --listen '%s': give ADDR:PORT\n", agent_listen.c_str());
      return 1;
    }
    for (const std::string& e : agent_exports) {
      const size_t eq = e.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == e.size()) {
        std::fprintf(stderr, "ulsp agent: --export '%s': give NAME=SPEC\n", e.c_str());
        return 1;
      }
      auto spec = ulsp::vfs::AbsoluteStackSpec(e.substr(eq + 1));
      if (!spec) {
        std::fprintf(stderr, "ulsp agent: --export %s: %s\n", e.substr(0, eq).c_str(), spec.error().c_str());
        return 1;
      }
      if (!agent.exports.emplace(e.substr(0, eq), *spec).second) {  // once, the last one won without a word
        std::fprintf(stderr, "ulsp agent: --export %s: the name is given twice\n", e.substr(0, eq).c_str());
        return 1;
      }
    }
    return ulsp::core::ServeAgent(agent);
  }
  if (check_cmd->parsed()) return printed(ulsp::core::CheckPolicy(check_file));
  if (ps_cmd->parsed()) return printed(ulsp::core::Ps(ps_json));
  // No subcommand: a usage error (a script that forgot one must not see success).
  std::fputs(app.help().c_str(), stderr);
  return 2;
}
