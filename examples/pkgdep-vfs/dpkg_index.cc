#include "examples/pkgdep-vfs/dpkg_index.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <optional>
#include <set>
#include <sstream>

#include "kernel/msgport/own_file.h"

namespace pkgdep {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// "libc6:amd64" -> "libc6"
std::string BareName(std::string_view name) {
  const size_t colon = name.find(':');
  return std::string(name.substr(0, colon));
}

}  // namespace

std::vector<std::vector<std::string>> Relations(std::string_view text) {
  std::vector<std::vector<std::string>> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string_view::npos) comma = text.size();
    std::vector<std::string> group;
    std::string_view item = text.substr(start, comma - start);
    size_t s2 = 0;
    while (s2 <= item.size()) {
      size_t bar = item.find('|', s2);
      if (bar == std::string_view::npos) bar = item.size();
      std::string_view alt = Trim(item.substr(s2, bar - s2));
      const size_t cut = alt.find_first_of(" ([<");
      alt = Trim(alt.substr(0, cut));
      if (!alt.empty()) group.emplace_back(alt);
      s2 = bar + 1;
    }
    if (!group.empty()) out.push_back(std::move(group));
    start = comma + 1;
  }
  return out;
}

namespace {

// A file's bytes, mapped (an empty file maps to nothing), or a message naming it.
// `populate`: all its pages now, for lookups that would otherwise each fault one in.
// `private_only`: refuse a file that another user owns or may write (EPERM), whose
// bytes are not ours to trust — or to keep mapped, as they could be cut short.
struct Mapped {
  std::shared_ptr<const void> keep;
  std::string_view bytes;
};
std::expected<Mapped, std::string> MapWhole(const std::string& path, bool populate, bool private_only = false) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::unexpected(path + ": " + std::strerror(errno));
  struct stat st {};
  void* addr = nullptr;
  int err = 0;
  if (::fstat(fd, &st) != 0) {
    err = errno;
  } else if (private_only && (st.st_uid != ::geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH)) != 0)) {
    err = EPERM;
  } else if (st.st_size > 0) {
    addr = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE | (populate ? MAP_POPULATE : 0), fd, 0);
    if (addr == MAP_FAILED) err = errno;
  }
  ::close(fd);
  if (err != 0) return std::unexpected(path + ": " + std::strerror(err));
  Mapped m;
  if (addr == nullptr) return m;
  const auto size = static_cast<size_t>(st.st_size);
  m.keep = std::shared_ptr<const void>(addr, [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
  m.bytes = std::string_view(static_cast<const char*>(addr), size);
  return m;
}

// What DeclaredClosure says of a name no installed package has.
std::string NotInstalled(std::string_view name) {
  return "no installed package '" + std::string(name) + "' (dpkg -l lists what is installed)";
}

bool ReadLines(const std::string& path, std::vector<std::string>& lines) {
  std::ifstream in(path);
  if (!in) return false;
  for (std::string line; std::getline(in, line);) lines.push_back(std::move(line));
  return true;
}

}  // namespace

namespace {
// Whether `path` is under one of the directories merged /usr links into /usr.
bool NeedsUsr(std::string_view path) {
  static constexpr std::string_view kMerged[] = {"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"};
  if (path.size() < 4 || path[0] != '/' || (path[1] != 'b' && path[1] != 's' && path[1] != 'l')) return false;
  for (std::string_view top : kMerged) {
    if (path.starts_with(top) && (path.size() == top.size() || path[top.size()] == '/')) return true;
  }
  return false;
}
// A fingerprint of the files the index is built from (FNV-1a over what names a file's
// version: its name, device, inode, size and modification time).
struct Stamp {
  uint64_t h = 0xcbf29ce484222325ULL;
  void Add(std::string_view bytes) {
    for (char c : bytes) {
      h ^= static_cast<unsigned char>(c);
      h *= 0x100000001b3ULL;
    }
  }
  void Add(uint64_t v) { Add(std::string_view(reinterpret_cast<const char*>(&v), sizeof v)); }
  void File(int dir_fd, const std::string& name) {
    Add(name);
    struct stat st {};
    if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return Add(uint64_t{0});
    for (uint64_t v : {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), static_cast<uint64_t>(st.st_size),
                       static_cast<uint64_t>(st.st_mtim.tv_sec), static_cast<uint64_t>(st.st_mtim.tv_nsec)})
      Add(v);
  }
};

