#include "examples/pkgdep-vfs/report.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "ulsp/core/group.h"

namespace pkgdep {
namespace {

bool Allowed(const std::string& path, const std::vector<std::string>& allow) {
  for (const std::string& a : allow) {
    if (a.starts_with("*/")) {
      if (path.find(a.substr(1)) != std::string::npos) return true;
    } else if (path.starts_with(a)) {
      return true;
    }
  }
  return false;
}

std::string Shorten(const std::string& s, size_t max) {
  return s.size() <= max ? s : s.substr(0, max - 3) + "...";
}

void Section(std::ostringstream& out, const std::string& title, const std::map<std::string, std::vector<Finding>>& by_package,
             const std::map<std::string, std::string>* why = nullptr, size_t per_package = 8) {
  if (by_package.empty()) return;
  out << "\n" << title << " (" << by_package.size() << "):\n";
  for (const auto& [package, findings] : by_package) {
    out << "  " << package;
    if (why != nullptr) {
      if (auto it = why->find(package); it != why->end()) out << "  (" << it->second << ")";
    }
    out << "\n";
    for (size_t i = 0; i < findings.size() && i < per_package; ++i) {
      const Finding& f = findings[i];
      out << "    " << f.path << "  " << UseName(f.touch.use) << " by pid " << f.touch.pid;
      if (!f.touch.argv.empty()) out << " (" << Shorten(f.touch.argv, 60) << ")";
      out << "\n";
    }
    if (findings.size() > per_package) out << "    ... and " << findings.size() - per_package << " more\n";
  }
}

nlohmann::ordered_json FindingsJson(const std::vector<Finding>& findings) {
  auto a = nlohmann::ordered_json::array();
  for (const Finding& f : findings) {
    a.push_back({{"path", f.path}, {"use", std::string(UseName(f.touch.use))}, {"pid", f.touch.pid}, {"argv", f.touch.argv}});
  }
  return a;
}

nlohmann::ordered_json ByPackageJson(const std::map<std::string, std::vector<Finding>>& m) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [p, f] : m) j[p] = FindingsJson(f);
  return j;
}

// When `path` looks read as a drop-in: its directory was listed, and every regular
// file there with the same suffix (".pth", or none: apt.conf.d), at least two, was
// read. A program reading a directory of drop-ins reads them all, whoever put them
// there; one looking for what it needs (Python's import of six.py beside hundreds of
// other modules) reads only that. Returns what it read ("the command read every *.pth
// file of DIR, NAME among them"), or "".
std::string DropIn(const std::string& path, const std::map<std::string, Touch>& record) {
  const size_t slash = path.rfind('/');
  if (slash == 0 || slash == std::string::npos) return "";
  const std::string dir = path.substr(0, slash), name = path.substr(slash + 1);
  const auto listed = record.find(dir);
  if (listed == record.end() || !listed->second.dir || listed->second.use < Use::kListed) return "";
  // A suffix is a kind (".pth", ".conf"), not a version's last digits ("fpc-3.2.2").
  auto suffix = [](std::string_view n) {
    const size_t dot = n.rfind('.');
    if (dot == std::string_view::npos || dot == 0 || dot + 1 == n.size() || std::isalpha(static_cast<unsigned char>(n[dot + 1])) == 0)
      return std::string_view();
    return n.substr(dot);
  };
  const std::string_view kind = suffix(name);
  size_t read = 0;
  std::error_code error;
  std::filesystem::directory_iterator it(DpkgIndex::Canonical(dir), error), end;
  for (int seen = 0; !error && it != end && seen < 4096; it.increment(error), ++seen) {
    const std::string entry = it->path().filename().string();
    // Links count where they lead (their own use is a link read).
    if (it->is_symlink(error) || !it->is_regular_file(error) || suffix(entry) != kind) continue;
    const auto touched = record.find(dir + "/" + entry);
    if (touched == record.end() || touched->second.use < Use::kOpened) return "";
    ++read;
  }
  if (error || it != end || read < 2) return "";
  return std::string("the command read every ") + (kind.empty() ? "file without a suffix" : "*" + std::string(kind) + " file") +
         " of " + dir + ", " + name + " among them";
}

}  // namespace

