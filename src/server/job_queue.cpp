// The job queue: FIFO, N workers, A1111's progress view, interrupt/skip/cancel (job_queue.h).
#include "server/job_queue.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <random>

#include "core/error.h"
#include "pipeline/preview.h"
#include "server/image_fit.h"

namespace diffuse::server {

using Clock = std::chrono::steady_clock;

bool Job::done() const {
  std::lock_guard<std::mutex> lk(mu_);
  return done_;
}

bool Job::wait_for(std::chrono::milliseconds d) {
  std::unique_lock<std::mutex> lk(mu_);
  return cv_.wait_for(lk, d, [&] { return done_; });
}

JobOutcome Job::outcome() const {
  std::lock_guard<std::mutex> lk(mu_);
  return out_;
}

struct JobQueue::Worker {
  std::thread thread;
  std::unique_ptr<api::RunState> state;
  std::shared_ptr<Job> job;  // running now (null: idle); guarded by JobQueue::mu_
  std::atomic<bool> interrupt{false}, skip{false};
  // Progress (guarded by JobQueue::mu_).
  Clock::time_point started;
  std::string timestamp, kind;
  int job_no = 0, job_count = 0, step = 0, steps = 0;
  std::string preview;  // base64 PNG
};

namespace {

std::string timestamp_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%d%H%M%S", &tm);
  return buf;
}

}  // namespace

JobQueue::JobQueue(api::Engine& engine, int workers, size_t max_queued, int preview_every)
    : engine_(engine), max_queued_(max_queued), preview_every_(preview_every) {
  for (int i = 0; i < std::max(1, workers); ++i) {
    auto w = std::make_unique<Worker>();
    w->state = engine_.new_state();
    workers_.push_back(std::move(w));
  }
  for (auto& w : workers_) {
    Worker* wp = w.get();
    wp->thread = std::thread([this, wp] { worker_loop(*wp); });
  }
}

JobQueue::~JobQueue() { shutdown(true); }

void JobQueue::submit(const std::shared_ptr<Job>& job) {
  std::lock_guard<std::mutex> lk(mu_);
  if (stopping_) throw RequestError(503, "", "the server is shutting down");
  if (queue_.size() >= max_queued_)
    throw RequestError(503, "", cat("the queue is full (", max_queued_, " jobs waiting; --max-queue)"));
  queue_.push_back(job);
  cv_.notify_one();
}

JobOutcome JobQueue::wait(const std::shared_ptr<Job>& job, const std::function<bool()>& client_alive) {
  while (!job->wait_for(std::chrono::milliseconds(100))) {
    if (client_alive && !client_alive()) {
      job->cancel = true;
      std::lock_guard<std::mutex> lk(mu_);
      auto it = std::find(queue_.begin(), queue_.end(), job);
      if (it != queue_.end()) {  // still waiting: it never runs
        queue_.erase(it);
        JobOutcome o;
        o.cancelled = true;
        o.error_status = 499;
        o.error = "the client closed the connection";
        std::lock_guard<std::mutex> jl(job->mu_);
        job->out_ = std::move(o);
        job->done_ = true;
        return job->out_;
      }
    }
  }
  return job->outcome();
}

void JobQueue::interrupt() {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& w : workers_)
    if (w->job) w->interrupt = true;
}

void JobQueue::skip() {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& w : workers_)
    if (w->job) w->skip = true;
}

