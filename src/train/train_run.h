// What a training run over a captioned dataset needs whatever it trains (`train full` uses it;
// `train lora` has the same pieces in lora_trainer.cpp): the shared options, the data prepared once
// (scan, regularisation images, every image encoded by the frozen VAE, every distinct caption by
// the frozen text encoder), the batches of each step, the validation loss, the loss log (CSV and
// chart), the resume state's fingerprint check and the step loop.
//
// Reproducibility: every step draws from generators seeded by (seed, step), and the epoch order
// by (seed, epoch), so a run's numbers do not depend on how it was split into sessions (--resume).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "pipeline/conditioning.h"
#include "train/dataset.h"
#include "train/objective.h"
#include "train/optim.h"
#include "train/reg_data.h"
#include "train/text_encoder_trainer.h"
#include "train/unet_trainer.h"

namespace diffuse::train {

// The options of a run (the CLI's names in comments where they differ).
struct RunOptions {
  std::string model, data, output;
  int steps = 0, epochs = 0;  // exactly one > 0 (steps win when both are given)
  int batch = 1;
  double lr = 1e-4;
  uint64_t seed = 42;
  DatasetOptions data_opts;  // resolution 0: the checkpoint's declared size, else the family's
  std::string lr_schedule = "constant";
  int warmup_steps = 0;
  double max_grad_norm = 1.0;
  float min_snr_gamma = 0;
  // The trained objective: "eps" or "v" (kohya's --v_parameterization); "" = the model's: what the
  // checkpoint declares (modelspec.prediction_type), else v for SD 2.x and eps for the others.
  std::string prediction;
  // kohya's --zero_terminal_snr: the schedule rescaled to zero SNR at t = T (pipeline/schedule.h;
  // v objective only). A checkpoint that declares it (SDModel::declared_zero_snr) keeps it.
  bool zero_terminal_snr = false;
  float noise_offset = 0;
  // kohya's --min_timestep / --max_timestep: training timesteps uniform in [min, max).
  int min_timestep = 0, max_timestep = 1000;
  int multires_noise_iterations = 0;  // kohya's --multires_noise_iterations (0: off)
  float multires_noise_discount = 0.3f;
  double caption_dropout = 0;
  double weight_decay = 1e-2;
  std::string save_precision = "fp16";  // fp16 | bf16 | float (fp32)
  int save_every = 0;
  std::string resume;  // a state file of this run (OUT.state.safetensors)
  bool train_text_encoder = false;
  double text_encoder_lr = 0;       // <= 0: lr
  int validate_every = 0;           // 0: at the start and the end only
  std::string precision = "fp32";   // compute: fp32 | bf16
  std::string reg_data;             // kohya's --reg_data_dir
  double prior_loss_weight = 1.0;
};

// A line for stderr; `progress`: a step line.
using LogFn = std::function<void(const std::string& line, bool progress)>;

// A generator for step `step`'s draws (stream: what they are for).
std::mt19937_64 step_rng(uint64_t seed, uint64_t step, uint64_t stream);
double uniform01(std::mt19937_64& g);  // [0, 1) from 53 bits
std::string fmt(const char* format, double v);
// Tensors of one shape but the first dimension, concatenated along it (owned).
Tensor concat0(const std::vector<Tensor>& parts);

// Checks the options every trainer shares (throws naming the option: --steps/--epochs, --batch,
// --lr, --lr-scheduler, --save-precision, --precision, --prior-loss-weight) and returns the dtype
// trained tensors are saved in.
DType check_run_options(const RunOptions& o);
// The objective a run trains: `prediction` ("eps"/"v") when given, else what the checkpoint declares
// (SDModel::declared_prediction), else v for SD 2.x and eps for the other families.
Objective trained_objective(const std::string& prediction, const SDModel& model);

// The run's dataset: --resolution (0: the model file's square modelspec.resolution if it declares
// one, else the family's native size, 512 / 768 / 1024, from its tensor names), the scan, the
// regularisation images; warnings go to `log`.
struct RunData {
  DatasetOptions dopt;
  Dataset data;
  RegInfo reg;
};
RunData load_run_data(const RunOptions& o, const LogFn& log);

// Steps per epoch (batches, rounded up) and the run's total steps.
struct RunLength {
  int64_t per_epoch = 1;
  int total = 0;
};
RunLength run_length(const RunOptions& o, const Dataset& data);

// One step's inputs: the noised latents and the conditioning (cached context, or with a trained
// text encoder the token ids it encodes in the step), each sample's reg flag.
struct TrainBatch {
  NoisedBatch nb;
  Tensor ctx, pooled, tids;             // [B, 77, C]; SDXL [B, P], [B, 6]
  TextEncoderTrainer::Batch ids;        // trained text encoder(s): the captions' token ids
  std::vector<bool> is_reg;
};

// The data of a run on a loaded model: every image's latent (VAE posterior mean × scaling
// factor, encoded once), the caption conditionings (encoded once per distinct text by the frozen
// text encoder(s)), the epoch order, batches and the validation set (up to four training images at
// timesteps 100, 300, 500, 700, 900 with fixed noise: the raw loss is dominated by the random
// timestep).
class TrainData {
 public:
  // With o.train_text_encoder, the text encoders' layers are registered in the trainer's Grads
  // and their forward and backward run in every step (train/text_encoder_trainer.h; the trained
  // parameters are the caller's).
  TrainData(SDModel& model, Backend& be, Dataset& data, const RunOptions& o, const DatasetOptions& dopt,
            UNetTrainer& trainer);
  ~TrainData();
  Objective objective() const { return obj_; }
  bool zero_terminal_snr() const { return ztsnr_; }  // asked for or declared by the model
  const RunOptions& options() const { return o_; }

