// HTTP threads on demand, reused most-recently-idle first (thread_pool.h).
#include "server/thread_pool.h"

namespace diffuse::server {

LifoThreadPool::LifoThreadPool(size_t max_threads) : max_threads_(max_threads ? max_threads : 1) {}

LifoThreadPool::~LifoThreadPool() { shutdown(); }

void LifoThreadPool::enqueue(std::function<void()> fn) {
  std::unique_lock<std::mutex> lk(mu_);
  if (stopping_) return;
  if (!idle_.empty()) {
    Slot* s = idle_.back();
    idle_.pop_back();
    s->task = std::move(fn);
    s->cv.notify_one();
    return;
  }
  if (slots_.size() < max_threads_) {
    slots_.push_back(std::make_unique<Slot>());
    Slot* s = slots_.back().get();
    s->task = std::move(fn);
    s->thread = std::thread([this, s] { run(*s); });
    return;
  }
  backlog_.push_back(std::move(fn));
}

void LifoThreadPool::run(Slot& s) {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    if (!s.task && !backlog_.empty()) {
      s.task = std::move(backlog_.front());
      backlog_.pop_front();
    }
    if (s.task) {
      std::function<void()> t = std::move(s.task);
      s.task = nullptr;
      lk.unlock();
      t();
      lk.lock();
      continue;
    }
    if (stopping_) return;
    idle_.push_back(&s);
    s.cv.wait(lk, [&] { return s.task || stopping_; });
    if (!s.task) {  // woken to stop: leave the idle stack
      for (size_t i = 0; i < idle_.size(); ++i)
        if (idle_[i] == &s) idle_.erase(idle_.begin() + long(i));
    }
  }
}

void LifoThreadPool::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_ && slots_.empty()) return;
    stopping_ = true;
    for (auto& s : slots_) s->cv.notify_one();
  }
  // Threads finish their task and any backlog first (httplib's pool does the same).
  for (auto& s : slots_)
    if (s->thread.joinable()) s->thread.join();
  std::lock_guard<std::mutex> lk(mu_);
  slots_.clear();
  idle_.clear();
}

}  // namespace diffuse::server
