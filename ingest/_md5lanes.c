/*
 * ingest._md5lanes: MD5 (RFC 1321) of several independent streams in one call.
 *
 * MD5 is serial within one stream: each 64-byte block's compression needs the
 * previous block's result. Different streams are independent, so N streams can
 * be compressed at once, one stream per 32-bit lane of a SIMD register ("multi-
 * buffer" hashing): 16 lanes with AVX-512, 8 with AVX2, 4 in plain C. Each lane reads its own
 * stream through its own pointer; the 16 message words of every lane are
 * transposed so that one register holds word j of every lane, and the 64 steps
 * of RFC 1321 section 3.4 run on whole registers.
 *
 * The kernel is chosen by the caller (see ingest/md5lanes.py) among those the CPU
 * runs (``kernels()``, from its CPUID flags and the operating system's support for
 * the registers); "portable" is plain C and runs everywhere.
 *
 * Python API:
 *   md5([data])                       a hasher: update(data), digest(), hexdigest()
 *   update_many(hashers, chunks, kernel)
 *                                     hasher i absorbs chunks[i], all at once with
 *                                     the GIL released; the chunks may have any
 *                                     lengths (equal lengths fill the lanes best)
 *   kernels()                         kernel names this CPU runs, fastest first
 *   LANES                             {kernel name: streams per pass}
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_KERNELS 1
#include <immintrin.h>
#endif

/* ---- the MD5 schedule (RFC 1321, section 3.4) -------------------------------
 * STEP(function, a, b, c, d, message word, left rotation, constant):
 *   a = b + ((a + function(b, c, d) + X[k] + T) <<< s)
 * The constants are floor(abs(sin(i + 1)) * 2^32), for the 64 steps in order.
 */
