// Causal attention of selected query rows over a whole KV cache, bf16 in, fp32 accumulation, on
// AVX512-BF16 (vdpbf16ps: two bf16 products per fp32 lane, twice the fp32 FMA's work).
//
// Why: a blend's recomputed rows (about 15% of the prompt) attend over every key in 29 of 30
// layers; torch's CPU flash kernel runs that in fp32 whatever the input dtype and was 57% of a
// blend prefill at fp32 peak. This kernel keeps the flash recipe (online softmax per query row,
// fp32 scores, probabilities rounded to bf16 for the weighted sum, as torch's bf16 path does)
// with the products in bf16.
//
// Layout: K is packed per tile of 64 keys as [32 dim pairs][64 keys] (a dim pair of one key is
// one 32-bit lane), so one vdpbf16ps against a broadcast query pair gives 16 keys' partial
// scores; V is packed as [key pairs][64 dims], so one against a broadcast pair of probabilities
// adds two keys to 16 output dims. Packing is once per call, amortised over every query row.
// Rows go in register blocks of 4 consecutive queries of one head (they share each K/V load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "bf16_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t D = 64;     // head dim the kernel is written for
constexpr int64_t PAIRS = 32; // D / 2
constexpr int64_t KT = 64;    // keys per tile
constexpr int64_t RB = 4;     // query rows per register block
constexpr int64_t QB = 32;    // queries per task

#if CACHEBLEND_BF16

// One register block: rows r0..r0+RB-1 (clamped to `rows`) of query head h over KV head j.
BF16_TARGET void attend_block(const uint16_t* q, int64_t q_row_stride, const int64_t* pos, int64_t rows,
                              const uint32_t* kp, const uint32_t* vp, float scale, uint16_t* out,
                              int64_t out_row_stride) {
  int64_t p[RB];
  const uint32_t* qrow[RB];
  for (int64_t r = 0; r < RB; ++r) {
    const int64_t i = std::min(r, rows - 1);  // a short block repeats its last row
    p[r] = pos[i];
    qrow[r] = reinterpret_cast<const uint32_t*>(q + i * q_row_stride);
  }
  const int64_t tiles = p[RB - 1] / KT + 1;  // positions are sorted: the last row sees the most keys
  float m[RB], l[RB];
  __m512 o[RB][4];
  for (int64_t r = 0; r < RB; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
    for (int c = 0; c < 4; ++c) o[r][c] = _mm512_setzero_ps();
  }
  alignas(64) uint16_t probs[RB][KT];
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* kt = kp + t * PAIRS * KT;  // [PAIRS][KT]
    __m512 s[RB][4];
    for (int64_t r = 0; r < RB; ++r)
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < PAIRS; ++i) {
      __m512i kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = _mm512_load_si512(kt + i * KT + c * 16);
      for (int64_t r = 0; r < RB; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(qrow[r][i]));
        for (int c = 0; c < 4; ++c) s[r][c] = dp(s[r][c], kv[c], qb);
      }
    }
    for (int64_t r = 0; r < RB; ++r) {
      __mmask16 visible[4];
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int c = 0; c < 4; ++c) {
        const __m512i key = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(t * KT + c * 16)));
        visible[c] = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(p[r])));
        s[r][c] = _mm512_mul_ps(s[r][c], _mm512_set1_ps(scale));
        mx = _mm512_mask_max_ps(mx, visible[c], mx, s[r][c]);
      }
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first tile (m = -inf)
      m[r] = m_new;
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        const __m512 e = _mm512_maskz_mov_ps(visible[c], exp512(_mm512_sub_ps(s[r][c], _mm512_set1_ps(m_new))));
        sum = _mm512_add_ps(sum, e);
        _mm256_store_si256(reinterpret_cast<__m256i*>(probs[r] + c * 16), (__m256i)_mm512_cvtneps_pbh(e));
        o[r][c] = _mm512_mul_ps(o[r][c], _mm512_set1_ps(alpha));
      }
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
    }
    const uint32_t* vt = vp + t * (KT / 2) * D;  // [KT / 2][D]
    for (int64_t kp2 = 0; kp2 < KT / 2; ++kp2) {
      __m512i vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = _mm512_load_si512(vt + kp2 * D + c * 16);
      for (int64_t r = 0; r < RB; ++r) {
        const __m512i pb = _mm512_set1_epi32(static_cast<int>(reinterpret_cast<const uint32_t*>(probs[r])[kp2]));
        for (int c = 0; c < 4; ++c) o[r][c] = dp(o[r][c], vv[c], pb);
      }
    }
  }
  for (int64_t r = 0; r < std::min(RB, rows); ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_row_stride + c * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][c], inv)));
  }
}