// The names in `dir` that `keep` admits, sorted; false when it cannot be listed.
bool ListDir(const std::string& dir, const std::function<bool(std::string_view)>& keep, std::vector<std::string>& out) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return false;
  while (dirent* e = ::readdir(d)) {
    std::string_view n = e->d_name;
    if (n != "." && n != ".." && keep(n)) out.emplace_back(n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return true;
}

// The cache file: fixed-width integers in this machine's byte order, strings as a
// 32-bit length and the bytes. Reading checks every length against what is left.
constexpr std::string_view kCacheMagic = "pkgdep-vfs file index 2\n";

struct CacheWriter {
  std::string out;
  template <typename T>
  void Int(T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void Str(std::string_view v) {
    Int(static_cast<uint32_t>(v.size()));
    out += v;
  }
};

struct CacheReader {
  std::string_view in;
  bool ok = true;
  std::string_view Bytes(size_t n) {
    if (!ok || n > in.size()) {
      ok = false;
      return {};
    }
    std::string_view b = in.substr(0, n);
    in.remove_prefix(n);
    return b;
  }
  template <typename T>
  T Int() {
    T v{};
    std::string_view b = Bytes(sizeof v);
    if (ok) std::memcpy(&v, b.data(), sizeof v);
    return v;
  }
  std::string_view Str() { return Bytes(Int<uint32_t>()); }
};

}  // namespace

std::expected<void, std::string> DpkgIndex::CheckInstalled(const std::vector<std::string>& names,
                                                           const std::string& admin_dir) {
  // Mapped, not read: this runs before the command starts, and reading the 800 KB
  // into fresh memory (its page faults) took 0.5-0.7 ms; the search touches only
  // the pages up to the names' paragraphs.
  auto status = MapWhole(admin_dir + "/status", false);
  if (!status) return std::unexpected(status.error());
  // Each paragraph of the name (one per architecture), by its Package line.
  const std::string_view text = status->bytes;
  auto find = [text](std::string_view needle, size_t from) {
    if (from > text.size()) return std::string_view::npos;
    const void* hit = ::memmem(text.data() + from, text.size() - from, needle.data(), needle.size());
    return hit == nullptr ? std::string_view::npos : static_cast<size_t>(static_cast<const char*>(hit) - text.data());
  };
  auto installed = [text, &find](std::string_view name) {
    const std::string line = "Package: " + std::string(name) + "\n";
    const std::string after_newline = "\n" + line;
    for (size_t at = text.starts_with(line) ? 0 : find(after_newline, 0); at != std::string_view::npos;
         at = find(after_newline, at + 1)) {
      const size_t end = text.find("\n\n", at + 1);
      const std::string_view paragraph = text.substr(at, end == std::string_view::npos ? end : end - at + 1);
      const size_t status_at = paragraph.find("\nStatus:");
      if (status_at == std::string_view::npos) continue;
      const size_t eol = paragraph.find('\n', status_at + 1);
      if (Trim(paragraph.substr(status_at + 1, eol == std::string_view::npos ? eol : eol - status_at - 1)).ends_with(" installed"))
        return true;
    }
    return false;
  };
  // Each name is a relation as a Depends field writes it ("a (>= 1) | b"): one of its
  // alternatives installed is enough. A virtual package is installed when a provider
  // is, and a name with an ":arch" is when that architecture's is, which only the full
  // parse tells; it is read for such a name alone.
  std::optional<DpkgIndex> full;
  for (const std::string& name : names) {
    const auto groups = Relations(name);
    bool found = false;
    for (const auto& group : groups)
      for (const std::string& alt : group) found = found || installed(alt);
    if (!found && !groups.empty()) {
      if (!full) {
        auto loaded = LoadPackages(admin_dir);
        if (!loaded) return std::unexpected(loaded.error());
        full = std::move(*loaded);
      }
      for (const auto& group : groups)
        for (const std::string& alt : group) found = found || !full->Satisfying(alt).empty();
    }
    if (!found) return std::unexpected(NotInstalled(name));
  }
  return {};
}

std::string DpkgIndex::Canonical(std::string_view path) {
  if (!NeedsUsr(path)) return std::string(path);
  std::string usr = "/usr";
  usr += path;
  return usr;
}

std::expected<DpkgIndex, std::string> DpkgIndex::Load(const std::string& admin_dir) {
  auto index = LoadPackages(admin_dir);
  if (!index) return index;
  if (auto files = index->LoadFiles(); !files) return std::unexpected(files.error());
  return index;
}

std::expected<DpkgIndex, std::string> DpkgIndex::LoadPackages(const std::string& admin_dir) {
  DpkgIndex index;
  index.admin_dir_ = admin_dir;
  // status: the installed packages and their relations.
  {
    const std::string path = admin_dir + "/status";
    Stamp stamp;
    stamp.File(AT_FDCWD, path);  // before reading: a change while it is read shows next time
    index.status_stamp_ = stamp.h;
    // Mapped and parsed in place: about 800 KB for 900 packages, most of it
    // descriptions and conffiles, which are skipped (what is kept is copied).
    auto status = MapWhole(path, false);
    if (!status) return std::unexpected(status.error());
    const std::string_view text = status->bytes;
    // The fields a package's relations come from; the others are not kept.
    enum Field { kNone, kEssential, kDepends, kPreDepends, kRecommends, kSuggests, kProvides, kArchitecture, kFields };
    auto field_of = [](std::string_view key) {
      if (key == "Essential") return kEssential;
      if (key == "Architecture") return kArchitecture;
      if (key == "Depends") return kDepends;
      if (key == "Pre-Depends") return kPreDepends;
      if (key == "Recommends") return kRecommends;
      if (key == "Suggests") return kSuggests;
      if (key == "Provides") return kProvides;
      return kNone;
    };
    Package p;
    bool installed = false;
    Field key = kNone;
    std::string fields[kFields];
    auto finish = [&] {
      if (installed && !p.name.empty()) {
        p.essential = fields[kEssential] == "yes";
        p.architecture = fields[kArchitecture];
        p.depends = Relations(fields[kDepends]);
        p.pre_depends = Relations(fields[kPreDepends]);
        p.recommends = Relations(fields[kRecommends]);
        p.suggests = Relations(fields[kSuggests]);
        for (const auto& g : Relations(fields[kProvides]))
          for (const auto& v : g) p.provides.push_back(BareName(v));
        for (const auto& v : p.provides) index.provided_by_[v].push_back(p.name);
        index.packages_[p.name] = std::move(p);
      }
      p = Package{};
      installed = false;
      for (std::string& f : fields) f.clear();
    };
    for (std::string_view rest = text; !rest.empty();) {
      const size_t eol = rest.find('\n');
      const std::string_view line = rest.substr(0, eol);
      rest.remove_prefix(eol == std::string_view::npos ? rest.size() : eol + 1);
      if (line.empty() || line == "\r") {
        finish();
        continue;
      }
      if (line[0] == ' ' || line[0] == '\t') {  // a continuation of the last field
        if (key != kNone) {
          fields[key] += ' ';
          fields[key] += Trim(line);
        }
        continue;
      }
      const size_t colon = line.find(':');
      key = kNone;
      if (colon == std::string_view::npos) continue;
      const std::string_view name = line.substr(0, colon);
      const std::string_view value = Trim(line.substr(colon + 1));
      if (name == "Package") {
        p.name = value;
      } else if (name == "Status") {
        installed = value.ends_with(" installed");
      } else {
        key = field_of(name);
        if (key != kNone) fields[key] = value;
      }
    }
    finish();
  }
  // dpkg's own package is of the native architecture (Architecture: all counts as it).
  if (const Package* dpkg = index.Find("dpkg")) index.native_architecture_ = dpkg->architecture;
  return index;
}

std::expected<void, std::string> DpkgIndex::LoadFiles(const std::string& cache_file) {
  const std::string& admin_dir = admin_dir_;
  DpkgIndex& index = *this;
  const std::string info_dir = admin_dir + "/info", alternatives_dir = admin_dir + "/alternatives";
  std::vector<std::string> lists, alternatives;
  if (!ListDir(info_dir, [](std::string_view n) { return n.ends_with(".list"); }, lists))
    return std::unexpected(info_dir + ": " + std::strerror(errno));
  (void)ListDir(alternatives_dir, [](std::string_view) { return true; }, alternatives);  // none is fine
  // Stamped before anything is read, so a change made while this reads shows next time.
  Stamp stamp;
  stamp.Add(status_stamp_);
  stamp.Add(admin_dir);
  for (const auto& [dir, names] : {std::pair{&info_dir, &lists}, std::pair{&alternatives_dir, &alternatives}}) {
    const int fd = ::open(dir->c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    for (const std::string& n : *names) stamp.File(fd, n);
    if (fd >= 0) ::close(fd);
  }
  stamp.File(AT_FDCWD, admin_dir + "/diversions");
  if (!cache_file.empty() && ReadCache(cache_file, stamp.h)) {
    files_from_cache_ = true;
    return {};
  }
  // info/*.list: who owns which path.
  {
    const std::string& dir = info_dir;
    std::vector<Entry>& entries = index.built_entries_;
    std::string& paths = index.built_paths_;
    std::string text;  // one list file
    for (const std::string& file : lists) {
      const std::string name = BareName(std::string_view(file).substr(0, file.size() - 5));
      if (!index.packages_.contains(name)) continue;  // a list left by a removed package
      const auto id = static_cast<uint32_t>(index.names_.size());
      index.names_.push_back(name);
      const std::string path = dir + "/" + file;
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return std::unexpected(path + ": " + std::strerror(errno));
      text.clear();
      char buf[65536];
      for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) != 0;) {
        if (n < 0) {
          if (errno == EINTR) continue;
          ::close(fd);
          return std::unexpected(path + ": " + std::strerror(errno));
        }
        text.append(buf, static_cast<size_t>(n));
      }
      ::close(fd);
      std::string_view rest = text;
      while (!rest.empty()) {
        const size_t nl = rest.find('\n');
        std::string_view line = rest.substr(0, nl);
        rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
        if (line.empty() || line == "/.") continue;
        const size_t offset = paths.size();
        if (NeedsUsr(line)) paths += "/usr";
        paths += line;
        const std::string_view canonical = std::string_view(paths).substr(offset);
        entries.push_back({std::hash<std::string_view>()(canonical), id, static_cast<uint32_t>(canonical.size()), offset});
      }
    }
    // Sorted by the path's hash (integers compare fast; a path's entries are neighbours).
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return a.hash != b.hash ? a.hash < b.hash : a.owner < b.owner; });
  }
  auto id_of = [&index](const std::string& name) -> int64_t {
    auto it = std::find(index.names_.begin(), index.names_.end(), name);
    return it == index.names_.end() ? -1 : it - index.names_.begin();
  };
  // diversions: three lines each — the diverted path, where it went, by whom.
  {
    std::vector<std::string> lines;
    if (ReadLines(admin_dir + "/diversions", lines)) {
      for (size_t i = 0; i + 2 < lines.size(); i += 3) {
        const std::string from = Canonical(lines[i]), to = Canonical(lines[i + 1]);
        const std::string& by = lines[i + 2];
        std::vector<uint32_t> original = index.ListedOwners(from);
        std::vector<uint32_t> at_from, at_to;
        const int64_t by_id = id_of(by);
        if (by_id >= 0) at_from.push_back(static_cast<uint32_t>(by_id));  // ":" is a local diversion
        for (uint32_t o : original)
          if (static_cast<int64_t>(o) != by_id) at_to.push_back(o);
        index.diverted_[from] = at_from;
        if (!at_to.empty()) index.diverted_[to] = at_to;
      }
    }
  }
  // alternatives: the links update-alternatives manages, and where they lead now.
  for (const std::string& name : alternatives) {
    std::vector<std::string> lines;
    if (!ReadLines(alternatives_dir + "/" + name, lines) || lines.size() < 2) continue;
    index.alternative_links_[Canonical(lines[1])] = "/etc/alternatives/" + name;
    index.alternative_links_["/etc/alternatives/" + name] = "/etc/alternatives/" + name;
    for (size_t i = 2; i + 1 < lines.size() && !lines[i].empty(); i += 2) {
      index.alternative_links_[Canonical(lines[i + 1])] = "/etc/alternatives/" + lines[i];
      index.alternative_links_["/etc/alternatives/" + lines[i]] = "/etc/alternatives/" + lines[i];
    }
  }
  if (!cache_file.empty()) WriteCache(cache_file, stamp.h);
  return {};
}

