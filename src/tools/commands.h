// Subcommands of the `diffuse` CLI. Each registers its flags on the CLI11 app and returns the
// function to run once parsing succeeded.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::tools {

using Run = std::function<int()>;
Run add_info_command(CLI::App& app);
Run add_bench_command(CLI::App& app);
Run add_synth_command(CLI::App& app);
Run add_generate_command(CLI::App& app);
Run add_train_command(CLI::App& app);
Run add_serve_command(CLI::App& app);
Run add_upscale_command(CLI::App& app);
Run add_dataset_command(CLI::App& app);
// `train full` (cmd_train_full.cpp), registered by add_train_command: its subcommand and runner.
std::pair<CLI::App*, Run> add_train_full_command(CLI::App* train);
// `train vae` (cmd_train_vae.cpp), likewise.
std::pair<CLI::App*, Run> add_train_vae_command(CLI::App* train);

// Folders searched for the layout manifests "sd15", "sd21", "sdxl" (cmd_synth.cpp).
std::vector<std::string> manifest_dirs();

}  // namespace diffuse::tools
