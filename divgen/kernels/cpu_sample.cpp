// The CPU sampler's candidate pass (cpu_sample.py, ``_dense_draw`` step 2 and step 4's test) as
// one loop over a block of rows: for every token of a sampled row, the counter-based noise hash
// h = fmix32(fmix32(id ^ k1) ^ k2) (reference.hash_tokens' 32 bits), and the token is a candidate
// when its score reaches the row's floor (z >= floor, false for NaN) or its hash has the top
// `top_bits` bits all set. Returns the candidates as flat indices r * V + id (row-major, ids
// ascending, rows of the block in order) and m = h >> 9 (the 23 bits of the uniform) of each.
//
// Integer arithmetic and one comparison only: the tokens are those of the torch passes by
// construction; the Gumbel transform of the few candidates stays torch's (cpu_sample.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

struct Hash {
  uint32_t c1, c2;
  inline uint32_t fmix(uint32_t h) const {
    h ^= h >> 16;
    h *= c1;
    h ^= h >> 13;
    h *= c2;
    h ^= h >> 16;
    return h;
  }
};

#ifdef __AVX512F__
inline __m512i fmix16(__m512i h, __m512i c1, __m512i c2) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, c1);
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, c2);
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}
#endif

// One row: writes the ids of its candidates to col and their h >> 9 to m (each with room for
// vocab + 16 values) and returns how many there are. The vector loop is branch-free: each 16
// tokens' candidates are compressed in a register and stored whole (the next store overwrites
// the unused tail), as a data-dependent branch would mispredict on a third of the blocks.
int64_t row_candidates(const float* z, int64_t vocab, uint32_t k1, uint32_t k2, float floor, int64_t top_bits,
                       const Hash& hash, int32_t* col, int32_t* m) {
  const int shift = static_cast<int>(32 - top_bits);
  const uint32_t top = (1u << top_bits) - 1u;
  int64_t j = 0, n = 0;
#ifdef __AVX512F__
  const __m512i c1 = _mm512_set1_epi32(static_cast<int32_t>(hash.c1));
  const __m512i c2 = _mm512_set1_epi32(static_cast<int32_t>(hash.c2));
  const __m512i vk1 = _mm512_set1_epi32(static_cast<int32_t>(k1));
  const __m512i vk2 = _mm512_set1_epi32(static_cast<int32_t>(k2));
  const __m512i vtop = _mm512_set1_epi32(static_cast<int32_t>(top));
  const __m512 vfloor = _mm512_set1_ps(floor);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= vocab; j += 16, ids = _mm512_add_epi32(ids, step)) {
    __m512i h = fmix16(_mm512_xor_si512(ids, vk1), c1, c2);
    h = fmix16(_mm512_xor_si512(h, vk2), c1, c2);
    __mmask16 cand = _mm512_cmp_ps_mask(_mm512_loadu_ps(z + j), vfloor, _CMP_GE_OQ);
    cand |= _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(h, shift), vtop);
    _mm512_storeu_si512(col + n, _mm512_maskz_compress_epi32(cand, ids));
    _mm512_storeu_si512(m + n, _mm512_maskz_compress_epi32(cand, _mm512_srli_epi32(h, 9)));
    n += __builtin_popcount(static_cast<unsigned>(cand));
  }
#endif
  for (; j < vocab; ++j) {
    const uint32_t h = hash.fmix(hash.fmix(static_cast<uint32_t>(j) ^ k1) ^ k2);
    if (z[j] >= floor || (h >> shift) == top) {
      col[n] = static_cast<int32_t>(j);
      m[n++] = static_cast<int32_t>(h >> 9);
    }
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> candidates(const at::Tensor& z, const at::Tensor& k1, const at::Tensor& k2,
                                              const at::Tensor& floor, const at::Tensor& sampled, int64_t top_bits,
                                              int64_t c1, int64_t c2) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && z.device().is_cpu(),
              "candidates: z must be a 2-d fp32 CPU tensor");
  TORCH_CHECK(top_bits >= 1 && top_bits <= 31, "candidates: top_bits must be in 1..31");
  const int64_t rows = z.size(0), vocab = z.size(1);
  for (const auto* t : {&k1, &k2, &floor, &sampled})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->device().is_cpu(),
                "candidates: k1, k2, floor and sampled must be [rows] CPU tensors");
  TORCH_CHECK(k1.scalar_type() == at::kInt && k2.scalar_type() == at::kInt, "candidates: k1, k2 must be int32");
  TORCH_CHECK(floor.scalar_type() == at::kFloat && sampled.scalar_type() == at::kBool,
              "candidates: floor must be fp32 and sampled bool");
  const at::Tensor zc = z.contiguous(), k1c = k1.contiguous(), k2c = k2.contiguous();
  const at::Tensor fc = floor.contiguous(), sc = sampled.contiguous();
  const float* zp = zc.data_ptr<float>();
  const int32_t* k1p = k1c.data_ptr<int32_t>();
  const int32_t* k2p = k2c.data_ptr<int32_t>();
  const float* fp = fc.data_ptr<float>();
  const bool* sp = sc.data_ptr<bool>();
  const Hash hash{static_cast<uint32_t>(c1), static_cast<uint32_t>(c2)};
  std::vector<std::vector<int32_t>> cols(rows), ms(rows);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> col(vocab + 16), m(vocab + 16);      // this thread's scratch
    for (int64_t r = r0; r < r1; ++r) {
      if (!sp[r]) continue;
      const int64_t n = row_candidates(zp + r * vocab, vocab, static_cast<uint32_t>(k1p[r]),
                                       static_cast<uint32_t>(k2p[r]), fp[r], top_bits, hash, col.data(), m.data());
      cols[r].assign(col.begin(), col.begin() + n);
      ms[r].assign(m.begin(), m.begin() + n);
    }
  });
  int64_t n = 0;
  for (const auto& c : cols) n += static_cast<int64_t>(c.size());
  at::Tensor out_flat = at::empty({n}, z.options().dtype(at::kLong));
  at::Tensor out_m = at::empty({n}, z.options().dtype(at::kInt));
  int64_t* of = out_flat.data_ptr<int64_t>();
  int32_t* om = out_m.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (const int32_t c : cols[r]) *of++ = r * vocab + c;
    om = std::copy(ms[r].begin(), ms[r].end(), om);
  }
  return {out_flat, out_m};
}

}  // namespace

TORCH_LIBRARY(divgen_sample, m) {
  m.def("candidates(Tensor z, Tensor k1, Tensor k2, Tensor floor, Tensor sampled, int top_bits, int c1, int c2)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(divgen_sample, CPU, m) { m.impl("candidates", &candidates); }
