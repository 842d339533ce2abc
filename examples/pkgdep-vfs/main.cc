// pkgdep-vfs: does a command need only what its package declares?
//
//   pkgdep-vfs check (--package NAME | --deps PKG,PKG...) [--mode observe|enforce]
//                    [--confirm] [--json FILE] [--allow-unowned FILE] -- COMMAND [ARG...]
//
// Runs COMMAND in an ulsp process group whose root is a layer stack over the real
// root — record (which remembers every access), then, in enforce mode, a view that
// hides every file owned only by undeclared packages, then passthrough:/ — and
// reports what it touched that the package does not declare. See README.md.
//
// Exit status: 0 nothing undeclared, 1 undeclared dependencies found, 2 a usage or
// environment error (with a message that says which).
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <regex>
#include <sstream>
#include <thread>

#include "examples/pkgdep-vfs/dpkg_index.h"
#include "examples/pkgdep-vfs/record_layer.h"
#include "examples/pkgdep-vfs/report.h"
#include "kernel/msgport/own_file.h"
#include "ulsp/core/group.h"
#include "ulsp/vfs/overlay.h"
#include "ulsp/vfs/passthrough.h"
#include "ulsp/vfs/view.h"

namespace pkgdep {
namespace {

constexpr int kUsage = 2;
// The file index between runs (DpkgIndex::LoadFiles says when it is used).
constexpr const char* kIndexCache = "/var/cache/pkgdep-vfs/file-index";

int Fail(const std::string& message) {
  std::fprintf(stderr, "pkgdep-vfs: %s\n", message.c_str());
  return kUsage;
}

// Where a command name leads, as a shell would look for it; "" when nowhere.
std::string Which(const std::string& command) {
  if (command.find('/') != std::string::npos) return ::access(command.c_str(), X_OK) == 0 ? command : "";
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + command;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// Standard output and error of a run, kept in files while it runs.
class Capture {
 public:
  Capture() {
    char out[] = "/tmp/pkgdep-vfs.out.XXXXXX", err[] = "/tmp/pkgdep-vfs.err.XXXXXX";
    out_fd_ = ::mkstemp(out);
    err_fd_ = ::mkstemp(err);
    ::unlink(out);
    ::unlink(err);
    saved_out_ = ::dup(1);
    saved_err_ = ::dup(2);
    std::fflush(stdout);
    std::fflush(stderr);
    ::dup2(out_fd_, 1);
    ::dup2(err_fd_, 2);
  }
  ~Capture() { Restore(); }
  // Puts the real standard output and error back; returns what the run wrote.
  std::pair<std::string, std::string> Restore() {
    if (saved_out_ < 0) return {out_, err_};
    std::fflush(stdout);
    std::fflush(stderr);
    ::dup2(saved_out_, 1);
    ::dup2(saved_err_, 2);
    ::close(saved_out_);
    ::close(saved_err_);
    saved_out_ = saved_err_ = -1;
    out_ = ReadAll(out_fd_);
    err_ = ReadAll(err_fd_);
    return {out_, err_};
  }

 private:
  static std::string ReadAll(int fd) {
    std::string s;
    ::lseek(fd, 0, SEEK_SET);
    char buf[65536];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) s.append(buf, static_cast<size_t>(n));
    ::close(fd);
    return s;
  }
  int out_fd_ = -1, err_fd_ = -1, saved_out_ = -1, saved_err_ = -1;
  std::string out_, err_;
};

struct Run {
  int status = 0;
  bool ulsp_failed = false;  // the group was not made, or its command not started (status 125)
  int interrupted_by = 0;    // a signal asking pkgdep-vfs to stop came during the run
  std::string out, err;
  std::map<std::string, Touch> record;
  std::map<std::string, Unlisted> unlisted;  // enforce: what listings left out, by directory
  double seconds = 0;
};

// A directory for a run's scratch layer, removed with what the run wrote in it.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = "/var/tmp/pkgdep-vfs.XXXXXX";
    if (::mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }  // "" when it could not be made

