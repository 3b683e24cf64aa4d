// CPU optimizer steps (Adam/AdamW, Adagrad, Lion) for fp32 parameters and states.
//
// Design:
// - One fused pass over memory per step: every element's parameter, gradient and states are
//   read once and written once (28 bytes per parameter for Adam), and the optional bf16/fp16
//   copy of the updated parameter (for offload: the buffer that is copied to the device) is
//   written in the same pass instead of a second sweep.
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

template <bool ADAMW, int OUT>
void adam_chunk(float* __restrict p, const float* __restrict g, float* __restrict m,
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
    float gi = g[i] * gs;  // exact when gs == 1
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

template <int OUT>
void adagrad_chunk(float* __restrict p, const float* __restrict g, float* __restrict s,
                   void* __restrict out, int64_t begin, int64_t end, float neg_clr, float eps,
                   float wd) {
  // neg_clr = -lr / (1 + (step - 1) * lr_decay), formed in double by the caller.
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i];
    const float gi = g[i] + wd * pi;
    const float si = s[i] + gi * gi;
    const float std_ = std::sqrt(si) + eps;
    pi = pi + neg_clr * (gi / std_);
    s[i] = si;
    p[i] = pi;
    store_out<OUT>(out, i, pi);
  }
  finish_chunk<OUT>(p, out, begin, end);
}

template <int OUT>
void lion_chunk(float* __restrict p, const float* __restrict g, float* __restrict m,
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
    const float gi = g[i];
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

template <bool ADAMW, int OUT>
void adam_all(int32_t n, float** p, float** g, float** m, float** v, void** out,
              const int64_t* numel, const double* bc1, const double* bc2s, const AdamHyper& h,
              int threads) {
  ChunkList chunks(n, numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks.size; ++c) {
    const Chunk& k = chunks.items[c];
    adam_chunk<ADAMW, OUT>(p[k.tensor], g[k.tensor], m[k.tensor], v[k.tensor],
                           out ? out[k.tensor] : nullptr, k.begin, k.end, h, bc1[k.tensor],
                           bc2s[k.tensor]);
  }
}

template <int OUT>
void adagrad_all(int32_t n, float** p, float** g, float** s, void** out, const int64_t* numel,
                 const double* neg_clr, double eps, double wd, int threads) {
  ChunkList chunks(n, numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks.size; ++c) {
    const Chunk& k = chunks.items[c];
    adagrad_chunk<OUT>(p[k.tensor], g[k.tensor], s[k.tensor], out ? out[k.tensor] : nullptr,
                       k.begin, k.end, static_cast<float>(neg_clr[k.tensor]),
                       static_cast<float>(eps), static_cast<float>(wd));
  }
}

template <int OUT>
void lion_all(int32_t n, float** p, float** g, float** m, void** out, const int64_t* numel,
              double lr, double beta1, double beta2, double wd, int threads) {
  ChunkList chunks(n, numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks.size; ++c) {
    const Chunk& k = chunks.items[c];
    lion_chunk<OUT>(p[k.tensor], g[k.tensor], m[k.tensor], out ? out[k.tensor] : nullptr,
                    k.begin, k.end, lr, beta1, beta2, wd);
  }
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

// Returns 0 on success, -1 for an unknown out_kind. `out` may be null (no low-precision copy);
// otherwise out[t] points at numel[t] 16-bit values.
int ds_adam_step(int32_t n, float** p, float** g, float** m, float** v, void** out,
                 int32_t out_kind, const int64_t* numel, const double* bias_correction1,
                 const double* bias_correction2_sqrt, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int32_t decoupled, int32_t threads,
                 double grad_scale) {
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, grad_scale};
  const int t = resolve_threads(threads);
  const int kind = out ? out_kind : kOutNone;
#define DS_ADAM(ADAMW, OUT) \
  adam_all<ADAMW, OUT>(n, p, g, m, v, out, numel, bias_correction1, bias_correction2_sqrt, h, t)
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

int ds_adagrad_step(int32_t n, float** p, float** g, float** s, void** out, int32_t out_kind,
                    const int64_t* numel, const double* neg_clr, double eps, double weight_decay,
                    int32_t threads) {
  const int t = resolve_threads(threads);
  const int kind = out ? out_kind : kOutNone;
  if (kind == kOutNone) {
    adagrad_all<kOutNone>(n, p, g, s, out, numel, neg_clr, eps, weight_decay, t);
  } else if (kind == kOutBF16) {
    adagrad_all<kOutBF16>(n, p, g, s, out, numel, neg_clr, eps, weight_decay, t);
  } else if (kind == kOutFP16) {
    adagrad_all<kOutFP16>(n, p, g, s, out, numel, neg_clr, eps, weight_decay, t);
  } else {
    return -1;
  }
  return 0;
}

int ds_lion_step(int32_t n, float** p, float** g, float** m, void** out, int32_t out_kind,
                 const int64_t* numel, double lr, double beta1, double beta2, double weight_decay,
                 int32_t threads) {
  const int t = resolve_threads(threads);
  const int kind = out ? out_kind : kOutNone;
  if (kind == kOutNone) {
    lion_all<kOutNone>(n, p, g, m, out, numel, lr, beta1, beta2, weight_decay, t);
  } else if (kind == kOutBF16) {
    lion_all<kOutBF16>(n, p, g, m, out, numel, lr, beta1, beta2, weight_decay, t);
  } else if (kind == kOutFP16) {
    lion_all<kOutFP16>(n, p, g, m, out, numel, lr, beta1, beta2, weight_decay, t);
  } else {
    return -1;
  }
  return 0;
}

}  // extern "C"