ProgressView JobQueue::progress() const {
  std::lock_guard<std::mutex> lk(mu_);
  ProgressView v;
  v.queued = int(queue_.size());
  const Worker* w = nullptr;  // the longest-running job stands for "the current job"
  for (auto& x : workers_)
    if (x->job && (!w || x->started < w->started)) w = x.get();
  if (!w) return v;
  v.busy = true;
  v.job = w->kind;
  v.job_timestamp = w->timestamp;
  v.job_no = w->job_no;
  v.job_count = w->job_count;
  v.sampling_step = w->step;
  v.sampling_steps = w->steps;
  v.interrupted = w->interrupt;
  v.skipped = w->skip;
  v.current_image = w->preview;
  // A1111: 0.01 + job_no/job_count + (step/steps)/job_count, at most 1.
  const int jc = std::max(1, w->job_count);
  v.progress = std::min(1.0, 0.01 + double(w->job_no) / jc + (w->steps ? double(w->step) / w->steps : 0.0) / jc);
  const double elapsed = std::chrono::duration<double>(Clock::now() - w->started).count();
  v.eta_relative = v.progress > 0 ? elapsed / v.progress - elapsed : 0;
  v.textinfo = cat("step ", w->step, "/", w->steps, ", batch ", w->job_no + 1, "/", jc);
  return v;
}

void JobQueue::shutdown(bool cancel_running) {
  std::deque<std::shared_ptr<Job>> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    dropped.swap(queue_);
    if (cancel_running)
      for (auto& w : workers_)
        if (w->job) w->interrupt = true;
    cv_.notify_all();
  }
  for (auto& j : dropped) {
    JobOutcome o;
    o.error_status = 503;
    o.error = "the server is shutting down";
    finish(*j, std::move(o));
  }
  for (auto& w : workers_)
    if (w->thread.joinable()) w->thread.join();
  std::lock_guard<std::mutex> lk(mu_);
  workers_.clear();
}

std::optional<ModelInfo> JobQueue::current_model() const {
  std::lock_guard<std::mutex> lk(mu_);
  return current_;
}

void JobQueue::set_taesd(const std::string& path, const std::string& precision) {
  std::lock_guard<std::mutex> lk(taesd_mu_);
  taesd_path_ = path;
  taesd_precision_ = precision;
}

std::shared_ptr<TaesdPreviewer> JobQueue::taesd_for(Family family, std::string* warning) {
  std::lock_guard<std::mutex> lk(taesd_mu_);
  if (taesd_path_.empty()) return nullptr;
  if (auto it = taesd_.find(family); it != taesd_.end()) return it->second;
  if (auto it = taesd_errors_.find(family); it != taesd_errors_.end()) {
    *warning = it->second;
    return nullptr;
  }
  try {
    auto t = make_taesd_previewer(taesd_path_, family, taesd_precision_);
    std::fprintf(stderr, "diffuse serve: TAESD previews for %s: %s\n", family_name(family), t->taesd.origin().c_str());
    const std::string w = taesd_family_warning(t->taesd.origin(), family);
    if (!w.empty()) std::fprintf(stderr, "diffuse serve: warning: --taesd %s\n", w.c_str());
    return taesd_[family] = t;
  } catch (const Error& e) {
    *warning = taesd_errors_[family] = cat("--taesd: ", e.what(), "; live previews use the cheap approximation");
    std::fprintf(stderr, "diffuse serve: warning: %s\n", warning->c_str());
    return nullptr;
  }
}

void JobQueue::set_current_model(const ModelInfo& m) {
  std::lock_guard<std::mutex> lk(mu_);
  current_ = m;
}

void JobQueue::finish(Job& job, JobOutcome out) {
  std::lock_guard<std::mutex> lk(job.mu_);
  job.out_ = std::move(out);
  job.done_ = true;
  job.cv_.notify_all();
}

