/* The CPU kernels of the block checksum (block_pool.payload_checksum): over little-endian
 * int32 words x_0 .. x_{W-1},
 *
 *     s1 = sum x_j            s2 = sum x_j * (j + 1)        (both modulo 2**64).
 *
 * kv_word_sums: those sums for each of `rows` rows (block_pool._field_sums), in one pass at
 * memory speed (the torch forms convert to float64 or int64 first).
 * kv_scatter_planes: a put body's chunk copied into its blocks' slots, each whole word folded
 * into its block's sums in the same pass (block_pool.ScatterSums), so a zero-copy put needs no
 * second pass over its blocks.
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
#define KV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KV_CLONES
#endif

/* The sums of nwords words at p; when dst is not NULL the words are also copied there (the
 * copy and the sums in one pass over p). */
static inline void sums_body(unsigned char *dst, const unsigned char *p, size_t nwords, uint64_t *s1,
                             uint64_t *s2)
{
    v4du a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0}, b0 = {0, 0, 0, 0}, b1 = {0, 0, 0, 0};
    size_t steps = nwords / 8;
    const unsigned char *q = p;
    for (size_t t = 0; t < steps; t++, q += 32) {
        v4si x0, x1;
        memcpy(&x0, q, 16);  /* unaligned loads: rows need only be 4-byte aligned */
        memcpy(&x1, q + 16, 16);
        if (dst) {
            memcpy(dst + 32 * t, &x0, 16);
            memcpy(dst + 32 * t + 16, &x1, 16);
        }
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
        if (dst)
            memcpy(dst + 4 * j, &x, 4);
        r1 += (uint64_t)(int64_t)x;
        r2 += (uint64_t)(int64_t)x * (uint64_t)(j + 1);
    }
    *s1 = r1;
    *s2 = r2;
}

KV_CLONES static void row_sums(const unsigned char *p, size_t nwords, uint64_t *s1, uint64_t *s2)
{
    sums_body(NULL, p, nwords, s1, s2);
}

KV_CLONES static void copy_sums(unsigned char *dst, const unsigned char *p, size_t nwords, uint64_t *s1,
                                uint64_t *s2)
{
    sums_body(dst, p, nwords, s1, s2);
}

/* Fold words [w, w + n) of a block, whose sums are t1, t2 counted from 0, into s. */
static inline void fold(uint64_t *s, uint64_t w, uint64_t t1, uint64_t t2)
{
    s[0] += t1;
    s[1] += t2 + w * t1;
}

void kv_word_sums(const unsigned char *base, size_t rows, size_t stride, size_t nwords, uint64_t *out)
{
    for (size_t r = 0; r < rows; r++)
        row_sums(base + r * stride, nwords, out + 2 * r, out + 2 * r + 1);
}

/* Copy `step` bytes from `from` to d + off, d being a piece of a block that holds its payload
 * words from `base` on, folding the whole words into s: a word the previous segment started
 * is folded from d once its last byte lands; the loop copies and sums in one pass. */
static void scatter_segment(unsigned char *d, size_t off, const unsigned char *from, size_t step, uint64_t base,
                            uint64_t *s)
{
    uint64_t t1, t2;
    size_t end = off + step, pos = off;
    if (pos % 4) {
        size_t k = 4 - pos % 4 < step ? 4 - pos % 4 : step;
        memcpy(d + pos, from, k);
        pos += k;
        from += k;
        if (pos % 4 == 0) {
            row_sums(d + pos - 4, 1, &t1, &t2);
            fold(s, base + pos / 4 - 1, t1, t2);
        }
    }
    size_t whole = (end - pos) / 4;
    if (whole) {
        copy_sums(d + pos, from, whole, &t1, &t2);
        fold(s, base + pos / 4, t1, t2);
        pos += 4 * whole;
        from += 4 * whole;
    }
    memcpy(d + pos, from, end - pos);  /* a word's first bytes: folded by the next segment */
}

/* The next `len` bytes of a put body in the wire layout (planes of `plane_bytes`: `nblk` pieces
 * of `piece` bytes, one per block, then a tail) into the blocks' slots: piece j of plane p goes
 * to blk[j] + p * piece, and its whole words are folded into sums[2 j], sums[2 j + 1] on the
 * way. blk[j] NULL (a block already cached) and the tails are dropped. `piece` must be a
 * multiple of 4. *pos is the body offset of src[0] (updated); the caller checks that `len` fits. */
void kv_scatter_planes(const unsigned char *src, size_t len, unsigned char *const *blk, size_t nblk, size_t piece,
                       size_t plane_bytes, uint64_t *pos, uint64_t *sums)
{
    uint64_t at = *pos;
    while (len) {
        size_t p = at / plane_bytes, in = at % plane_bytes, j = in / piece, step;
        if (j < nblk) {
            size_t off = in % piece;
            step = piece - off < len ? piece - off : len;
            if (blk[j])
                scatter_segment(blk[j] + p * piece, off, src, step, p * piece / 4, sums + 2 * j);
        } else {
            step = plane_bytes - in < len ? plane_bytes - in : len;
        }
        src += step;
        len -= step;
        at += step;
    }
    *pos = at;
}
