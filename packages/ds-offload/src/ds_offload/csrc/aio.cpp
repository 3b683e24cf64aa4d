// Async file IO for offload: O_DIRECT where the buffer, file offset and length allow it,
// buffered IO for the unaligned rest, over one of two backends:
//
//   kernel AIO  thread_count submitting threads, each with its own kernel AIO context of
//               queue_depth requests (io_setup / io_submit / io_getevents, what libaio wraps;
//               called through syscall(2) with the kernel's own header, so neither libaio nor
//               its header is needed). Used for O_DIRECT blocks when the kernel allows it.
//   threads     a pool of thread_count * queue_depth threads issuing blocking pread/pwrite:
//               where kernel AIO is unavailable (ENOSYS, aio-max-nr exhausted, a seccomp
//               profile) and for buffered IO, which kernel AIO would run synchronously.
//
// The C ABI below is called through ctypes, which releases the GIL for each call.
//
// Knobs (DeepSpeed's names):
//   block_size     bytes per IO
//   queue_depth    IOs in flight per submitting thread
//   thread_count   submitting threads; the pool has thread_count * queue_depth IO threads
//   single_submit  a request's blocks are issued one at a time, in order, by one IO thread
//   overlap_events when 0, a request's blocks are issued in waves of queue_depth and a wave
//                  must finish before the next is queued (no overlap of submit and reap)
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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

// Kernel AIO through syscall(2): the kernel's ABI, no libaio needed.
int IoSetup(unsigned nr, aio_context_t* ctx) { return static_cast<int>(syscall(__NR_io_setup, nr, ctx)); }
int IoDestroy(aio_context_t ctx) { return static_cast<int>(syscall(__NR_io_destroy, ctx)); }
int IoSubmit(aio_context_t ctx, long n, iocb** cbs) {
  return static_cast<int>(syscall(__NR_io_submit, ctx, n, cbs));
}
int IoGetevents(aio_context_t ctx, long min_nr, long max_nr, io_event* ev) {
  return static_cast<int>(syscall(__NR_io_getevents, ctx, min_nr, max_nr, ev, nullptr));
}