#define MD5_STEPS(STEP) \
    STEP(F, a, b, c, d,  0,  7, 0xd76aa478); \
    STEP(F, d, a, b, c,  1, 12, 0xe8c7b756); \
    STEP(F, c, d, a, b,  2, 17, 0x242070db); \
    STEP(F, b, c, d, a,  3, 22, 0xc1bdceee); \
    STEP(F, a, b, c, d,  4,  7, 0xf57c0faf); \
    STEP(F, d, a, b, c,  5, 12, 0x4787c62a); \
    STEP(F, c, d, a, b,  6, 17, 0xa8304613); \
    STEP(F, b, c, d, a,  7, 22, 0xfd469501); \
    STEP(F, a, b, c, d,  8,  7, 0x698098d8); \
    STEP(F, d, a, b, c,  9, 12, 0x8b44f7af); \
    STEP(F, c, d, a, b, 10, 17, 0xffff5bb1); \
    STEP(F, b, c, d, a, 11, 22, 0x895cd7be); \
    STEP(F, a, b, c, d, 12,  7, 0x6b901122); \
    STEP(F, d, a, b, c, 13, 12, 0xfd987193); \
    STEP(F, c, d, a, b, 14, 17, 0xa679438e); \
    STEP(F, b, c, d, a, 15, 22, 0x49b40821); \
    STEP(G, a, b, c, d,  1,  5, 0xf61e2562); \
    STEP(G, d, a, b, c,  6,  9, 0xc040b340); \
    STEP(G, c, d, a, b, 11, 14, 0x265e5a51); \
    STEP(G, b, c, d, a,  0, 20, 0xe9b6c7aa); \
    STEP(G, a, b, c, d,  5,  5, 0xd62f105d); \
    STEP(G, d, a, b, c, 10,  9, 0x02441453); \
    STEP(G, c, d, a, b, 15, 14, 0xd8a1e681); \
    STEP(G, b, c, d, a,  4, 20, 0xe7d3fbc8); \
    STEP(G, a, b, c, d,  9,  5, 0x21e1cde6); \
    STEP(G, d, a, b, c, 14,  9, 0xc33707d6); \
    STEP(G, c, d, a, b,  3, 14, 0xf4d50d87); \
    STEP(G, b, c, d, a,  8, 20, 0x455a14ed); \
    STEP(G, a, b, c, d, 13,  5, 0xa9e3e905); \
    STEP(G, d, a, b, c,  2,  9, 0xfcefa3f8); \
    STEP(G, c, d, a, b,  7, 14, 0x676f02d9); \
    STEP(G, b, c, d, a, 12, 20, 0x8d2a4c8a); \
    STEP(H, a, b, c, d,  5,  4, 0xfffa3942); \
    STEP(H, d, a, b, c,  8, 11, 0x8771f681); \
    STEP(H, c, d, a, b, 11, 16, 0x6d9d6122); \
    STEP(H, b, c, d, a, 14, 23, 0xfde5380c); \
    STEP(H, a, b, c, d,  1,  4, 0xa4beea44); \
    STEP(H, d, a, b, c,  4, 11, 0x4bdecfa9); \
    STEP(H, c, d, a, b,  7, 16, 0xf6bb4b60); \
    STEP(H, b, c, d, a, 10, 23, 0xbebfbc70); \
    STEP(H, a, b, c, d, 13,  4, 0x289b7ec6); \
    STEP(H, d, a, b, c,  0, 11, 0xeaa127fa); \
    STEP(H, c, d, a, b,  3, 16, 0xd4ef3085); \
    STEP(H, b, c, d, a,  6, 23, 0x04881d05); \
    STEP(H, a, b, c, d,  9,  4, 0xd9d4d039); \
    STEP(H, d, a, b, c, 12, 11, 0xe6db99e5); \
    STEP(H, c, d, a, b, 15, 16, 0x1fa27cf8); \
    STEP(H, b, c, d, a,  2, 23, 0xc4ac5665); \
    STEP(I, a, b, c, d,  0,  6, 0xf4292244); \
    STEP(I, d, a, b, c,  7, 10, 0x432aff97); \
    STEP(I, c, d, a, b, 14, 15, 0xab9423a7); \
    STEP(I, b, c, d, a,  5, 21, 0xfc93a039); \
    STEP(I, a, b, c, d, 12,  6, 0x655b59c3); \
    STEP(I, d, a, b, c,  3, 10, 0x8f0ccc92); \
    STEP(I, c, d, a, b, 10, 15, 0xffeff47d); \
    STEP(I, b, c, d, a,  1, 21, 0x85845dd1); \
    STEP(I, a, b, c, d,  8,  6, 0x6fa87e4f); \
    STEP(I, d, a, b, c, 15, 10, 0xfe2ce6e0); \
    STEP(I, c, d, a, b,  6, 15, 0xa3014314); \
    STEP(I, b, c, d, a, 13, 21, 0x4e0811a1); \
    STEP(I, a, b, c, d,  4,  6, 0xf7537e82); \
    STEP(I, d, a, b, c, 11, 10, 0xbd3af235); \
    STEP(I, c, d, a, b,  2, 15, 0x2ad7d2bb); \
    STEP(I, b, c, d, a,  9, 21, 0xeb86d391)

/* ---- one stream's state ----------------------------------------------------- */

typedef struct {
    uint32_t h[4];        /* A, B, C, D */
    uint64_t length;      /* bytes absorbed so far */
    uint8_t tail[64];     /* bytes of an incomplete block */
    unsigned tail_len;
} md5_stream;

static void stream_init(md5_stream *s)
{
    s->h[0] = 0x67452301u;
    s->h[1] = 0xefcdab89u;
    s->h[2] = 0x98badcfeu;
    s->h[3] = 0x10325476u;
    s->length = 0;
    s->tail_len = 0;
}

/* ---- plain C: one stream, and the portable kernel (4 streams interleaved) ------ */

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint32_t rotl32(uint32_t x, int s)
{
    return (x << s) | (x >> (32 - s));
}