void DpkgIndex::WriteCache(const std::string& file, uint64_t stamp) const {
  CacheWriter w;
  w.out += kCacheMagic;
  w.Int(stamp);
  w.Int(static_cast<uint64_t>(std::hash<std::string_view>()("/usr/bin/sh")));  // entries are sorted by this hash
  w.Int(static_cast<uint32_t>(names_.size()));
  for (const std::string& n : names_) w.Str(n);
  w.Int(static_cast<uint32_t>(diverted_.size()));
  for (const auto& [path, owners] : diverted_) {
    w.Str(path);
    w.Int(static_cast<uint32_t>(owners.size()));
    for (uint32_t o : owners) w.Int(o);
  }
  w.Int(static_cast<uint32_t>(alternative_links_.size()));
  for (const auto& [link, name] : alternative_links_) {
    w.Str(link);
    w.Str(name);
  }
  w.out.resize((w.out.size() + 7) / 8 * 8, '\0');  // the entries are read in place: aligned
  const auto entries = Entries();
  const std::string_view paths = Paths();
  w.Int(static_cast<uint64_t>(entries.size()));
  w.Int(static_cast<uint64_t>(paths.size()));
  w.out.append(reinterpret_cast<const char*>(entries.data()), entries.size_bytes());
  w.out += paths;
  w.out += kCacheMagic;  // a cut-off file does not end with it
  // Written aside and renamed over: a reader sees the old file or the new one.
  const size_t slash = file.rfind('/');
  if (slash != std::string::npos && slash > 0) ::mkdir(file.substr(0, slash).c_str(), 0755);
  // Readable by all, writable by us alone, whatever the umask (ReadCache refuses
  // anything else): a user who could write it could change what pkgdep-vfs reports.
  const std::string tmp = file + ".new." + std::to_string(::getpid());
  ::unlink(tmp.c_str());  // left by a killed run of a process with our pid
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return;
  bool ok = ::fchmod(fd, 0644) == 0 && ulsp::WriteAll(fd, w.out).has_value();
  ok = ::close(fd) == 0 && ok;
  if (!ok || ::rename(tmp.c_str(), file.c_str()) != 0) ::unlink(tmp.c_str());
}

