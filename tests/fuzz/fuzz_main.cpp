// One libFuzzer binary per harness: tests/fuzz/CMakeLists.txt compiles this file once per harness with
// QKD_FUZZ_HARNESS set to the body's name (harnesses.h).
#include <cstddef>
#include <cstdint>

#include "tests/fuzz/harnesses.h"

#ifndef QKD_FUZZ_HARNESS
#error "define QKD_FUZZ_HARNESS to one of the bodies in tests/fuzz/harnesses.h"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qkd::fuzz::QKD_FUZZ_HARNESS(data, size);
  return 0;
}
