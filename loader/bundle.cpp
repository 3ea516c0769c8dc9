#include "loader/bundle.h"

#include <filesystem>
#include <fstream>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/gguf.h"
#include "loader/mmap_file.h"

namespace qkd {

namespace fs = std::filesystem;

static bool gguf_magic(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string_view(magic, 4) == "GGUF";
}

std::string find_tokenizer(const std::string& model_path) {
  const fs::path p(model_path);
  const fs::path dir = fs::is_directory(p) ? p : p.parent_path().empty() ? fs::path(".") : p.parent_path();
  // A GGUF model carries its own tokenizer; a checkpoint made from one has it in tokenizer.gguf.
  if (fs::is_regular_file(p) && gguf_magic(p.string())) return p.string();
  for (const char* name : {"tokenizer.model", "tokenizer.bin", "tokenizer.gguf"})
    if (fs::is_regular_file(dir / name)) return (dir / name).string();
  // llama2.c's small models ship their own vocabularies as tokNNN.bin / tokNNN.model beside the weights;
  // take one only when it is unambiguous.
  std::vector<fs::path> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (e.is_regular_file() && name.rfind("tok", 0) == 0 && (ext == ".bin" || ext == ".model")) found.push_back(e.path());
  }
  if (found.size() == 1) return found[0].string();
  if (found.size() == 2 && found[0].stem() == found[1].stem()) {  // tok105.bin and tok105.model: the same vocab
    return (found[0].extension() == ".model" ? found[0] : found[1]).string();
  }
  return "";
}

static std::string hf_chat_template(const fs::path& dir) {
  const fs::path cfg = dir / "tokenizer_config.json";
  if (!fs::is_regular_file(cfg)) return "";
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(cfg.string()));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", cfg.string(), e.what());
  }
  auto it = j.find("chat_template");
  if (it == j.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {  // a list of named templates: the one called "default"
    for (const auto& t : *it)
      if (t.value("name", "") == "default" && t.contains("template") && t["template"].is_string())
        return t["template"].get<std::string>();
  }
  return "";
}

ModelBundle load_bundle(const std::string& model_path, const std::string& tokenizer_path) {
  QKD_CHECK(!model_path.empty(), "no model given (-m PATH)");
  if (!fs::exists(model_path)) fail("{}: model not found: No such file or directory", model_path);
  ModelBundle b;
  b.weights = load_model(model_path);
  b.tokenizer_path = tokenizer_path.empty() ? find_tokenizer(model_path) : tokenizer_path;
  if (b.tokenizer_path.empty())
    fail("{}: no tokenizer found beside the model (looked for tokenizer.model, tokenizer.bin, tok*.bin); "
         "pass --tokenizer PATH", model_path);
  b.tokenizer = load_tokenizer(b.tokenizer_path, b.weights.config.vocab_size);
  if (b.tokenizer->vocab_size() > b.weights.config.vocab_size)
    fail("{}: the tokenizer has {} tokens but the model {} has vocab_size {}", b.tokenizer_path,
         b.tokenizer->vocab_size(), model_path, b.weights.config.vocab_size);
  if (gguf_magic(b.tokenizer_path)) {
    const GgufFile g = GgufFile::open(b.tokenizer_path);
    b.chat_template = std::string(g.get_string("tokenizer.chat_template", ""));
  } else if (fs::is_directory(model_path)) {
    b.chat_template = hf_chat_template(model_path);
  }
  return b;
}

}  // namespace qkd
