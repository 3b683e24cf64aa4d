// Async file IO for offload: a pool of IO threads issuing pread/pwrite, O_DIRECT where the
// buffer, file offset and length allow it, buffered IO for the unaligned rest.
//
// Why a thread pool and not libaio/io_uring: neither header is present on the machines this
// project builds on, and a blocking pread/pwrite per thread keeps as many IOs in flight as
// there are threads, which is what queue depth buys on a single device. The C ABI below is
// called through ctypes, which releases the GIL for the duration of each call.
//
// Knobs (DeepSpeed's names):
//   block_size     bytes per IO
//   queue_depth    IOs in flight per submitting thread
//   thread_count   submitting threads; the pool has thread_count * queue_depth IO threads
//   single_submit  a request's blocks are issued one at a time, in order, by one IO thread
//   overlap_events when 0, a request's blocks are issued in waves of queue_depth and a wave
//                  must finish before the next is queued (no overlap of submit and reap)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kDirectAlign = 4096;

struct Request;

struct Block {
  Request* req;
  char* buf;
  int64_t len;
  int64_t off;
  bool direct;
};

struct Request {
  bool write = false;
  int fd_direct = -1;
  int fd_buffered = -1;
  std::string path;
  std::vector<Block> blocks;  // all blocks; issued by waves or all at once
  size_t next = 0;            // first block not yet queued (wave mode)
  int64_t wave_left = 0;      // blocks of the current wave still running (wave mode)
  int64_t left = 0;           // blocks not yet finished
  int err = 0;                // first errno seen
  std::string what;
};

class Engine {
 public:
  Engine(int64_t block_size, int queue_depth, int thread_count, bool single_submit,
         bool overlap_events, bool use_direct)
      : block_size_(block_size), queue_depth_(queue_depth), single_submit_(single_submit),
        overlap_events_(overlap_events), use_direct_(use_direct) {
    int n = thread_count * queue_depth;
    for (int i = 0; i < n; ++i) pool_.emplace_back([this] { Worker(); });
  }

