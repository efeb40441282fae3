// A small persistent thread pool for CPU kernels called many times per token (the fused GGUF
// matmul: ~7 calls per decoder layer). Spawning std::threads per call costs 20-60 us each, as
// much as a small matmul; these workers stay alive, spin briefly after each job (the next call
// usually comes within microseconds) and then sleep on a condition variable, so an idle pool
// takes no CPU from torch's own threads.
//
// One pool per owner (offload's Runtime creates and destroys its own): no process-wide state.
// run(parts, fn) calls fn(part) for part in [0, parts) on the workers and the caller, and
// returns when all have finished.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define OFFLOAD_PAUSE() _mm_pause()
#else
#define OFFLOAD_PAUSE() std::this_thread::yield()
#endif

namespace offload_pool {

class Pool {
 public:
  // ``threads`` counts the caller: a pool of 1 runs everything on the calling thread.
  explicit Pool(int threads, int spin_us = 50) : spin_us_(spin_us) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(0); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return (int)workers_.size() + 1; }

  void run(int64_t parts, const std::function<void(int64_t)>& fn) {
    if (parts <= 0) return;
    if (workers_.empty() || parts == 1) {
      for (int64_t p = 0; p < parts; ++p) fn(p);
      return;
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = &fn;
      parts_ = parts;
      next_.store(0, std::memory_order_relaxed);
      done_.store(0, std::memory_order_relaxed);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    take(fn, parts);
    while (done_.load(std::memory_order_acquire) < parts) OFFLOAD_PAUSE();
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = nullptr;   // workers that wake late find no job
    }
    // A worker that took this job may still be between its last part and leaving ``take``:
    // ``fn`` lives on the caller's stack, so wait for it before returning.
    while (active_.load(std::memory_order_acquire) > 0) OFFLOAD_PAUSE();
  }

 private:
  void take(const std::function<void(int64_t)>& fn, int64_t parts) {
    for (int64_t p; (p = next_.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      fn(p);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // ``seen``: the epoch at construction (a worker that starts late must still see every job
  // and the stop posted since).
  void work(uint64_t seen) {
    for (;;) {
      // Spin a while for the next job, then sleep until one is posted.
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
      while (epoch_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until)
        OFFLOAD_PAUSE();
      const std::function<void(int64_t)>* job;
      int64_t parts;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [&] { return stop_ || epoch_.load(std::memory_order_acquire) != seen; });
        seen = epoch_.load(std::memory_order_acquire);
        if (stop_) return;
        job = job_;
        parts = parts_;
        if (job != nullptr) active_.fetch_add(1, std::memory_order_acq_rel);
      }
      if (job != nullptr) {
        take(*job, parts);
        active_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  const int spin_us_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> active_{0};
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t parts_ = 0;
  bool stop_ = false;
};

}  // namespace offload_pool
