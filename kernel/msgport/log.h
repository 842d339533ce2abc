// One named spdlog logger per component ("msgport", "vfs", "net", ...), created on
// first use, writing to standard error. Debug messages are compiled in and off by
// default; ULSP_LOG=debug (or any spdlog level) turns them on for every component.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace ulsp {

std::shared_ptr<spdlog::logger> Logger(const std::string& component);

}  // namespace ulsp
