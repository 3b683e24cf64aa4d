// CPU optimizer steps (Adam/AdamW, Adagrad, Lion) for fp32 parameters and states.
//
// Design:
// - One fused pass over memory per step: every element's parameter, gradient and states are
//   read once and written once (28 bytes per parameter for Adam with fp32 gradients), and the
//   optional bf16/fp16 copy of the updated parameter (for offload: the buffer that is copied to
//   the device) is written in the same pass instead of a second sweep.
// - Gradients may be fp32, bf16 or fp16, per tensor, and are widened to fp32 inside the pass:
//   memory sees 2 bytes per 16-bit gradient element instead of an upcast pass (read 2, write 4
//   into a new tensor) plus the update's 4-byte read. bf16 is widened in registers (a shift,
//   which vectorises inside the update loop); fp16 in blocks of kBlock elements into a buffer
//   that stays in L1 (GCC does not vectorise the fp16 -> fp32 cast; F16C does 8 at a time).
//   Widening is exact, so the update computes exactly what it computes on `grad.float()`: the
//   fp32 arithmetic below is the same code for every gradient kind.
// - Multi-tensor: one call covers every tensor of a parameter group. The work is cut into
//   fixed-size chunks (a chunk never spans two tensors) and OpenMP threads share the chunk
//   list, so a group of many small tensors costs one parallel region, not one per tensor.
// - SIMD through the compiler: the inner loops are `#pragma omp simd` over restrict pointers
//   and the op is built with -O3 -march=native (x86: AVX2 / AVX-512 as the host has them;
//   aarch64: NEON is baseline). ds_cpu_optim_isa() reports what the build targeted.
// - Arithmetic follows torch.optim's order of operations (lerp for exp_avg, sqrt(v)/bc2_sqrt
//   + eps, value * (m / denom)) so that results match torch.optim to float rounding.
// - Plain C ABI (no torch headers): the library compiles in seconds and is called through
//   ctypes with raw pointers that the Python side has validated (device, dtype, contiguity,
//   sizes).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// 16K floats = 64 KiB per stream: large enough to amortise scheduling, small enough that the
// chunk list balances across threads for tensors of a few MB.
constexpr int64_t kChunk = 16384;

enum OutKind : int { kOutNone = 0, kOutBF16 = 1, kOutFP16 = 2 };
enum GradKind : int { kGradF32 = 0, kGradBF16 = 1, kGradFP16 = 2 };

// 2048 fp32 values = 8 KiB per thread: widened gradients are read back from L1.
constexpr int64_t kBlock = 2048;

// Round-to-nearest-even fp32 -> bf16, NaN kept quiet (same result as torch's conversion).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

#if defined(__FLT16_MAX__)
#define DS_HAVE_FLOAT16 1
inline uint16_t to_fp16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, sizeof(u));
  return u;
}
#else
#define DS_HAVE_FLOAT16 0
// Portable round-to-nearest-even fp32 -> fp16 for compilers without _Float16.
inline uint16_t to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absx < 0x38800000u) {                                                // subnormal / zero
    float a;
    std::memcpy(&a, &absx, sizeof(a));
    const float scaled = a * 16777216.0f;  // 2^24: subnormal fp16 units
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  uint32_t mant = absx + 0xc8000fffu + ((absx >> 13) & 1u);  // rebias exponent and round
  return static_cast<uint16_t>(sign | (mant >> 13));
}
#endif

