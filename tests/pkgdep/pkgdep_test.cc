// pkgdep-vfs on real Debian programs, each case with the truth it rests on, checked
// here against dpkg itself before pkgdep-vfs is asked.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>

#include "examples/pkgdep-vfs/dpkg_index.h"
#include "tests/vfs/mount_fixture.h"

namespace ulsp::testing {
namespace {

const std::string kPkgdep = PKGDEP_BIN;

struct Result {
  int status;
  std::string out, err;
  nlohmann::json json;
};

class PkgdepTest : public ::testing::Test {
 protected:
  // Runs pkgdep-vfs check ARGS from `cwd` (by default "/", which packages own: no
  // file is the command's own), with `env` ("NAME=VALUE ...") added to its environment.
  Result Check(const std::string& args, const std::string& cwd = "/", const std::string& env = "") {
    const int status = Shell("cd " + cwd + " && " + env + " " + kPkgdep + " check " + args.substr(0, args.find(" -- ")) + " --json " + dir_ / "r.json" +
                             args.substr(args.find(" -- ")) + " > " + dir_ / "out" + " 2> " + dir_ / "err");
    Result r{status, Output("cat " + dir_ / "out"), Output("cat " + dir_ / "err"), nullptr};
    std::ifstream in(dir_ / "r.json");
    if (in) r.json = nlohmann::json::parse(in, nullptr, false);
    return r;
  }
  // The truth behind a case: what dpkg says, asked directly.
  static std::string Dpkg(const std::string& query) { return Output("dpkg-query " + query + " 2>/dev/null"); }
  // A directory for the command to work in, removed when the test ends. Here, not in
  // /tmp or /var/tmp: those are allow-listed (and /tmp is the group's own). "" if it
  // could not be made.
  std::string WorkDir() {
    std::string dir = (std::filesystem::current_path() / "pkgdep-test.XXXXXX").string();
    if (::mkdtemp(dir.data()) == nullptr) return "";
    work_dirs_.push_back(dir);
    return dir;
  }
  void TearDown() override {
    for (const auto& d : work_dirs_) std::filesystem::remove_all(d);
    EXPECT_EQ(Output("grep -c ' fuse.ulsp ' /proc/self/mountinfo"), "0\n");
  }
  std::vector<std::string> work_dirs_;
  TempDir dir_;
};

// coreutils declares no Python: its Depends and Pre-Depends are C libraries. Running
// python3 "as coreutils" uses python3's interpreter, owned by python3.11-minimal.
TEST_F(PkgdepTest, ACommandThatUsesAnUndeclaredPackageIsCaught) {
  ASSERT_EQ(Dpkg("-W -f='${Pre-Depends} ${Depends}' coreutils").find("python"), std::string::npos);
  ASSERT_EQ(Dpkg("-S /usr/bin/python3.11"), "python3.11-minimal: /usr/bin/python3.11\n");
  auto r = Check("--deps coreutils -- /usr/bin/python3 -c 'print(40 + 2)'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_EQ(r.out.substr(0, 3), "42\n");  // the command ran as usual
  ASSERT_TRUE(r.json.is_object()) << r.out;
  ASSERT_TRUE(r.json["undeclared"].contains("python3.11-minimal")) << r.out;
  bool executed = false;
  for (const auto& f : r.json["undeclared"]["python3.11-minimal"]) {
    if (f["path"] == "/usr/bin/python3.11" && f["use"] == "executed") {
      executed = true;
      EXPECT_EQ(f["argv"], "/usr/bin/python3 -c print(40 + 2)");  // the process, after its exec
      EXPECT_GE(f["pid"].get<int>(), 2);
    }
  }
  EXPECT_TRUE(executed) << r.out;
  EXPECT_NE(r.out.find("Undeclared dependencies"), std::string::npos);
  EXPECT_EQ(r.json["verdict"], 1);
}

// A real Debian finding: libssl3 reads /etc/ssl/openssl.cnf, which the openssl
// package ships, and neither curl nor libcurl4 nor libssl3 depends on openssl.
TEST_F(PkgdepTest, CurlReadsOpensslsConfigurationWithoutDeclaringIt) {
  ASSERT_EQ(Dpkg("-S /etc/ssl/openssl.cnf"), "openssl: /etc/ssl/openssl.cnf\n");
  for (const char* p : {"curl", "libcurl4", "libssl3"})
    ASSERT_EQ(Dpkg(std::string("-W -f='${Pre-Depends} ${Depends}' ") + p).find("openssl"), std::string::npos) << p;
  auto r = Check("--package curl -- curl --version");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  ASSERT_TRUE(r.json["undeclared"].contains("openssl")) << r.out;
  EXPECT_EQ(r.json["undeclared"]["openssl"][0]["path"], "/etc/ssl/openssl.cnf");
  EXPECT_EQ(r.json["undeclared"]["openssl"][0]["argv"], "curl --version");
}

// ls of coreutils' own documentation: ls is coreutils, its libraries are coreutils'
// Pre-Depends, the rest is essential.
TEST_F(PkgdepTest, ACommandThatDeclaresEverythingIsClean) {
  ASSERT_EQ(Dpkg("-S /bin/ls"), "coreutils: /bin/ls\n");  // dpkg spells it /bin (merged /usr)
  auto r = Check("--package coreutils -- ls /usr/share/doc/coreutils");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("copyright\n"), std::string::npos);
  EXPECT_TRUE(r.json["undeclared"].empty()) << r.out;
  EXPECT_NE(r.out.find("Result: nothing undeclared (exit 0)"), std::string::npos);
}

// make running a C compile uses gcc-12 and what gcc-12 depends on (cpp-12, binutils
// and the libraries they load), and libc6-dev's headers, which gcc-12 only
// Recommends: none of them is make's. What to declare is gcc-12 and libc6-dev; the
// others come with gcc-12.
TEST_F(PkgdepTest, WhatToDeclareLeavesOutWhatComesWithAnotherUndeclaredPackage) {
  ASSERT_EQ(Dpkg("-W -f='${Pre-Depends} ${Depends}' make").find("gcc"), std::string::npos);
  const std::string gcc = Dpkg("-W -f='${Depends}' gcc-12");
  for (const char* p : {"cpp-12 ", "binutils ", "libisl23 "}) ASSERT_NE(gcc.find(p), std::string::npos) << gcc;
  ASSERT_EQ(gcc.find("libc6-dev"), std::string::npos) << gcc;
  ASSERT_NE(Dpkg("-W -f='${Recommends}' gcc-12").find("libc6-dev"), std::string::npos);
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  std::ofstream(work + "/hello.c") << "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n";
  std::ofstream(work + "/Makefile") << "hello: hello.c\n\tgcc-12 -o $@ $<\n";
  auto r = Check("--package make -- make", work);
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  ASSERT_TRUE(r.json.is_object()) << r.out;
  EXPECT_EQ(r.json["to_declare"], nlohmann::json({"gcc-12", "libc6-dev"})) << r.out;
  for (const char* p : {"cpp-12", "binutils", "libisl23"}) {
    ASSERT_TRUE(r.json["undeclared"].contains(p)) << p << "\n" << r.out;
    EXPECT_EQ(r.json["undeclared_via"][p], "gcc-12") << p;
  }
  EXPECT_FALSE(r.json["undeclared_via"].contains("libc6-dev"));
  EXPECT_NE(r.out.find("  cpp-12  (comes with gcc-12)\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  Declaring gcc-12, libc6-dev would declare all " + std::to_string(r.json["undeclared"].size()) +
                       " (the others come with them).\n"),
            std::string::npos)
      << r.out;
}

// "Declared, never used" as tar: /usr/bin/true is coreutils' and loads libc alone, so
// tar and what only tar pre-depends on (libacl1) go unused. Two things must not hide
// that or pad it: the loader crossing merged /usr's /lib link to /usr/lib (which
// hundreds of packages list, tar and libacl1 among them) is no use of them, and
// gcc-12-base (a Depends of libgcc-s1) ships only documentation, which no program uses.
TEST_F(PkgdepTest, DeclaredButNeverUsedListsWhatTheCommandCouldDoWithout) {
  ASSERT_EQ(Output("ldd /usr/bin/true | grep -c -e libacl -e libselinux"), "0\n");
  ASSERT_EQ(Output("readlink /lib"), "usr/lib\n");
  ASSERT_EQ(Dpkg("-S /usr/lib | tr ',' '\\n' | grep -c -w -e tar -e libacl1"), "2\n");
  ASSERT_EQ(Dpkg("-L gcc-12-base | grep -v -c -e ^/usr/share/doc -e '^/\\.$' -e '^/usr$' -e '^/usr/share$'"), "0\n");
  auto r = Check("--package tar -- true");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  const auto untouched = r.json["untouched"].get<std::set<std::string>>();
  EXPECT_TRUE(untouched.contains("tar")) << r.out;
  EXPECT_TRUE(untouched.contains("libacl1")) << r.out;
  EXPECT_FALSE(untouched.contains("libc6")) << r.out;
  EXPECT_FALSE(untouched.contains("gcc-12-base")) << r.out;
  // Given as --deps, tar is the declaration and libacl1 tar's own: only tar is listed
  // (once the whole Depends chain was, thirty packages for --deps make,gcc,libc6-dev).
  r = Check("--deps tar -- true");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.json["untouched"], nlohmann::json::array({"tar"})) << r.out;
}

// A declaration never used itself can still be what declares used packages: gcc (the
// package of the /usr/bin/gcc link) is how --deps gcc declares gcc-12, which
// `gcc-12 --version` runs. Once it was listed as "declared, never used", inviting
// its removal; it is dropped only when the rest of the declaration still declares
// every used package, as with --deps gcc,gcc-12.
TEST_F(PkgdepTest, ADeclarationUsedOnlyThroughItsDependsIsNotNeverUsed) {
  ASSERT_EQ(Dpkg("-S /usr/bin/gcc-12"), "gcc-12: /usr/bin/gcc-12\n");
  ASSERT_NE(Dpkg("-W -f='${Depends}' gcc").find("gcc-12"), std::string::npos);
  auto r = Check("--deps gcc -- gcc-12 --version");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_TRUE(r.json["untouched"].empty()) << r.out;
  ASSERT_TRUE(r.json["used_through_depends"].contains("gcc")) << r.out;
  EXPECT_TRUE(r.json["used_through_depends"]["gcc"].get<std::set<std::string>>().contains("gcc-12")) << r.out;
  EXPECT_NE(r.out.find("\nDeclared, never used itself, but without it used packages would be undeclared (1):\n  gcc ("),
            std::string::npos)
      << r.out;
  r = Check("--deps gcc,gcc-12 -- gcc-12 --version");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.json["untouched"], nlohmann::json::array({"gcc"})) << r.out;
  EXPECT_TRUE(r.json["used_through_depends"].empty()) << r.out;
}