#define S_F(b, c, d) ((d) ^ ((b) & ((c) ^ (d))))
#define S_G(b, c, d) ((c) ^ ((d) & ((b) ^ (c))))
#define S_H(b, c, d) ((b) ^ (c) ^ (d))
#define S_I(b, c, d) ((c) ^ ((b) | ~(d)))
#define SCALAR_STEP(FN, a, b, c, d, k, s, t) \
    a = b + rotl32(a + S_##FN(b, c, d) + x[k] + (uint32_t)(t), s)

static void compress_one(uint32_t h[4], const uint8_t *p, size_t nblocks)
{
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (; nblocks; nblocks--, p += 64) {
        uint32_t x[16];
        for (int j = 0; j < 16; j++)
            x[j] = load_le32(p + 4 * j);
        uint32_t a0 = a, b0 = b, c0 = c, d0 = d;
        MD5_STEPS(SCALAR_STEP);
        a += a0;
        b += b0;
        c += c0;
        d += d0;
    }
    h[0] = a;
    h[1] = b;
    h[2] = c;
    h[3] = d;
}

/* Four streams interleaved in plain C: one stream's steps depend on each other, so a
 * lone stream leaves most of a superscalar core idle; independent streams'
 * instructions fill the gaps (and compilers that vectorize turn the lane loops into
 * 4 x 32-bit vector instructions: SSE2, NEON). */
#define PORTABLE_LANES 4
#define LANE_STEP(FN, a, b, c, d, k, s, t) \
    for (int l = 0; l < PORTABLE_LANES; l++) \
        a[l] = b[l] + rotl32(a[l] + S_##FN(b[l], c[l], d[l]) + x[l][k] + (uint32_t)(t), s)

static void compress_interleaved(uint32_t **h, const uint8_t **src, size_t nblocks)
{
    uint32_t a[PORTABLE_LANES], b[PORTABLE_LANES], c[PORTABLE_LANES], d[PORTABLE_LANES];
    const uint8_t *p[PORTABLE_LANES];
    for (int l = 0; l < PORTABLE_LANES; l++) {
        a[l] = h[l][0];
        b[l] = h[l][1];
        c[l] = h[l][2];
        d[l] = h[l][3];
        p[l] = src[l];
    }
    for (; nblocks; nblocks--) {
        uint32_t x[PORTABLE_LANES][16], a0[PORTABLE_LANES], b0[PORTABLE_LANES], c0[PORTABLE_LANES],
            d0[PORTABLE_LANES];
        for (int l = 0; l < PORTABLE_LANES; l++) {
            for (int j = 0; j < 16; j++)
                x[l][j] = load_le32(p[l] + 4 * j);
            p[l] += 64;
            a0[l] = a[l];
            b0[l] = b[l];
            c0[l] = c[l];
            d0[l] = d[l];
        }
        MD5_STEPS(LANE_STEP);
        for (int l = 0; l < PORTABLE_LANES; l++) {
            a[l] += a0[l];
            b[l] += b0[l];
            c[l] += c0[l];
            d[l] += d0[l];
        }
    }
    for (int l = 0; l < PORTABLE_LANES; l++) {
        h[l][0] = a[l];
        h[l][1] = b[l];
        h[l][2] = c[l];
        h[l][3] = d[l];
    }
}

#ifdef HAVE_X86_KERNELS

/* ---- AVX2 kernel: 8 streams ----------------------------------------------------
 * Word j of lanes 0-7 in one register; rotations are two shifts and an OR. */

#define AVX2 __attribute__((target("avx2")))
#define V8_ROTL(v, s) _mm256_or_si256(_mm256_slli_epi32(v, s), _mm256_srli_epi32(v, 32 - (s)))
#define V8_F(b, c, d) _mm256_xor_si256(d, _mm256_and_si256(b, _mm256_xor_si256(c, d)))
#define V8_G(b, c, d) _mm256_xor_si256(c, _mm256_and_si256(d, _mm256_xor_si256(b, c)))
#define V8_H(b, c, d) _mm256_xor_si256(_mm256_xor_si256(b, c), d)
#define V8_I(b, c, d) _mm256_xor_si256(c, _mm256_or_si256(b, _mm256_xor_si256(d, ones)))
#define AVX2_STEP(FN, a, b, c, d, k, s, t) \
    a = _mm256_add_epi32(b, V8_ROTL(_mm256_add_epi32(_mm256_add_epi32(a, V8_##FN(b, c, d)), \
                                                     _mm256_add_epi32(x[k], _mm256_set1_epi32((int)(t)))), s))

/* r[i] holds 8 words of lane i; afterwards w[j] holds word j of lanes 0-7. */
AVX2 static inline void transpose8(const __m256i r[8], __m256i w[8])
{
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);      /* words 0,1 | 4,5 of lanes i, i+1 */
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);  /* words 2,3 | 6,7 */
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);      /* word 0 | 4 of lanes i..i+3 */
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);  /* word 1 | 5 */
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);  /* word 2 | 6 */
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);  /* word 3 | 7 */
    }
    for (int j = 0; j < 4; j++) {
        w[j] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
        w[j + 4] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
    }
}

