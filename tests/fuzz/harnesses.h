// The bodies of qkd's fuzz harnesses: each takes one input (the bytes of a file of its kind), feeds it through
// the loader entry point the apps use, and then uses what loaded the way the runtime would (tensor views,
// dequantization of small tensors, tokenizer encode/decode). A malformed input must end in a qkd::Error, which
// the body catches; anything else (another exception, a crash, a view outside the file, a sanitizer report) is a
// finding. The libFuzzer binaries (fuzz_main.cpp) and the regression test (test_fuzz_regressions.cpp, normal CPU
// suite) call the same bodies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace qkd::fuzz {

using HarnessFn = void (*)(const uint8_t* data, size_t size);

struct Harness {
  const char* name;  // also the folder of its seed corpus and regressions: tests/fuzz/{corpus,regressions}/<name>
  HarnessFn run;
};

void fuzz_safetensors(const uint8_t* data, size_t size);       // a .safetensors file
void fuzz_hf_config(const uint8_t* data, size_t size);         // an HF config.json
void fuzz_llama2c(const uint8_t* data, size_t size);           // a llama2.c checkpoint .bin
void fuzz_gguf(const uint8_t* data, size_t size);              // a GGUF model
void fuzz_int4_checkpoint(const uint8_t* data, size_t size);   // a qkd int4 model.safetensors
void fuzz_llama2c_tokenizer(const uint8_t* data, size_t size); // a llama2.c tokenizer.bin
void fuzz_gguf_tokenizer(const uint8_t* data, size_t size);    // a GGUF file's tokenizer.ggml.* metadata

// Every harness, in a fixed order.
std::span<const Harness> harnesses();

}  // namespace qkd::fuzz
