// Text from files and users: UTF-8 validation and decoding, and escaping control characters
// before text goes into messages or to a terminal.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace diffuse {

// Decodes UTF-8 into code points; false when the bytes are not valid UTF-8 (overlong forms,
// surrogates and values above U+10FFFF included).
bool utf8_codepoints(std::string_view s, std::vector<uint32_t>& out);
bool valid_utf8(std::string_view s);

// s with control characters (below 0x20, and 0x7f) written as \xNN; with keep_lines, line feeds
// and tabs are kept.
std::string printable(std::string_view s, bool keep_lines = false);

}  // namespace diffuse