AVX2 static void compress_avx2(uint32_t *h[8], const uint8_t *src[8], size_t nblocks)
{
    const __m256i ones = _mm256_set1_epi32(-1);
    const uint8_t *p[8];
    uint32_t tmp[4][8];
    for (int i = 0; i < 8; i++) {
        p[i] = src[i];
        for (int j = 0; j < 4; j++)
            tmp[j][i] = h[i][j];
    }
    __m256i a = _mm256_loadu_si256((const __m256i *)tmp[0]);
    __m256i b = _mm256_loadu_si256((const __m256i *)tmp[1]);
    __m256i c = _mm256_loadu_si256((const __m256i *)tmp[2]);
    __m256i d = _mm256_loadu_si256((const __m256i *)tmp[3]);
    for (; nblocks; nblocks--) {
        __m256i r[8], x[16];
        for (int i = 0; i < 8; i++)
            r[i] = _mm256_loadu_si256((const __m256i *)p[i]);
        transpose8(r, x);
        for (int i = 0; i < 8; i++) {
            r[i] = _mm256_loadu_si256((const __m256i *)(p[i] + 32));
            p[i] += 64;
        }
        transpose8(r, x + 8);
        __m256i a0 = a, b0 = b, c0 = c, d0 = d;
        MD5_STEPS(AVX2_STEP);
        a = _mm256_add_epi32(a, a0);
        b = _mm256_add_epi32(b, b0);
        c = _mm256_add_epi32(c, c0);
        d = _mm256_add_epi32(d, d0);
    }
    _mm256_storeu_si256((__m256i *)tmp[0], a);
    _mm256_storeu_si256((__m256i *)tmp[1], b);
    _mm256_storeu_si256((__m256i *)tmp[2], c);
    _mm256_storeu_si256((__m256i *)tmp[3], d);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++)
            h[i][j] = tmp[j][i];
}

/* ---- AVX-512 kernel: 16 streams ---------------------------------------------------
 * One register holds word j of lanes 0-15. Each round function is one ternary-
 * logic instruction, its truth table computed from the function applied to the
 * operand patterns 0xF0, 0xCC, 0xAA; each rotation is one instruction. */

