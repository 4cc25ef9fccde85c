// The CPU decode step's weight products: y = x · Wᵀ (+ bias) on a weight packed once into column
// panels, with an AVX-512 register-blocked micro-kernel (cpu_gemm.py says when it is built and
// used; DESIGN.md, "CPU GEMM", says why).
//
// Packed layout, P panels of NB = 32 output columns (the last one zero-padded):
//   fp32: [P, K, 32]           panel p, step k: W[32p .. 32p+31][k]
//   bf16: [P, ceil(K/2), 32, 2] panel p, pair j: (W[n][2j], W[n][2j+1]) for the 32 columns n
//                              (the pair layout VDPBF16PS multiplies; an odd K is padded with 0)
// so one step of the K loop reads 128 contiguous bytes of weight. The activations are repacked per
// call into blocks of MR = 8 rows, [ceil(M/8), K, 8] (bf16: [.., ceil(K/2), 8] pairs), so the 8
// values one step broadcasts share a cache line.
//
// Micro-kernel: 8 rows × 32 columns = 16 zmm accumulators; a K step is two weight loads, eight
// broadcasts and sixteen FMAs (bf16: VDPBF16PS, two products per lane). A panel is walked once per
// row block: the first block streams it from memory with a software prefetch 64 steps (8 KiB)
// ahead into L2, the other blocks find it in L2. Accumulation is fp32 in K order; the output takes
// x's dtype (bf16 rounded to nearest even).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 32;       // output columns a panel (two 16-float vectors)
constexpr int64_t MR = 8;        // activation rows a block
constexpr int64_t PF = 64;       // K steps the first row block prefetches ahead

bool supports(c10::ScalarType dtype) {
#if defined(__AVX512F__)
  if (dtype == at::kFloat) return true;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (dtype == at::kBFloat16) return true;
#endif
  return false;
}

at::Tensor pack(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2, "gemm_pack: the weight must be 2-D [out, in], got ", w_in.sizes());
  TORCH_CHECK(supports(w_in.scalar_type()), "gemm_pack: no kernel for ", w_in.scalar_type(), " on this CPU build");
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NB - 1) / NB;
  if (w.scalar_type() == at::kFloat) {
    at::Tensor out = at::zeros({P, K, NB}, w.options());
    const float* s = w.data_ptr<float>();
    float* d = out.data_ptr<float>();
    at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p)
        for (int64_t c = 0; c < NB && p * NB + c < N; ++c) {
          const float* row = s + (p * NB + c) * K;
          for (int64_t k = 0; k < K; ++k) d[(p * K + k) * NB + c] = row[k];
        }
    });
    return out;
  }
  const int64_t K2 = (K + 1) / 2;
  at::Tensor out = at::zeros({P, K2, NB, 2}, w.options());
  const uint16_t* s = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t c = 0; c < NB && p * NB + c < N; ++c) {
        const uint16_t* row = s + (p * NB + c) * K;
        for (int64_t k = 0; k < K; ++k) d[((p * K2 + k / 2) * NB + c) * 2 + (k & 1)] = row[k];
      }
  });
  return out;
}

#ifdef __AVX512F__

// Stores rows [0, R) of the block, columns [0, cols) of the panel (cols < 32 only in the last one).
template <int R>
inline void store(__m512 (&acc)[MR][2], float* y, int64_t ldy, int64_t cols, const float* bias) {
  for (int c = 0; c < 2; ++c) {
    const int64_t left = cols - 16 * c;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * c) : _mm512_setzero_ps();
    for (int m = 0; m < R; ++m) _mm512_mask_storeu_ps(y + m * ldy + 16 * c, mask, _mm512_add_ps(acc[m][c], b));
  }
}

#ifdef __AVX512BF16__
template <int R>
inline void store(__m512 (&acc)[MR][2], at::BFloat16* y, int64_t ldy, int64_t cols, const float* bias) {
  for (int c = 0; c < 2; ++c) {
    const int64_t left = cols - 16 * c;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * c) : _mm512_setzero_ps();
    for (int m = 0; m < R; ++m) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][c], b));
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(y + m * ldy + 16 * c), mask, h);
    }
  }
}
#endif

