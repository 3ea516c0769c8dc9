// What qkd-run, qkd-eval and qkd-bench share after parsing flags: resolving the model path (the default model
// when -m is absent), loading it with its tokenizer, choosing the context length and placing it on a backend.
#pragma once

#include <memory>
#include <string>

#include "apps/cli.h"
#include "loader/bundle.h"
#include "runtime/model.h"

namespace qkd::cli {

struct LoadedApp {
  ModelBundle bundle;
  std::unique_ptr<runtime::Model> model;
};

// Loads flags.model (or the default model), clamps the context to the model's maximum with a warning, and builds
// the model on the requested backend. default_ctx applies when -c is not given (0 = the model's maximum).
LoadedApp load_for_app(const char* prog, const ModelFlags& flags, int default_ctx, int max_batch);

// Human-readable size: 24.9M, 6.7B.
std::string format_count(double n);

}  // namespace qkd::cli