  // The next step's batch: the next examples in epoch order (each item `repeats` times, shuffled
  // per epoch from the seed; examples of another latent size than the first wait for a later
  // batch), with noise, timesteps, caption shuffling and dropout drawn from step_rng(seed, step).
  TrainBatch next_batch(int step);
  // Advances the epoch order by `steps` batches without building them (a resumed run).
  void skip(int steps);
  // The per-sample loss weights of a batch (min-SNR-γ, the prior loss weight on reg samples).
  std::vector<float> loss_weights_of(const TrainBatch& b) const;
  // Forward (+ backward) of a batch through the UNet trainer, and the text encoder when trained.
  UNetTrainer::Step run(TrainBatch& b, const std::vector<float>& weights, bool backward);
  // The validation loss with the weights as they stand.
  double validation();

 private:
  struct Example;
  TrainBatch make_batch(const std::vector<size_t>& idx, std::mt19937_64& g, const std::vector<int>* fixed_t,
                        const std::vector<Tensor>* fixed_noise, bool for_train);
  std::vector<size_t> take_indices();
  const Conditioning& conditioning(const std::string& text);

  SDModel& model_;
  Backend& be_;
  UNetTrainer& trainer_;
  const RunOptions& o_;
  DatasetOptions dopt_;
  Objective obj_;
  bool ztsnr_;
  bool sdxl_;
  DdpmSchedule sched_;
  Workspace ws_;
  std::unique_ptr<TextEncoderTrainer> tenc_;  // with o.train_text_encoder
  std::vector<Example> examples_;
  std::map<std::string, Conditioning> cond_cache_;
  int64_t epoch_ = -1;
  std::vector<size_t> order_;
  size_t pos_ = 0;
  std::vector<size_t> val_idx_;
  std::vector<int> val_t_;
  std::vector<std::vector<Tensor>> val_noise_;
};

// The loss log beside the output, OUT.csv ("step,loss,lr,val_loss": row 0 and the last row hold
// validation losses only), and its chart OUT.loss.png (train/loss_plot.h).
class LossLog {
 public:
  // `before`: a resumed run's log so far (from its state); empty: a new log starting with the
  // validation loss at step 0.
  LossLog(std::string output, const std::string& before, double val_start);
  void step(int step, double loss, float lr, const double* val_loss);
  void end(int total, double val_loss);
  std::string text() const { return csv_.str(); }
  void write() const;  // both files, through the safe writer

 private:
  std::string output_;
  std::ostringstream csv_;
};

// The settings a state file must agree on to continue a run (as JSON; the trainer adds its own).
// The log line that describes a run's data: "N images, M per epoch with repeats; resolution R,
// objective v (zero terminal SNR)".
std::string data_summary(const RunData& rd, const TrainData& data);

nlohmann::json run_fingerprint(const RunOptions& o, const Dataset& data, int total, int resolution);

// A state file written by a run (tensors and metadata diffuse_run, diffuse_step, diffuse_csv).
class RunState {
 public:
  // Opens `path` and checks its fingerprint against `fingerprint` (throws naming the path and the
  // settings that differ, or that it is not a diffuse training state).
  RunState(const std::string& path, const std::string& fingerprint);
  int step() const { return step_; }
  const std::string& csv() const { return csv_; }
  // Tensor `key` as f32, checked against `shape` (throws naming the path and key).
  Tensor get(const std::string& key, const Shape& shape) const;

 private:
  TensorFile f_;
  int step_ = 0;
  std::string csv_;
};
// The metadata of a state file.
std::map<std::string, std::string> state_metadata(const std::string& fingerprint, int step, const std::string& csv);

// Continues a run from the state file `path` (checked against `fingerprint`): every trained
// tensor's value (under value_prefix + its key) and AdamW moments (adam.exp_avg. / adam.exp_avg_sq.
// + key), and `extra(i, state)` for a trainer's own tensors (an EMA). Returns the step; *csv gets
// the loss log so far.
int resume_from(const std::string& path, const std::string& fingerprint, const std::vector<Param*>& params,
                const std::vector<std::string>& keys, const std::string& value_prefix, AdamW& adam, std::string* csv,
                const std::function<void(size_t, const RunState&)>& extra = {});

// The validation loss at the end of a run: logged (with the start's) and the loss log's last row.
double end_validation(TrainData& data, LossLog& loss_log, int total, double val_start, const LogFn& log);

// An intermediate save's path: OUT-step<N>.<ext> beside OUT.
std::string intermediate_path(const std::string& output, int step);

// What the step loop calls besides training (each may be empty): after every optimiser step
// (`step`: steps done), when an intermediate save is due (--save-every), after the step's log.
struct StepHooks {
  std::function<void(int step)> after_update, save, after_step;
};

// Steps start..total-1: batch, loss weights, zero_grad, forward + backward, a finite-loss check
// (naming `what` as the last saved artefact), clip_grad_norm over the optimiser's parameters,
// AdamW at the schedule's rate, the log (CSV row, a progress line at most every total/100 steps,
// the validation loss every --validate-every steps).
void run_steps(const RunOptions& o, TrainData& data, AdamW& adam, LossLog& loss_log, int start, int total,
               const std::string& what, const StepHooks& hooks, const LogFn& log);

}  // namespace diffuse::train
