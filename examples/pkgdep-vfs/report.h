// What pkgdep-vfs found: every path the command touched, attributed to the packages
// that own it and judged against what the package declares.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "examples/pkgdep-vfs/dpkg_index.h"
#include "examples/pkgdep-vfs/record_layer.h"

namespace pkgdep {

struct Finding {
  std::string path;
  Touch touch;
};

// A directory enforce mode hid, and the undeclared packages that ship it.
struct HiddenDirectory {
  Finding finding;
  std::vector<std::string> packages;
};

// A directory whose listings enforce mode left entries out of: a program that finds
// files by listing (Python's import) misses them without looking one up.
struct UnlistedDirectory {
  std::string dir;
  pid_t pid = 0;     // the first process whose listing left one out
  std::string argv;  // its argv
  std::map<std::string, size_t> packages;  // undeclared package -> entries of it left out
  size_t entries = 0;
};

struct Report {
  std::string mode;  // "observe" or "enforce"
  bool checks_a_package = false;  // --package (its Depends are its declarations), not --deps
  std::vector<std::string> command;
  int status = 0;    // the command's exit status in the (first) run
  double seconds = 0;
  Closure closure;

  std::map<std::string, std::vector<Finding>> undeclared;  // package -> files it used
  // Undeclared packages one of whose files the command read as a drop-in (it read
  // every file of that kind in a directory it listed: apt.conf.d, Python's *.pth),
  // with a note that says which: a hint, still counted as undeclared.
  std::map<std::string, std::string> drop_ins;
  // What to add to the declaration: the undeclared packages no other undeclared one
  // brings by its own Depends and Pre-Depends (gcc-12, not the binutils and cpp-12 it
  // depends on). Each of the others maps to one of these that brings it.
  std::vector<std::string> to_declare;
  std::map<std::string, std::string> undeclared_via;
  std::map<std::string, std::vector<Finding>> recommended;  // used, but only Recommended/Suggested
  std::map<std::string, std::vector<Finding>> probed;       // undeclared packages only probed
  std::map<std::string, std::vector<Finding>> hidden;       // enforce: files looked for, but hidden
  std::vector<HiddenDirectory> hidden_directories;          // enforce: directories looked for, but hidden
  std::vector<UnlistedDirectory> hidden_from_listings;      // enforce: entries listings left out
  std::vector<Finding> unowned;                             // used, owned by no package
  std::vector<Finding> written;                             // written by the command, owned by no package
  std::vector<Finding> unowned_programs;                    // run, owned by no package, not the command's own
  // The command's program as PATH found it ("/root/.pyenv/shims/python3") when no
  // package owns it, and the packaged program of the same name it shadows
  // ("/usr/bin/python3 (python3-minimal)"): "" when there is none.
  std::string command_path, packaged_command;
  std::string own_tree;  // the command's working directory when no package owns it ("" if one does)
  size_t own_files = 0;  // files of own_tree used, owned by no package: the command's own, not listed
  std::vector<std::string> untouched;                       // declared (not for being essential), never used
  // Declared, never used itself, and what used packages its declaration alone brings
  // (a metapackage: build-essential -> gcc, make ...).
  std::map<std::string, std::vector<std::string>> used_through_depends;
  size_t paths = 0;                                         // paths seen in all
  std::map<std::string, std::string> confirmed;             // --confirm: package -> hard, soft, none
  int interrupted_by = 0;                                   // the signal that stopped the check (^C: SIGINT)
  bool confirm_cut_short = false;                           // --confirm did not get through every finding

  // The exit status pkgdep-vfs ends with: 1 when undeclared dependencies were found
  // (observe: an undeclared package used; enforce: the command failed and had looked
  // for hidden files or directories, or listed a directory some were left out of), else 0; 128 + the signal when one stopped it.
  int Verdict() const;
  std::string Interruption() const;  // "SIGINT"
  std::string Text() const;
  std::string Json() const;
};

// Attributes what enforce mode left out of listings to the packages that own it.
void AttributeUnlisted(const DpkgIndex& index, const std::map<std::string, Unlisted>& unlisted, Report& report);

// Files owned by no package that every program reads (and generated caches), as path
// prefixes; "*/__pycache__/" matches anywhere. Extended by --allow-unowned.
std::vector<std::string> DefaultUnownedAllowList();

// Attributes what `record` saw. `allow` lists unowned paths not to report; files
// under `report.own_tree` (when set) are counted, not listed.
void Attribute(const DpkgIndex& index, const std::map<std::string, Touch>& record,
               const std::vector<std::string>& allow, Report& report);

}  // namespace pkgdep
