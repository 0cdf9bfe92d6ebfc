// The server's jobs: a FIFO queue served by N workers (default 1), each with its own engine
// RunState, and the A1111 view of "the current job" that /sdapi/v1/progress reports. HTTP
// threads submit a job and wait for it; progress, interrupt, skip, options and the lists answer
// from other threads meanwhile. A job whose client goes away is cancelled (removed from the
// queue, or stopped at the next step); interrupt stops the running jobs, which still answer
// with what they have; skip abandons the current batch of an n_iter job.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "api/engine.h"
#include "pipeline/preview.h"
#include "server/model_registry.h"
#include "server/request.h"

namespace diffuse::server {

struct JobOutcome {
  std::vector<api::GeneratedImage> images;
  uint64_t seed = 0;              // the first image's seed (the run's)
  std::vector<uint64_t> seeds;    // one per image
  int steps_run = 0;              // sampling steps the last batch ran (all of them unless interrupted)
  int steps_total = 0;
  bool interrupted = false, cancelled = false;
  std::string sampler, schedule;  // what ran (diffuse names)
  int width = 0, height = 0;
  std::string job_timestamp;      // when the job started, YYYYMMDDhhmmss (A1111's)
  int error_status = 0;           // 0: ok; else an HTTP status (4xx bad request, 500 failure)
  std::string error;              // the message
  std::vector<std::string> warnings;
};

class Job {
 public:
  enum class Kind { Generate, LoadModel };
  Kind kind = Kind::Generate;
  JobSpec spec;      // Generate: spec.req.model is the checkpoint's path
  ModelInfo model;   // the checkpoint it runs on (LoadModel: the one to make current)

  std::atomic<bool> cancel{false};  // the client went away
  bool done() const;
  // Waits up to `d` for the outcome; true when the job has finished.
  bool wait_for(std::chrono::milliseconds d);
  JobOutcome outcome() const;

 private:
  friend class JobQueue;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  JobOutcome out_;
};

// What /sdapi/v1/progress shows (A1111's process-global view of the running job).
struct ProgressView {
  bool busy = false;
  double progress = 0, eta_relative = 0;
  int job_no = 0, job_count = 0, sampling_step = 0, sampling_steps = 0, queued = 0;
  bool interrupted = false, skipped = false;
  std::string job, job_timestamp, textinfo;
  std::string current_image;  // base64 PNG, "" none
};

class JobQueue {
 public:
  // preview_every: steps between previews when a request does not say (0: no previews).
  JobQueue(api::Engine& engine, int workers, size_t max_queued, int preview_every);
  ~JobQueue();

  // Queues a job; throws RequestError(503) when max_queued jobs are already waiting, or the queue
  // is shutting down.
  void submit(const std::shared_ptr<Job>& job);
  // Waits for `job`, cancelling it when client_alive() turns false (checked every ~100 ms).
  // Returns its outcome (cancelled set when the client left).
  JobOutcome wait(const std::shared_ptr<Job>& job, const std::function<bool()>& client_alive);

  void interrupt();  // the running jobs stop at their next step and answer with what they have
  void skip();       // the running jobs abandon their current batch (n_iter continues)
  ProgressView progress() const;
  // Cancels everything queued (their waiters get 503) and, when `cancel_running`, interrupts the
  // running jobs; joins the workers once they finish.
  void shutdown(bool cancel_running);

  // The current checkpoint (what a request without a model runs on); set by LoadModel jobs.
  std::optional<ModelInfo> current_model() const;
  void set_current_model(const ModelInfo& m);

  // --taesd DIR|FILE: live previews decoded by TAESD (pipeline/preview.h) on a backend computing as
  // `precision` says, the decoder loaded for a model family when a job of that family first needs
  // it. A decoder that fails to load gives that family the cheap previews, with a warning in each
  // job's info. Call before the first job.
  void set_taesd(const std::string& path, const std::string& precision);

 private:
  struct Worker;
  void worker_loop(Worker& w);
  void run_generate(Worker& w, Job& job, JobOutcome& out);
  void finish(Job& job, JobOutcome out);
  // The TAESD previewer for `family` (null: cheap previews; *warning says why when loading failed).
  std::shared_ptr<TaesdPreviewer> taesd_for(Family family, std::string* warning);

  api::Engine& engine_;
  const size_t max_queued_;
  const int preview_every_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::string taesd_path_, taesd_precision_;
  std::mutex taesd_mu_;  // loads one decoder at a time
  std::map<Family, std::shared_ptr<TaesdPreviewer>> taesd_;
  std::map<Family, std::string> taesd_errors_;
  std::optional<ModelInfo> current_;
};

}  // namespace diffuse::server
