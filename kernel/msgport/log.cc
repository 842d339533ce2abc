#include "kernel/msgport/log.h"

#include <spdlog/cfg/helpers.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <mutex>

namespace ulsp {

std::shared_ptr<spdlog::logger> Logger(const std::string& component) {
  static std::mutex mu;
  std::lock_guard lock(mu);
  if (auto existing = spdlog::get(component)) return existing;
  auto logger = spdlog::stderr_color_mt(component);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n %P] %v");
  logger->set_level(spdlog::level::info);
  if (const char* level = std::getenv("ULSP_LOG")) logger->set_level(spdlog::level::from_str(level));
  return logger;
}

}  // namespace ulsp