bool DpkgIndex::ReadCache(const std::string& file, uint64_t stamp) {
  static_assert(std::is_trivially_copyable_v<Entry> && sizeof(Entry) == 24);
  // Populated now: the lookups come after the command, in random order, and would
  // each fault a page in then; this runs while the command does (observe mode).
  auto mapped = MapWhole(file, true, /*private_only=*/true);
  if (!mapped || mapped->bytes.empty()) return false;
  mapping_ = std::move(mapped->keep);
  const std::string_view file_bytes = mapped->bytes;
  CacheReader r{file_bytes};
  bool ok = r.Bytes(kCacheMagic.size()) == kCacheMagic && r.Int<uint64_t>() == stamp &&
            r.Int<uint64_t>() == static_cast<uint64_t>(std::hash<std::string_view>()("/usr/bin/sh"));
  const auto n_names = ok ? r.Int<uint32_t>() : 0;
  for (uint32_t i = 0; r.ok && i < n_names; ++i) names_.emplace_back(r.Str());
  const auto n_diverted = r.Int<uint32_t>();
  for (uint32_t i = 0; ok && r.ok && i < n_diverted; ++i) {
    std::vector<uint32_t>& owners = diverted_[std::string(r.Str())];
    const auto k = r.Int<uint32_t>();
    for (uint32_t j = 0; r.ok && ok && j < k; ++j) {
      owners.push_back(r.Int<uint32_t>());
      ok = owners.back() < names_.size();
    }
  }
  const auto n_links = r.Int<uint32_t>();
  for (uint32_t i = 0; ok && r.ok && i < n_links; ++i) {
    const std::string link(r.Str());
    alternative_links_[link] = std::string(r.Str());
  }
  r.Bytes((8 - (file_bytes.size() - r.in.size()) % 8) % 8);
  const auto n_entries = r.Int<uint64_t>();
  const auto paths_size = r.Int<uint64_t>();
  ok = ok && r.ok && n_entries <= r.in.size() / sizeof(Entry);
  if (ok) {
    // Read in place (each entry's bounds are checked where it is used).
    mapped_entries_ = std::span(reinterpret_cast<const Entry*>(r.Bytes(n_entries * sizeof(Entry)).data()), n_entries);
    mapped_paths_ = r.Bytes(paths_size);
  }
  if (ok && r.ok && r.Bytes(kCacheMagic.size()) == kCacheMagic && r.in.empty()) return true;
  mapping_.reset();
  mapped_entries_ = {};
  mapped_paths_ = {};
  names_.clear();
  diverted_.clear();
  alternative_links_.clear();
  return false;
}