// One row block (R ≤ 8 rows) against one panel over the whole K. x: the block's packed
// activations [steps][8] (fp32 values, or bf16 pairs as 32-bit words); w: the panel [steps][32].
template <typename T, int R, bool PREFETCH>
inline void block(const void* xv, const void* wv, int64_t steps, T* y, int64_t ldy, int64_t cols,
                  const float* bias) {
  __m512 acc[MR][2];
  for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  if constexpr (std::is_same_v<T, float>) {
    const float* x = static_cast<const float*>(xv);
    const float* w = static_cast<const float*>(wv);
    for (int64_t k = 0; k < steps; ++k) {
      if (PREFETCH) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NB), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NB + 16), _MM_HINT_T1);
      }
      const __m512 w0 = _mm512_loadu_ps(w + k * NB), w1 = _mm512_loadu_ps(w + k * NB + 16);
      for (int m = 0; m < R; ++m) {
        const __m512 b = _mm512_set1_ps(x[k * MR + m]);
        acc[m][0] = _mm512_fmadd_ps(b, w0, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(b, w1, acc[m][1]);
      }
    }
  } else {
#ifdef __AVX512BF16__
    const int32_t* x = static_cast<const int32_t*>(xv);
    const uint16_t* w = static_cast<const uint16_t*>(wv);
    for (int64_t k = 0; k < steps; ++k) {
      if (PREFETCH) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NB * 2), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NB * 2 + 32), _MM_HINT_T1);
      }
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k * NB * 2);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k * NB * 2 + 32);
      for (int m = 0; m < R; ++m) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(x[k * MR + m]);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], b, w0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], b, w1);
      }
    }
#endif
  }
  store<R>(acc, y, ldy, cols, bias);
}

template <typename T, bool PREFETCH>
inline void block_rows(int64_t rows, const void* x, const void* w, int64_t steps, T* y, int64_t ldy,
                       int64_t cols, const float* bias) {
  switch (rows) {
    case 8: return block<T, 8, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    case 7: return block<T, 7, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    case 6: return block<T, 6, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    case 5: return block<T, 5, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    case 4: return block<T, 4, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    case 3: return block<T, 3, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    case 2: return block<T, 2, PREFETCH>(x, w, steps, y, ldy, cols, bias);
    default: return block<T, 1, PREFETCH>(x, w, steps, y, ldy, cols, bias);
  }
}

// x [M, K] (rows contiguous) -> blocks [ceil(M/8), steps, 8] of 32-bit words (fp32 values or bf16
// pairs, an odd K's last pair padded with 0); the last block's rows past M are never read (left as
// they are).
template <typename T>
at::Tensor pack_rows(const at::Tensor& x, int64_t steps) {
  const int64_t M = x.size(0), K = x.size(1), blocks = (M + MR - 1) / MR;
  at::Tensor out = at::empty({blocks, steps, MR}, x.options().dtype(at::kInt));
  int32_t* d = out.data_ptr<int32_t>();
  if constexpr (std::is_same_v<T, float>) {
    const int32_t* s = reinterpret_cast<const int32_t*>(x.data_ptr<float>());
    for (int64_t m = 0; m < M; ++m) {
      int32_t* col = d + (m / MR) * steps * MR + m % MR;
      for (int64_t k = 0; k < K; ++k) col[k * MR] = s[m * K + k];
    }
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; ++m) {
      int32_t* col = d + (m / MR) * steps * MR + m % MR;
      const uint16_t* row = s + m * K;
      for (int64_t j = 0; j < K / 2; ++j) col[j * MR] = int32_t(uint32_t(row[2 * j]) | uint32_t(row[2 * j + 1]) << 16);
      if (K & 1) col[(K / 2) * MR] = int32_t(uint32_t(row[K - 1]));
    }
  }
  return out;
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& packed, int64_t N, const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0), steps = packed.size(1), P = packed.size(0), blocks = (M + MR - 1) / MR;
  const at::Tensor xp = pack_rows<T>(x, steps);
  const int32_t* xd = xp.data_ptr<int32_t>();
  const char* wd = static_cast<const char*>(packed.data_ptr());
  const int64_t panel_bytes = steps * NB * 4;          // fp32 [steps, 32] or bf16 [steps, 32, 2]
  T* yd = y.data_ptr<T>();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const void* w = wd + p * panel_bytes;
      const int64_t cols = std::min(NB, N - p * NB);
      const float* bp = bias ? bias + p * NB : nullptr;
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t rows = std::min(MR, M - i * MR);
        const void* xb = xd + i * steps * MR;
        T* yb = yd + i * MR * N + p * NB;
        if (i == 0) block_rows<T, true>(rows, xb, w, steps, yb, N, cols, bp);
        else block_rows<T, false>(rows, xb, w, steps, yb, N, cols, bp);
      }
    }
  });
}

