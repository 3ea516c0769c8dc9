// The Unicode character classes that byte-level BPE pre-tokenizers match (\p{L}, \p{N}, \s), from tables that
// tools/gen_unicode_tables.py generates into loader/unicode_tables.cpp from Python's unicodedata. See that
// script for the exact definition of each class.
#pragma once

#include <cstdint>

namespace qkd {

enum UnicodeClass : uint8_t {
  kLetter = 1,      // \p{L}: Lu Ll Lt Lm Lo
  kNumber = 2,      // \p{N}: Nd Nl No
  kWhitespace = 4,  // \s: U+0009..U+000D, U+0085, Zs Zl Zp
};

// The class bits of code point cp (0 for everything else, including unassigned code points).
uint8_t unicode_flags(uint32_t cp);

}  // namespace qkd
