// Decode attention on CPU: each slot's new query against its own cached keys and values, reading
// only the positions the slot attends to and each K and V row once (cpu_attention.py says when it
// is built and used; DESIGN.md, "CPU decode attention", says why).
//
//   out[s, h, g, :] = softmax_j(scale * q[s, h, g, :] . k[s, h, j, :]) v[s, h, j, :]
//   over j in [lo(s), pos[s]], lo(s) = max(0, pos[s] - window + 1) for a sliding window, else 0.
//
// q [S, KVH, G, hd]; k, v [S, KVH, L, hd] (any strides but a unit last one); pos [S] int64;
// window 0 = none. fp32 throughout (bf16 / fp16 inputs are widened as they are read); the output
// takes q's dtype. One task per (slot, KV head): its G query rows share every K and V row read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <vector>

namespace {

// ---- 16-float vectors (one AVX-512 register; two or four narrower ones elsewhere) ---------------

constexpr int W = 16;                                    // floats a vector (one AVX-512 register)
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));

template <typename T>
inline vf vload(const T* p);

template <>
inline vf vload<float>(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <>
inline vf vload<at::BFloat16>(const at::BFloat16* p) {      // bf16 is the top half of an fp32
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu w = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline float hsum(vf v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(vf v) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
#endif
}

// e^x for x <= 0, 16 lanes, in plain arithmetic (libm's expf does not vectorize without
// -ffast-math): x = n ln2 + r with n = round(x / ln2) (by the 1.5 * 2^23 shift, exact in the default
// rounding mode for |x / ln2| < 2^22), |r| <= ln2 / 2, ln2 in two parts so r is exact enough; e^r by
// its Taylor series to r^8 (truncation < 2e-9 relative), times 2^n built in the exponent bits.
// x is clamped at -87 (e^-87 ~ 1.6e-38: a weight of 0 beside the row's maximum's 1).
inline vf vexp_nonpositive(vf x) {
  const vf lowest = vf{} - 87.0f;
  x = x < lowest ? lowest : x;
  const vf shift = vf{} + 12582912.0f;
  const vf n = (x * 1.44269504088896341f + shift) - shift;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vf{} + 2.48015873e-5f;                          // 1/8!, then 1/7! ... 1/0!
  p = p * r + 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// softmax numerators in place over sg[0, n), returning 1 / their sum
inline float softmax_row(float* sg, int64_t n) {
  int64_t j = 0;
  float m = -INFINITY;
  if (n >= W) {
    vf vm = vload<float>(sg);
    for (j = W; j + W <= n; j += W) {
      const vf x = vload<float>(sg + j);
      vm = x > vm ? x : vm;
    }
    m = hmax(vm);
  }
  for (; j < n; ++j) m = std::max(m, sg[j]);
  vf vs = vf{};
  for (j = 0; j + W <= n; j += W) {
    const vf e = vexp_nonpositive(vload<float>(sg + j) - m);
    std::memcpy(sg + j, &e, sizeof e);
    vs += e;
  }
  float sum = hsum(vs);
  for (; j < n; ++j) {
    const vf e = vexp_nonpositive(vf{} + (sg[j] - m));     // the same arithmetic as the lanes
    sg[j] = e[0];
    sum += e[0];
  }
  return 1.0f / sum;
}

// ---- the fast path: head size 64, 128 or 256, groups of 1-8 (fp32, bf16) -------------------------

// One (slot, KV head): scores of its G query rows against keys [0, n) (kbase, row stride ks),
// softmax, then the weighted sum of values (vbase, vs) into dst [G, HD].
template <typename T, int HD, int G>
void attend_one(const T* qsrc, int64_t qs, float scale, const T* kbase, int64_t ks, const T* vbase, int64_t vs,
                int64_t n, float* scores, T* dst) {
  constexpr int C = HD / W;
  vf q[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) q[g][c] = vload<T>(qsrc + g * qs + c * W) * scale;
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = kbase + j * ks;
    vf k[C];
    for (int c = 0; c < C; ++c) k[c] = vload<T>(kr + c * W);
    for (int g = 0; g < G; ++g) {
      vf acc = q[g][0] * k[0];
      for (int c = 1; c < C; ++c) acc += q[g][c] * k[c];
      scores[g * n + j] = hsum(acc);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = softmax_row(scores + g * n, n);
  vf acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = vf{} ;
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = vbase + j * vs;
    vf v[C];
    for (int c = 0; c < C; ++c) v[c] = vload<T>(vr + c * W);
    for (int g = 0; g < G; ++g) {
      const float w = scores[g * n + j];
      for (int c = 0; c < C; ++c) acc[g][c] += w * v[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      const vf o = acc[g][c] * inv[g];
      for (int i = 0; i < W; ++i) dst[g * HD + c * W + i] = static_cast<T>(o[i]);
    }
}

template <typename T>
using AttendOne = void (*)(const T*, int64_t, float, const T*, int64_t, const T*, int64_t, int64_t, float*, T*);

template <typename T, int HD>
AttendOne<T> pick_group(int64_t G) {
  switch (G) {
    case 1: return attend_one<T, HD, 1>;
    case 2: return attend_one<T, HD, 2>;
    case 3: return attend_one<T, HD, 3>;
    case 4: return attend_one<T, HD, 4>;
    case 5: return attend_one<T, HD, 5>;
    case 6: return attend_one<T, HD, 6>;
    case 7: return attend_one<T, HD, 7>;
    case 8: return attend_one<T, HD, 8>;
    default: return nullptr;
  }
}

template <typename T>
AttendOne<T> pick(int64_t hd, int64_t G) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    switch (hd) {
      case 64: return pick_group<T, 64>(G);
      case 128: return pick_group<T, 128>(G);
      case 256: return pick_group<T, 256>(G);
      default: return nullptr;
    }
  }
  return nullptr;
}

// ---- the generic path: any head size and group, any float dtype ----------------------------------

template <typename T>
inline const float* widen(const T* src, float* buf, int64_t n) {
  for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(src[d]);
  return buf;
}

template <>
inline const float* widen<float>(const float* src, float*, int64_t) {
  return src;
}

template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                             int64_t window, double scale, at::Tensor& out) {
  const int64_t S = q.size(0), KVH = q.size(1), G = q.size(2), hd = q.size(3);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float fscale = static_cast<float>(scale);
  const AttendOne<T> fast = pick<T>(hd, G);

  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * hd), acc(G * hd), row(hd), inv(G), scores;   // per thread, reused by its tasks
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, h = task % KVH;
      const int64_t p = pp[s];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const int64_t n = p - lo + 1;
      scores.resize(G * n);
      const T* qsrc = qp + s * qs0 + h * qs1;
      const T* kbase = kp + s * ks0 + h * ks1 + lo * ks2;
      const T* vbase = vp + s * vs0 + h * vs1 + lo * vs2;
      T* dst = op + (s * KVH + h) * G * hd;
      if (fast != nullptr) {
        fast(qsrc, qs2, fscale, kbase, ks2, vbase, vs2, n, scores.data(), dst);
        continue;
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < hd; ++d) qf[g * hd + d] = static_cast<float>(qsrc[g * qs2 + d]) * fscale;
      // scores: one pass over this slot's keys, every query row of the head against each key
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = widen<T>(kbase + j * ks2, row.data(), hd);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * hd;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < hd; ++d) dot += qg[d] * kr[d];
          scores[g * n + j] = dot;
        }
      }
      for (int64_t g = 0; g < G; ++g) inv[g] = softmax_row(scores.data() + g * n, n);
      // values: one pass, each V row added into every query row's accumulator with its weight
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = widen<T>(vbase + j * vs2, row.data(), hd);
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * n + j];
          float* ag = acc.data() + g * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) ag[d] += w * vr[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < hd; ++d) dst[g * hd + d] = static_cast<T>(acc[g * hd + d] * inv[g]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos, int64_t window, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() && pos.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_attention: q [S, KVH, G, hd], "
              "k/v [S, KVH, L, hd]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v must share a dtype");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == q.size(0),
              "decode_attention: pos must be int64 [S]");
  const int64_t S = q.size(0), KVH = q.size(1), hd = q.size(3), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == S && k_cache.size(1) == KVH && k_cache.size(3) == hd &&
              v_cache.sizes() == k_cache.sizes(), "decode_attention: cache shape ", k_cache.sizes(),
              " does not match q ", q.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "decode_attention: the head dimension must be contiguous");
  at::Tensor p = pos.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(pp[s] >= 0 && pp[s] < L, "decode_attention: slot ", s, " is at position ", pp[s],
                ", outside the cache's [0, ", L, ")");
  at::Tensor out = at::empty({S, KVH, q.size(2), hd}, q.options());
  if (S == 0 || q.size(2) == 0 || hd == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention_kernel<float>(q, k_cache, v_cache, p, window, scale, out); break;
    case at::kBFloat16: decode_attention_kernel<at::BFloat16>(q, k_cache, v_cache, p, window, scale, out); break;
    case at::kHalf: decode_attention_kernel<at::Half>(q, k_cache, v_cache, p, window, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention: float32, bfloat16 or float16, not ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(divgen_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(divgen_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
