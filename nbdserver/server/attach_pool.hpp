// Threads that attach node views for the event loops.
//
// Attaching a node opens its view, and creating one at its first attach
// makes files and syncs them (five fsyncs), under the store's lock. Run on
// an event loop, that stalled every other connection of the loop for as
// long as the disk took, in a boot storm of new nodes once per node. The
// loops hand such attaches here (nbd::Handshake's deferred attach) and go
// on serving; a job posts its result back to its loop.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace server {

class AttachPool {
 public:
  explicit AttachPool(unsigned threads);
  // Runs every job already posted, then joins the threads.
  ~AttachPool();
  AttachPool(const AttachPool&) = delete;
  AttachPool& operator=(const AttachPool&) = delete;

  // Any thread. Jobs run in the order posted, several at a time.
  void post(std::function<void()> job);

 private:
  void run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;  // guarded by mu_
  bool stop_ = false;                       // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace server
