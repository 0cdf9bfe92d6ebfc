// `diffuse info` on textual inversions (info_embeddings.cpp).
#pragma once
#include <string>

namespace diffuse::tools {

bool is_embedding_file(const std::string& path);  // readable as an embedding (small, one of the formats)
bool is_embeddings_dir(const std::string& path);  // a non-model folder with embedding-sized tensor files
int embedding_file_info(const std::string& path, bool json);
int embeddings_dir_info(const std::string& dir, bool json);

}  // namespace diffuse::tools