 private:
  std::string path_;
};

// --confirm runs the command more than once, and every run must read what the first
// one read. Standard input from a pipe or a socket is therefore kept whole before the
// first run, in an unnamed file in /var/tmp that becomes standard input (read from its
// start by every run). A regular file is rewound to where it stood. A terminal or
// another device is left as it is: each run reads from it what comes.
class KeptStdin {
 public:
  static constexpr off_t kMax = off_t{1} << 30;  // 1 GiB: an endless producer ends here

  // "" once kept (or when there is nothing to keep), else what went wrong.
  std::string Keep() {
    struct stat st {};
    if (::fstat(0, &st) != 0) return "";  // no standard input
    if (S_ISREG(st.st_mode)) {
      start_ = ::lseek(0, 0, SEEK_CUR);
      return "";
    }
    if (!S_ISFIFO(st.st_mode) && !S_ISSOCK(st.st_mode)) return "";
    const int fd = ::open("/var/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) return std::string("cannot keep standard input in /var/tmp for --confirm: ") + std::strerror(errno);
    ulsp::UniqueFd file(fd);
    char buf[65536];
    off_t kept = 0;
    for (;;) {
      auto n = ulsp::Sys([&] { return ::read(0, buf, sizeof buf); });
      if (!n) return "reading standard input to keep it for --confirm: " + n.error().Describe();
      if (*n == 0) break;
      if ((kept += *n) > kMax)
        return "standard input goes on past 1 GiB: --confirm gives every run the same input and keeps it for them "
               "(feed it from a file, or leave --confirm out)";
      if (auto w = ulsp::WriteAll(file.get(), {buf, static_cast<size_t>(*n)}); !w)
        return "cannot keep standard input in /var/tmp for --confirm: " + w.error().Describe();
    }
    if (::dup2(file.get(), 0) < 0) return std::string("standard input: ") + std::strerror(errno);
    start_ = 0;
    Rewind();
    return "";
  }
  // Before each run: standard input from where the first run began.
  void Rewind() const {
    if (start_ >= 0) ::lseek(0, start_, SEEK_SET);
  }

 private:
  off_t start_ = -1;  // where each run starts reading; -1: left as it is
};

// Runs the command once in a group rooted at record[,view(hide)][,overlay],passthrough:/.
// `hide` (may be empty) says which paths do not exist. `scratch`: what the command
// writes goes to an overlay's upper directory, removed after the run, so that runs
// compared with each other start from the same files. `started` (may be empty) is
// called once the group's processes are made. Fails (125) when ulsp could not make
// the group; it said why on stderr.
Run RunOnce(const std::vector<std::string>& command, std::function<bool(std::string_view)> hide, bool scratch,
            bool capture, bool progress, int progress_fd, std::function<void()> started = {}) {
  Run result;
  auto fail = [&](const std::string& what) {
    result.status = 125;
    result.ulsp_failed = true;
    std::fprintf(stderr, "pkgdep-vfs: %s\n", what.c_str());
    return result;
  };
  auto passthrough = ulsp::vfs::PassthroughLayer::Open("/");
  if (!passthrough) return fail("passthrough of /: " + passthrough.error().Describe());
  std::unique_ptr<ulsp::vfs::Layer> below = std::move(*passthrough);
  std::optional<ScratchDir> upper;
  if (scratch) {
    upper.emplace();
    if (upper->path().empty())
      return fail(std::string("cannot make a scratch directory in /var/tmp for --confirm: ") + std::strerror(errno));
    auto overlay = ulsp::vfs::OverlayLayer::Open(upper->path(), std::move(below));
    if (!overlay) return fail("a scratch layer for --confirm: " + overlay.error());
    below = std::move(*overlay);
  }
  if (hide) {
    below = ulsp::vfs::ViewLayer::FromPredicate([hide](std::string_view p) { return !hide(p); }, std::move(below));
  }
  auto recorder = std::make_shared<Recording>();
  recorder->SetCommand(ulsp::core::JoinCommand(command));
  auto record = std::make_unique<RecordLayer>(recorder, std::move(below), std::move(hide));

  ulsp::core::GroupPolicy policy;
  policy.name = "pkgdep";
  policy.net = ulsp::net::RuleSet({}, /*default_allow=*/true);
  policy.pid_namespace = true;
  policy.private_tmp = true;
  ulsp::core::MountPolicy root;
  root.path = "/";
  root.stack = std::string("record,") + (hide ? "view(undeclared hidden)," : "") +
               (scratch ? "overlay:" + upper->path() + "," : "") + "passthrough:/";
  root.timeout = 5.0;
  root.where = "pkgdep-vfs";
  policy.mounts.push_back(root);

  ulsp::core::GroupRun run;
  run.policy = &policy;
  run.policy_file = "(pkgdep-vfs)";
  run.command = command;
  run.stacks.push_back(std::move(record));
  // A progress line for runs longer than a few seconds.
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  const auto start = std::chrono::steady_clock::now();
  std::thread progress_thread;
  auto report_progress = [&] {
    std::unique_lock lock(mu);
    for (int tick = 1; !cv.wait_for(lock, std::chrono::seconds(1), [&] { return done; }); ++tick) {
      if (tick < 3 || tick % 5 != 0) continue;
      const std::string line = "pkgdep-vfs: running for " + std::to_string(tick) + " s: " +
                               std::to_string(recorder->size()) + " paths, " + std::to_string(recorder->processes()) +
                               " processes\n";
      (void)!::write(progress_fd, line.data(), line.size());
    }
  };
  // Threads of this process start once the group's processes are forked: a thread
  // still being set up when this process forks can hold a sanitizer allocator's
  // lock, which the child then waits on forever (seen under AddressSanitizer).
  run.on_started = [&, started = std::move(started)](pid_t) {
    if (progress) progress_thread = std::thread(report_progress);
    if (started) started();
  };
  // The group's /proc, for the argv of each process, is open before the command
  // starts: a command that fails at once is still named.
  run.on_built = [&](pid_t init) { recorder->OpenGroupProc(init); };
  run.who = "pkgdep-vfs";
  {
    std::optional<Capture> cap;
    if (capture) cap.emplace();
    result.status = ulsp::core::RunGroup(run);
    result.ulsp_failed = !run.failure.empty();
    result.interrupted_by = run.interrupted_by;
    if (cap) std::tie(result.out, result.err) = cap->Restore();
  }
  {
    std::lock_guard lock(mu);
    done = true;
  }
  cv.notify_all();
  if (progress_thread.joinable()) progress_thread.join();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.unlisted = recorder->UnlistedSnapshot();
  result.record = recorder->Snapshot();  // the layer went with the group's stack; the record stays
  return result;
}

std::vector<std::string> Split(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream s(list);
  for (std::string item; std::getline(s, item, ',');) {
    const size_t first = item.find_first_not_of(" \t");
    if (first == std::string::npos) continue;
    out.push_back(item.substr(first, item.find_last_not_of(" \t") - first + 1));
  }
  return out;
}

// Why `relation` ("NAME", "NAME:ARCH (>= VERSION)", "A | B", as a Depends field
// writes one) is not one; empty when it is. dpkg's index reads its own fields leniently
// (Relations); what a user types is checked, so that a slip ("libc6 (>= 2") is said,
// not taken for a name.
std::string RelationError(const std::string& relation) {
  static const std::regex kAlternative(
      R"(\s*[a-z0-9][a-z0-9+.-]+(:[a-z0-9][a-z0-9-]*)?\s*(\(\s*(<<|<=|=|>=|>>|<|>)\s*[A-Za-z0-9.+~:-]+\s*\))?\s*)");
  bool ok = !relation.ends_with('|');
  std::stringstream s(relation);
  for (std::string alt; ok && std::getline(s, alt, '|');) ok = std::regex_match(alt, kAlternative);
  if (ok) return {};
  return "--deps: '" + relation + "' is not a relation (give NAME, NAME (>= VERSION) or A | B, comma-separated)";
}

int Check(const std::string& package, const std::string& deps, const std::string& mode, bool confirm,
          const std::string& json_file, const std::string& allow_file, const std::vector<std::string>& command) {
  if (package.empty() == deps.empty()) return Fail("give either --package NAME or --deps PKG,PKG...");
  if (mode != "observe" && mode != "enforce") return Fail("--mode is observe or enforce, not '" + mode + "'");
  if (confirm && mode == "enforce")
    return Fail("--confirm reruns an observed command without each undeclared package: give it with --mode observe");
  const std::vector<std::string> roots = package.empty() ? Split(deps) : std::vector<std::string>{package};
  if (roots.empty()) return Fail("--deps '" + deps + "' names no package (give PKG,PKG...)");
  if (!deps.empty())
    for (const std::string& relation : roots)
      if (std::string why = RelationError(relation); !why.empty()) return Fail(why);
  if (command.empty()) return Fail("give the command to check after --");
  if (command.front().empty()) return Fail("the command after -- is an empty string");
  if (::geteuid() != 0) return Fail("needs root (it runs the command in an ulsp process group)");
  if (Which(command[0]).empty()) return Fail(command[0] + ": command not found");
  std::vector<std::string> allow = DefaultUnownedAllowList();
  if (!allow_file.empty()) {
    auto text = ulsp::ReadTextFile(allow_file, 16u << 20);
    if (!text) return Fail(allow_file + ": cannot read the allow-list: " + text.error());
    std::istringstream in(*text);
    int number = 0;
    for (std::string line; std::getline(in, line);) {
      ++number;
      // Blanks around a prefix (a CR of a file written on Windows) are not part of it:
      // kept, the prefix would silently match nothing.
      line.erase(0, std::min(line.find_first_not_of(" \t\r"), line.size()));
      line.erase(line.find_last_not_of(" \t\r") + 1);
      if (line.empty() || line[0] == '#') continue;
      if (line[0] != '/' && !line.starts_with("*/"))
        return Fail(allow_file + ":" + std::to_string(number) + ": '" + line +
                    "' is neither an absolute path prefix nor */NAME/");
      allow.push_back(line);
    }
  }
  if (!json_file.empty() && json_file != "-") {
    // A report path that cannot be written is said now, not after a long run: opened
    // as the report will be (the same checks), and let go again (a file it had to
    // make is removed: the run may yet fail before there is a report).
    struct stat before {};
    const bool existed = ::lstat(json_file.c_str(), &before) == 0;
    auto fd = ulsp::OpenOwnFile(json_file, /*append=*/true);
    if (!fd) return Fail("cannot write the JSON report: " + fd.error());
    if (!existed) ::unlink(json_file.c_str());
  }
  // The packages, the declared closure and who owns which path. Enforcing, the view
  // needs them before the run. Observing, they are needed only for the report: a
  // quick check that the named packages are installed comes first (a bad name must
  // not run the command), and the rest is read while the command runs. The reader
  // starts once the group's processes are forked: a thread busy allocating while
  // this process forks can leave a ThreadSanitizer build's child waiting forever on
  // an allocator lock (seen in CI), and the group's start does not wait for it anyway.
  std::expected<DpkgIndex, std::string> index = std::unexpected(std::string("the dpkg database was not read"));
  std::expected<Closure, std::string> closure = std::unexpected(std::string("the declared closure was not computed"));
  std::expected<void, std::string> files;
  auto load = [&] {
    index = DpkgIndex::LoadPackages();
    if (!index) return;
    closure = DeclaredClosure(*index, roots);
    if (closure) files = index->LoadFiles(kIndexCache);
  };
  std::thread loader;
  std::function<void()> start_loading;
  if (mode == "enforce") {
    load();
    if (!index) return Fail(index.error());
    if (!closure) return Fail(closure.error());
    if (!files) return Fail(files.error());
  } else {
    if (auto installed = DpkgIndex::CheckInstalled(roots); !installed) return Fail(installed.error());
    start_loading = [&] {
      if (loader.joinable()) return;
      loader = std::thread([&] {
        // Only on a CPU that nothing else wants: the group is being built and the
        // command run meanwhile, and the report waits for the command anyway.
        const sched_param idle{};
        ::pthread_setschedparam(::pthread_self(), SCHED_IDLE, &idle);
        load();
      });
    };
  }
  struct Joiner {
    std::thread& t;
    ~Joiner() {
      if (t.joinable()) t.join();
    }
  } joiner{loader};

  Report report;
  report.mode = mode;
  report.checks_a_package = !package.empty();
  report.command = command;
  const int progress_fd = ::dup(2);
  // Enforce: a path is hidden when every package owning it is undeclared.
  std::function<bool(std::string_view)> hide;
  if (mode == "enforce") {
    hide = [&idx = *index, &c = *closure](std::string_view path) {
      const auto owners = idx.Owners(path);
      if (owners.empty()) return false;
      return std::none_of(owners.begin(), owners.end(), [&c](const std::string& o) { return c.Declares(o); });
    };
  }
  // --confirm compares runs, so none may see another's changes (a second `make` would
  // find the first one's output up to date): each writes to a scratch layer, and each
  // reads the same standard input.
  KeptStdin input;
  if (confirm) {
    if (const std::string error = input.Keep(); !error.empty()) {
      ::close(progress_fd);
      return Fail(error);
    }
  }
  Run first = RunOnce(command, hide, /*scratch=*/confirm, /*capture=*/confirm, true, progress_fd, start_loading);
  if (first.ulsp_failed) {
    ::close(progress_fd);
    return kUsage;  // ulsp could not make the group: it said why
  }
  if (confirm) {  // what the command said, as it would have without the capture
    std::fwrite(first.out.data(), 1, first.out.size(), stdout);
    std::fwrite(first.err.data(), 1, first.err.size(), stderr);
    std::fflush(stdout);
  }
  report.status = first.status;
  report.seconds = first.seconds;
  if (loader.joinable()) {
    loader.join();
  } else if (mode != "enforce") {
    load();  // the group never said it started
  }
  if (!index) return Fail(index.error());
  if (!closure) return Fail(closure.error());
  if (!files) return Fail(files.error());
  const DpkgIndex& idx = *index;
  report.closure = *closure;
  // The command runs in pkgdep-vfs's working directory. A tree no package owns (a
  // source tree, not /, /usr or /etc) is the command's own.
  std::error_code cwd_error;
  if (const std::string cwd = std::filesystem::current_path(cwd_error).string();
      !cwd_error && cwd != "/" && idx.Owners(cwd).empty())
    report.own_tree = cwd;
  Attribute(idx, first.record, allow, report);
  AttributeUnlisted(idx, first.unlisted, report);
  // A command named without a path that PATH finds outside the package system (a
  // pyenv shim, /usr/local/bin) shadows a packaged program: say which.
  if (const std::string found = Which(command[0]); command[0].find('/') == std::string::npos && idx.Owners(found).empty()) {
    for (const char* dir : {"/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/"}) {
      const std::string packaged = dir + command[0];
      const auto owners = idx.Owners(packaged);
      if (owners.empty() || ::access(packaged.c_str(), X_OK) != 0) continue;
      report.command_path = found;
      report.packaged_command = packaged + " (";
      for (size_t i = 0; i < owners.size(); ++i) report.packaged_command += (i == 0 ? "" : ", ") + owners[i];
      report.packaged_command += ")";
      break;
    }
  }

  // A check stopped by ^C (or SIGTERM, SIGHUP) reports what it saw, confirms nothing
  // (a rerun would compare against a command cut short), and ends as one so stopped.
  int interrupted_by = first.interrupted_by;
  if (confirm && interrupted_by == 0) {  // observe mode only (checked above)
    for (const auto& [p, findings] : report.undeclared) {
      const std::string without = p;
      auto hide_one = [&idx, without](std::string_view path) {
        const auto owners = idx.Owners(path);
        return !owners.empty() && std::all_of(owners.begin(), owners.end(), [&](const std::string& o) { return o == without; });
      };
      std::fprintf(stderr, "pkgdep-vfs: confirming %s: running again without it\n", without.c_str());
      input.Rewind();
      Run again = RunOnce(command, hide_one, /*scratch=*/true, /*capture=*/true, false, progress_fd);
      if ((interrupted_by = again.interrupted_by) != 0) break;
      report.confirmed[without] = again.status != first.status ? "hard (exit status " + std::to_string(first.status) + " -> " +
                                                                     std::to_string(again.status) + ")"
                                  : (again.out != first.out || again.err != first.err) ? "soft (same exit status, different output)"
                                                                                        : "none (same exit status and output)";
    }
  }
  ::close(progress_fd);
  report.interrupted_by = interrupted_by;
  report.confirm_cut_short = confirm && report.confirmed.size() < report.undeclared.size();
  // With --json -, standard output gets the JSON and the text goes to standard error.
  const std::string text = report.Text();
  std::FILE* const text_out = json_file == "-" ? stderr : stdout;
  // A report nobody got is no verdict: a full disk, a closed pipe say so (exit 2).
  if (std::fwrite(text.data(), 1, text.size(), text_out) != text.size() || std::fflush(text_out) != 0)
    return Fail(std::string("cannot write the report to standard ") + (text_out == stdout ? "output" : "error") + ": " +
                std::strerror(errno));
  if (json_file == "-") {
    const std::string json = report.Json();
    std::fwrite(json.data(), 1, json.size(), stdout);
    if (std::fflush(stdout) != 0) return Fail(std::string("cannot write the JSON report to standard output: ") + std::strerror(errno));
  } else if (!json_file.empty()) {
    if (auto w = ulsp::WriteOwnFile(json_file, report.Json()); !w) return Fail("cannot write the JSON report: " + w.error());
  }
  return report.Verdict();
}

}  // namespace
}  // namespace pkgdep