std::vector<std::string> DefaultUnownedAllowList() {
  return {"/etc/ld.so.cache", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/nsswitch.conf",
          "/etc/localtime", "/etc/hosts", "/etc/resolv.conf", "/etc/host.conf", "/etc/hostname", "/etc/mtab",
          "/etc/machine-id", "/etc/ssl/certs/", "/etc/alternatives/", "/usr/lib/locale/locale-archive",
          "/var/cache/", "/var/lib/", "/var/log/", "/var/tmp/", "/run/", "/tmp/", "/root/", "/home/", "*/__pycache__/",
          "/usr/local/"};
}

void Attribute(const DpkgIndex& index, const std::map<std::string, Touch>& record, const std::vector<std::string>& allow,
               Report& report) {
  report.paths = record.size();
  std::set<std::string> used;
  for (const auto& [path, touch] : record) {
    if (touch.dir) continue;  // directories are ways to files, not uses (and hundreds of packages own /usr)
    // So is merged /usr's /lib, a link the loader's path crosses: the packages own
    // it as the directory /usr/lib, which hundreds of them list. (A link a package
    // ships, to a directory or not, stays a use of it: without the package it fails.)
    struct stat st {};
    if (touch.use == Use::kReadLink && ::lstat(DpkgIndex::Canonical(path).c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      continue;
    const std::vector<std::string> owners = index.Owners(path);
    if (owners.empty()) {
      // What the command wrote is its own output (a build's objects, a repository it
      // made), not a dependency: listed apart. What it used from its working tree
      // (own_tree) is its own too (a build's sources): counted, not listed.
      // A program no package owns is listed even where unowned files are allowed
      // (/usr/local, /root): a python3 of pyenv's found before Debian's makes every
      // finding about that other program.
      if (touch.use == Use::kWritten || touch.written) {
        report.written.push_back({path, touch});
      } else if (IsUse(touch.use) && !report.own_tree.empty() && path.starts_with(report.own_tree + "/")) {
        ++report.own_files;
      } else if (touch.use == Use::kExecuted) {
        report.unowned_programs.push_back({path, touch});
      } else if (IsUse(touch.use) && !Allowed(path, allow)) {
        report.unowned.push_back({path, touch});
      }
      continue;
    }
    bool declared = false;
    for (const std::string& o : owners) {
      if (report.closure.Declares(o)) {
        declared = true;
        if (IsUse(touch.use)) used.insert(o);
      }
    }
    if (declared) continue;
    // A hidden directory is listed once with the packages that ship it: a search
    // path (perl's /usr/lib/x86_64-linux-gnu/perl5) is shipped by dozens.
    if (report.mode == "enforce" && touch.use == Use::kMissing &&
        ::stat(DpkgIndex::Canonical(path).c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      report.hidden_directories.push_back({{path, touch}, owners});
      continue;
    }
    for (const std::string& o : owners) {
      if (report.mode == "enforce" && touch.use == Use::kMissing) {
        // The view hid it: it exists, but its package is not declared.
        report.hidden[o].push_back({path, touch});
      } else if (IsUse(touch.use)) {
        if (report.closure.recommended.contains(o)) {
          report.recommended[o].push_back({path, touch});
        } else {
          report.undeclared[o].push_back({path, touch});
        }
      } else if (touch.use != Use::kMissing) {
        report.probed[o].push_back({path, touch});
      }
    }
  }
  for (const auto& [p, findings] : report.undeclared) {
    for (const Finding& f : findings) {
      if (f.touch.use != Use::kOpened) continue;
      if (const std::string why = DropIn(f.path, record); !why.empty()) {
        report.drop_ins[p] = "perhaps a drop-in: " + why;
        break;
      }
    }
  }
  // What to declare: a used package that another used undeclared one depends on
  // (transitively) comes with it, unless it depends on that one in turn (a cycle, whose
  // packages are all named). Found from each one's own closure.
  std::map<std::string, Closure> brings;
  for (const auto& [p, f] : report.undeclared)
    if (auto c = DeclaredClosure(index, {p})) brings.emplace(p, std::move(*c));
  auto declares = [&brings](const std::string& q, const std::string& p) {
    const auto it = brings.find(q);
    return it != brings.end() && it->second.Declares(p);
  };
  auto brought_by = [&](const std::string& p, const std::string& q) { return p != q && declares(q, p) && !declares(p, q); };
  for (const auto& [p, f] : report.undeclared) {
    if (std::none_of(brings.begin(), brings.end(), [&](const auto& b) { return brought_by(p, b.first); }))
      report.to_declare.push_back(p);
  }
  for (const auto& [p, f] : report.undeclared) {
    for (const std::string& root : report.to_declare) {
      if (brought_by(p, root)) {
        report.undeclared_via[p] = root;
        break;
      }
    }
  }
  // A package both used and probed is a used one.
  for (const auto& [p, f] : report.undeclared) report.probed.erase(p);
  for (const auto& [p, f] : report.recommended) report.probed.erase(p);
  // "Declared, never used": the declarations of whoever is checked, each of which it
  // could drop: with --deps the packages named; with --package that package and its
  // own Depends and Pre-Depends. Not what those depend on in turn (their maintainers'
  // declarations, not this one's), nor the essential set.
  std::set<std::string> own;
  for (const auto& [package, why] : report.closure.declared) {
    if (why == "named") own.insert(package);
  }
  if (report.checks_a_package) {
    const std::set<std::string> named = own;
    for (const auto& [package, why] : report.closure.declared)
      for (const std::string& o : named)
        if (why == "Depends of " + o || why == "Pre-Depends of " + o) own.insert(package);
  }
  // A package of documentation alone (gcc-12-base, which libgcc-s1 depends on) is
  // never used by any program: listing it would be noise in every report.
  // One never used itself that declares used packages no other declaration does (a
  // metapackage: build-essential, by whose Depends gcc and make are declared) is
  // listed apart: dropping it would leave them undeclared. Found by computing the
  // closure again without it.
  const Package* checked = report.checks_a_package ? index.Find(report.closure.roots.front()) : nullptr;
  auto names = [&index](const std::vector<std::string>& group, const std::string& p) {
    return std::any_of(group.begin(), group.end(), [&](const std::string& alt) {
      const auto sat = index.Satisfying(alt);
      return std::any_of(sat.begin(), sat.end(), [&](const Package* q) { return q->name == p; });
    });
  };
  auto lost_without = [&](const std::string& p) {
    std::vector<std::string> roots;
    auto keep = [&](const std::vector<std::string>& group) {
      if (names(group, p)) return;
      std::string text;
      for (const std::string& alt : group) text += (text.empty() ? "" : " | ") + alt;
      roots.push_back(text);
    };
    if (checked != nullptr) {
      for (const auto* relations : {&checked->pre_depends, &checked->depends})
        for (const auto& group : *relations) keep(group);
    } else {
      for (const std::string& r : report.closure.roots)
        for (const auto& group : Relations(r)) keep(group);
    }
    std::vector<std::string> lost;
    const auto rest = DeclaredClosure(index, roots);
    if (!rest) return lost;  // a relation of the package's that nothing satisfies: no claim
    for (const std::string& u : used)
      if (u != p && !rest->Declares(u) && (checked == nullptr || u != checked->name)) lost.push_back(u);
    return lost;
  };
  for (const std::string& p : own) {
    if (used.contains(p) || index.ShipsOnlyDocumentation(p)) continue;
    std::vector<std::string> lost;
    if (checked == nullptr || p != checked->name) lost = lost_without(p);
    if (!lost.empty()) {
      report.used_through_depends[p] = std::move(lost);
    } else {
      report.untouched.push_back(p);
    }
  }
}

void AttributeUnlisted(const DpkgIndex& index, const std::map<std::string, Unlisted>& unlisted, Report& report) {
  for (const auto& [dir, u] : unlisted) {
    UnlistedDirectory d{dir, u.pid, u.argv, {}, u.paths.size()};
    for (const std::string& path : u.paths)
      for (const std::string& o : index.Owners(path)) ++d.packages[o];
    report.hidden_from_listings.push_back(std::move(d));
  }
}

std::string Report::Interruption() const {
  const char* name = interrupted_by != 0 ? sigabbrev_np(interrupted_by) : nullptr;
  return name != nullptr ? std::string("SIG") + name : "signal " + std::to_string(interrupted_by);
}

int Report::Verdict() const {
  if (interrupted_by != 0) return 128 + interrupted_by;
  if (mode == "enforce")
    return status != 0 && !(hidden.empty() && hidden_directories.empty() && hidden_from_listings.empty()) ? 1 : 0;
  return undeclared.empty() ? 0 : 1;
}

std::string Report::Text() const {
  std::ostringstream out;
  const std::string cmd = ulsp::core::JoinCommand(command);
  size_t essentials = 0;
  for (const auto& [p, why] : closure.declared)
    if (why == "essential") ++essentials;
  std::string roots;
  for (const auto& r : closure.roots) roots += (roots.empty() ? "" : ", ") + r;
  out << "pkgdep-vfs: " << Shorten(cmd, 70) << "\n";
  out << "  mode " << mode << "; declared: " << roots << " and " << closure.declared.size() - closure.roots.size()
      << " packages more (Depends, Pre-Depends, " << essentials << " essential); exit status " << status << " after "
      << static_cast<int>(seconds * 1000) / 1000.0 << " s; " << paths << " paths touched\n";
  std::map<std::string, std::string> drop_in_notes = drop_ins;
  if (confirmed.empty())  // else the confirmation below says
    for (auto& [p, note] : drop_in_notes) note += "; --confirm tells whether it needs the package";
  for (const auto& [p, root] : undeclared_via) {
    std::string& note = drop_in_notes[p];
    note = "comes with " + root + (note.empty() ? "" : "; " + note);
  }
  Section(out, "Undeclared dependencies: used, but neither declared nor essential", undeclared, &drop_in_notes);
  if (to_declare.size() < undeclared.size()) {
    std::string list;
    for (const std::string& p : to_declare) list += (list.empty() ? "" : ", ") + p;
    out << "  Declaring " << list << " would declare all " << undeclared.size() << " (the others come with "
        << (to_declare.size() == 1 ? "it" : "them") << ").\n";
  }
  std::map<std::string, std::string> why;
  for (const auto& [p, f] : recommended) why[p] = closure.recommended.at(p);
  Section(out, "Used, but only Recommended or Suggested (never counted as declared)", recommended, &why);
  Section(out, "Hidden by enforce mode: looked for, owned only by undeclared packages", hidden);
  if (!hidden_directories.empty()) {
    out << "\nHidden by enforce mode: directories looked for, shipped only by undeclared packages ("
        << hidden_directories.size() << "):\n";
    for (const auto& [f, packages] : hidden_directories) {
      out << "  " << f.path << "  " << UseName(f.touch.use) << " by pid " << f.touch.pid;
      if (!f.touch.argv.empty()) out << " (" << Shorten(f.touch.argv, 60) << ")";
      out << "\n    shipped by ";
      for (size_t i = 0; i < packages.size() && i < 6; ++i) out << (i == 0 ? "" : ", ") << packages[i];
      if (packages.size() > 6) out << " and " << packages.size() - 6 << " more";
      out << "\n";
    }
  }
  if (!hidden_from_listings.empty() && status == 0) {
    // The command did without them: a count (`ls /usr/bin` leaves out hundreds).
    std::set<std::string> packages;
    size_t entries = 0;
    for (const UnlistedDirectory& d : hidden_from_listings) {
      entries += d.entries;
      for (const auto& [p, n] : d.packages) packages.insert(p);
    }
    out << "\nHidden by enforce mode: left out of " << hidden_from_listings.size() << " director"
        << (hidden_from_listings.size() == 1 ? "y" : "ies") << " the command listed: " << entries << " entr"
        << (entries == 1 ? "y" : "ies") << " of " << packages.size() << " package" << (packages.size() == 1 ? "" : "s")
        << " (the command succeeded without them; the JSON report lists them)\n";
  } else if (!hidden_from_listings.empty()) {
    out << "\nHidden by enforce mode: left out of directories the command listed (a program that finds files by\n"
           "listing, as Python's import does, misses them without looking one up) ("
        << hidden_from_listings.size() << "):\n";
    for (const UnlistedDirectory& d : hidden_from_listings) {
      out << "  " << d.dir << "  listed by pid " << d.pid;
      if (!d.argv.empty()) out << " (" << Shorten(d.argv, 60) << ")";
      // Every package, wrapped: the one the command missed is somewhere in the list.
      out << "\n";
      std::string line = "    " + std::to_string(d.entries) + (d.entries == 1 ? " entry of " : " entries of ");
      size_t i = 0;
      for (const auto& [package, count] : d.packages) {
        const std::string item = package + (++i < d.packages.size() ? "," : "");
        if (line.size() + 1 + item.size() > 100 && line.size() > 6) {
          out << line << "\n";
          line = "     ";
        }
        line += (line.back() == ' ' ? "" : " ") + item;
      }
      out << line << "\n";
    }
  }
  Section(out, "Probed only (looked up or listed, never opened: not uses)", probed, nullptr, 3);
  if (!unowned.empty()) {
    out << "\nUsed, owned by no package (" << unowned.size() << "):\n";
    for (size_t i = 0; i < unowned.size() && i < 12; ++i) {
      out << "  " << unowned[i].path << "  " << UseName(unowned[i].touch.use) << " by pid " << unowned[i].touch.pid;
      if (!unowned[i].touch.argv.empty()) out << " (" << Shorten(unowned[i].touch.argv, 60) << ")";
      out << "\n";
    }
    if (unowned.size() > 12) out << "  ... and " << unowned.size() - 12 << " more\n";
  }
  if (!unowned_programs.empty()) {
    out << "\nPrograms run that no package owns (what they use is not what the packages' programs use) ("
        << unowned_programs.size() << "):\n";
    for (size_t i = 0; i < unowned_programs.size() && i < 12; ++i) {
      const Finding& f = unowned_programs[i];
      out << "  " << f.path << "  " << UseName(f.touch.use) << " by pid " << f.touch.pid;
      if (!f.touch.argv.empty()) out << " (" << Shorten(f.touch.argv, 60) << ")";
      out << "\n";
    }
    if (unowned_programs.size() > 12) out << "  ... and " << unowned_programs.size() - 12 << " more\n";
  }
  if (!packaged_command.empty())
    out << "\nNote: " << command.front() << " is " << command_path << " on this PATH, which no package owns; the packaged "
        << command.front() << " is " << packaged_command << ": give its path to check that one.\n";
  if (own_files != 0)
    out << "\nUsed from the working directory " << own_tree << ", owned by no package (the command's own, not listed): "
        << own_files << " file" << (own_files == 1 ? "" : "s") << "\n";
  if (!written.empty()) {
    out << "\nWritten by the command, owned by no package (its output, not dependencies) (" << written.size() << "):\n";
    for (size_t i = 0; i < written.size() && i < 5; ++i) out << "  " << written[i].path << "\n";
    if (written.size() > 5) out << "  ... and " << written.size() - 5 << " more\n";
  }
  if (!untouched.empty()) {
    std::string list;
    for (const auto& p : untouched) list += (list.empty() ? "" : ", ") + p;
    out << "\nDeclared, never used (" << untouched.size() << "): " << list << "\n";
  }
  if (!used_through_depends.empty()) {
    out << "\nDeclared, never used itself, but without it used packages would be undeclared ("
        << used_through_depends.size() << "):\n";
    for (const auto& [p, lost] : used_through_depends) {
      std::string list;
      for (size_t i = 0; i < lost.size() && i < 6; ++i) list += (i == 0 ? "" : ", ") + lost[i];
      if (lost.size() > 6) list += " and " + std::to_string(lost.size() - 6) + " more";
      out << "  " << p << " (" << list << ")\n";
    }
  }
  if (!closure.unsatisfied.empty()) {
    out << "\nDeclared relations no installed package satisfies (" << closure.unsatisfied.size() << "):\n";
    for (const auto& u : closure.unsatisfied) out << "  " << u << "\n";
  }
  if (!confirmed.empty()) {
    out << "\nConfirmed by running again without each (hard: exit status changed; soft: output changed;\n"
           "every run wrote to a scratch layer, removed after it: the command's changes to files were not kept):\n";
    for (const auto& [p, verdict] : confirmed) out << "  " << p << ": " << verdict << "\n";
  }
  out << "\n";
  if (interrupted_by != 0) {
    out << "Result: interrupted by " << Interruption() << " (exit " << Verdict() << "); what the command did until then: "
        << undeclared.size() << " undeclared dependenc" << (undeclared.size() == 1 ? "y" : "ies")
        << (confirm_cut_short ? ", not all confirmed" : "") << "\n";
  } else if (mode == "enforce") {
    out << (Verdict() == 1 ? "Result: the command failed with only its declared dependencies visible (exit 1)\n"
                           : "Result: the command ran with only its declared dependencies visible (exit 0)\n");
  } else if (undeclared.empty()) {
    out << "Result: nothing undeclared (exit 0)\n";
  } else {
    out << "Result: " << undeclared.size() << " undeclared dependenc" << (undeclared.size() == 1 ? "y" : "ies") << " (exit 1)\n";
  }
  return out.str();
}

std::string Report::Json() const {
  nlohmann::ordered_json j;
  j["command"] = command;
  j["mode"] = mode;
  j["status"] = status;
  j["seconds"] = seconds;
  j["roots"] = closure.roots;
  j["declared"] = closure.declared;
  j["recommended"] = closure.recommended;
  j["unsatisfied"] = closure.unsatisfied;
  j["paths_touched"] = paths;
  j["undeclared"] = ByPackageJson(undeclared);
  j["drop_ins"] = drop_ins;
  j["to_declare"] = to_declare;
  j["undeclared_via"] = undeclared_via;
  j["recommended_only"] = ByPackageJson(recommended);
  j["hidden"] = ByPackageJson(hidden);
  j["hidden_directories"] = nlohmann::ordered_json::array();
  for (const auto& [f, packages] : hidden_directories) {
    j["hidden_directories"].push_back(FindingsJson({f})[0]);
    j["hidden_directories"].back()["packages"] = packages;
  }
  j["hidden_from_listings"] = nlohmann::ordered_json::array();
  for (const UnlistedDirectory& d : hidden_from_listings)
    j["hidden_from_listings"].push_back(
        {{"dir", d.dir}, {"pid", d.pid}, {"argv", d.argv}, {"entries", d.entries}, {"packages", d.packages}});
  j["probed_only"] = ByPackageJson(probed);
  j["unowned"] = FindingsJson(unowned);
  j["written"] = FindingsJson(written);
  j["unowned_programs"] = FindingsJson(unowned_programs);
  j["packaged_command"] = packaged_command.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(packaged_command);
  j["own_tree"] = own_tree.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(own_tree);
  j["own_files"] = own_files;
  j["untouched"] = untouched;
  j["used_through_depends"] = used_through_depends;
  j["confirmed"] = confirmed;
  if (interrupted_by != 0) j["interrupted"] = Interruption();
  j["verdict"] = Verdict();
  return j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace pkgdep
