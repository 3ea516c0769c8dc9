// The one command-line parser of the qkd apps. Flags follow llama.cpp where one exists (-m, -p, -n, -c, --temp,
// --top-k, --top-p, --seed). A bad flag, a missing value or a value that does not parse is a qkd::Error naming
// the flag and the value; apps print it with the usage hint and exit 2.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace qkd::cli {

class ArgParser {
 public:
  ArgParser(std::string prog, std::string summary);

  // names: comma-separated spellings, e.g. "-m,--model". metavar names the value in the usage text.
  void add(const std::string& names, std::string* out, const std::string& metavar, const std::string& help);
  void add(const std::string& names, std::optional<std::string>* out, const std::string& metavar,
           const std::string& help);
  void add(const std::string& names, int* out, const std::string& metavar, const std::string& help);
  void add(const std::string& names, float* out, const std::string& metavar, const std::string& help);
  void add(const std::string& names, uint64_t* out, const std::string& metavar, const std::string& help);
  // Numbers whose absence matters (a setting that only makes sense with another flag): empty unless given; the
  // help text states the default the caller applies.
  void add(const std::string& names, std::optional<int>* out, const std::string& metavar, const std::string& help);
  void add(const std::string& names, std::optional<float>* out, const std::string& metavar,
           const std::string& help);
  void add_switch(const std::string& names, bool* out, const std::string& help);

  // Parses argv. Returns false when --help was asked for (usage already printed to stdout).
  bool parse(int argc, char** argv);
  std::string usage() const;

 private:
  struct Flag {
    std::vector<std::string> names;
    std::string metavar, help, default_text;
    bool takes_value = true;
    std::function<void(const std::string& flag, const std::string& value)> set;
  };
  void add_flag(const std::string& names, const std::string& metavar, const std::string& help,
                std::string default_text, bool takes_value,
                std::function<void(const std::string&, const std::string&)> set);
  std::string prog_, summary_;
  std::vector<Flag> flags_;
};

// Flags every model-using app shares: -m, --tokenizer, --backend, -c.
struct ModelFlags {
  std::string model;
  std::string tokenizer;
  std::string backend = "auto";
  int ctx = 0;  // 0: the app's default
};
void add_model_flags(ArgParser& p, ModelFlags& f, const std::string& ctx_help);

// Runs an app's body, turning qkd::Error and other exceptions into a one-line message on stderr and an exit code
// (2 for usage errors, 1 for everything else).
int run_app(const char* prog, const std::function<int()>& body);

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace qkd::cli
