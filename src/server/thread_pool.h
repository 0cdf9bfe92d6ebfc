// The HTTP threads: started on demand up to a limit, and the most recently idle one takes the
// next connection. cpp-httplib's own pool starts every thread at once and wakes them in turn, so
// a steady trickle of requests walks through all of them, each touching its own stack and
// allocator arena (resident memory kept climbing over the first few hundred requests); here a
// sequential client keeps reusing one warm thread.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <httplib.h>

namespace diffuse::server {

class LifoThreadPool : public httplib::TaskQueue {
 public:
  explicit LifoThreadPool(size_t max_threads);
  ~LifoThreadPool() override;
  void enqueue(std::function<void()> fn) override;
  void shutdown() override;

 private:
  struct Slot {
    std::thread thread;
    std::condition_variable cv;
    std::function<void()> task;
  };
  void run(Slot& s);

  const size_t max_threads_;
  std::mutex mu_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> idle_;                  // a stack: the last one to finish is the next to work
  std::deque<std::function<void()>> backlog_;  // tasks waiting for a thread when all are busy
  bool stopping_ = false;
};

}  // namespace diffuse::server
