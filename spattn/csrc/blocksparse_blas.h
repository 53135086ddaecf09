// Helpers shared by the compiled block-sparse loops: the BLAS libtorch_cpu exports, GEMMs on row-major
// tiles, and a vectorisable exp.
//
// sgemm_ / dgemm_ are weak symbols: without them the library still loads, have_blas() says false and
// spattn keeps its eager kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // by value (the lower-case name takes a pointer)
}

namespace spattn_blas {

// Column-major BLAS gemm: C (m x n) = alpha op(A) op(B) + beta C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline bool available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// While alive, MKL runs single-threaded on this thread (the loops parallelise over tiles themselves:
// one level of parallelism). A no-op with another BLAS.
class OneBlasThread {
 public:
  OneBlasThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_;
};


// Row-major s[i, j] = alpha * a[i, :d] . b[j, :d] for i < m, j < n (s has leading dimension lds, default n).
template <typename T>
void abt(int64_t m, int64_t n, int64_t d, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T* s,
         int64_t lds = 0) {
  // column-major view: s^T (n x m) = b (as d x n)^T . a (as d x m)
  gemm('T', 'N', n, m, d, alpha, b, ldb, a, lda, T(0), s, lds > 0 ? lds : n);
}

// Row-major c[i, :] += alpha * p[i, :n] . b[:n, :] for i < m (c has leading dimension ldc, p has ldp,
// default n).
template <typename T>
void add_pb(int64_t m, int64_t n, int64_t dc, T alpha, const T* p, const T* b, int64_t ldb, T* c, int64_t ldc,
            int64_t ldp = 0) {
  // column-major view: c^T (dc x m) += b (as dc x n) . p (as n x m)
  gemm('N', 'N', dc, m, n, alpha, b, ldb, p, ldp > 0 ? ldp : n, T(1), c, ldc);
}

// Row-major c[j, :] += alpha * p[:m, j]^T . a[:m, :] for j < n (c has leading dimension ldc, p has n).
template <typename T>
void add_ptb(int64_t m, int64_t n, int64_t dc, T alpha, const T* p, const T* a, int64_t lda, T* c, int64_t ldc) {
  // column-major view: c^T (dc x n) += a (as dc x m) . p^T (p as n x m, transposed)
  gemm('N', 'T', dc, n, m, alpha, a, lda, p, n, T(1), c, ldc);
}

// exp(x) for x <= 0 (a rounding excess above 0 is fine; valid up to x = 88), vectorisable: x = n ln2 + r
// with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (relative error < 6e-9), 2^n through
// the exponent bits. x < -87 (including -inf) gives exactly 0 (exp(-87) ~ 1.6e-38 is below anything a
// row sum notices), NaN gives NaN.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.f);  // NaN stays NaN
  const float magic = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc * 1.4426950408889634f + magic) - magic;
  const float r = (xc - n * 0.693145751953125f) - n * 1.4286068203094172e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.f ? 0.f : p * two_n;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace spattn_blas