enum Backend { kAuto = 0, kThreads = 1, kKernelAio = 2 };

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
  // backend kKernelAio: fails (ok() false) where the kernel refuses an AIO context.
  Engine(int64_t block_size, int queue_depth, int thread_count, bool single_submit,
         bool overlap_events, bool use_direct, int backend)
      : block_size_(block_size), queue_depth_(queue_depth), single_submit_(single_submit),
        overlap_events_(overlap_events), use_direct_(use_direct) {
    // buffered IO would run synchronously inside io_submit: threads serve it better
    bool try_aio = backend == kKernelAio || (backend == kAuto && use_direct);
    if (try_aio) {
      for (int i = 0; i < thread_count; ++i) {
        aio_context_t ctx = 0;
        if (IoSetup(static_cast<unsigned>(queue_depth), &ctx) < 0) break;
        ctxs_.push_back(ctx);
      }
      if (static_cast<int>(ctxs_.size()) < thread_count) {
        for (aio_context_t c : ctxs_) IoDestroy(c);
        ctxs_.clear();
      }
    }
    if (backend == kKernelAio && ctxs_.empty()) {
      ok_ = false;
      return;
    }
    if (!ctxs_.empty()) {
      for (aio_context_t c : ctxs_) pool_.emplace_back([this, c] { AioWorker(c); });
    } else {
      int n = thread_count * queue_depth;
      for (int i = 0; i < n; ++i) pool_.emplace_back([this] { Worker(); });
    }
  }

  ~Engine() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& t : pool_) t.join();
    for (aio_context_t c : ctxs_) IoDestroy(c);
  }

  bool ok() const { return ok_; }
  int backend() const { return ctxs_.empty() ? kThreads : kKernelAio; }

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
      RunBlocking(b);
    }
  }

  // A queue entry run with blocking pread/pwrite: one block, or (single_submit) a whole request.
  void RunBlocking(const Block& b) {
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
    Complete(req, e, what, ran, b.len >= 0);
  }

  void Complete(Request* req, int e, const std::string& what, int64_t ran, bool wave_block) {
    std::lock_guard<std::mutex> g(mu_);
    if (e && !req->err) {
      req->err = e;
      req->what = what;
    }
    req->left -= ran;
    if (wave_block && !overlap_events_ && --req->wave_left == 0 && req->next < req->blocks.size()) {
      QueueWave(req);
      cv_work_.notify_all();
    }
    if (req->left == 0) Finish(req);
  }

  // One submitting thread of the kernel AIO backend: keeps up to queue_depth O_DIRECT blocks in
  // flight on its context; buffered blocks and single_submit requests run blocking, in turn.
  void AioWorker(aio_context_t ctx) {
    const int qd = queue_depth_;
    std::vector<iocb> cbs(qd);
    std::vector<Block> held(qd);
    std::vector<int> free_slots;
    for (int i = qd - 1; i >= 0; --i) free_slots.push_back(i);
    std::vector<io_event> events(qd);
    int inflight = 0;
    for (;;) {
      std::vector<int> fresh;
      bool blocking = false;
      Block blk{};
      bool more = false;
      {
        std::unique_lock<std::mutex> g(mu_);
        if (inflight == 0) {
          cv_work_.wait(g, [this] { return stop_ || !queue_.empty(); });
          if (stop_ && queue_.empty()) return;
        }
        while (!free_slots.empty() && !queue_.empty()) {
          Block b = queue_.front();
          queue_.pop_front();
          if (b.len < 0 || !b.direct) {
            blk = b;
            blocking = true;
            break;
          }
          int s = free_slots.back();
          free_slots.pop_back();
          held[s] = b;
          fresh.push_back(s);
        }
        more = !queue_.empty();
      }
      std::vector<iocb*> ptrs;
      for (int s : fresh) {
        const Block& b = held[s];
        iocb& cb = cbs[s];
        std::memset(&cb, 0, sizeof(cb));
        cb.aio_data = static_cast<uint64_t>(s);
        cb.aio_lio_opcode = b.req->write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cb.aio_fildes = static_cast<uint32_t>(b.req->fd_direct);
        cb.aio_buf = reinterpret_cast<uint64_t>(b.buf);
        cb.aio_nbytes = static_cast<uint64_t>(b.len);
        cb.aio_offset = b.off;
        ptrs.push_back(&cb);
      }
      size_t sent = 0;
      while (sent < ptrs.size()) {
        int r = IoSubmit(ctx, static_cast<long>(ptrs.size() - sent), ptrs.data() + sent);
        if (r > 0) {
          sent += static_cast<size_t>(r);
          continue;
        }
        if (r < 0 && errno == EINTR) continue;
        break;  // the kernel takes no more now (EAGAIN, ...): run the rest blocking
      }
      inflight += static_cast<int>(sent);
      for (size_t k = sent; k < ptrs.size(); ++k) {
        int s = fresh[k];
        Block b = held[s];
        free_slots.push_back(s);
        RunBlocking(b);
      }
      if (blocking) RunBlocking(blk);
      if (inflight == 0) continue;
      // wait for at least one completion unless more work could be submitted right away
      long min_nr = (free_slots.empty() || !more) ? 1 : 0;
      int n = IoGetevents(ctx, min_nr, qd, events.data());
      if (n < 0) {
        if (errno == EINTR) continue;
        n = 0;  // cannot happen with a valid context; retried on the next turn
      }
      for (int k = 0; k < n; ++k) {
        int s = static_cast<int>(events[k].data);
        Block b = held[s];
        free_slots.push_back(s);
        --inflight;
        int64_t res = events[k].res;
        std::string what;
        int e = 0;
        if (res < 0) {
          e = static_cast<int>(-res);
          what = std::string(b.req->write ? "pwrite(" : "pread(") + b.req->path + ") at offset " +
                 std::to_string(b.off) + " failed: " + strerror(e);
        } else if (res < b.len) {
          // short transfer (end of file on a read): finish buffered, which names the problem
          Block rest{b.req, b.buf + res, b.len - res, b.off + res, false};
          e = DoIO(b.req, rest, &what);
        }
        Complete(b.req, e, what, 1, true);
      }
    }
  }

  const int64_t block_size_;
  const int queue_depth_;
  const bool single_submit_;
  const bool overlap_events_;
  const bool use_direct_;
  bool ok_ = true;
  std::vector<aio_context_t> ctxs_;
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

// backend: 0 auto (kernel AIO for O_DIRECT when available, else threads), 1 threads,
// 2 kernel AIO (nullptr where the kernel refuses it).
void* ds_aio_create(int64_t block_size, int queue_depth, int thread_count, int single_submit,
                    int overlap_events, int use_direct, int backend) {
  if (block_size <= 0 || queue_depth <= 0 || thread_count <= 0) return nullptr;
  auto* e = new Engine(block_size, queue_depth, thread_count, single_submit != 0,
                       overlap_events != 0, use_direct != 0, backend);
  if (!e->ok()) {
    delete e;
    return nullptr;
  }
  return e;
}

int ds_aio_backend(void* h) { return static_cast<Engine*>(h)->backend(); }

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
