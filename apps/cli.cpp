#include "apps/cli.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <sstream>

#include <fmt/format.h>

#include "kernels/error.h"

namespace qkd::cli {

namespace {

std::vector<std::string> split_names(const std::string& names) {
  std::vector<std::string> out;
  std::stringstream ss(names);
  for (std::string s; std::getline(ss, s, ',');) out.push_back(s);
  return out;
}

template <typename T>
T parse_number(const std::string& flag, const std::string& v) {
  T x{};
  const char* end = v.data() + v.size();
  auto [ptr, ec] = std::from_chars(v.data(), end, x);
  if (ec != std::errc() || ptr != end || v.empty())
    throw UsageError(fmt::format("{}: '{}' is not a valid {}", flag, v,
                                 std::is_floating_point_v<T> ? "number" : "whole number"));
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(x)) throw UsageError(fmt::format("{}: '{}' is not a finite number", flag, v));
  }
  return x;
}

}  // namespace

ArgParser::ArgParser(std::string prog, std::string summary) : prog_(std::move(prog)), summary_(std::move(summary)) {}

void ArgParser::add_flag(const std::string& names, const std::string& metavar, const std::string& help,
                         std::string default_text, bool takes_value,
                         std::function<void(const std::string&, const std::string&)> set) {
  flags_.push_back(Flag{split_names(names), metavar, help, std::move(default_text), takes_value, std::move(set)});
}

void ArgParser::add(const std::string& names, std::string* out, const std::string& metavar,
                    const std::string& help) {
  add_flag(names, metavar, help, *out, true, [out](const std::string&, const std::string& v) { *out = v; });
}
void ArgParser::add(const std::string& names, std::optional<std::string>* out, const std::string& metavar,
                    const std::string& help) {
  add_flag(names, metavar, help, "", true, [out](const std::string&, const std::string& v) { *out = v; });
}
void ArgParser::add(const std::string& names, int* out, const std::string& metavar, const std::string& help) {
  add_flag(names, metavar, help, std::to_string(*out), true,
           [out](const std::string& f, const std::string& v) { *out = parse_number<int>(f, v); });
}
void ArgParser::add(const std::string& names, float* out, const std::string& metavar, const std::string& help) {
  add_flag(names, metavar, help, fmt::format("{}", *out), true,
           [out](const std::string& f, const std::string& v) { *out = parse_number<float>(f, v); });
}
void ArgParser::add(const std::string& names, uint64_t* out, const std::string& metavar,
                    const std::string& help) {
  add_flag(names, metavar, help, "", true,
           [out](const std::string& f, const std::string& v) { *out = parse_number<uint64_t>(f, v); });
}
void ArgParser::add(const std::string& names, std::optional<int>* out, const std::string& metavar,
                    const std::string& help) {
  add_flag(names, metavar, help, "", true,
           [out](const std::string& f, const std::string& v) { *out = parse_number<int>(f, v); });
}
void ArgParser::add(const std::string& names, std::optional<float>* out, const std::string& metavar,
                    const std::string& help) {
  add_flag(names, metavar, help, "", true,
           [out](const std::string& f, const std::string& v) { *out = parse_number<float>(f, v); });
}
void ArgParser::add_switch(const std::string& names, bool* out, const std::string& help) {
  add_flag(names, "", help, "", false, [out](const std::string&, const std::string&) { *out = true; });
}

bool ArgParser::parse(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(usage().c_str(), stdout);
      return false;
    }
    std::string value;
    bool has_inline = false;
    if (arg.rfind("--", 0) == 0) {
      if (auto eq = arg.find('='); eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_inline = true;
      }
    }
    const Flag* flag = nullptr;
    for (const Flag& f : flags_)
      for (const std::string& n : f.names)
        if (n == arg) flag = &f;
    if (flag == nullptr) {
      if (arg.empty() || arg[0] != '-') throw UsageError(fmt::format("unexpected argument '{}'", arg));
      throw UsageError(fmt::format("unknown flag '{}'", arg));
    }
    if (!flag->takes_value) {
      if (has_inline) throw UsageError(fmt::format("{} takes no value (got '{}')", arg, value));
      flag->set(arg, "");
      continue;
    }
    if (!has_inline) {
      if (i + 1 >= argc) throw UsageError(fmt::format("{} needs a value ({})", arg, flag->metavar));
      value = argv[++i];
    }
    flag->set(arg, value);
  }
  return true;
}

std::string ArgParser::usage() const {
  std::string s = fmt::format("usage: {} [flags]\n{}\n\nflags:\n", prog_, summary_);
  for (const Flag& f : flags_) {
    std::string left;
    for (size_t i = 0; i < f.names.size(); ++i) left += (i ? ", " : "") + f.names[i];
    if (f.takes_value) left += " " + f.metavar;
    std::string help = f.help;
    if (!f.default_text.empty()) help += fmt::format(" (default: {})", f.default_text);
    s += fmt::format("  {:<28} {}\n", left, help);
  }
  s += fmt::format("  {:<28} {}\n", "-h, --help", "show this help");
  return s;
}

void add_model_flags(ArgParser& p, ModelFlags& f, const std::string& ctx_help) {
  p.add("-m,--model", &f.model, "PATH",
        "model: a Hugging Face checkpoint directory, a llama2.c .bin, a .gguf file or a qkd int4 checkpoint");
  p.add("--tokenizer", &f.tokenizer, "PATH",
        "tokenizer file (sentencepiece .model or llama2.c tokenizer.bin); found beside the model when omitted");
  p.add("--backend", &f.backend, "auto|cpu|cuda", "where to run; auto uses CUDA when a GPU is present");
  p.add("-c,--ctx", &f.ctx, "N", ctx_help);
}

int run_app(const char* prog, const std::function<int()>& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s (see %s --help)\n", prog, e.what(), prog);
    return 2;
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", prog, e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory\n", prog);
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", prog, e.what());
    return 1;
  }
}

}  // namespace qkd::cli