// Exact fp16 -> fp32 for compilers without _Float16 (normal, subnormal, inf and NaN).
inline float fp16_to_float(uint16_t h) {
#if DS_HAVE_FLOAT16
  _Float16 v;
  std::memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else {
    const float sub = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    std::memcpy(&bits, &sub, sizeof(bits));
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// Widen n fp16 gradients starting at element `begin` into dst (fp32, exact).
inline void widen_fp16(const void* __restrict src, int64_t begin, int64_t n,
                       float* __restrict dst) {
  const uint16_t* s = static_cast<const uint16_t*>(src) + begin;
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = fp16_to_float(s[i]);
}

// Gradient element i of a chunk as fp32: fp32 read as it is, bf16 (the top half of an fp32)
// widened by a shift.
template <int G>
inline float grad_at(const void* __restrict g, int64_t i) {
  if constexpr (G == kGradBF16) {
    const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(g)[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    static_assert(G == kGradF32, "fp16 gradients are widened into blocks first");
    return static_cast<const float*>(g)[i];
  }
}

template <int G>
using GradKindC = std::integral_constant<int, G>;

// Run fn(kind, g, begin, n) over [begin, end), g pointing at the gradient of element `begin`
// read as `kind`: the tensor's own fp32 or bf16 memory, or for fp16 blocks widened into an
// L1-resident fp32 buffer.
template <int G, typename Fn>
inline void over_grads(const void* g, int64_t begin, int64_t end, Fn&& fn) {
  if constexpr (G == kGradFP16) {
    alignas(64) float buf[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = end - b < kBlock ? end - b : kBlock;
      widen_fp16(g, b, n, buf);
      fn(GradKindC<kGradF32>{}, static_cast<const void*>(buf), b, n);
    }
  } else {
    const int64_t size = G == kGradBF16 ? 2 : 4;
    fn(GradKindC<G>{}, static_cast<const void*>(static_cast<const char*>(g) + begin * size),
       begin, end - begin);
  }
}

// bf16 rounding is integer arithmetic, which vectorises inside the update loop.
template <int OUT>
inline void store_out(void* out, int64_t i, float value) {
  if constexpr (OUT == kOutBF16) {
    static_cast<uint16_t*>(out)[i] = to_bf16(value);
  }
}

// fp16 conversion does not auto-vectorise (GCC 12), so it runs right after a chunk's update,
// while the chunk's 64 KiB of parameters are still in L1/L2: memory is still swept once.
template <int OUT>
inline void finish_chunk(const float* __restrict p, void* __restrict out, int64_t begin,
                         int64_t end) {
  if constexpr (OUT == kOutFP16) {
    uint16_t* o = static_cast<uint16_t*>(out);
    int64_t i = begin;
#if defined(__F16C__)
    for (; i + 8 <= end; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(p + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), h);
    }
#endif
    for (; i < end; ++i) o[i] = to_fp16(p[i]);
  } else {
    (void)p, (void)out, (void)begin, (void)end;
  }
}

// torch.lerp's formula, so exp_avg matches torch.optim.Adam bit for bit where FMA allows.
inline float lerp(float start, float end, float weight) {
  return weight < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// Chunk table over all tensors of one call. Built on the caller's thread: it is small
// (one entry per 16K elements) and needs no synchronisation.
struct ChunkList {
  Chunk* items = nullptr;
  int64_t size = 0;

  ChunkList(int32_t n_tensors, const int64_t* numels) {
    int64_t total = 0;
    for (int32_t t = 0; t < n_tensors; ++t) total += (numels[t] + kChunk - 1) / kChunk;
    items = new Chunk[total > 0 ? total : 1];
    for (int32_t t = 0; t < n_tensors; ++t) {
      for (int64_t b = 0; b < numels[t]; b += kChunk) {
        const int64_t e = b + kChunk < numels[t] ? b + kChunk : numels[t];
        items[size++] = Chunk{t, b, e};
      }
    }
  }
  ~ChunkList() { delete[] items; }
  ChunkList(const ChunkList&) = delete;
  ChunkList& operator=(const ChunkList&) = delete;
};

// Hyperparameters arrive as doubles (Python floats) so derived scalars are formed in double
// and rounded to float once, as torch.optim does.
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  // Factor on every gradient element before use (unscale x clip coefficient of an offloaded
  // step). Folded into the one pass over the state: multiplying the host gradients first would
  // be one more read and write of 8 bytes per element in a memory-bound step. Rounded to float
  // once, as torch's grad.mul_(scale) rounds its scalar, so the results are bitwise the same.
  double grad_scale;
};

// The chunk kernels update elements [begin, end) of p and the states; g points at the
// gradient of element `begin`, of kind G (fp32 or bf16; fp16 arrives as widened fp32 blocks).
template <bool ADAMW, int OUT, int G>
void adam_chunk(float* __restrict p, const void* __restrict g, float* __restrict m,
                float* __restrict v, void* __restrict out, int64_t begin, int64_t end,
                const AdamHyper& h, double bias_correction1, double bias_correction2_sqrt) {
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  const float w1 = static_cast<float>(1.0 - h.beta1);
  const float b2 = static_cast<float>(h.beta2);
  const float one_minus_b2 = static_cast<float>(1.0 - h.beta2);
  const float neg_step = static_cast<float>(-h.lr / bias_correction1);
  const float bc2s = static_cast<float>(bias_correction2_sqrt);
  const float eps = static_cast<float>(h.eps);
  const float wd = static_cast<float>(h.weight_decay);
  const float gs = static_cast<float>(h.grad_scale);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i];
    float gi = grad_at<G>(g, i - begin) * gs;  // exact when gs == 1
    if constexpr (ADAMW) {
      pi = pi * decay;
    } else {
      gi = gi + wd * pi;
    }
    const float mi = lerp(m[i], gi, w1);
    const float vi = v[i] * b2 + one_minus_b2 * gi * gi;  // addcmul: (value * g) * g
    const float denom = std::sqrt(vi) / bc2s + eps;
    pi = pi + neg_step * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    store_out<OUT>(out, i, pi);
  }
  finish_chunk<OUT>(p, out, begin, end);
}

