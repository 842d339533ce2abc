// DpkgIndex: what dpkg knows about the installed system, read once from its own
// database (/var/lib/dpkg: status, info/*.list, diversions, alternatives) and
// indexed for the questions pkgdep-vfs asks: which packages own this path, what does
// this package declare it depends on.
//
// Debian 12 facts it accounts for:
//  - merged /usr: /bin, /sbin, /lib* are links into /usr, and dpkg records some
//    files under one spelling and some under the other; every path is looked up in
//    its /usr spelling (Canonical).
//  - diversions: a diverted path belongs to the package that diverted it; the
//    original's file, moved aside, to the original package.
//  - alternatives: /etc/alternatives/NAME and the links that point at it (/usr/bin/
//    editor) belong to no package; the package owning the current target counts.
//
// Immutable after Load; every method is thread-safe.
#pragma once

#include <expected>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace pkgdep {

struct Package {
  std::string name;  // without an architecture qualifier
  std::string architecture;  // its Architecture field (amd64, all ...)
  bool essential = false;
  // Each relation is a list of alternatives ("a | b"), names only (versions and
  // architecture qualifiers dropped).
  std::vector<std::vector<std::string>> depends, pre_depends, recommends, suggests;
  std::vector<std::string> provides;
};

class DpkgIndex {
 public:
  // Reads the database under `admin_dir` (dpkg's, /var/lib/dpkg). Fails with a message
  // naming the file that could not be read.
  static std::expected<DpkgIndex, std::string> Load(const std::string& admin_dir = "/var/lib/dpkg");
  // The same in two steps: the packages (fast: status alone), then who owns which path
  // (info/*.list, diversions, alternatives), which may run on another thread while
  // nothing else uses the index. Owners() answers nothing before LoadFiles.
  static std::expected<DpkgIndex, std::string> LoadPackages(const std::string& admin_dir = "/var/lib/dpkg");
  // Whether each of `names`, a relation as a Depends field writes it ("a (>= 1) | b",
  // an ":arch" qualifier and versions ignored), is satisfied by an installed package,
  // by a scan of status for its Package and Status lines only: a fraction of
  // LoadPackages' time, for a check that must come before a command runs (a virtual
  // package alone needs the full parse). Fails naming the first that is not, as
  // DeclaredClosure would, or the unreadable file.
  static std::expected<void, std::string> CheckInstalled(const std::vector<std::string>& names,
                                                         const std::string& admin_dir = "/var/lib/dpkg");
  // With a `cache_file`, the file index is kept there between runs and read back
  // while what it was built from is unchanged: the stamps (name, inode, size,
  // mtime) of status, of every info/*.list, of diversions and of every alternatives
  // file. dpkg and update-alternatives replace those files by rename, so each change
  // they make shows. A missing, stale or damaged cache is rebuilt; one that cannot be
  // written only costs the next run the time.
  std::expected<void, std::string> LoadFiles(const std::string& cache_file = "");
  bool files_from_cache() const noexcept { return files_from_cache_; }

  // The installed package `name` (an ":arch" qualifier is ignored), or nullptr.
  const Package* Find(std::string_view name) const;
  // Installed packages that are, or provide, `name`, of the architecture its ":arch"
  // qualifier names, as dpkg matches it (":any" is any; none is the package's own).
  std::vector<const Package*> Satisfying(std::string_view name) const;
  // Packages owning `path` (any spelling; links of alternatives resolved; a Python
  // module's __pycache__/NAME.*.pyc is its NAME.py's owners'). Empty for files owned
  // by no package.
  std::vector<std::string> Owners(std::string_view path) const;
  // Whether the installed package `name` ships nothing a program could use: every
  // file it lists is documentation (/usr/share/doc, doc-base, lintian), as with
  // gcc-12-base. False when its list cannot be read.
  bool ShipsOnlyDocumentation(std::string_view name) const;
  // Every installed package with Essential: yes.
  std::vector<std::string> EssentialPackages() const;

  size_t package_count() const noexcept { return packages_.size(); }
  size_t path_count() const noexcept { return Entries().size(); }

  // The /usr spelling of a path on a merged-/usr system ("/bin/sh" -> "/usr/bin/sh").
  static std::string Canonical(std::string_view path);

 private:
  std::vector<uint32_t> ListedOwners(std::string_view canonical) const;  // from the .list files
  bool ReadCache(const std::string& file, uint64_t stamp);
  void WriteCache(const std::string& file, uint64_t stamp) const;
  std::string admin_dir_;
  std::string native_architecture_;  // dpkg's ("" without it)
  uint64_t status_stamp_ = 0;  // of status as LoadPackages read it
  bool files_from_cache_ = false;
  std::map<std::string, Package, std::less<>> packages_;
  std::unordered_map<std::string, std::vector<std::string>> provided_by_;  // virtual -> providers
  // Every (path, package id) of the .list files, sorted by the path's hash: ~160k
  // entries here, built in one sort with no allocation per path. Plain data that
  // points into `paths_` by offset, so the cache file holds it as it is in memory
  // and is mapped, not read.
  struct Entry {  // 24 bytes, no padding: the cache file's layout
    uint64_t hash;
    uint32_t owner;
    uint32_t length;
    uint64_t offset;  // into paths_
  };
  std::vector<Entry> built_entries_;
  std::string built_paths_;              // every path, one after the other
  std::shared_ptr<const void> mapping_;  // the cache file, when the index came from it
  std::span<const Entry> mapped_entries_;
  std::string_view mapped_paths_;
  std::span<const Entry> Entries() const { return mapping_ ? mapped_entries_ : std::span<const Entry>(built_entries_); }
  std::string_view Paths() const { return mapping_ ? mapped_paths_ : std::string_view(built_paths_); }
  std::unordered_map<std::string, std::vector<uint32_t>> diverted_;         // path -> owners, after diversions
  std::vector<std::string> names_;                                          // package id -> name
  std::unordered_map<std::string, std::string> alternative_links_;          // link path -> /etc/alternatives/NAME
};

// What a package (or a list of them) declares: its Depends and Pre-Depends, followed
// transitively, plus every Essential package and what they depend on (Debian policy
// lets every package rely on those). Recommends and Suggests of the declared packages
// are kept apart: they are never counted as declared.
// A relation as a Depends field writes it, "a (>= 1) | b:any [amd64], c", as its
// groups of alternatives: {{a, b:any}, {c}} (an ":arch" qualifier is kept, for
// Satisfying; versions are dropped).
std::vector<std::vector<std::string>> Relations(std::string_view text);

struct Closure {
  std::vector<std::string> roots;                    // what the user named
  std::map<std::string, std::string> declared;       // package -> why ("root", "essential", "Depends of X")
  std::map<std::string, std::string> recommended;    // package -> "Recommends of X" / "Suggests of X"
  std::vector<std::string> unsatisfied;              // declared relations no installed package satisfies

  bool Declares(const std::string& p) const { return declared.contains(p); }
};

// Each root is a relation as in a Depends field: every installed alternative and
// provider of it is declared ("named"). Fails with "no installed package 'X'" for a
// root that no installed package satisfies.
std::expected<Closure, std::string> DeclaredClosure(const DpkgIndex& index, const std::vector<std::string>& roots);

}  // namespace pkgdep