const Package* DpkgIndex::Find(std::string_view name) const {
  auto it = packages_.find(BareName(name));
  return it == packages_.end() ? nullptr : &it->second;
}

std::vector<const Package*> DpkgIndex::Satisfying(std::string_view name) const {
  // The qualifier, as dpkg reads it: "NAME:any" is any architecture's, "NAME:native"
  // or "NAME:amd64" (the native one) also an Architecture: all package's, and
  // "NAME:i386" only that architecture's.
  const size_t colon = name.find(':');
  const std::string_view arch = colon == std::string_view::npos ? "" : name.substr(colon + 1);
  const std::string_view native = native_architecture_.empty() ? arch : std::string_view(native_architecture_);
  auto admits = [&](const Package& p) {
    if (arch.empty() || arch == "any") return true;
    if (arch == "native" || arch == native) return p.architecture == native || p.architecture == "all";
    return p.architecture == arch;
  };
  std::vector<const Package*> out;
  if (const Package* p = Find(name); p != nullptr && admits(*p)) out.push_back(p);
  if (auto it = provided_by_.find(BareName(name)); it != provided_by_.end()) {
    for (const std::string& provider : it->second) {
      const Package* p = Find(provider);
      if (p != nullptr && admits(*p) && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
    }
  }
  return out;
}

bool DpkgIndex::ShipsOnlyDocumentation(std::string_view name) const {
  const Package* p = Find(name);
  if (p == nullptr) return false;
  // info/NAME.list, or NAME:ARCH.list for a package that is Multi-Arch: same. Read
  // up to the first file that is not documentation (most packages: a few lines).
  const std::string base = admin_dir_ + "/info/" + p->name;
  std::ifstream list(base + ".list");
  if (!list) list.open(base + ":" + p->architecture + ".list");
  if (!list) return false;
  static constexpr std::string_view kDocumentation[] = {"/usr/share/doc/", "/usr/share/doc-base/", "/usr/share/lintian/"};
  bool any = false;
  for (std::string line; std::getline(list, line);) {
    any = true;
    if (std::ranges::any_of(kDocumentation, [&](std::string_view d) { return line.starts_with(d); })) continue;
    struct stat st {};
    if (::lstat(line.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) continue;  // /usr, /usr/share ...: shared
    return false;
  }
  return any;
}

std::vector<std::string> DpkgIndex::Owners(std::string_view path) const {
  std::string canonical = Canonical(path);
  if (auto alt = alternative_links_.find(canonical); alt != alternative_links_.end()) {
    char target[PATH_MAX];
    const ssize_t n = ::readlink(alt->second.c_str(), target, sizeof target - 1);
    if (n > 0) canonical = Canonical(std::string_view(target, static_cast<size_t>(n)));
  }
  std::vector<std::string> out;
  auto it = diverted_.find(canonical);
  for (uint32_t id : it != diverted_.end() ? it->second : ListedOwners(canonical)) out.push_back(names_[id]);
  if (out.empty()) {
    // DIR/__pycache__/NAME.TAG[.opt-N].pyc (PEP 3147) is compiled from DIR/NAME.py when
    // the package is installed (py3compile), and dpkg lists only the source: Python
    // runs the one and only stats the other, so the source's owners own it.
    constexpr std::string_view kCache = "/__pycache__/";
    const size_t at = canonical.rfind(kCache);
    if (at != std::string::npos && canonical.ends_with(".pyc") && canonical.find('/', at + kCache.size()) == std::string::npos) {
      const std::string_view file = std::string_view(canonical).substr(at + kCache.size());
      const std::string source = canonical.substr(0, at + 1) + std::string(file.substr(0, file.find('.'))) + ".py";
      for (uint32_t id : ListedOwners(source)) out.push_back(names_[id]);
    }
  }
  return out;
}

std::vector<uint32_t> DpkgIndex::ListedOwners(std::string_view canonical) const {
  std::vector<uint32_t> out;
  const uint64_t hash = std::hash<std::string_view>()(canonical);
  const auto entries = Entries();
  const std::string_view paths = Paths();
  auto it = std::lower_bound(entries.begin(), entries.end(), hash, [](const Entry& e, uint64_t h) { return e.hash < h; });
  for (; it != entries.end() && it->hash == hash; ++it) {
    if (it->offset > paths.size() || it->length > paths.size() - it->offset || it->owner >= names_.size()) continue;
    // A path's entries are sorted by owner, so a repeat (a package listing both /bin/x
    // and /usr/bin/x) follows its first. (A std::find here made a directory that 800
    // packages list, /usr, cost 300,000 comparisons.)
    if (paths.substr(it->offset, it->length) == canonical && (out.empty() || out.back() != it->owner))
      out.push_back(it->owner);
  }
  return out;
}

std::vector<std::string> DpkgIndex::EssentialPackages() const {
  std::vector<std::string> out;
  for (const auto& [name, p] : packages_)
    if (p.essential) out.push_back(name);
  return out;
}

std::expected<Closure, std::string> DeclaredClosure(const DpkgIndex& index, const std::vector<std::string>& roots) {
  Closure c;
  c.roots = roots;
  // Follows Depends and Pre-Depends from what `todo` holds, adding to c.declared.
  // Declares every installed alternative and provider of one relation ("a | b"), for
  // `why`; whether any was installed.
  auto declare = [&](const std::vector<std::string>& group, const std::string& why, std::deque<std::string>& todo) {
    bool satisfied = false;
    for (const std::string& alt : group) {
      for (const Package* q : index.Satisfying(alt)) {
        satisfied = true;
        if (c.declared.emplace(q->name, why).second) todo.push_back(q->name);
      }
    }
    return satisfied;
  };
  auto follow = [&](std::deque<std::string> todo) {
    while (!todo.empty()) {
      const Package* p = index.Find(todo.front());
      todo.pop_front();
      if (p == nullptr) continue;
      for (const auto* relations : {&p->pre_depends, &p->depends}) {
        const std::string why = (relations == &p->depends ? "Depends of " : "Pre-Depends of ") + p->name;
        for (const auto& group : *relations) {
          if (!declare(group, why, todo)) {
            std::string text;
            for (const std::string& alt : group) text += (text.empty() ? "" : " | ") + alt;
            c.unsatisfied.push_back(p->name + ": " + text);
          }
        }
      }
    }
  };
  std::deque<std::string> todo;
  for (const std::string& r : roots) {  // each a relation, as in a Depends field
    bool found = false;
    for (const auto& group : Relations(r)) found = declare(group, "named", todo) || found;
    if (!found) return std::unexpected(NotInstalled(r));
  }
  follow(std::move(todo));
  // What the named packages recommend or suggest (not what the essential set does).
  std::vector<std::string> own(c.declared.size());
  std::transform(c.declared.begin(), c.declared.end(), own.begin(), [](const auto& kv) { return kv.first; });
  todo.clear();
  for (const std::string& e : index.EssentialPackages())
    if (c.declared.emplace(e, "essential").second) todo.push_back(e);
  follow(std::move(todo));
  for (const std::string& name : own) {
    const Package* p = index.Find(name);
    for (const auto* relations : {&p->recommends, &p->suggests}) {
      for (const auto& group : *relations) {
        for (const std::string& alt : group) {
          for (const Package* q : index.Satisfying(alt)) {
            if (c.declared.contains(q->name)) continue;
            c.recommended.emplace(q->name, (relations == &p->recommends ? "Recommends of " : "Suggests of ") + name);
          }
        }
      }
    }
  }
  return c;
}

}  // namespace pkgdep
