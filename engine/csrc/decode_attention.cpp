// One decode step's attention for a whole batch, in one call (CPU).
//
// For each sequence b and KV head g (in parallel): write the new token's K and V at position
// pos[b] of the sequence's own cache, then attend the g-th group of query heads over keys
// 0..pos[b]. Each K and V row is read once for the whole group. Softmax is fp32; scores and the
// weighted sum are too, except on the bf16 path (attend_bf16) where the products are bf16. The
// Python loop this replaces (attention.py, append_attend_torch) made about six small ops per
// sequence and layer; at batch 8 their overhead, not the arithmetic, was the cost.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "bf16_vec.h"

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

#if CACHEBLEND_BF16
// 16 vectors -> one: lane i is the sum of a[i]'s lanes (a transpose-and-add tree).
BF16_TARGET inline __m512 sum16(const __m512* a) {
  __m512 y[4];
  for (int m = 0; m < 4; ++m) {
    __m512 x[2];
    for (int h = 0; h < 2; ++h) {
      const __m512 u = a[4 * m + 2 * h], w = a[4 * m + 2 * h + 1];
      x[h] = _mm512_add_ps(_mm512_unpacklo_ps(u, w), _mm512_unpackhi_ps(u, w));
    }
    const __m512d x0 = _mm512_castps_pd(x[0]), x1 = _mm512_castps_pd(x[1]);
    y[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x0, x1)), _mm512_castpd_ps(_mm512_unpackhi_pd(x0, x1)));
  }  // y[m], each 128-bit lane: keys 4m..4m+3, partial over that lane
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The bf16 path for one sequence and KV head, head dim 64, on AVX512-BF16: scores from bf16 dot
// products (fp32 sums), fp32 softmax, probabilities rounded to bf16 for the weighted sum (as the
// prefill kernel). At batch 8 and 16 with 2,500-token caches, 30 layers: 29 -> 8-10 ms and 63 -> 23-29 ms
// against the generic loop below, which converts every K/V element to fp32 and reduces each dot product.
// q[j]: G query rows (scaled); K, V: n rows with strides ks, vs; out[j]: G output rows.
BF16_TARGET void attend_bf16(const uint16_t* const* q, int64_t G, const uint16_t* K, int64_t ks, const uint16_t* V,
                             int64_t vs, int64_t n, uint16_t* const* out, std::vector<float>& scores,
                             std::vector<uint16_t>& probs) {
  const int64_t n16 = (n + 15) / 16 * 16;
  scores.resize(G * n16);
  probs.resize(G * n16 + 32);
  for (int64_t j = 0; j < G; ++j) {
    const __m512i q0 = _mm512_loadu_si512(q[j]), q1 = _mm512_loadu_si512(q[j] + 32);
    float* sj = scores.data() + j * n16;
    __m512 part[16];
    for (int64_t t0 = 0; t0 < n16; t0 += 16) {
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t t = std::min(t0 + i, n - 1);  // past the end: a repeat, masked below
        const uint16_t* kt = K + t * ks;
        part[i] = dp(dp(_mm512_setzero_ps(), _mm512_loadu_si512(kt), q0), _mm512_loadu_si512(kt + 32), q1);
      }
      _mm512_storeu_ps(sj + t0, sum16(part));
    }
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sj[t]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n16; t0 += 16) {
      const __mmask16 valid = t0 + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - t0)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(_mm512_loadu_ps(sj + t0), _mm512_set1_ps(m))));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs.data() + j * n16 + t0), (__m256i)_mm512_cvtneps_pbh(e));
    }
    sj[0] = 1.f / _mm512_reduce_add_ps(sum);  // the normaliser, kept for the end
  }
  // Weighted sum over key pairs: two V rows interleaved per 16-bit lane (unpacklo/hi within
  // 128-bit lanes), so acc[c] holds dims in a fixed permuted order, undone at the store.
  __m512 acc[8][4];  // G <= 8
  for (int64_t j = 0; j < G; ++j)
    for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 2) {
    const uint16_t* va = V + t * vs;
    const uint16_t* vb = t + 1 < n ? V + (t + 1) * vs : va;  // odd tail: its probability is 0
    __m512i vv[4];
    for (int h = 0; h < 2; ++h) {
      const __m512i a = _mm512_loadu_si512(va + 32 * h), b = _mm512_loadu_si512(vb + 32 * h);
      vv[2 * h] = _mm512_unpacklo_epi16(a, b);
      vv[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
    }
    for (int64_t j = 0; j < G; ++j) {
      uint32_t pair;
      std::memcpy(&pair, probs.data() + j * n16 + t, 4);  // p[t], p[t + 1] (0 past n: masked above)
      const __m512i pb = _mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < 4; ++c) acc[j][c] = dp(acc[j][c], vv[c], pb);
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    alignas(64) float o[4][16];
    const __m512 inv = _mm512_set1_ps(scores[j * n16]);
    for (int c = 0; c < 4; ++c) _mm512_store_ps(o[c], _mm512_mul_ps(acc[j][c], inv));
    // acc[2h + hi], lane 4L + e (128-bit lane L, element e) holds dim 32h + 8L + 4hi + e
    alignas(64) float dims[64];
    for (int c = 0; c < 4; ++c)
      for (int lane = 0; lane < 16; ++lane) dims[32 * (c / 2) + 8 * (lane / 4) + 4 * (c % 2) + lane % 4] = o[c][lane];
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[j] + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(dims + 16 * c)));
  }
}
#endif