#endif  // __AVX512F__

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(supports(dt), "gemm: no kernel for ", dt, " on this CPU build");
  TORCH_CHECK(packed.scalar_type() == dt, "gemm: activations are ", dt, " but the packed weight is ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == (dt == at::kFloat ? 3 : 4) && packed.is_contiguous() && packed.size(2) == NB &&
                  (dt == at::kFloat || packed.size(3) == 2),
              "gemm: the weight was not packed by gemm_pack");
  TORCH_CHECK(N > 0 && N <= packed.size(0) * NB && N > (packed.size(0) - 1) * NB,
              "gemm: ", N, " output columns do not match the packed weight's ", packed.size(0), " panels");
  const int64_t K = x_in.size(-1);
  const int64_t steps = dt == at::kFloat ? K : (K + 1) / 2;
  TORCH_CHECK(steps == packed.size(1), "gemm: activations have ", K, " features but the weight was packed for ",
              dt == at::kFloat ? packed.size(1) : 2 * packed.size(1));
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y.view(shape);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "gemm: bias must be [", N, "], got ", bias->sizes());
    b32 = bias->to(at::kFloat).contiguous();
  }
#ifdef __AVX512F__
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (dt == at::kFloat) run<float>(x, packed, N, bp, y);
#ifdef __AVX512BF16__
  else run<at::BFloat16>(x, packed, N, bp, y);
#endif
#endif
  return y.view(shape);
}

// RMSNorm of each row of x [..., D] as the model's torch code computes it (llama.py, RMSNorm): fp32
// x̂ = x · 1/sqrt(mean(x²) + eps); then w · x̂ rounded to the model dtype first (Llama), or
// x̂ · (1 + w) in fp32 (Gemma's unit offset). One pass to sum, one to write, instead of the five
// full-tensor ops (and their dispatch) of the torch code: at 16 rows each costs more to launch
// than to run.
template <typename T>
void norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t D, float eps, bool unit_offset) {
  typedef float v16 __attribute__((vector_size(64)));
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      v16 acc = {};
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) {
        v16 v;
        for (int i = 0; i < 16; ++i) v[i] = float(xr[d + i]);
        acc += v * v;
      }
      float ss = 0.0f;
      for (int i = 0; i < 16; ++i) ss += acc[i];
      for (; d < D; ++d) ss += float(xr[d]) * float(xr[d]);
      const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
      for (d = 0; d < D; ++d) {
        const float h = float(xr[d]) * inv;
        if (unit_offset) yr[d] = T(h * (1.0f + float(w[d])));
        else yr[d] = T(float(w[d]) * float(T(h)));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps, bool unit_offset) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "rms_norm: fp32 or bf16 only, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt && weight.dim() == 1 && weight.size(0) == x_in.size(-1),
              "rms_norm: weight must be [", x_in.size(-1), "] of ", dt, ", got ", weight.sizes(), " ", weight.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  if (dt == at::kFloat)
    norm_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, float(eps), unit_offset);
  else
    norm_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, D,
                            float(eps), unit_offset);
  return y;
}

}  // namespace

TORCH_LIBRARY(divgen_gemm, m) {
  m.def("supports(ScalarType dtype) -> bool", &supports);
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool unit_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(divgen_gemm, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
  m.impl("rms_norm", &rms_norm);
}