template <int OUT, int G>
void adagrad_chunk(float* __restrict p, const void* __restrict g, float* __restrict s,
                   void* __restrict out, int64_t begin, int64_t end, float neg_clr, float eps,
                   float wd) {
  // neg_clr = -lr / (1 + (step - 1) * lr_decay), formed in double by the caller.
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i];
    const float gi = grad_at<G>(g, i - begin) + wd * pi;
    const float si = s[i] + gi * gi;
    const float std_ = std::sqrt(si) + eps;
    pi = pi + neg_clr * (gi / std_);
    s[i] = si;
    p[i] = pi;
    store_out<OUT>(out, i, pi);
  }
  finish_chunk<OUT>(p, out, begin, end);
}

template <int OUT, int G>
void lion_chunk(float* __restrict p, const void* __restrict g, float* __restrict m,
                void* __restrict out, int64_t begin, int64_t end, double lr_d, double beta1_d,
                double beta2_d, double wd) {
  const float decay = static_cast<float>(1.0 - lr_d * wd);
  const float beta1 = static_cast<float>(beta1_d);
  const float beta2 = static_cast<float>(beta2_d);
  const float one_minus_b1 = static_cast<float>(1.0 - beta1_d);
  const float one_minus_b2 = static_cast<float>(1.0 - beta2_d);
  const float neg_lr = static_cast<float>(-lr_d);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gi = grad_at<G>(g, i - begin);
    const float mi = m[i];
    const float c = mi * beta1 + gi * one_minus_b1;
    const float sign = static_cast<float>((c > 0.0f) - (c < 0.0f));
    const float pi = p[i] * decay + neg_lr * sign;
    m[i] = mi * beta2 + gi * one_minus_b2;
    p[i] = pi;
    store_out<OUT>(out, i, pi);
  }
  finish_chunk<OUT>(p, out, begin, end);
}

int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// One chunk of one tensor, with the tensor's gradient kind as a template argument.
template <bool ADAMW, int OUT, int G>
void adam_span(const Chunk& k, float** p, const void* const* g, float** m, float** v,
               void** out, const double* bc1, const double* bc2s, const AdamHyper& h) {
  const int32_t t = k.tensor;
  void* o = out ? out[t] : nullptr;
  over_grads<G>(g[t], k.begin, k.end, [&](auto kind, const void* gb, int64_t b, int64_t n) {
    adam_chunk<ADAMW, OUT, decltype(kind)::value>(p[t], gb, m[t], v[t], o, b, b + n, h, bc1[t],
                                                  bc2s[t]);
  });
}

