// diffuse: the command-line tool. Every failure ends here as one line on stderr and exit code 1.
#include <cstdio>
#include <cstring>
#include <new>

#include "core/error.h"
#include "core/memory_stats.h"
#include "core/threads.h"
#include "io/output_file.h"
#include "tools/commands.h"

#ifndef DIFFUSE_VERSION
#define DIFFUSE_VERSION "0.1.0"
#endif

int main(int argc, char** argv) {
  diffuse::reexec_with_short_omp_spin(argv);  // before any thread starts (core/threads.h)
  diffuse::tune_allocator();
  diffuse::install_output_cleanup();  // Ctrl-C while writing leaves no temporary file behind
  CLI::App app{"diffuse: Stable Diffusion in one native binary (SD 1.x, 2.x, XL)"};
  app.set_version_flag("--version", DIFFUSE_VERSION);
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, diffuse::tools::Run>> commands;
  auto track = [&](const char* name, diffuse::tools::Run run) { commands.emplace_back(app.get_subcommand(name), run); };
  track("info", diffuse::tools::add_info_command(app));
  track("bench", diffuse::tools::add_bench_command(app));
  track("synth", diffuse::tools::add_synth_command(app));
  track("generate", diffuse::tools::add_generate_command(app));
  track("train", diffuse::tools::add_train_command(app));
  track("serve", diffuse::tools::add_serve_command(app));
  track("upscale", diffuse::tools::add_upscale_command(app));
  track("dataset", diffuse::tools::add_dataset_command(app));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // A malformed or unknown flag: the same one-line form as every other failure.
    std::fprintf(stderr, "diffuse: error: %s (see diffuse --help)\n", e.what());
    return 1;
  }
  try {
    for (auto& [cmd, run] : commands)
      if (cmd->parsed()) return run();
  } catch (const diffuse::Error& e) {
    std::fprintf(stderr, "diffuse: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "diffuse: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "diffuse: error: %s\n", e.what());
    return 1;
  }
  return 1;
}
