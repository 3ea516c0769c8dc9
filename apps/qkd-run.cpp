// qkd-run: chat with a model (a REPL that streams its replies), or complete one prompt with -p.
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include <unistd.h>

#include <fmt/format.h>

#include "apps/cli.h"
#include "apps/model_setup.h"
#include "kernels/error.h"
#include "loader/chat_template.h"
#include "runtime/chat.h"

namespace {

std::atomic<bool> g_cancel{false};  // set by SIGINT: stops the reply being generated

extern "C" void on_sigint(int) { g_cancel.store(true); }

void install_sigint() {
  struct sigaction sa {};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a Ctrl-C at the prompt interrupts the read, and the REPL re-prompts
  sigaction(SIGINT, &sa, nullptr);
}

void write_out(std::string_view s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

void print_stats(const qkd::runtime::GenerateResult& r) {
  std::fprintf(stderr, "\nqkd-run: prompt %d tokens at %.1f tok/s; generated %zu tokens at %.1f tok/s (stop: %s)\n",
               r.n_prompt, r.prefill_tok_per_s(), r.tokens.size(), r.decode_tok_per_s(),
               qkd::runtime::stop_reason_name(r.stop));
}

qkd::ChatTemplate choose_template(const std::string& flag, const qkd::ModelBundle& b) {
  if (flag != "auto") return qkd::chat_template_from_name(flag);
  std::string message;
  qkd::ChatTemplate t = qkd::detect_chat_template(b.chat_template, &message);
  if (!b.chat_template.empty() && !message.empty()) std::fprintf(stderr, "qkd-run: %s\n", message.c_str());
  return t;
}

int repl(qkd::runtime::ChatSession& chat, bool show_stats) {
  const bool tty = isatty(STDIN_FILENO) != 0;
  std::fprintf(stderr, "qkd-run: chat; Ctrl-C stops a reply, /reset starts over, Ctrl-D or /exit quits\n");
  for (;;) {
    if (tty) write_out("> ");
    g_cancel.store(false);
    std::string line;
    if (!std::getline(std::cin, line)) {
      if (g_cancel.load()) {  // Ctrl-C at the prompt: drop the line, ask again
        std::cin.clear();
        std::clearerr(stdin);
        write_out("\n");
        continue;
      }
      if (tty) write_out("\n");
      return 0;
    }
    if (line == "/exit" || line == "/quit") return 0;
    if (line == "/reset") {
      chat.reset();
      continue;
    }
    if (line.empty()) continue;
    try {
      const qkd::runtime::GenerateResult r = chat.reply(line, write_out);
      write_out("\n");
      if (chat.dropped_turns() > 0)
        std::fprintf(stderr, "qkd-run: the context was full; dropped the %d oldest turn(s)\n", chat.dropped_turns());
      if (r.stop == qkd::runtime::StopReason::Cancelled) std::fprintf(stderr, "qkd-run: [reply stopped]\n");
      if (show_stats) print_stats(r);
    } catch (const qkd::Error& e) {  // one bad turn does not end the session
      std::fprintf(stderr, "qkd-run: error: %s\n", e.what());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return qkd::cli::run_app("qkd-run", [&] {
    qkd::cli::ModelFlags mf;
    std::optional<std::string> prompt;
    std::string system, tmpl_name = "auto";
    int n_predict = 256;
    qkd::runtime::SamplerParams sp;
    std::optional<std::string> seed_text;
    bool stats = false;
    qkd::cli::ArgParser p("qkd-run",
                          "Chat with a model, or complete one prompt with -p (stdout: the prompt, then the generated "
                          "text; statistics go to stderr).");
    qkd::cli::add_model_flags(p, mf, "context length in tokens (default: the model's maximum)");
    p.add("-p,--prompt", &prompt, "TEXT", "complete this prompt and exit (\"\" starts from BOS alone)");
    p.add("-n,--max-tokens", &n_predict, "N", "most tokens to generate per reply (-1: until the end of the turn)");
    p.add("--temp", &sp.temperature, "T", "sampling temperature; 0 is greedy");
    p.add("--top-k", &sp.top_k, "K", "sample among the K most likely tokens; 0 disables");
    p.add("--top-p", &sp.top_p, "P", "nucleus sampling threshold in (0, 1]; 1 disables");
    p.add("--seed", &seed_text, "N", "random seed (default: from the clock, printed on stderr)");
    p.add("--system", &system, "TEXT", "system message for chat");
    p.add("--chat-template", &tmpl_name, "NAME",
          "auto (from the model's metadata), llama2, llama3, chatml, zephyr or none");
    p.add_switch("--stats", &stats, "print token rates after every chat reply");
    if (!p.parse(argc, argv)) return 0;
    if (seed_text) {
      sp.seed = 0;
      char* end = nullptr;
      errno = 0;
      const unsigned long long v = std::strtoull(seed_text->c_str(), &end, 10);
      if (seed_text->empty() || *end != '\0' || errno != 0 || (*seed_text)[0] == '-')
        throw qkd::cli::UsageError(fmt::format("--seed: '{}' is not a valid whole number", *seed_text));
      sp.seed = v;
    } else {
      sp.seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
      std::fprintf(stderr, "qkd-run: seed %llu\n", static_cast<unsigned long long>(sp.seed));
    }
    if (n_predict < -1) throw qkd::cli::UsageError(fmt::format("-n: {} is not -1 or a count", n_predict));
    qkd::runtime::validate(sp);
    if (prompt) {  // validate before the (slow) model load
      if (const int64_t bad = qkd::find_invalid_utf8(*prompt); bad >= 0)
        qkd::fail("prompt is not valid UTF-8: byte 0x{:02x} at offset {}", static_cast<unsigned char>((*prompt)[bad]),
                  bad);
    }
    if (tmpl_name != "auto") qkd::chat_template_from_name(tmpl_name);

    qkd::cli::LoadedApp app = qkd::cli::load_for_app("qkd-run", mf, 0, 1);
    qkd::runtime::Sampler sampler(sp);
    qkd::runtime::GenerateParams gp;
    gp.max_new_tokens = n_predict;
    gp.cancel = &g_cancel;
    install_sigint();

    const qkd::ChatTemplate tmpl = choose_template(tmpl_name, app.bundle);
    std::fprintf(stderr, "qkd-run: chat template %s\n", qkd::chat_template_name(tmpl.kind));
    if (prompt) {
      qkd::runtime::GenerateResult r;
      write_out(*prompt);
      if (tmpl.kind == qkd::ChatTemplateKind::None) {
        r = qkd::runtime::complete(*app.model, *app.bundle.tokenizer, sampler, *prompt, gp, write_out);
      } else {  // an instruct model answers the prompt as one user turn
        write_out("\n");
        qkd::runtime::ChatSession chat(*app.model, *app.bundle.tokenizer, sampler, tmpl, system, gp);
        r = chat.reply(*prompt, write_out);
      }
      write_out("\n");
      print_stats(r);
      return r.stop == qkd::runtime::StopReason::Cancelled ? 130 : 0;
    }
    qkd::runtime::ChatSession chat(*app.model, *app.bundle.tokenizer, sampler, tmpl, system, gp);
    return repl(chat, stats);
  });
}