#define AVX512 __attribute__((target("avx512f")))
#define TT_F ((0xF0 & 0xCC) | (~0xF0 & 0xAA))
#define TT_G ((0xF0 & 0xAA) | (0xCC & ~0xAA))
#define TT_H (0xF0 ^ 0xCC ^ 0xAA)
#define TT_I ((0xCC ^ (0xF0 | ~0xAA)) & 0xFF)
#define V16_F(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TT_F)
#define V16_G(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TT_G)
#define V16_H(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TT_H)
#define V16_I(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TT_I)
#define AVX512_STEP(FN, a, b, c, d, k, s, t) \
    a = _mm512_add_epi32(b, _mm512_rol_epi32(_mm512_add_epi32(_mm512_add_epi32(a, V16_##FN(b, c, d)), \
                                                              _mm512_add_epi32(x[k], _mm512_set1_epi32((int)(t)))), s))

/* r[i] holds the 16 words of lane i; afterwards w[j] holds word j of lanes 0-15. */
AVX512 static inline void transpose16(const __m512i r[16], __m512i w[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        /* in each 128-bit quarter q: words 4q, 4q+1 (lo) or 4q+2, 4q+3 (hi) of lanes i, i+1 */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        /* u[i + j], quarter q: word 4q + j of lanes i..i+3 */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        /* gather quarter q of u[j], u[4 + j], u[8 + j], u[12 + j] into w[4q + j] */
        __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);      /* q0 q1 of lanes 0-3, 4-7 */
        __m512i x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);      /* q2 q3 */
        __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44); /* q0 q1 of lanes 8-11, 12-15 */
        __m512i y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        w[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        w[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        w[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        w[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

AVX512 static void compress_avx512(uint32_t *h[16], const uint8_t *src[16], size_t nblocks)
{
    const uint8_t *p[16];
    uint32_t tmp[4][16];
    for (int i = 0; i < 16; i++) {
        p[i] = src[i];
        for (int j = 0; j < 4; j++)
            tmp[j][i] = h[i][j];
    }
    __m512i a = _mm512_loadu_si512(tmp[0]);
    __m512i b = _mm512_loadu_si512(tmp[1]);
    __m512i c = _mm512_loadu_si512(tmp[2]);
    __m512i d = _mm512_loadu_si512(tmp[3]);
    for (; nblocks; nblocks--) {
        __m512i r[16], x[16];
        for (int i = 0; i < 16; i++) {
            r[i] = _mm512_loadu_si512(p[i]);
            p[i] += 64;
        }
        transpose16(r, x);
        __m512i a0 = a, b0 = b, c0 = c, d0 = d;
        MD5_STEPS(AVX512_STEP);
        a = _mm512_add_epi32(a, a0);
        b = _mm512_add_epi32(b, b0);
        c = _mm512_add_epi32(c, c0);
        d = _mm512_add_epi32(d, d0);
    }
    _mm512_storeu_si512(tmp[0], a);
    _mm512_storeu_si512(tmp[1], b);
    _mm512_storeu_si512(tmp[2], c);
    _mm512_storeu_si512(tmp[3], d);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 4; j++)
            h[i][j] = tmp[j][i];
}

#endif /* HAVE_X86_KERNELS */

/* ---- kernels and their choice -------------------------------------------------- */

enum { K_AVX512, K_AVX2, K_PORTABLE, K_COUNT };

typedef void (*lanes_fn)(uint32_t **h, const uint8_t **p, size_t nblocks);

static const struct {
    const char *name;
    int lanes;
    lanes_fn fn;    /* NULL where not compiled in: never supported then */
} KERNELS[K_COUNT] = {
#ifdef HAVE_X86_KERNELS
    {"avx512", 16, compress_avx512},
    {"avx2", 8, compress_avx2},
#else
    {"avx512", 16, NULL},
    {"avx2", 8, NULL},
#endif
    {"portable", PORTABLE_LANES, compress_interleaved},
};

static int supported[K_COUNT];

static void detect_kernels(void)
{
    supported[K_PORTABLE] = 1;
#ifdef HAVE_X86_KERNELS
    __builtin_cpu_init();
    /* __builtin_cpu_supports also checks that the OS saves the wider registers. */
    supported[K_AVX2] = __builtin_cpu_supports("avx2") != 0;
    supported[K_AVX512] = __builtin_cpu_supports("avx512f") != 0;
#endif
}

/* Fewer streams than lanes: idle lanes cost as much as busy ones, so below this many
 * streams a narrower kernel is faster, and below the portable kernel's minimum plain C
 * one stream at a time. Measured per core with bench/md5lanes.py: AVX-512 passes
 * with 8 busy lanes are slower than AVX2's, the portable kernel with 2 busy lanes
 * slower than two single streams. */
static const size_t MIN_STREAMS[K_COUNT] = {9, 2, 3};

/* Compress `nblocks` blocks of each of `n` streams with `kernel`, or narrower ones. */
static void compress_group(int kernel, md5_stream **s, const uint8_t **p, size_t n, size_t nblocks)
{
    while (n) {
        int k = kernel;
        while (k < K_COUNT && (n < MIN_STREAMS[k] || !supported[k]))
            k++;
        if (k == K_COUNT) {
            compress_one(s[0]->h, p[0], nblocks);
            s++, p++, n--;
            continue;
        }
        size_t lanes = (size_t)KERNELS[k].lanes, take = n < lanes ? n : lanes;
        uint32_t *h[16];
        const uint8_t *src[16];
        uint32_t idle[4];
        for (size_t i = 0; i < lanes; i++) {
            /* an idle lane hashes stream 0's bytes again into a state nobody reads */
            h[i] = i < take ? s[i]->h : idle;
            src[i] = i < take ? p[i] : p[0];
        }
        KERNELS[k].fn(h, src, nblocks);
        s += take, p += take, n -= take;
    }
}

/* Absorb len[i] bytes at p[i] into stream s[i], for i < n, using `kernel`. */
static void absorb(int kernel, md5_stream **s, const uint8_t **p, size_t *len, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        s[i]->length += len[i];
        if (s[i]->tail_len) {    /* first complete the block a previous call left open */
            size_t take = 64 - s[i]->tail_len;
            if (take > len[i])
                take = len[i];
            memcpy(s[i]->tail + s[i]->tail_len, p[i], take);
            s[i]->tail_len += (unsigned)take;
            p[i] += take;
            len[i] -= take;
            if (s[i]->tail_len == 64) {
                compress_one(s[i]->h, s[i]->tail, 1);
                s[i]->tail_len = 0;
            }
        }
    }
    size_t width = (size_t)KERNELS[kernel].lanes;
    for (size_t g = 0; g < n; g += width) {    /* the blocks a group's streams all have */
        size_t k = n - g < width ? n - g : width;
        size_t common = len[g] / 64;
        for (size_t i = g + 1; i < g + k; i++)
            if (len[i] / 64 < common)
                common = len[i] / 64;
        if (!common)
            continue;
        compress_group(kernel, s + g, p + g, k, common);
        for (size_t i = g; i < g + k; i++) {
            p[i] += common * 64;
            len[i] -= common * 64;
        }
    }
    for (size_t i = 0; i < n; i++) {    /* what is left: uneven lengths, then the tails */
        size_t full = len[i] / 64;
        compress_one(s[i]->h, p[i], full);
        p[i] += full * 64;
        len[i] -= full * 64;
        if (len[i]) {
            memcpy(s[i]->tail + s[i]->tail_len, p[i], len[i]);
            s[i]->tail_len += (unsigned)len[i];
        }
    }
}

static void stream_digest(const md5_stream *s, uint8_t out[16])
{
    /* the tail, 0x80, zeros up to 8 bytes short of a block boundary, the length in bits */
    uint8_t last[128] = {0};
    size_t total = s->tail_len < 56 ? 64 : 128;
    uint64_t bits = s->length * 8;
    uint32_t h[4] = {s->h[0], s->h[1], s->h[2], s->h[3]};
    memcpy(last, s->tail, s->tail_len);
    last[s->tail_len] = 0x80;
    for (int i = 0; i < 8; i++)
        last[total - 8 + i] = (uint8_t)(bits >> (8 * i));
    compress_one(h, last, total / 64);
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++)
            out[4 * j + i] = (uint8_t)(h[j] >> (8 * i));
}

/* ---- the Python type ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    md5_stream stream;
    int busy;             /* being hashed without the GIL */
} Md5Object;