  ~Engine() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& t : pool_) t.join();
  }

  // Returns 0 when queued, else -errno (open failed; nothing queued).
  int Submit(bool write, char* buf, int64_t nbytes, const char* path, int64_t offset,
             char* err, int errlen) {
    auto req = new Request();
    req->write = write;
    req->path = path;
    int flags = write ? (O_WRONLY | O_CREAT) : O_RDONLY;
    req->fd_buffered = ::open(path, flags, 0644);
    if (req->fd_buffered < 0) {
      int e = errno;
      snprintf(err, errlen, "open(%s) failed: %s", path, strerror(e));
      delete req;
      return -e;
    }
    bool aligned = (reinterpret_cast<uintptr_t>(buf) % kDirectAlign == 0) &&
                   (offset % kDirectAlign == 0);
    int64_t body = aligned ? (nbytes / kDirectAlign) * kDirectAlign : 0;
    if (use_direct_ && body > 0) {
      req->fd_direct = ::open(path, flags | O_DIRECT, 0644);
      // tmpfs and some overlay filesystems refuse O_DIRECT: buffered IO is then correct.
      if (req->fd_direct < 0) body = 0;
    } else {
      body = 0;
    }
    // Split: direct body in block_size pieces (block_size rounded to the alignment), then the
    // buffered rest (unaligned tail, or everything when O_DIRECT is not possible).
    int64_t step = block_size_;
    if (body > 0) step = std::max<int64_t>(kDirectAlign, (block_size_ / kDirectAlign) * kDirectAlign);
    if (single_submit_) {
      if (body > 0) req->blocks.push_back({req, buf, body, offset, true});
      if (nbytes > body) req->blocks.push_back({req, buf + body, nbytes - body, offset + body, false});
    } else {
      for (int64_t pos = 0; pos < body; pos += step)
        req->blocks.push_back({req, buf + pos, std::min(step, body - pos), offset + pos, true});
      for (int64_t pos = body; pos < nbytes; pos += block_size_)
        req->blocks.push_back(
            {req, buf + pos, std::min(block_size_, nbytes - pos), offset + pos, false});
    }
    std::lock_guard<std::mutex> g(mu_);
    ++outstanding_;
    if (req->blocks.empty()) {
      Finish(req);
      return 0;
    }
    req->left = static_cast<int64_t>(req->blocks.size());
    if (single_submit_) {
      // One queue entry: the worker runs the blocks in order (see RunSequential).
      queue_.push_back({req, nullptr, -1, 0, false});
    } else {
      QueueWave(req);
    }
    cv_work_.notify_all();
    return 0;
  }

  // Wait for every submitted request. Returns the number of requests completed since the
  // previous Wait and puts the first error (errno, description) into *err_no / err.
  int64_t Wait(int* err_no, char* err, int errlen) {
    std::unique_lock<std::mutex> g(mu_);
    cv_done_.wait(g, [this] { return outstanding_ == 0; });
    int64_t done = completed_;
    completed_ = 0;
    *err_no = first_err_;
    if (first_err_) snprintf(err, errlen, "%s", first_what_.c_str());
    first_err_ = 0;
    first_what_.clear();
    return done;
  }

  int64_t Outstanding() {
    std::lock_guard<std::mutex> g(mu_);
    return outstanding_;
  }

 private:
  // Caller holds mu_.
  void QueueWave(Request* req) {
    size_t n = req->blocks.size();
    size_t upto = overlap_events_ ? n : std::min(n, req->next + static_cast<size_t>(queue_depth_));
    req->wave_left = static_cast<int64_t>(upto - req->next);
    for (; req->next < upto; ++req->next) queue_.push_back(req->blocks[req->next]);
  }

  static int DoIO(Request* req, const Block& b, std::string* what) {
    int fd = b.direct ? req->fd_direct : req->fd_buffered;
    int64_t done = 0;
    while (done < b.len) {
      ssize_t r = req->write ? ::pwrite(fd, b.buf + done, b.len - done, b.off + done)
                             : ::pread(fd, b.buf + done, b.len - done, b.off + done);
      if (r < 0) {
        if (errno == EINTR) continue;
        int e = errno;
        *what = std::string(req->write ? "pwrite(" : "pread(") + req->path + ") at offset " +
                std::to_string(b.off + done) + " failed: " + strerror(e);
        return e;
      }
      if (r == 0) {
        *what = "pread(" + req->path + "): the file ends before offset " +
                std::to_string(b.off + b.len) + " (it is shorter than the tensor being read)";
        return EIO;
      }
      done += r;
    }
    return 0;
  }

  // Caller holds mu_.
  void Finish(Request* req) {
    if (req->err && !first_err_) {
      first_err_ = req->err;
      first_what_ = req->what;
    }
    if (req->fd_direct >= 0) ::close(req->fd_direct);
    if (req->fd_buffered >= 0) ::close(req->fd_buffered);
    delete req;
    --outstanding_;
    ++completed_;
    if (outstanding_ == 0) cv_done_.notify_all();
  }

  void Worker() {
    for (;;) {
      Block b;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_work_.wait(g, [this] { return stop_ || !queue_.empty(); });
        if (stop_ && queue_.empty()) return;
        b = queue_.front();
        queue_.pop_front();
      }
      Request* req = b.req;
      std::string what;
      int e = 0;
      int64_t ran = 1;
      if (b.len < 0) {  // single_submit: the whole request, block by block, in order
        for (const Block& blk : req->blocks) {
          int64_t pos = 0;
          int64_t step = blk.direct ? std::max<int64_t>(kDirectAlign, (block_size_ / kDirectAlign) * kDirectAlign)
                                    : block_size_;
          while (pos < blk.len && e == 0) {
            Block piece{req, blk.buf + pos, std::min(step, blk.len - pos), blk.off + pos, blk.direct};
            e = DoIO(req, piece, &what);
            pos += piece.len;
          }
          if (e) break;
        }
        ran = req->left;  // every block of the request is accounted for, even after an error
      } else {
        e = DoIO(req, b, &what);
      }
      std::lock_guard<std::mutex> g(mu_);
      if (e && !req->err) {
        req->err = e;
        req->what = what;
      }
      req->left -= ran;
      if (b.len >= 0 && !overlap_events_ && --req->wave_left == 0 && req->next < req->blocks.size()) {
        QueueWave(req);
        cv_work_.notify_all();
      }
      if (req->left == 0) Finish(req);
    }
  }

  const int64_t block_size_;
  const int queue_depth_;
  const bool single_submit_;
  const bool overlap_events_;
  const bool use_direct_;
  std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  std::deque<Block> queue_;
  std::vector<std::thread> pool_;
  int64_t outstanding_ = 0;
  int64_t completed_ = 0;
  int first_err_ = 0;
  std::string first_what_;
  bool stop_ = false;
};

}  // namespace

extern "C" {

void* ds_aio_create(int64_t block_size, int queue_depth, int thread_count, int single_submit,
                    int overlap_events, int use_direct) {
  if (block_size <= 0 || queue_depth <= 0 || thread_count <= 0) return nullptr;
  return new Engine(block_size, queue_depth, thread_count, single_submit != 0,
                    overlap_events != 0, use_direct != 0);
}

void ds_aio_destroy(void* h) { delete static_cast<Engine*>(h); }

int ds_aio_submit(void* h, int is_write, void* buf, int64_t nbytes, const char* path,
                  int64_t offset, char* err, int errlen) {
  return static_cast<Engine*>(h)->Submit(is_write != 0, static_cast<char*>(buf), nbytes, path,
                                         offset, err, errlen);
}

int64_t ds_aio_wait(void* h, int* err_no, char* err, int errlen) {
  return static_cast<Engine*>(h)->Wait(err_no, err, errlen);
}

int64_t ds_aio_outstanding(void* h) { return static_cast<Engine*>(h)->Outstanding(); }

int ds_aio_direct_alignment() { return static_cast<int>(kDirectAlign); }
}
