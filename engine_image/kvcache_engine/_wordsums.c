/* The CPU kernel of the block checksum (block_pool._field_sums): for each of `rows` rows of
 * `nwords` little-endian int32 words x_0 .. x_{W-1}, starting `stride` bytes apart,
 *
 *     s1 = sum x_j            s2 = sum x_j * (j + 1)        (both modulo 2**64)
 *
 * written to out[2 r] and out[2 r + 1]. The same digest as the torch forms in block_pool.py,
 * in one pass over the words at memory speed (the torch forms convert to float64 or int64
 * first).
 *
 * How: 8 lanes (word j is lane j % 8 at step t = j / 8) keep Fletcher pairs a += x; b += a, so
 * after T steps a_l = sum_t x and b_l = sum_t x * (T - t). Then
 *     sum_j x_j (j + 1) = sum_l [ 8 * sum_t t * x + (l + 1) * a_l ]
 *                       = sum_l [ 8 * (T * a_l - b_l) + (l + 1) * a_l ].
 * Unsigned 64-bit arithmetic wraps (defined behaviour), so every step is exact modulo 2**64.
 *
 * Plain C, no Python API: loaded with ctypes (which releases the GIL for the call). Built by
 * setup.py as an optional extension; without it block_pool uses its torch forms.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int32_t v4si __attribute__((vector_size(16), aligned(4)));
typedef int64_t v4di __attribute__((vector_size(32)));
typedef uint64_t v4du __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One build for every x86-64: AVX2 when the CPU has it (chosen at load time), else SSE2. */
__attribute__((target_clones("avx2", "default")))
#endif
static void row_sums(const unsigned char *p, size_t nwords, uint64_t *s1, uint64_t *s2)
{
    v4du a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0}, b0 = {0, 0, 0, 0}, b1 = {0, 0, 0, 0};
    size_t steps = nwords / 8;
    const unsigned char *q = p;
    for (size_t t = 0; t < steps; t++, q += 32) {
        v4si x0, x1;
        memcpy(&x0, q, 16);  /* unaligned loads: rows need only be 4-byte aligned */
        memcpy(&x1, q + 16, 16);
        a0 += (v4du)__builtin_convertvector(x0, v4di);  /* sign-extend, then wrap as unsigned */
        a1 += (v4du)__builtin_convertvector(x1, v4di);
        b0 += a0;
        b1 += a1;
    }
    uint64_t a[8], b[8];
    memcpy(a, &a0, 32);
    memcpy(a + 4, &a1, 32);
    memcpy(b, &b0, 32);
    memcpy(b + 4, &b1, 32);
    uint64_t r1 = 0, r2 = 0;
    for (int l = 0; l < 8; l++) {
        r1 += a[l];
        r2 += 8u * ((uint64_t)steps * a[l] - b[l]) + (uint64_t)(l + 1) * a[l];
    }
    for (size_t j = steps * 8; j < nwords; j++) {
        int32_t x;
        memcpy(&x, p + 4 * j, 4);
        r1 += (uint64_t)(int64_t)x;
        r2 += (uint64_t)(int64_t)x * (uint64_t)(j + 1);
    }
    *s1 = r1;
    *s2 = r2;
}

void kv_word_sums(const unsigned char *base, size_t rows, size_t stride, size_t nwords, uint64_t *out)
{
    for (size_t r = 0; r < rows; r++)
        row_sums(base + r * stride, nwords, out + 2 * r, out + 2 * r + 1);
}