// q [H, S, D], k, v [Hkv, N, D] (bf16, rows contiguous), q_pos [S] sorted -> out [H, S, D].
BF16_TARGET void blend_attend_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& q_pos, const at::Tensor& out, double scale) {
  const int64_t H = q.size(0), S = q.size(1), Hkv = k.size(0), G = H / Hkv;
  const int64_t* pos = q_pos.data_ptr<int64_t>();
  const int64_t tiles = pos[S - 1] / KT + 1, n = std::min<int64_t>(k.size(1), tiles * KT);
  // Packed copies, zero past the last key (those scores are masked; their probabilities are 0).
  std::vector<uint32_t> kbuf(Hkv * tiles * PAIRS * KT + 16), vbuf(Hkv * tiles * KT / 2 * D + 16);
  uint32_t* kpack = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(kbuf.data()) + 63) & ~uintptr_t(63));
  uint32_t* vpack = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(vbuf.data()) + 63) & ~uintptr_t(63));
  at::parallel_for(0, Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t jt = begin; jt < end; ++jt) {
      const int64_t j = jt / tiles, t = jt % tiles;
      const uint16_t* K = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>()) + j * k.stride(0);
      const uint16_t* V = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>()) + j * v.stride(0);
      uint32_t* kt = kpack + jt * PAIRS * KT;
      uint16_t* vt = reinterpret_cast<uint16_t*>(vpack + jt * KT / 2 * D);
      for (int64_t key = 0; key < KT; ++key) {
        const int64_t idx = t * KT + key;
        const uint32_t* krow = reinterpret_cast<const uint32_t*>(K + idx * k.stride(1));
        const uint16_t* vrow = V + idx * v.stride(1);
        for (int64_t i = 0; i < PAIRS; ++i) kt[i * KT + key] = idx < n ? krow[i] : 0u;
        uint16_t* vdst = vt + (key / 2) * 2 * D + (key % 2);
        for (int64_t d = 0; d < D; ++d) vdst[2 * d] = idx < n ? vrow[d] : uint16_t(0);
      }
    }
  });
  const int64_t blocks = (S + QB - 1) / QB;
  at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t hb = begin; hb < end; ++hb) {
      const int64_t h = hb / blocks, s0 = (hb % blocks) * QB, s1 = std::min(S, s0 + QB), j = h / G;
      const uint16_t* qh = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()) + h * q.stride(0);
      uint16_t* oh = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + h * out.stride(0);
      for (int64_t i = s0; i < s1; i += RB)
        attend_block(qh + i * q.stride(1), q.stride(1), pos + i, std::min(RB, s1 - i), kpack + j * tiles * PAIRS * KT,
                     vpack + j * tiles * KT / 2 * D, static_cast<float>(scale), oh + i * out.stride(1), out.stride(1));
    }
  });
}

#else
void blend_attend_impl(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       double) {}
#endif

}  // namespace

bool blend_attend_supported() {
#if CACHEBLEND_BF16
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void blend_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                  const at::Tensor& out, double scale) {
  TORCH_CHECK(blend_attend_supported(), "blend_attend needs a CPU with AVX512-BF16");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16, "blend_attend takes bf16 tensors");
  TORCH_CHECK(q.size(2) == D && k.size(2) == D && v.size(2) == D, "blend_attend is written for head dim 64");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && out.stride(2) == 1, "rows must be contiguous");
  TORCH_CHECK(q.size(0) % k.size(0) == 0 && q.size(1) == q_pos.size(0) && q_pos.size(0) > 0, "shapes");
  TORCH_CHECK(q_pos.scalar_type() == at::kLong && q_pos.is_contiguous(), "q_pos: contiguous int64");
  TORCH_CHECK(q_pos[-1].item<int64_t>() < k.size(1), "blend_attend: a query position beyond the keys");
  blend_attend_impl(q, k, v, q_pos, out, scale);
}
