// The web UI's static files (src/server/web/*), compiled into the binary by web_assets.cmake.
#pragma once
#include <cstddef>
#include <string>

namespace diffuse::server {

struct WebAsset {
  const char* path;          // "/index.html", "/app.js", ...
  const char* content_type;  // "text/html; charset=utf-8", ...
  const unsigned char* data;
  size_t size;
};

// The asset served at `path` ("/" is "/index.html"); nullptr when there is none.
const WebAsset* find_web_asset(const std::string& path);

}  // namespace diffuse::server
