// One decode step's attention for a whole batch, in one call (CPU).
//
// For each sequence b and KV head g (in parallel): write the new token's K and V at position
// pos[b] of the sequence's own cache, then attend the g-th group of query heads over keys
// 0..pos[b]. Each K and V row is read once for the whole group. Scores, softmax and the weighted
// sum are fp32 whatever the cache dtype. The Python loop this replaces (attention.py,
// append_attend_torch) made about six small ops per sequence and layer; at batch 8 their
// overhead, not the arithmetic, was the cost.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
void append_attend_impl(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                        const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                        const std::vector<int64_t>& positions, int64_t layer, const at::Tensor& out) {
  const int64_t H = q.size(0), B = q.size(1), D = q.size(2);
  const int64_t Hkv = k_new.size(0), G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
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