template <bool ADAMW, int OUT>
void adam_all(int32_t n, float** p, const void* const* g, const int32_t* gkind, float** m,
              float** v, void** out, const int64_t* numel, const double* bc1, const double* bc2s,
              const AdamHyper& h, int threads) {
  ChunkList chunks(n, numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks.size; ++c) {
    const Chunk& k = chunks.items[c];
    switch (gkind[k.tensor]) {
      case kGradBF16:
        adam_span<ADAMW, OUT, kGradBF16>(k, p, g, m, v, out, bc1, bc2s, h);
        break;
      case kGradFP16:
        adam_span<ADAMW, OUT, kGradFP16>(k, p, g, m, v, out, bc1, bc2s, h);
        break;
      default:
        adam_span<ADAMW, OUT, kGradF32>(k, p, g, m, v, out, bc1, bc2s, h);
    }
  }
}

template <int OUT, int G>
void adagrad_span(const Chunk& k, float** p, const void* const* g, float** s, void** out,
                  const double* neg_clr, double eps, double wd) {
  const int32_t t = k.tensor;
  void* o = out ? out[t] : nullptr;
  over_grads<G>(g[t], k.begin, k.end, [&](auto kind, const void* gb, int64_t b, int64_t n) {
    adagrad_chunk<OUT, decltype(kind)::value>(p[t], gb, s[t], o, b, b + n,
                                              static_cast<float>(neg_clr[t]),
                                              static_cast<float>(eps), static_cast<float>(wd));
  });
}

template <int OUT>
void adagrad_all(int32_t n, float** p, const void* const* g, const int32_t* gkind, float** s,
                 void** out, const int64_t* numel, const double* neg_clr, double eps, double wd,
                 int threads) {
  ChunkList chunks(n, numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks.size; ++c) {
    const Chunk& k = chunks.items[c];
    switch (gkind[k.tensor]) {
      case kGradBF16:
        adagrad_span<OUT, kGradBF16>(k, p, g, s, out, neg_clr, eps, wd);
        break;
      case kGradFP16:
        adagrad_span<OUT, kGradFP16>(k, p, g, s, out, neg_clr, eps, wd);
        break;
      default:
        adagrad_span<OUT, kGradF32>(k, p, g, s, out, neg_clr, eps, wd);
    }
  }
}

template <int OUT, int G>
void lion_span(const Chunk& k, float** p, const void* const* g, float** m, void** out, double lr,
               double beta1, double beta2, double wd) {
  const int32_t t = k.tensor;
  void* o = out ? out[t] : nullptr;
  over_grads<G>(g[t], k.begin, k.end, [&](auto kind, const void* gb, int64_t b, int64_t n) {
    lion_chunk<OUT, decltype(kind)::value>(p[t], gb, m[t], o, b, b + n, lr, beta1, beta2, wd);
  });
}

template <int OUT>
void lion_all(int32_t n, float** p, const void* const* g, const int32_t* gkind, float** m,
              void** out, const int64_t* numel, double lr, double beta1, double beta2, double wd,
              int threads) {
  ChunkList chunks(n, numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks.size; ++c) {
    const Chunk& k = chunks.items[c];
    switch (gkind[k.tensor]) {
      case kGradBF16:
        lion_span<OUT, kGradBF16>(k, p, g, m, out, lr, beta1, beta2, wd);
        break;
      case kGradFP16:
        lion_span<OUT, kGradFP16>(k, p, g, m, out, lr, beta1, beta2, wd);
        break;
      default:
        lion_span<OUT, kGradF32>(k, p, g, m, out, lr, beta1, beta2, wd);
    }
  }
}

// Every gradient kind must be known before any thread starts writing.
bool valid_grad_kinds(int32_t n, const int32_t* gkind) {
  for (int32_t t = 0; t < n; ++t) {
    if (gkind[t] != kGradF32 && gkind[t] != kGradBF16 && gkind[t] != kGradFP16) return false;
  }
  return true;
}

}  // namespace