template <typename T>
void append_attend_impl(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                        const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                        const std::vector<int64_t>& positions, int64_t layer, const at::Tensor& out) {
  const int64_t H = q.size(0), B = q.size(1), D = q.size(2);
  const int64_t Hkv = k_new.size(0), G = H / Hkv;
  // bf16 with head dim 64 on AVX512-BF16 (rows contiguous): the bf16 dot-product path
#if CACHEBLEND_BF16
  const bool bf16_path = std::is_same_v<T, at::BFloat16> && D == 64 && G <= 8 && q.stride(2) == 1 &&
                         out.stride(2) == 1 && __builtin_cpu_supports("avx512bf16");
#endif
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    std::vector<uint16_t> probs;
    std::vector<const uint16_t*> qrows(G);
    std::vector<uint16_t*> orows(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, p = positions[b], n = p + 1;
      const at::Tensor& kc = k_caches[b];
      const at::Tensor& vc = v_caches[b];
      T* K = kc.data_ptr<T>() + kc.stride(0) * layer + kc.stride(1) * g;  // [capacity, D]
      T* V = vc.data_ptr<T>() + vc.stride(0) * layer + vc.stride(1) * g;
      const int64_t ks = kc.stride(2), vs = vc.stride(2);
      const T* kn = k_new.data_ptr<T>() + k_new.stride(0) * g + k_new.stride(1) * b;
      const T* vn = v_new.data_ptr<T>() + v_new.stride(0) * g + v_new.stride(1) * b;
      for (int64_t d = 0; d < D; ++d) {
        K[p * ks + d] = kn[d * k_new.stride(2)];
        V[p * vs + d] = vn[d * v_new.stride(2)];
      }
#if CACHEBLEND_BF16
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (bf16_path) {
          for (int64_t j = 0; j < G; ++j) {
            qrows[j] = reinterpret_cast<const uint16_t*>(q.data_ptr<T>() + q.stride(0) * (g * G + j) + q.stride(1) * b);
            orows[j] = reinterpret_cast<uint16_t*>(out.data_ptr<T>() + out.stride(0) * b + out.stride(1) * (g * G + j));
          }
          attend_bf16(qrows.data(), G, reinterpret_cast<const uint16_t*>(K), ks, reinterpret_cast<const uint16_t*>(V), vs,
                      n, orows.data(), scores, probs);
          continue;
        }
      }
#endif
      for (int64_t j = 0; j < G; ++j) {
        const T* qh = q.data_ptr<T>() + q.stride(0) * (g * G + j) + q.stride(1) * b;
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<float>(qh[d * q.stride(2)]);
      }
      scores.resize(G * n);  // [G, n]
      for (int64_t t = 0; t < n; ++t) {
        const T* kt = K + t * ks;
        for (int64_t j = 0; j < G; ++j) {
          const float* qj = qf.data() + j * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qj[d] * static_cast<float>(kt[d]);
          scores[j * n + t] = s;
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        float* sj = scores.data() + j * n;
        const float m = *std::max_element(sj, sj + n);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = std::exp(sj[t] - m);
          sum += sj[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const T* vt = V + t * vs;
        for (int64_t j = 0; j < G; ++j) {
          const float w = scores[j * n + t];
          float* aj = acc.data() + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) aj[d] += w * static_cast<float>(vt[d]);
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        T* o = out.data_ptr<T>() + out.stride(0) * b + out.stride(1) * (g * G + j);
        for (int64_t d = 0; d < D; ++d) o[d * out.stride(2)] = static_cast<T>(acc[j * D + d]);
      }
    }
  });
}

}  // namespace

// q [H, B, D] (already scaled by D^-0.5), k_new / v_new [Hkv, B, D]; k_caches[b] / v_caches[b]
// [L, Hkv, capacity, D] with rows contiguous; positions[b] the new token's position; out [B, H, D].
void append_attend(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                   const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                   const std::vector<int64_t>& positions, int64_t layer, const at::Tensor& out) {
  const int64_t B = q.size(1), D = q.size(2);
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3 && out.dim() == 3, "append_attend: 3-d q, k, v, out");
  TORCH_CHECK(q.size(0) % k_new.size(0) == 0, "append_attend: query heads must be a multiple of KV heads");
  TORCH_CHECK(out.size(0) == B && out.size(1) == q.size(0) && out.size(2) == D, "append_attend: out must be [B, H, D]");
  TORCH_CHECK((int64_t)k_caches.size() == B && (int64_t)v_caches.size() == B && (int64_t)positions.size() == B,
              "append_attend: one cache and position per sequence");
  for (int64_t b = 0; b < B; ++b) {
    for (const at::Tensor* c : {&k_caches[b], &v_caches[b]}) {
      TORCH_CHECK(c->dim() == 4 && c->size(1) == k_new.size(0) && c->size(3) == D && c->stride(3) == 1,
                  "append_attend: caches must be [L, Hkv, capacity, D] with contiguous rows");
      TORCH_CHECK(c->scalar_type() == q.scalar_type() && c->device().is_cpu(), "append_attend: caches must match q (CPU)");
      TORCH_CHECK(layer >= 0 && layer < c->size(0), "append_attend: layer out of range");
      TORCH_CHECK(positions[b] >= 0 && positions[b] < c->size(2), "append_attend: position beyond the cache");
    }
  }
  for (const at::Tensor* t : {&k_new, &v_new, &out})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(), "append_attend: dtypes must match (CPU)");
  if (q.scalar_type() == at::kFloat) {
    append_attend_impl<float>(q, k_new, v_new, k_caches, v_caches, positions, layer, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    append_attend_impl<at::BFloat16>(q, k_new, v_new, k_caches, v_caches, positions, layer, out);
  } else if (q.scalar_type() == at::kHalf) {
    append_attend_impl<at::Half>(q, k_new, v_new, k_caches, v_caches, positions, layer, out);
  } else {
    TORCH_CHECK(false, "append_attend: float32, bfloat16 or float16 only");
  }
}
