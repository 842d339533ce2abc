#include "ulsp/vfs/view.h"

#include <cctype>
#include <cstring>
#include <expected>
#include <new>
#include <optional>
#include <sstream>

#include "kernel/msgport/own_file.h"

namespace ulsp::vfs {
namespace {

// "/a//b/" -> "/a/b"; nullopt for relative paths and "." or ".." components.
std::optional<std::string> Normalize(std::string_view p) {
  if (p.empty() || p.front() != '/') return std::nullopt;
  std::string out;
  size_t i = 0;
  while (i < p.size()) {
    while (i < p.size() && p[i] == '/') ++i;
    if (i == p.size()) break;
    size_t j = p.find('/', i);
    if (j == std::string_view::npos) j = p.size();
    std::string_view part = p.substr(i, j - i);
    if (part == "." || part == "..") return std::nullopt;
    out += '/';
    out += part;
    i = j;
  }
  return out.empty() ? std::string("/") : out;
}

}  // namespace

std::expected<std::unique_ptr<ViewLayer>, std::string> ViewLayer::Open(const std::string& list_path,
                                                                       std::unique_ptr<Layer> lower) {
  auto text = ReadTextFile(list_path, 256u << 20);
  if (!text) return std::unexpected(list_path + ": cannot read the allow-list: " + text.error());
  std::vector<std::string> lines;
  std::istringstream in(*text);
  for (std::string line; std::getline(in, line);) lines.push_back(std::move(line));
  return FromPaths(lines, list_path, std::move(lower));
}

std::expected<std::unique_ptr<ViewLayer>, std::string> ViewLayer::FromPaths(const std::vector<std::string>& paths,
                                                                            const std::string& source,
                                                                            std::unique_ptr<Layer> lower) {
  std::unique_ptr<ViewLayer> view(new ViewLayer(std::move(lower)));
  for (size_t n = 0; n < paths.size(); ++n) {
    std::string_view line = paths[n];
    if (auto hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.remove_suffix(1);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.front()))) line.remove_prefix(1);
    if (line.empty()) continue;
    auto path = Normalize(line);
    if (!path) {
      return std::unexpected(source + ":" + std::to_string(n + 1) + ": '" + std::string(line) +
                             "' is not an absolute path without '.' or '..' components");
    }
    for (size_t slash = path->rfind('/'); slash != std::string::npos && slash > 0; slash = path->rfind('/', slash - 1))
      view->ancestors_.insert(path->substr(0, slash));
    view->admitted_.insert(std::move(*path));
  }
  return view;
}

std::unique_ptr<ViewLayer> ViewLayer::FromPredicate(std::function<bool(std::string_view)> visible,
                                                    std::unique_ptr<Layer> lower) {
  std::unique_ptr<ViewLayer> view(new ViewLayer(std::move(lower)));
  view->predicate_ = std::move(visible);
  return view;
}

bool ViewLayer::Visible(std::string_view path) const {
  if (predicate_) return path == "/" || predicate_(path);
  return path == "/" || ancestors_.contains(path) || AdmitsBelow(path);
}

bool ViewLayer::AdmitsBelow(std::string_view dir) const {
  if (predicate_) return Visible(dir);
  if (admitted_.contains("/")) return true;
  // `dir` itself or any directory above it listed.
  for (std::string_view key = dir;;) {
    if (admitted_.contains(key)) return true;
    const size_t slash = key.rfind('/');
    if (slash == 0 || slash == std::string_view::npos) return false;
    key = key.substr(0, slash);
  }
}

int ViewLayer::Serve(VfsRequest& req) noexcept try {
  if (IsTmpfile(req)) return AdmitsBelow(PathOf(req.node)) ? Down(req) : EACCES;  // O_TMPFILE: a file with no name
  switch (req.op) {
    case VfsOp::kLookup:
    case VfsOp::kUnlink:
    case VfsOp::kRmDir:
      if (!Visible(ChildPath(req.node, req.name))) return ENOENT;
      break;
    case VfsOp::kCreate:
    case VfsOp::kMkDir:
    case VfsOp::kMkNod:
    case VfsOp::kSymlink:
      if (!Visible(ChildPath(req.node, req.name))) return EACCES;
      break;
    case VfsOp::kLink:
      if (!Visible(ChildPath(req.node2, req.name2))) return EACCES;
      break;
    case VfsOp::kRename:
      if (!Visible(ChildPath(req.node, req.name))) return ENOENT;
      if (!Visible(ChildPath(req.node2, req.name2))) return EACCES;
      break;
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus: {
      std::string dir = PathOf(req.node);
      req.admit = [this, dir = std::move(dir), outer = std::move(req.admit)](std::string_view name) {
        return (!outer || outer(name)) && Visible(JoinPath(dir, name));
      };
      break;
    }
    default:
      break;  // other operations name a node the kernel found through this view
  }
  return Down(req);
} catch (const std::bad_alloc&) {
  return ENOMEM;
}

}  // namespace ulsp::vfs
