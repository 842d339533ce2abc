// `ulsp mount` and `ulsp umount`: mount a layer stack on a directory through the
// FUSE shim, and take it away again.
#pragma once

#include <string>
#include <vector>

namespace ulsp::core {

struct MountArgs {
  std::string mountpoint;
  std::string stack;        // SPEC; empty when `source` is given
  std::string source;       // a directory: short for --stack passthrough:SOURCE
  bool isolated = false;    // serve the stack in its own process
  bool foreground = false;  // serve in this process until unmounted or signalled
  bool debug = false;       // libfuse's request log (implies foreground)
  bool read_only = false;   // mounted read-only (FuseShim::Options)
  double timeout = 1.0;     // entry and attribute cache, seconds
  bool kernel_passthrough = true;  // the kernel reads and writes files the stack lets
                                   // it on their descriptors (FuseShim::Options)
  bool io_uring = true;     // requests through FUSE over io_uring when the kernel
                            // offers it (FuseShim::Options)
  std::string log_file;     // where a background server writes its log
  // --remote ADDR:PORT/NAME: the stack is served by a translation agent (agent.h).
  std::string remote;
  std::string token_file;                 // its shared token, if it wants one
  std::string tls_cert, tls_key, tls_ca;  // mutual TLS (files)
  std::string tls_name;                   // the name the agent's certificate must carry
                                          // (default: the ADDR of --remote)
  double deadline = 10.0;                 // seconds a request waits for the agent
};

// Mounts; returns once the mount is live (or, in the foreground, once it is gone).
// Prints a one-line error naming what was wrong and returns 1; nothing is left
// mounted then.
int Mount(const MountArgs& args);

// Unmounts a ulsp mount; the server exits once the kernel lets go. A busy mount (a
// program has a file or its directory there) is refused, or with `lazy` detached: gone
// from the tree at once, served until the last program using it lets go (MNT_DETACH).
// Returns 0 or prints a one-line error and returns 1.
int Umount(const std::string& mountpoint, bool lazy = false);

// Whether `path` (absolute, resolved) is a mount point, and its file-system type.
bool IsMountPoint(const std::string& path, std::string* fstype = nullptr);

// One line of /proc/self/mountinfo, unescaped.
struct MountEntry {
  std::string root;   // the directory of its file system mounted there
  std::string point;  // where
  std::string fstype;
  std::vector<std::string> super_options;  // the super block's, split at commas
};
// This process's mounts, in /proc/self/mountinfo's order (a later one on top).
std::vector<MountEntry> Mounts();

}  // namespace ulsp::core