int main(int argc, char** argv) {
  CLI::App app{"pkgdep-vfs: does a command need only what its Debian package declares?"};
  app.require_subcommand(1, 1);
  std::string package, deps, mode = "observe", json_file, allow_file;
  bool confirm = false;
  std::vector<std::string> command;
  CLI::App* check = app.add_subcommand("check", "Run COMMAND in a recorded (or restricted) view and report");
  check->add_option("--package", package, "The package whose declarations count (its Depends, transitively)");
  check->add_option("--deps", deps,
                    "Declared packages, as a Depends field writes them: comma-separated, with alternatives "
                    "(a | b) and virtual packages (instead of --package)");
  check->add_option("--mode", mode, "observe (everything visible, all recorded) or enforce (only the declared)")
      ->capture_default_str();
  check->add_flag("--confirm", confirm, "Run again without each undeclared package: hard, soft or no difference");
  check->add_option("--json", json_file, "Also write the report as JSON to FILE (-: standard output, the text then on standard error)");
  check->add_option("--allow-unowned", allow_file, "More unowned path prefixes not to report, one per line");
  check->add_option("command", command, "-- COMMAND [ARG...]");
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "pkgdep-vfs: %s (see pkgdep-vfs%s --help)\n", e.what(), check->parsed() ? " check" : "");
    return 2;
  }
  return pkgdep::Check(package, deps, mode, confirm, json_file, allow_file, command);
}
