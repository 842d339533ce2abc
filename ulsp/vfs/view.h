// ViewLayer: shows only what an allow-list (or a predicate) admits; everything else does not exist
// (lookups answer ENOENT, directory listings leave it out, and creating a name the
// list does not admit answers EACCES).
//
// The allow-list is a text file, one absolute path per line (paths inside the
// mount), '#' starts a comment. A listed path admits itself and everything beneath
// it; its ancestors are visible as directories, so it can be reached, but their other
// entries are not. Thread-safe: the list is read once, then only read.
#pragma once

#include <expected>
#include <functional>
#include <string>
#include <unordered_set>
#include <vector>

#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class ViewLayer final : public Layer {
 public:
  // Reads the allow-list at `list_path`. Fails with a message naming the file, and the
  // line when a line is bad (not absolute, or holding "." or ".." components).
  static std::expected<std::unique_ptr<ViewLayer>, std::string> Open(const std::string& list_path,
                                                                     std::unique_ptr<Layer> lower);
  // A view decided by a function instead of a list: `visible(path)` answers for every
  // path (absolute, normalized) the layer is asked about; it must be thread-safe.
  static std::unique_ptr<ViewLayer> FromPredicate(std::function<bool(std::string_view path)> visible,
                                                  std::unique_ptr<Layer> lower);
  // The same, from paths already in memory (`source` names them in errors).
  static std::expected<std::unique_ptr<ViewLayer>, std::string> FromPaths(const std::vector<std::string>& paths,
                                                                          const std::string& source,
                                                                          std::unique_ptr<Layer> lower);

  int Serve(VfsRequest& req) noexcept override;
  std::string_view Name() const noexcept override { return "view"; }

  // Whether `path` (absolute, normalized) is visible.
  bool Visible(std::string_view path) const;
  // Whether what is below `dir` is admitted (not just `dir` on the way to something).
  bool AdmitsBelow(std::string_view dir) const;

 private:
  explicit ViewLayer(std::unique_ptr<Layer> lower) : Layer(std::move(lower)) {
    PassesFileData();
    ListsThrough();  // names are filtered as they are listed, per request
  }
  // The path a name operation would make or touch.
  std::string ChildPath(uint64_t parent, std::string_view name) const { return JoinPath(PathOf(parent), name); }

  // Looked up by string_view, with no copy of the path (a lookup asks for each
  // directory above it).
  struct PathHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  using PathSet = std::unordered_set<std::string, PathHash, std::equal_to<>>;
  PathSet admitted_;   // listed paths: themselves and beneath
  PathSet ancestors_;  // directories on the way to them
  std::function<bool(std::string_view)> predicate_;  // instead of the list, when set
};

}  // namespace ulsp::vfs