// Enforce: a hidden directory is listed once, with every undeclared package that
// ships it, not once under each: perl looks for modules in /usr/lib/ARCH/perl5,
// which every installed XS module package ships (libhtml-parser-perl, which
// devscripts pulls in, at least), none of them in perl's closure. A listing of a
// hidden directory fails as on a system without its package, and that is a finding.
TEST_F(PkgdepTest, AHiddenDirectoryIsListedOnceWithThePackagesThatShipIt) {
  const std::string search = "/usr/lib/" + Output("gcc -print-multiarch | tr -d '\\n'") + "/perl5";
  // "a:amd64, b: /usr/lib/x86_64-linux-gnu/perl5" -> a b, one a line, sorted
  const std::string listed =
      Output("dpkg-query -S " + search + " | sed 's/: \\/.*//' | tr -d ' ' | tr , '\\n' | sed 's/:.*//' | sort");
  ASSERT_FALSE(listed.empty()) << search;
  std::vector<std::string> owners;
  std::istringstream in(listed);
  for (std::string line; std::getline(in, line);) owners.push_back(line);
  auto r = Check("--mode enforce --deps perl -- perl -MJSON::PP -e 'print 6 * 7'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.out.substr(0, 2), "42");
  auto hidden = [](const nlohmann::json& report, const std::string& path) {
    for (const auto& d : report["hidden_directories"])
      if (d["path"] == path) return d;
    return nlohmann::json();
  };
  const nlohmann::json entry = hidden(r.json, search);
  ASSERT_TRUE(entry.is_object()) << r.out;
  EXPECT_EQ(entry["use"], "not found");
  auto packages = entry["packages"].get<std::vector<std::string>>();
  std::sort(packages.begin(), packages.end());
  EXPECT_EQ(packages, owners);
  for (const auto& [package, findings] : r.json["hidden"].items())
    for (const auto& f : findings) EXPECT_NE(f["path"], search) << package;
  EXPECT_EQ(r.out.find(search + "  not found", r.out.find(search + "  not found") + 1), std::string::npos) << r.out;
  r = Check("--mode enforce --deps coreutils -- ls /usr/share/doc/curl");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_EQ(r.json["status"], 2);
  EXPECT_EQ(hidden(r.json, "/usr/share/doc/curl")["packages"], nlohmann::json({"curl"})) << r.out;
}

// test -e and ls of a directory look and list, and open nothing of python's: probes.
TEST_F(PkgdepTest, ACommandThatOnlyProbesIsNotCharged) {
  auto r = Check("--deps coreutils -- sh -c 'test -e /usr/bin/python3.11 && ls /usr/lib/python3.11 > /dev/null; echo $?'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.out.substr(0, 2), "0\n");
  EXPECT_TRUE(r.json["undeclared"].empty()) << r.out;
  EXPECT_TRUE(r.json["probed_only"].contains("python3.11-minimal")) << r.out;
}

// Enforce: python3 is not in coreutils' closure, so /usr/bin/python3 does not exist.
TEST_F(PkgdepTest, EnforceModeMakesTheUndeclaredUseFail) {
  auto r = Check("--mode enforce --deps coreutils -- /usr/bin/python3 -c 'print(1)'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_EQ(r.json["status"], 127);  // as on a system without python3: not found
  EXPECT_TRUE(r.json["hidden"].contains("python3-minimal")) << r.out;
  // The process that looked for it never became python3: it is named by the command
  // it was to run, not by pkgdep-vfs's own argv, which it still had.
  EXPECT_EQ(r.json["hidden"]["python3-minimal"][0]["argv"], "/usr/bin/python3 -c print(1) (before its exec)") << r.out;
  EXPECT_NE(r.err.find("/usr/bin/python3: No such file or directory"), std::string::npos) << r.err;
  // What is declared stays visible.
  r = Check("--mode enforce --package coreutils -- ls /usr/share/doc/coreutils");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("copyright\n"), std::string::npos);
}

// A program that finds files by listing a directory never looks up what the listing
// left out: Python's import lists dist-packages and, with python3-six hidden, fails
// with "No module named 'six'" without asking for six.py. Once, such a run's report
// named nothing the command had missed. `ls | grep` does the same as Python here,
// with packages the test machine always has: curl's /usr/share/doc/curl.
TEST_F(PkgdepTest, EnforceModeNamesWhatListingsLeftOut) {
  ASSERT_EQ(Dpkg("-S /usr/share/doc/curl"), "curl: /usr/share/doc/curl\n");
  auto r = Check("--mode enforce --deps coreutils,dash,grep -- sh -c 'ls /usr/share/doc | grep -qx curl'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_EQ(r.json["status"], 1);
  EXPECT_FALSE(r.json["hidden"].contains("curl")) << r.out;  // it was never looked up by name
  const nlohmann::json* doc = nullptr;
  for (const auto& d : r.json["hidden_from_listings"])
    if (d["dir"] == "/usr/share/doc") doc = &d;
  ASSERT_NE(doc, nullptr) << r.out;
  EXPECT_TRUE((*doc)["packages"].contains("curl")) << r.out;
  EXPECT_FALSE((*doc)["packages"].contains("coreutils")) << r.out;  // declared: listed
  EXPECT_EQ((*doc)["argv"], "ls /usr/share/doc") << r.out;
  EXPECT_NE(r.out.find("Hidden by enforce mode: left out of directories the command listed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" curl,"), std::string::npos) << r.out;
  // A command that did without them gets a count.
  r = Check("--mode enforce --deps coreutils -- ls /usr/share/doc");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.json["hidden_from_listings"].size(), 1u) << r.out;
  EXPECT_NE(r.out.find("(the command succeeded without them; the JSON report lists them)"), std::string::npos) << r.out;
}

// A program that reads every file of a directory (apt's apt.conf.d, Python's *.pth
// files in dist-packages) reads what other packages dropped there, needed or not:
// python3 is charged with python3-setuptools for its distutils-precedence.pth. Such
// a use stays undeclared (the command may need it) but is marked as perhaps a
// drop-in; reading one file of the directory is not marked. (Listings were once not
// recorded at all: the mount answers opendir with "list without handles".) The
// case here: every command's completion file, git's among them.
TEST_F(PkgdepTest, AFileReadWithEveryOtherOfItsKindIsMarkedPerhapsADropIn) {
  // bash-completion's directory: a file per command, each from the command's package.
  const std::string dir = "/usr/share/bash-completion/completions";
  ASSERT_EQ(Dpkg("-S " + dir + "/git"), "git: " + dir + "/git\n");
  ASSERT_EQ(Dpkg("-W -f='${Pre-Depends} ${Depends}' coreutils dash").find("git"), std::string::npos);
  auto r = Check("--deps coreutils,dash -- sh -c 'cat " + dir + "/* > /dev/null'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  ASSERT_TRUE(r.json["undeclared"].contains("git")) << r.out;
  ASSERT_TRUE(r.json["drop_ins"].contains("git")) << r.out;
  EXPECT_EQ(r.json["drop_ins"]["git"], "perhaps a drop-in: the command read every file without a suffix of " + dir +
                                           ", git among them")
      << r.out;
  EXPECT_NE(r.out.find(", git among them; --confirm tells whether it needs the package)\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\n  git  (perhaps a drop-in: the command read every file without a suffix of " + dir + ", "),
            std::string::npos)
      << r.out;
  r = Check("--deps coreutils,dash -- sh -c 'ls " + dir + " > /dev/null && cat " + dir + "/git'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_TRUE(r.json["undeclared"].contains("git")) << r.out;
  EXPECT_TRUE(r.json["drop_ins"].empty()) << r.out;
}

// cc is an alternative: /usr/bin/cc and /etc/alternatives/cc are owned by no package,
// and lead to gcc's /usr/bin/gcc; gcc counts, and neither link is "unowned".
TEST_F(PkgdepTest, AlternativesCountForTheirTarget) {
  ASSERT_EQ(Dpkg("-S /usr/bin/cc"), "");
  ASSERT_EQ(Output("readlink /etc/alternatives/cc"), "/usr/bin/gcc\n");
  auto r = Check("--deps coreutils -- cc --version");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_TRUE(r.json["undeclared"].contains("gcc")) << r.out;
  for (const auto& u : r.json["unowned"]) {
    EXPECT_NE(u["path"], "/usr/bin/cc");
    EXPECT_NE(u["path"], "/etc/alternatives/cc");
  }
}

// Python runs a module from its __pycache__/NAME.cpython-311.pyc, made at install
// (py3compile) and listed by no package, and only stats NAME.py. Once, a module's
// package was therefore "probed only", never used: an undeclared Python library went
// unreported, and a declared one was "declared, never used".
TEST_F(PkgdepTest, APythonModulesCompiledCacheCountsForItsPackage) {
  const std::string dir = "/usr/lib/python3.11/json";
  ASSERT_EQ(Dpkg("-S " + dir + "/__init__.py"), "libpython3.11-stdlib:amd64: " + dir + "/__init__.py\n");
  ASSERT_EQ(Dpkg("-S " + dir + "/__pycache__/__init__.cpython-311.pyc"), "");
  ASSERT_TRUE(std::filesystem::exists(dir + "/__pycache__/__init__.cpython-311.pyc"));
  auto r = Check("--deps coreutils -- /usr/bin/python3 -c 'import json'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  bool ran = false;
  for (const auto& f : r.json["undeclared"]["libpython3.11-stdlib"])
    ran = ran || (f["path"] == dir + "/__pycache__/__init__.cpython-311.pyc" && f["use"] == "opened");
  EXPECT_TRUE(ran) << r.out;
}

// A file the command reads that no package owns is worth a look (a configuration
// nobody ships); one it writes is its output. Once, every file `git init` and a
// commit wrote was listed as "used, owned by no package", burying the one it read.
TEST_F(PkgdepTest, WhatTheCommandWritesIsItsOutputNotAnUnownedUse) {
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  ASSERT_EQ(Shell("echo settings > " + work + "/in"), 0);
  auto r = Check("--deps coreutils -- sh -c 'cat " + work + "/in > " + work + "/out'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  ASSERT_EQ(r.json["unowned"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["unowned"][0]["path"], work + "/in");
  ASSERT_EQ(r.json["written"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["written"][0]["path"], work + "/out");
  EXPECT_NE(r.out.find("Written by the command, owned by no package (its output, not dependencies) (1):\n  " + work +
                       "/out\n"),
            std::string::npos)
      << r.out;
  // Who read it, as every other section says (its command line was once left out).
  // The command line is cut to 60 characters, and a long work directory (CI's) is cut.
  const std::string head = "Used, owned by no package (1):\n  " + work + "/in  opened by pid ";
  const size_t at = r.out.find(head);
  ASSERT_NE(at, std::string::npos) << r.out;
  const std::string line = r.out.substr(at + head.size(), r.out.find('\n', at + head.size()) - at - head.size());
  EXPECT_NE(line.find(" (cat " + work.substr(0, 20)), std::string::npos) << line;
}

// A file opened for writing is written by a write, not by the open: one opened
// read-write and only read (a database a program opens "r+" and reads) is an input,
// worth a look if no package owns it. Once, every file opened for writing was listed
// as the command's output, hiding the inputs among them.
TEST_F(PkgdepTest, AFileOpenedForWritingButLeftAsItWasIsAnInputNotOutput) {
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  ASSERT_EQ(Shell("echo settings > " + work + "/kept && echo log > " + work + "/changed"), 0);
  auto r = Check("--deps coreutils,dash -- sh -c 'exec 3<>" + work + "/kept && cat <&3 && echo more >> " + work +
                 "/changed'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(Output("cat " + work + "/kept " + work + "/changed"), "settings\nlog\nmore\n");
  ASSERT_EQ(r.json["unowned"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["unowned"][0]["path"], work + "/kept");
  EXPECT_EQ(r.json["unowned"][0]["use"], "opened");
  ASSERT_EQ(r.json["written"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["written"][0]["path"], work + "/changed");
  EXPECT_EQ(r.json["written"][0]["argv"], "sh -c exec 3<>" + work + "/kept && cat <&3 && echo more >> " + work +
                                              "/changed");
}

// A build reads its own sources: files under its working directory, which no package
// owns. Once, each was listed as "used, owned by no package", burying what the build
// read from elsewhere. A working directory a package owns (/, /etc) is no one's own.
TEST_F(PkgdepTest, FilesOfTheWorkingDirectorysTreeAreTheCommandsOwn) {
  const std::string work = WorkDir(), other = WorkDir();
  ASSERT_FALSE(work.empty() || other.empty());
  ASSERT_EQ(Dpkg("-S " + work), "");
  ASSERT_EQ(Shell("mkdir " + work + "/src && echo a > " + work + "/src/a.c && echo b > " + other + "/b.h"), 0);
  const std::string command = "--deps coreutils -- cat src/a.c " + other + "/b.h";
  auto r = Check(command, work);
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.json["own_tree"], work);
  EXPECT_EQ(r.json["own_files"], 1);
  ASSERT_EQ(r.json["unowned"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["unowned"][0]["path"], other + "/b.h");
  EXPECT_NE(r.out.find("\nUsed from the working directory " + work +
                       ", owned by no package (the command's own, not listed): 1 file\n"),
            std::string::npos)
      << r.out;
  ASSERT_TRUE(Dpkg("-S /etc").ends_with(": /etc\n"));
  r = Check("--deps coreutils -- cat " + work + "/src/a.c", "/etc");
  EXPECT_TRUE(r.json["own_tree"].is_null()) << r.out;
  ASSERT_EQ(r.json["unowned"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["unowned"][0]["path"], work + "/src/a.c");
}

// A file made with O_TMPFILE has no name until a link gives it one: what was written
// is the linked name, not the directory it was made in (nor an empty path).
TEST_F(PkgdepTest, AnUnnamedFileCountsAsWrittenUnderTheNameItIsLinkedTo) {
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  auto r = Check("--deps coreutils,python3 -- /usr/bin/python3 -c 'import os\n"
                 "fd = os.open(\"" + work + "\", os.O_TMPFILE | os.O_RDWR, 0o644)\n"
                 "os.write(fd, b\"made\")\n"
                 "os.link(\"/proc/self/fd/%d\" % fd, \"" + work + "/named\", follow_symlinks=True, dst_dir_fd=os.open(\"/\", os.O_PATH))'");
  EXPECT_EQ(r.json["status"], 0) << r.out << r.err;  // (python's start-up may use undeclared packages)
  EXPECT_EQ(Output("cat " + work + "/named"), "made");
  ASSERT_EQ(r.json["written"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["written"][0]["path"], work + "/named");
}

// --allow-unowned adds prefixes of unowned files not to report. A file written on
// Windows ends its lines in CR, which once stayed part of the prefix, so that it
// matched nothing; and a bad line was named without its number.
TEST_F(PkgdepTest, AnAllowListOfUnownedFilesIsReadAsWritten) {
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  ASSERT_EQ(Shell("echo settings > " + work + "/in"), 0);
  std::ofstream(dir_ / "allow") << "# ours\r\n\r\n  " << work << "/\r\n";
  const std::string command = " -- cat " + work + "/in";
  auto r = Check("--deps coreutils" + command);
  EXPECT_EQ(r.json["unowned"].size(), 1u) << r.out;  // reported without the list
  r = Check("--deps coreutils --allow-unowned " + dir_ / "allow" + command);
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_TRUE(r.json["unowned"].empty()) << r.out;
  std::ofstream(dir_ / "bad") << "/ok/\n# fine\nrelative/\n";
  r = Check("--deps coreutils --allow-unowned " + dir_ / "bad" + command);
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: " + dir_ / "bad" + ":3: 'relative/' is neither an absolute path prefix nor */NAME/\n");
}

// A command that PATH finds outside the package system (a pyenv shim, /usr/local/bin)
// is not the packaged program, and what it uses says nothing about the package. Once,
// such a python3 under /root was checked as python3 without a word: /root and
// /usr/local are allow-listed for unowned files. A program no package owns is now
// listed wherever it is, and a command that shadows a packaged one is named. A
// program the command made and then ran (a build's test binary) is its output.
TEST_F(PkgdepTest, AProgramNoPackageOwnsIsNamedAndSoIsThePackagedOneItShadows) {
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  ASSERT_EQ(Dpkg("-S /bin/cat"), "coreutils: /bin/cat\n");  // /usr/bin/cat under merged /usr
  ASSERT_EQ(Shell("printf '#!/bin/sh\\nexec /usr/bin/cat \"$@\"\\n' > " + work + "/cat && chmod 755 " + work + "/cat"), 0);
  std::ofstream(dir_ / "allow") << work << "/\n";
  auto r = Check("--deps coreutils,dash --allow-unowned " + dir_ / "allow" + " -- cat /etc/hostname", "/",
                 "PATH=" + work + ":/usr/bin:/bin");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  ASSERT_EQ(r.json["unowned_programs"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["unowned_programs"][0]["path"], work + "/cat");
  EXPECT_EQ(r.json["unowned_programs"][0]["use"], "executed");
  EXPECT_EQ(r.json["packaged_command"], "/usr/bin/cat (coreutils)");
  EXPECT_NE(r.out.find("\nNote: cat is " + work + "/cat on this PATH, which no package owns; the packaged cat is "
                       "/usr/bin/cat (coreutils): give its path to check that one.\n"),
            std::string::npos)
      << r.out;

  r = Check("--deps coreutils,dash -- sh -c 'cp /usr/bin/true " + work + "/made && " + work + "/made'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_TRUE(r.json["unowned_programs"].empty()) << r.out;
  EXPECT_TRUE(r.json["packaged_command"].is_null()) << r.out;
  ASSERT_EQ(r.json["written"].size(), 1u) << r.out;
  EXPECT_EQ(r.json["written"][0]["path"], work + "/made");
}

// --deps takes what a Depends field says: "awk" is a virtual package (no package is
// named awk; the installed mawk provides it), "a | b" holds when either is installed,
// and a version is part of the relation. Each was once "no installed package".
TEST_F(PkgdepTest, DepsAreWrittenAsADependsField) {
  ASSERT_NE(Dpkg("-W -f '${Status}' awk"), "install ok installed");
  ASSERT_EQ(Dpkg("-W -f '${Status} ${Provides}' mawk"), "install ok installed awk");
  auto r = Check("--deps 'awk, libc6 (>= 2.36)' -- awk 'BEGIN { print 6 * 7 }'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.out.substr(0, 3), "42\n");
  EXPECT_EQ(r.json["roots"], nlohmann::json({"awk", "libc6 (>= 2.36)"}));
  EXPECT_EQ(r.json["declared"]["mawk"], "named") << r.out;
  EXPECT_EQ(r.json["declared"]["libc6"], "named") << r.out;
  EXPECT_TRUE(r.json["undeclared"].empty()) << r.out;
  // Enforcing, what the provider ships stays visible; an absent alternative is no harm.
  r = Check("--mode enforce --deps 'no-such-package-here | awk' -- awk 'BEGIN { print 6 * 7 }'");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.out.substr(0, 3), "42\n");
  r = Check("--deps 'coreutils, no-such-a | no-such-b' -- true");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: no installed package 'no-such-a | no-such-b' (dpkg -l lists what is installed)\n");
}

// --json - is standard output, as the convention goes: the JSON alone there (the text
// report on standard error), never a file named "-" in the current directory.
TEST_F(PkgdepTest, JsonDashIsStandardOutput) {
  const std::string out = dir_ / "stdout", err = dir_ / "stderr";
  ASSERT_FALSE(std::filesystem::exists("/-"));
  struct Remove {
    ~Remove() { std::filesystem::remove("/-"); }  // should it be made after all
  } remove;
  ASSERT_EQ(Shell("cd / && " + kPkgdep + " check --deps coreutils --json - -- true > " + out + " 2> " + err), 0);
  const auto json = nlohmann::json::parse(Output("cat " + out), nullptr, false);
  ASSERT_FALSE(json.is_discarded()) << Output("cat " + out);
  EXPECT_EQ(json["roots"], nlohmann::json({"coreutils"}));
  EXPECT_NE(Output("cat " + err).find("Result: nothing undeclared (exit 0)"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists("/-"));
}

TEST_F(PkgdepTest, ConfirmClassifiesByRunningWithoutEach) {
  auto r = Check("--confirm --deps coreutils -- /usr/bin/python3 -c 'print(1)'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  ASSERT_TRUE(r.json["confirmed"].contains("python3.11-minimal")) << r.out;
  EXPECT_EQ(r.json["confirmed"]["python3.11-minimal"].get<std::string>().substr(0, 4), "hard");
  EXPECT_EQ(r.out.substr(0, 2), "1\n");  // the first run's output still reaches the user
}

// Runs compared must start from the same files. Here, as with make, the command does
// its work only if its output is not there yet: once, the rerun without python found
// the first run's output, did nothing, and the finding was called "soft". Each run
// now writes to a scratch layer, and nothing of them is left (the report says so).
TEST_F(PkgdepTest, ConfirmRunsDoNotSeeEachOthersChanges) {
  const std::string work = WorkDir();
  ASSERT_FALSE(work.empty());
  const std::string scratch_before = Output("ls -d /var/tmp/pkgdep-vfs.* 2>/dev/null | wc -l");
  auto r = Check("--confirm --deps coreutils -- sh -c 'cd " + work +
                 " && if [ -e out ]; then echo up to date; else /usr/bin/python3 -c pass && echo made > out && cat out; fi'");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_EQ(r.out.substr(0, 5), "made\n");
  ASSERT_TRUE(r.json["confirmed"].contains("python3.11-minimal")) << r.out;
  EXPECT_EQ(r.json["confirmed"]["python3.11-minimal"].get<std::string>().substr(0, 4), "hard") << r.out;
  EXPECT_NE(r.out.find("the command's changes to files were not kept"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(work + "/out"));
  EXPECT_EQ(Output("ls -d /var/tmp/pkgdep-vfs.* 2>/dev/null | wc -l"), scratch_before);
}

// Runs compared must read the same input. Once, the first run read all of a piped
// standard input, the rerun without curl read nothing, printed something else, and
// curl, whose file only went to /dev/null, was called "soft". A pipe's input is now
// kept for every run, a file is rewound, and an endless producer is refused.
TEST_F(PkgdepTest, ConfirmRunsReadTheSameStandardInput) {
  ASSERT_EQ(Shell("test -r /usr/share/doc/curl/copyright"), 0);
  const std::string command =
      " check --confirm --deps coreutils --json " + dir_ / "r.json" +
      " -- sh -c 'read x; head -c 9 /usr/share/doc/curl/copyright > /dev/null 2>&1; echo \"got $x\"' > " + dir_ / "out";
  ASSERT_EQ(Shell("echo hi > " + dir_ / "in"), 0);
  for (const std::string& feed : {"cat " + dir_ / "in" + " | " + kPkgdep, kPkgdep + " < " + dir_ / "in"}) {
    SCOPED_TRACE(feed);
    EXPECT_EQ(Shell(feed + command + " 2>/dev/null"), 1);
    EXPECT_EQ(Output("head -1 " + dir_ / "out"), "got hi\n");
    std::ifstream in(dir_ / "r.json");
    const auto json = nlohmann::json::parse(in, nullptr, false);
    ASSERT_TRUE(json.is_object() && json["confirmed"].contains("curl")) << Output("cat " + dir_ / "out");
    EXPECT_EQ(json["confirmed"]["curl"], "none (same exit status and output)");
  }
  EXPECT_EQ(Shell("yes | " + kPkgdep + command + " 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"),
            "pkgdep-vfs: standard input goes on past 1 GiB: --confirm gives every run the same input and keeps it for "
            "them (feed it from a file, or leave --confirm out)\n");
}

// A check stopped by a signal (^C, a CI job's SIGTERM) reports what the command did
// until then, confirms nothing more, and ends as a stopped program does (128 + the
// signal), so a calling script stops too. Once it reran the cut-short command for
// --confirm and called curl "hard (exit status 143 -> 0)", then exited 1.
TEST_F(PkgdepTest, AnInterruptedCheckReportsWhatItSawAndStops) {
  // The command's sleep, seen from here, says it read curl's file: with --confirm its
  // files go to a scratch layer, so it cannot say so by writing one.
  const std::string sleep = "sleep 29.713";
  const auto began = std::chrono::steady_clock::now();
  const int status = Shell(kPkgdep + " check --confirm --deps coreutils --json " + dir_ / "r.json" +
                           " -- sh -c 'cat /usr/share/doc/curl/copyright > /dev/null; exec " + sleep + "' > " +
                           dir_ / "out" + " 2>&1 & pid=$!; for i in $(seq 200); do pgrep -fx '" + sleep +
                           "' > /dev/null && break; sleep 0.05; done; kill -TERM $pid; wait $pid");
  EXPECT_LT(std::chrono::steady_clock::now() - began, std::chrono::seconds(9));
  EXPECT_EQ(status, 128 + SIGTERM) << Output("cat " + dir_ / "out");
  std::ifstream in(dir_ / "r.json");
  const auto json = nlohmann::json::parse(in, nullptr, false);
  ASSERT_TRUE(json.is_object()) << Output("cat " + dir_ / "out");
  EXPECT_EQ(json["interrupted"], "SIGTERM");
  EXPECT_EQ(json["verdict"], 128 + SIGTERM);
  EXPECT_TRUE(json["undeclared"].contains("curl")) << Output("cat " + dir_ / "out");
  EXPECT_TRUE(json["confirmed"].empty());
  EXPECT_NE(Output("cat " + dir_ / "out").find("Result: interrupted by SIGTERM (exit 143)"), std::string::npos)
      << Output("cat " + dir_ / "out");
  EXPECT_EQ(Shell("pgrep -fx '" + sleep + "'"), 1);  // the group went with it
}

TEST_F(PkgdepTest, BadInputIsAnErrorThatSaysWhich) {
  auto r = Check("--package no-such-package-here -- true");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: no installed package 'no-such-package-here' (dpkg -l lists what is installed)\n");
  r = Check("--package coreutils -- /nonexistent/program");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: /nonexistent/program: command not found\n");
  r = Check("--package coreutils -- ''");  // it was "pkgdep-vfs: : command not found"
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: the command after -- is an empty string\n");
  r = Check("--package coreutils --deps tar -- true");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: give either --package NAME or --deps PKG,PKG...\n");
  r = Check("--deps , -- true");  // once taken as a declaration of nothing
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "pkgdep-vfs: --deps ',' names no package (give PKG,PKG...)\n");
  // A relation cut short was taken for a package named "libc6 (>= 2", and an empty
  // alternative was looked up as a package named '|'.
  for (const std::string bad : {"libc6 (>= 2", "libc6 |", "libc6 || tar", "Libc6"}) {
    r = Check("--deps 'tar, " + bad + "' -- true");
    EXPECT_EQ(r.status, 2) << bad;
    EXPECT_EQ(r.err, "pkgdep-vfs: --deps: '" + bad + "' is not a relation (give NAME, NAME (>= VERSION) or A | B, comma-separated)\n");
  }
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "pkgdep-vfs: give the command to check after --\n");
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils --mode strict -- true 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "pkgdep-vfs: --mode is observe or enforce, not 'strict'\n");
  // --confirm classifies what observe mode found; with enforce it was silently dropped.
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils --mode enforce --confirm -- true 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"),
            "pkgdep-vfs: --confirm reruns an observed command without each undeclared package: give it with --mode "
            "observe\n");
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils --mode 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "pkgdep-vfs: --mode: 1 required TEXT missing (see pkgdep-vfs check --help)\n");
  // A JSON report at a path another user controls: their link would have root
  // overwrite whatever it names. Said before the command runs (which would make `ran`).
  const std::string link = dir_ / "their-link", precious = dir_ / "precious", ran = dir_ / "ran";
  ASSERT_EQ(Shell("echo keep > " + precious + " && ln -s " + precious + " " + link + " && chown -h 65534 " + link), 0);
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils --json " + link + " -- touch " + ran + " > /dev/null 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "pkgdep-vfs: cannot write the JSON report: " + link +
                                               ": a symbolic link owned by uid 65534, neither yours, root's nor its "
                                               "directory owner's: refusing to use what another user controls\n");
  EXPECT_EQ(Output("cat " + precious), "keep\n");
  // A report in a directory that does not exist: said before the run too.
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils --json " + dir_ / "no/such/dir/r.json" + " -- touch " + ran +
                  " > /dev/null 2> " + dir_ / "err"),
            2);
  EXPECT_EQ(Output("cat " + dir_ / "err"),
            "pkgdep-vfs: cannot write the JSON report: " + dir_ / "no/such/dir/r.json" + ": No such file or directory\n");
  EXPECT_FALSE(std::filesystem::exists(ran)) << "the command ran although its report could not be written";
  // Started from a directory the group cannot see (its /tmp is its own): said, and
  // nothing runs. It once ran from "/", where `touch NAME` made the host's /NAME, and
  // reported on it with exit 0.
  const std::string name = "pkgdep-made-by-test-" + std::to_string(::getpid());
  struct Remove {
    std::string path;
    ~Remove() { std::filesystem::remove(path); }  // should it be made after all
  } remove{"/" + name};
  EXPECT_EQ(Shell("cd " + dir_.path() + " && " + kPkgdep + " check --package coreutils -- touch " + name +
                  " > /dev/null 2> " + dir_ / "err"),
            2);
  EXPECT_NE(Output("cat " + dir_ / "err").find("pkgdep-vfs: the current directory " + dir_.path() + " is not in the group"),
            std::string::npos)
      << Output("cat " + dir_ / "err");
  EXPECT_FALSE(std::filesystem::exists("/" + name));
  // A check that fails before there is a report leaves no empty file behind.
  EXPECT_EQ(Shell(kPkgdep + " check --package no-such-package-here --json " + dir_ / "new.json" + " -- true 2> /dev/null"), 2);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "new.json"));
  // A report that cannot be written (a full disk) is no verdict: once, it was lost
  // and the check said 0.
  EXPECT_EQ(Shell(kPkgdep + " check --package coreutils -- true > /dev/full 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "pkgdep-vfs: cannot write the report to standard output: No space left on device\n");
}

// The index against dpkg's own answers, merged /usr and diversions included.
TEST(DpkgIndex, AgreesWithDpkgQuery) {
  auto index = pkgdep::DpkgIndex::Load();
  ASSERT_TRUE(index.has_value()) << index.error();
  EXPECT_GT(index->path_count(), 10000u);
  EXPECT_EQ(index->Owners("/usr/bin/ls"), std::vector<std::string>{"coreutils"});
  EXPECT_EQ(index->Owners("/bin/ls"), std::vector<std::string>{"coreutils"});  // merged /usr
  EXPECT_EQ(pkgdep::DpkgIndex::Canonical("/lib/x86_64-linux-gnu/libc.so.6"), "/usr/lib/x86_64-linux-gnu/libc.so.6");
  EXPECT_EQ(pkgdep::DpkgIndex::Canonical("/libexec/x"), "/libexec/x");
  EXPECT_EQ(pkgdep::DpkgIndex::Canonical("/binary"), "/binary");
  EXPECT_TRUE(index->Owners("/etc/passwd").empty());
  // A directory that hundreds of packages list, some of them (coreutils) both as /bin
  // and as /usr/bin: every package that lists it, each once.
  std::set<std::string> listers;
  for (const auto& e : std::filesystem::directory_iterator("/var/lib/dpkg/info")) {
    std::string name = e.path().filename();
    if (!name.ends_with(".list")) continue;
    std::ifstream list(e.path());
    for (std::string line; std::getline(list, line);) {
      if (line != "/bin" && line != "/usr/bin") continue;
      name.resize(name.size() - 5);
      listers.insert(name.substr(0, name.find(':')));
      break;
    }
  }
  const std::vector<std::string> usr_bin = index->Owners("/usr/bin");
  EXPECT_GT(usr_bin.size(), 100u);
  EXPECT_EQ(std::set<std::string>(usr_bin.begin(), usr_bin.end()).size(), usr_bin.size()) << "an owner named twice";
  EXPECT_EQ(std::set<std::string>(usr_bin.begin(), usr_bin.end()), listers);
  // Every diversion: the diverted path is the diverter's.
  std::ifstream div("/var/lib/dpkg/diversions");
  std::string from, to, by;
  while (std::getline(div, from) && std::getline(div, to) && std::getline(div, by)) {
    if (by == ":") continue;
    EXPECT_EQ(index->Owners(from), std::vector<std::string>{by}) << from;
  }
  auto closure = pkgdep::DeclaredClosure(*index, {"coreutils"});
  ASSERT_TRUE(closure.has_value());
  EXPECT_EQ(closure->declared.at("coreutils"), "named");
  EXPECT_EQ(closure->declared.at("libc6"), "Pre-Depends of coreutils");
  EXPECT_EQ(closure->declared.at("dash"), "essential");
  EXPECT_FALSE(closure->Declares("python3-minimal"));
  EXPECT_EQ(pkgdep::DeclaredClosure(*index, {"nope-nope"}).error(), "no installed package 'nope-nope' (dpkg -l lists what is installed)");
}

// A name may carry an ":arch", as in a Depends field or `dpkg -s NAME:ARCH`: that
// architecture's package alone counts, an Architecture: all one counts as the native
// architecture's, and ":any" is any. "coreutils:i386" was once taken for the amd64
// coreutils installed here.
TEST(DpkgIndex, AnArchitectureQualifierIsMatchedAsDpkgMatchesIt) {
  const std::string native = Output("dpkg --print-architecture | tr -d '\\n'");
  const std::string foreign = native == "i386" ? "arm64" : "i386";
  ASSERT_EQ(Output("dpkg-query -W -f '${Architecture}' coreutils"), native);
  ASSERT_EQ(Output("dpkg-query -W -f '${Architecture}' tzdata"), "all");
  ASSERT_NE(Output("dpkg-query -W -f '${Status}' coreutils:" + foreign + " 2>/dev/null"), "install ok installed");
  ASSERT_EQ(Shell("grep -q '^Depends:.*perl:any' /var/lib/dpkg/status"), 0);  // dpkg-dev's, for one
  auto index = pkgdep::DpkgIndex::LoadPackages();
  ASSERT_TRUE(index.has_value()) << index.error();
  for (const std::string& name : std::vector<std::string>{"coreutils:" + native, "coreutils:any", "coreutils:native", "tzdata:" + native, "tzdata:all"}) {
    EXPECT_EQ(index->Satisfying(name).size(), 1u) << name;
    EXPECT_TRUE(pkgdep::DpkgIndex::CheckInstalled({name}).has_value()) << name;
  }
  const std::string wrong = "coreutils:" + foreign;
  EXPECT_TRUE(index->Satisfying(wrong).empty());
  const auto installed = pkgdep::DpkgIndex::CheckInstalled({wrong});
  ASSERT_FALSE(installed.has_value());
  EXPECT_EQ(installed.error(), "no installed package '" + wrong + "' (dpkg -l lists what is installed)");
  const auto refused = pkgdep::DeclaredClosure(*index, {wrong});
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error(), "no installed package '" + wrong + "' (dpkg -l lists what is installed)");
  EXPECT_TRUE(pkgdep::DeclaredClosure(*index, {wrong + " | tzdata"}).has_value());
  // A qualified Depends is still followed: dpkg-dev's perl:any declares perl.
  auto closure = pkgdep::DeclaredClosure(*index, {"dpkg-dev:" + native});
  ASSERT_TRUE(closure.has_value()) << closure.error();
  EXPECT_EQ(closure->declared.at("perl"), "Depends of dpkg-dev");
}

// The quick check made before a run agrees with the full parse on every package
// status lists, installed or not (a package removed but not purged keeps a
// paragraph with "deinstall ok config-files"; the copy here adds one).
TEST(DpkgIndex, CheckInstalledAgreesWithTheFullParse) {
  TempDir dir;
  ASSERT_EQ(Shell("mkdir -p " + dir / "dpkg && cp /var/lib/dpkg/status " + dir / "dpkg/ && printf "
                  "'Package: gone-but-configured\\nStatus: deinstall ok config-files\\nVersion: 1\\n\\n' >> " +
                  dir / "dpkg/status"),
            0);
  const std::string admin = dir / "dpkg";
  auto index = pkgdep::DpkgIndex::LoadPackages(admin);
  ASSERT_TRUE(index.has_value()) << index.error();
  std::ifstream status(admin + "/status");
  size_t installed = 0, listed = 0;
  for (std::string line; std::getline(status, line);) {
    if (!line.starts_with("Package: ")) continue;
    const std::string name = line.substr(9);
    ++listed;
    const bool full = index->Find(name) != nullptr;
    installed += full ? 1 : 0;
    const auto quick = pkgdep::DpkgIndex::CheckInstalled({name}, admin);
    EXPECT_EQ(quick.has_value(), full) << name;
    if (!quick) {
      EXPECT_EQ(quick.error(), "no installed package '" + name + "' (dpkg -l lists what is installed)");
    }
  }
  EXPECT_GT(installed, 100u);
  EXPECT_LT(installed, listed);  // at least the one added
  EXPECT_TRUE(pkgdep::DpkgIndex::CheckInstalled({"coreutils", "libc6:amd64"}, admin).has_value());
  EXPECT_TRUE(pkgdep::DpkgIndex::CheckInstalled({"awk", "nope-nope | coreutils (>= 1)"}, admin).has_value());
  EXPECT_EQ(pkgdep::DpkgIndex::CheckInstalled({"awk", "nope-nope | nada"}, admin).error(),
            "no installed package 'nope-nope | nada' (dpkg -l lists what is installed)");
  EXPECT_EQ(pkgdep::DpkgIndex::CheckInstalled({"coreutils", "nope-nope"}, admin).error(),
            "no installed package 'nope-nope' (dpkg -l lists what is installed)");
  EXPECT_EQ(pkgdep::DpkgIndex::CheckInstalled({"x"}, dir / "missing").error(),
            dir / "missing/status" + ": No such file or directory");
}

// The file index kept between runs answers as the database does, and a change made
// the way dpkg makes it (a new file renamed over the old), a damaged cache or a
// foreign file in its place, or one that others could have written, each make it
// rebuild. The database is a copy, so the test can change it.
TEST(DpkgIndex, ItsCacheAnswersLikeTheDatabaseAndIsRebuiltWhenThatChanges) {
  TempDir dir;
  const std::string admin = dir / "dpkg", cache = dir / "cache/file-index";
  ASSERT_EQ(Shell("mkdir -p " + admin + "/info && cp -a /var/lib/dpkg/status /var/lib/dpkg/diversions "
                  "/var/lib/dpkg/alternatives " + admin + "/ && cp -a /var/lib/dpkg/info/*.list " + admin + "/info/"),
            0);
  auto load = [&](bool expect_cached) {
    auto index = pkgdep::DpkgIndex::LoadPackages(admin);
    EXPECT_TRUE(index.has_value());
    auto files = index->LoadFiles(cache);
    EXPECT_TRUE(files.has_value()) << files.error();
    EXPECT_EQ(index->files_from_cache(), expect_cached);
    return std::move(*index);
  };
  const auto uncached = pkgdep::DpkgIndex::Load(admin);
  ASSERT_TRUE(uncached.has_value());
  // Paths of every kind: plain, merged /usr, diverted, an alternative's link, unowned.
  std::vector<std::string> probes = {"/usr/bin/ls", "/bin/ls", "/etc/passwd", "/usr/bin/editor", "/etc/alternatives/editor",
                                     "/usr/lib/x86_64-linux-gnu/libc.so.6", "/nonexistent"};
  std::ifstream div("/var/lib/dpkg/diversions");
  for (std::string line; std::getline(div, line);) probes.push_back(line);
  std::ifstream list("/var/lib/dpkg/info/libssl3:amd64.list");
  for (std::string line; std::getline(list, line);) probes.push_back(line);
  auto same_answers = [&](const pkgdep::DpkgIndex& index) {
    EXPECT_EQ(index.path_count(), uncached->path_count());
    for (const std::string& p : probes) EXPECT_EQ(index.Owners(p), uncached->Owners(p)) << p;
  };

  same_answers(load(false));  // no cache yet: built, and written
  ASSERT_TRUE(std::filesystem::exists(cache));
  same_answers(load(true));   // nothing changed: read back

  // dpkg installs a file list: written aside, renamed over the old one.
  const std::string marker = "/usr/share/doc/coreutils/pkgdep-test-marker";
  ASSERT_EQ(Shell("cp " + admin + "/info/coreutils.list " + admin + "/info/coreutils.list-new && echo " + marker +
                  " >> " + admin + "/info/coreutils.list-new && mv " + admin + "/info/coreutils.list-new " + admin +
                  "/info/coreutils.list"),
            0);
  {
    const auto index = load(false);
    EXPECT_EQ(index.Owners(marker), std::vector<std::string>{"coreutils"});
  }
  EXPECT_EQ(load(true).Owners(marker), std::vector<std::string>{"coreutils"});

  // A cache cut short (a full disk, a crash) and one overwritten with garbage.
  ASSERT_EQ(::truncate(cache.c_str(), static_cast<off_t>(std::filesystem::file_size(cache) / 2)), 0);
  EXPECT_EQ(load(false).Owners(marker), std::vector<std::string>{"coreutils"});
  ASSERT_EQ(Shell("head -c 100000 /dev/urandom > " + cache), 0);
  EXPECT_EQ(load(false).Owners(marker), std::vector<std::string>{"coreutils"});
  load(true);  // written again

  // Whatever the umask, the cache is writable by its owner alone; one that another
  // user may write, or owns, is not believed (it could say anything) and is replaced.
  const mode_t old_umask = ::umask(0);
  ASSERT_EQ(::unlink(cache.c_str()), 0);
  load(false);
  ::umask(old_umask);
  auto mode_of = [&] { return std::filesystem::status(cache).permissions(); };
  EXPECT_EQ(mode_of(), std::filesystem::perms(0644));
  load(true);
  ASSERT_EQ(::chmod(cache.c_str(), 0666), 0);
  load(false);
  EXPECT_EQ(mode_of(), std::filesystem::perms(0644));
  ASSERT_EQ(::chown(cache.c_str(), 65534, 65534), 0);  // nobody's
  load(false);
  load(true);

  // A cache that cannot be written costs only the time.
  auto index = pkgdep::DpkgIndex::LoadPackages(admin);
  ASSERT_TRUE(index.has_value());
  EXPECT_TRUE(index->LoadFiles("/proc/no-such-dir/file-index").has_value());
  EXPECT_EQ(index->Owners(marker), std::vector<std::string>{"coreutils"});
}

}  // namespace
}  // namespace ulsp::testing