static PyTypeObject Md5Type;

/* Hashing without the GIL needs the hasher to itself. */
static int claim(Md5Object *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_ValueError,
                        "md5 hasher is already being updated (given twice, or in use by another thread)");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static int md5_update_buffer(Md5Object *self, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (claim(self) < 0) {
        PyBuffer_Release(&view);
        return -1;
    }
    md5_stream *s = &self->stream;
    const uint8_t *p = view.buf;
    size_t len = (size_t)view.len;
    if (len >= 2048) {
        Py_BEGIN_ALLOW_THREADS
        absorb(K_PORTABLE, &s, &p, &len, 1);
        Py_END_ALLOW_THREADS
    } else {
        absorb(K_PORTABLE, &s, &p, &len, 1);
    }
    self->busy = 0;
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *md5_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *data = NULL;
    static char *keywords[] = {"data", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:md5", keywords, &data))
        return NULL;
    Md5Object *self = (Md5Object *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    stream_init(&self->stream);
    self->busy = 0;
    if (data != NULL && md5_update_buffer(self, data) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *md5_update(Md5Object *self, PyObject *data)
{
    if (md5_update_buffer(self, data) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int md5_final(Md5Object *self, uint8_t out[16])
{
    if (self->busy) {
        PyErr_SetString(PyExc_ValueError, "md5 hasher is being updated by another thread");
        return -1;
    }
    stream_digest(&self->stream, out);
    return 0;
}

static PyObject *md5_digest(Md5Object *self, PyObject *unused)
{
    uint8_t out[16];
    if (md5_final(self, out) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *md5_hexdigest(Md5Object *self, PyObject *unused)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t out[16];
    char text[32];
    if (md5_final(self, out) < 0)
        return NULL;
    for (int i = 0; i < 16; i++) {
        text[2 * i] = hex[out[i] >> 4];
        text[2 * i + 1] = hex[out[i] & 15];
    }
    return PyUnicode_FromStringAndSize(text, 32);
}

static PyMethodDef md5_methods[] = {
    {"update", (PyCFunction)md5_update, METH_O, "Absorb the bytes of a buffer."},
    {"digest", (PyCFunction)md5_digest, METH_NOARGS, "The 16-byte digest of the bytes so far."},
    {"hexdigest", (PyCFunction)md5_hexdigest, METH_NOARGS, "The digest as 32 lowercase hex digits."},
    {NULL, NULL, 0, NULL},
};

static PyObject *md5_get_name(PyObject *self, void *closure)
{
    return PyUnicode_FromString("md5");
}

static PyObject *md5_get_digest_size(PyObject *self, void *closure)
{
    return PyLong_FromLong(16);
}

static PyObject *md5_get_block_size(PyObject *self, void *closure)
{
    return PyLong_FromLong(64);
}

static PyGetSetDef md5_getset[] = {
    {"name", md5_get_name, NULL, "md5", NULL},
    {"digest_size", md5_get_digest_size, NULL, "16", NULL},
    {"block_size", md5_get_block_size, NULL, "64", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Md5Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ingest._md5lanes.md5",
    .tp_basicsize = sizeof(Md5Object),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "md5([data]): an MD5 hasher, which update_many() can update with others at once.",
    .tp_new = md5_new,
    .tp_methods = md5_methods,
    .tp_getset = md5_getset,
};

/* ---- module functions ----------------------------------------------------------------- */

static int kernel_index(const char *name)
{
    for (int k = 0; k < K_COUNT; k++)
        if (strcmp(name, KERNELS[k].name) == 0)
            return k;
    return -1;
}

static PyObject *update_many(PyObject *module, PyObject *args)
{
    PyObject *hashers_arg, *chunks_arg;
    const char *kernel_name;
    if (!PyArg_ParseTuple(args, "OOs:update_many", &hashers_arg, &chunks_arg, &kernel_name))
        return NULL;
    int kernel = kernel_index(kernel_name);
    if (kernel < 0)
        return PyErr_Format(PyExc_ValueError, "unknown MD5 kernel %R", PyTuple_GET_ITEM(args, 2));
    if (!supported[kernel])
        return PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s MD5 kernel", kernel_name);

    PyObject *hashers = PySequence_Fast(hashers_arg, "hashers must be a sequence");
    if (hashers == NULL)
        return NULL;
    PyObject *chunks = PySequence_Fast(chunks_arg, "chunks must be a sequence");
    if (chunks == NULL) {
        Py_DECREF(hashers);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(hashers), claimed = 0, viewed = 0;
    Py_buffer *views = NULL;
    Md5Object **objs = NULL;
    md5_stream **streams = NULL;
    const uint8_t **ptrs = NULL;
    size_t *lens = NULL;
    if (PySequence_Fast_GET_SIZE(chunks) != n) {
        PyErr_Format(PyExc_ValueError, "%zd hashers but %zd chunks", n, PySequence_Fast_GET_SIZE(chunks));
        goto done;
    }
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    objs = PyMem_Calloc((size_t)n + 1, sizeof(Md5Object *));
    streams = PyMem_Calloc((size_t)n + 1, sizeof(md5_stream *));
    ptrs = PyMem_Calloc((size_t)n + 1, sizeof(uint8_t *));
    lens = PyMem_Calloc((size_t)n + 1, sizeof(size_t));
    if (!views || !objs || !streams || !ptrs || !lens) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(hashers, i);
        if (!PyObject_TypeCheck(h, &Md5Type)) {
            PyErr_Format(PyExc_TypeError, "hashers[%zd] is %.100s, not an md5 hasher of this module",
                         i, Py_TYPE(h)->tp_name);
            goto done;
        }
        objs[i] = (Md5Object *)h;
        if (claim(objs[i]) < 0)
            goto done;
        claimed = i + 1;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(chunks, i), &views[i], PyBUF_SIMPLE) < 0)
            goto done;
        viewed = i + 1;
        streams[i] = &objs[i]->stream;
        ptrs[i] = views[i].buf;
        lens[i] = (size_t)views[i].len;
    }
    Py_BEGIN_ALLOW_THREADS
    absorb(kernel, streams, ptrs, lens, (size_t)n);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < viewed; i++)
        PyBuffer_Release(&views[i]);
    for (Py_ssize_t i = 0; i < claimed; i++)
        objs[i]->busy = 0;
    PyMem_Free(views);
    PyMem_Free(objs);
    PyMem_Free(streams);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_DECREF(hashers);
    Py_DECREF(chunks);
    return result;
}

static PyObject *kernels(PyObject *module, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int k = 0; k < K_COUNT; k++) {
        if (!supported[k])
            continue;
        PyObject *name = PyUnicode_FromString(KERNELS[k].name);
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
    }
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

static PyMethodDef module_methods[] = {
    {"update_many", update_many, METH_VARARGS,
     "update_many(hashers, chunks, kernel): hasher i absorbs chunks[i]; all at once, without the GIL."},
    {"kernels", kernels, METH_NOARGS, "The MD5 kernels this CPU runs, fastest first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ingest._md5lanes",
    .m_doc = "MD5 of several streams at once, in SIMD lanes (AVX-512, AVX2) or plain C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__md5lanes(void)
{
    detect_kernels();
    if (PyType_Ready(&Md5Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    PyObject *lanes = PyDict_New();
    if (lanes == NULL)
        goto fail;
    for (int k = 0; k < K_COUNT; k++) {
        PyObject *v = PyLong_FromLong(KERNELS[k].lanes);
        if (v == NULL || PyDict_SetItemString(lanes, KERNELS[k].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(lanes);
            goto fail;
        }
        Py_DECREF(v);
    }
    if (PyModule_AddObject(m, "LANES", lanes) < 0) {
        Py_DECREF(lanes);
        goto fail;
    }
    Py_INCREF(&Md5Type);
    if (PyModule_AddObject(m, "md5", (PyObject *)&Md5Type) < 0) {
        Py_DECREF(&Md5Type);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