extern "C" {

// Which SIMD instruction set the compiler targeted for this build (for ds-report).
const char* ds_cpu_optim_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__ARM_FEATURE_SVE)
  return "sve";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

int ds_cpu_optim_has_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Returns 0 on success, -1 for an unknown out_kind, -2 for an unknown gradient kind. `out` may
// be null (no low-precision copy); otherwise out[t] points at numel[t] 16-bit values. g[t]
// points at numel[t] gradients of kind grad_kind[t] (GradKind: fp32, bf16 or fp16).
int ds_adam_step(int32_t n, float** p, const void* const* g, const int32_t* grad_kind, float** m,
                 float** v, void** out, int32_t out_kind, const int64_t* numel,
                 const double* bias_correction1, const double* bias_correction2_sqrt, double lr,
                 double beta1, double beta2, double eps, double weight_decay, int32_t decoupled,
                 int32_t threads, double grad_scale) {
  if (!valid_grad_kinds(n, grad_kind)) return -2;
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, grad_scale};
  const int t = resolve_threads(threads);
  const int kind = out ? out_kind : kOutNone;
#define DS_ADAM(ADAMW, OUT)                                                              \
  adam_all<ADAMW, OUT>(n, p, g, grad_kind, m, v, out, numel, bias_correction1,         \
                       bias_correction2_sqrt, h, t)
  if (kind == kOutNone) {
    decoupled ? DS_ADAM(true, kOutNone) : DS_ADAM(false, kOutNone);
  } else if (kind == kOutBF16) {
    decoupled ? DS_ADAM(true, kOutBF16) : DS_ADAM(false, kOutBF16);
  } else if (kind == kOutFP16) {
    decoupled ? DS_ADAM(true, kOutFP16) : DS_ADAM(false, kOutFP16);
  } else {
    return -1;
  }
#undef DS_ADAM
  return 0;
}

int ds_adagrad_step(int32_t n, float** p, const void* const* g, const int32_t* grad_kind,
                    float** s, void** out, int32_t out_kind, const int64_t* numel,
                    const double* neg_clr, double eps, double weight_decay, int32_t threads) {
  if (!valid_grad_kinds(n, grad_kind)) return -2;
  const int t = resolve_threads(threads);
  const int kind = out ? out_kind : kOutNone;
  if (kind == kOutNone) {
    adagrad_all<kOutNone>(n, p, g, grad_kind, s, out, numel, neg_clr, eps, weight_decay, t);
  } else if (kind == kOutBF16) {
    adagrad_all<kOutBF16>(n, p, g, grad_kind, s, out, numel, neg_clr, eps, weight_decay, t);
  } else if (kind == kOutFP16) {
    adagrad_all<kOutFP16>(n, p, g, grad_kind, s, out, numel, neg_clr, eps, weight_decay, t);
  } else {
    return -1;
  }
  return 0;
}

int ds_lion_step(int32_t n, float** p, const void* const* g, const int32_t* grad_kind,
                 float** m, void** out, int32_t out_kind, const int64_t* numel, double lr,
                 double beta1, double beta2, double weight_decay, int32_t threads) {
  if (!valid_grad_kinds(n, grad_kind)) return -2;
  const int t = resolve_threads(threads);
  const int kind = out ? out_kind : kOutNone;
  if (kind == kOutNone) {
    lion_all<kOutNone>(n, p, g, grad_kind, m, out, numel, lr, beta1, beta2, weight_decay, t);
  } else if (kind == kOutBF16) {
    lion_all<kOutBF16>(n, p, g, grad_kind, m, out, numel, lr, beta1, beta2, weight_decay, t);
  } else if (kind == kOutFP16) {
    lion_all<kOutFP16>(n, p, g, grad_kind, m, out, numel, lr, beta1, beta2, weight_decay, t);
  } else {
    return -1;
  }
  return 0;
}

}  // extern "C"