void JobQueue::worker_loop(Worker& w) {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      job = queue_.front();
      queue_.pop_front();
      w.job = job;
      w.interrupt = false;
      w.skip = false;
      w.started = Clock::now();
      w.timestamp = timestamp_now();
      w.kind = job->kind == Job::Kind::LoadModel ? "load_model"
               : job->spec.req.init.pixels.empty() ? "txt2img" : "img2img";
      w.job_no = 0;
      w.job_count = job->kind == Job::Kind::LoadModel ? 1 : job->spec.n_iter;
      w.step = w.steps = 0;
      w.preview.clear();
    }
    JobOutcome out;
    try {
      if (job->kind == Job::Kind::LoadModel) {
        engine_.load(job->model.filename);
        set_current_model(job->model);
      } else {
        run_generate(w, *job, out);
      }
    } catch (const RequestError& e) {
      out.error_status = e.status;
      out.error = e.what();
    } catch (const FileError& e) {
      out.error_status = 500;
      out.error = e.what();
    } catch (const Cancelled&) {
      out.cancelled = true;
      out.error_status = 499;
      out.error = "cancelled";
    } catch (const Error& e) {
      out.error_status = 422;  // settings the engine refused (sizes, memory, strength, ...)
      out.error = e.what();
    } catch (const std::exception& e) {
      out.error_status = 500;
      out.error = e.what();
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      w.job.reset();
    }
    finish(*job, std::move(out));
  }
}

void JobQueue::run_generate(Worker& w, Job& job, JobOutcome& out) {
  JobSpec& s = job.spec;
  fit_request_images(s);
  api::Request r = s.req;
  const uint64_t base = r.seed ? *r.seed : api::random_seed();
  out.seed = base;
  {
    std::lock_guard<std::mutex> lk(mu_);
    out.job_timestamp = w.timestamp;
  }
  out.sampler = r.sampler;
  out.schedule = r.schedule;
  out.warnings = s.warnings;
  // A request's own interval; < 0 is A1111's "off" / "end only": no previews; 0: the server's.
  const int every = s.preview_every > 0 ? s.preview_every : s.preview_every < 0 ? 0 : preview_every_;
  const Family family = engine_.family_of(r.model);
  std::string taesd_warning;
  const std::shared_ptr<TaesdPreviewer> taesd = every > 0 ? taesd_for(family, &taesd_warning) : nullptr;
  if (!taesd_warning.empty()) out.warnings.push_back(taesd_warning);
  for (int it = 0; it < s.n_iter; ++it) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      w.job_no = it;
      w.step = 0;
    }
    if (w.interrupt || job.cancel) break;
    w.skip = false;
    r.seed = base + uint64_t(it) * uint64_t(r.batch);  // A1111: batch `it` starts at seed + it·batch_size
    if (s.req.subseed) r.subseed = *s.req.subseed + uint64_t(it) * uint64_t(r.batch);  // and so do subseeds
    api::Callbacks cb;
    cb.progress = [&](Stage st, int done, int total) {
      if (st == Stage::Denoise) {
        std::lock_guard<std::mutex> lk(mu_);
        w.step = done;
        w.steps = total;
        out.steps_run = done;
        out.steps_total = total;
      }
      return !(job.cancel || w.skip);
    };
    cb.finish_early = [&] { return bool(w.interrupt); };  // the partly denoised image still comes back
    cb.on_latent = [&](const Tensor& latent, int step, int steps) {
      if (every <= 0 || (step % every != 0 && step != steps)) return;
      const std::vector<uint8_t> png = encode_png(taesd ? (*taesd)(latent, 0) : latent_preview(latent, 0, family));
      std::string b64 = base64_encode(png.data(), png.size());
      std::lock_guard<std::mutex> lk(mu_);
      w.preview = std::move(b64);
    };
    cb.on_image = [&](const api::GeneratedImage& g, int) {
      api::GeneratedImage img = g;
      out.width = img.image.width;
      out.height = img.image.height;
      out.seeds.push_back(img.seed);
      out.images.push_back(std::move(img));
    };
    try {
      engine_.generate(r, cb, w.state.get());
    } catch (const Cancelled&) {
      if (job.cancel) {
        out.cancelled = true;
        out.error_status = 499;
        out.error = "the client closed the connection";
        return;
      }
      if (w.interrupt) {
        out.interrupted = true;
        break;
      }
      // skip: on with the next batch
    }
  }
  if (w.interrupt) out.interrupted = true;
}

}  // namespace diffuse::server
