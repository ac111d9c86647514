/* CRC32C (Castagnoli) for the record accelerator (core/storage/_record_speedups.pyx).
 *
 * Same function as the `crc32c` package's crc32c(data, value): `crc` is the CRC of the bytes before `p`
 * (0 to start), so tg_crc32c(tg_crc32c(0, a), b) == crc32c(a + b).
 * x86-64 with GCC or Clang uses the SSE4.2 crc32 instruction when the CPU has it (checked once at run time, so
 * the module is built without -msse4.2 and still loads on any x86-64); everything else uses slicing-by-8 tables.
 *
 * The crc32 instruction has a latency of 3 cycles but issues one per cycle, so one dependency chain uses a third of
 * it. Spans of at least 3 * TG_CRC_SHORT bytes are cut into three consecutive blocks whose CRCs run as three
 * independent chains in the same loop; the three results are then joined by "shifting" a CRC over a block's
 * length of zero bytes (the CRC register is linear over GF(2), so crc(A B) = shift(crc(A), |B|) ^ crc(B) taken
 * from a zero register), with tables built once at init (Mark Adler's crc32c.c, crc32c_hw, uses the same scheme).
 * Shorter spans and the tails keep the single chain. The result is bit for bit the same.
 */
#ifndef TIDEGATE_CRC32C_H
#define TIDEGATE_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TG_CRC_X86 1
#include <nmmintrin.h>
#endif

#define TG_CRC_POLY 0x82F63B78u /* reflected Castagnoli polynomial */
#define TG_CRC_LONG 8192u /* bytes per chain in the long three-chain loop (a power of two) */
#define TG_CRC_SHORT 256u /* bytes per chain in the short three-chain loop (a power of two) */

static uint32_t tg_crc_table[8][256];
static int tg_crc_hw = 0;
/* tg_crc_shift_long[k][b]: the CRC register whose byte k is b, then fed TG_CRC_LONG zero bytes (and _short alike);
 * the register is linear, so four lookups shift any register. */
static uint32_t tg_crc_shift_long[4][256];
static uint32_t tg_crc_shift_short[4][256];

/* A 32x32 matrix over GF(2) as its 32 columns: mat[i] is the image of bit i. */
static uint32_t tg_gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1) sum ^= *mat;
    return sum;
}

static void tg_gf2_square(uint32_t *square, const uint32_t *mat) {
    int i;
    for (i = 0; i < 32; i++) square[i] = tg_gf2_times(mat, mat[i]);
}

/* Fill shift[4][256] with the operator "feed `zero_bytes` zero bytes" (zero_bytes a power of two). */
static void tg_crc_shift_init(uint32_t shift[4][256], size_t zero_bytes) {
    uint32_t op[32], sq[32];
    uint32_t n;
    int i;
    /* one zero bit: c -> (c >> 1) ^ (c & 1 ? POLY : 0) */
    op[0] = TG_CRC_POLY;
    for (i = 1; i < 32; i++) op[i] = 1u << (i - 1);
    /* squaring doubles the number of zero bits: 3 squarings give one zero byte, then one per doubling */
    for (i = 0; i < 3; i++) {
        tg_gf2_square(sq, op);
        memcpy(op, sq, sizeof op);
    }
    for (; zero_bytes > 1; zero_bytes >>= 1) {
        tg_gf2_square(sq, op);
        memcpy(op, sq, sizeof op);
    }
    for (n = 0; n < 256; n++)
        for (i = 0; i < 4; i++) shift[i][n] = tg_gf2_times(op, n << (8 * i));
}

static inline uint32_t tg_crc_shift(uint32_t shift[4][256], uint32_t crc) {
    return shift[0][crc & 0xff] ^ shift[1][(crc >> 8) & 0xff] ^ shift[2][(crc >> 16) & 0xff] ^ shift[3][crc >> 24];
}

static void tg_crc32c_init(void) {
    uint32_t n, c;
    int k;
    for (n = 0; n < 256; n++) {
        c = n;
        for (k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        tg_crc_table[0][n] = c;
    }
    for (n = 0; n < 256; n++) {
        c = tg_crc_table[0][n];
        for (k = 1; k < 8; k++) {
            c = tg_crc_table[0][c & 0xff] ^ (c >> 8);
            tg_crc_table[k][n] = c;
        }
    }
#ifdef TG_CRC_X86
    __builtin_cpu_init();
    tg_crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (tg_crc_hw) {
        tg_crc_shift_init(tg_crc_shift_long, TG_CRC_LONG);
        tg_crc_shift_init(tg_crc_shift_short, TG_CRC_SHORT);
    }
#endif
}

static uint32_t tg_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n) {
    uint32_t c = ~crc, lo, hi;
    while (n && ((uintptr_t)p & 7)) {
        c = tg_crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        /* byte by byte, so the result does not depend on the host's byte order */
        lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = tg_crc_table[7][lo & 0xff] ^ tg_crc_table[6][(lo >> 8) & 0xff] ^ tg_crc_table[5][(lo >> 16) & 0xff]
            ^ tg_crc_table[4][lo >> 24] ^ tg_crc_table[3][hi & 0xff] ^ tg_crc_table[2][(hi >> 8) & 0xff]
            ^ tg_crc_table[1][(hi >> 16) & 0xff] ^ tg_crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = tg_crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

#ifdef TG_CRC_X86
static inline uint64_t tg_load64(const unsigned char *p) {
    uint64_t word;
    memcpy(&word, p, 8);
    return word;
}

/* Three chains over the blocks [p, p+block), [p+block, p+2 block), [p+2 block, p+3 block), joined; `c` is the raw
 * register (not inverted) before p and the raw register after the three blocks is returned. `block` is a multiple
 * of 8 and `shift` shifts a register over `block` zero bytes. */
__attribute__((target("sse4.2"))) static inline uint64_t tg_crc32c_hw3(uint64_t c, const unsigned char *p,
                                                                       size_t block, uint32_t shift[4][256]) {
    uint64_t c1 = 0, c2 = 0;
    const unsigned char *end = p + block;
    do {
        c = _mm_crc32_u64(c, tg_load64(p));
        c1 = _mm_crc32_u64(c1, tg_load64(p + block));
        c2 = _mm_crc32_u64(c2, tg_load64(p + 2 * block));
        p += 8;
    } while (p < end);
    c = tg_crc_shift(shift, (uint32_t)c) ^ (uint32_t)c1;
    return tg_crc_shift(shift, (uint32_t)c) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2"))) static uint32_t tg_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = (uint32_t)~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 3 * TG_CRC_LONG) {
        c = tg_crc32c_hw3(c, p, TG_CRC_LONG, tg_crc_shift_long);
        p += 3 * TG_CRC_LONG;
        n -= 3 * TG_CRC_LONG;
    }
    while (n >= 3 * TG_CRC_SHORT) {
        c = tg_crc32c_hw3(c, p, TG_CRC_SHORT, tg_crc_shift_short);
        p += 3 * TG_CRC_SHORT;
        n -= 3 * TG_CRC_SHORT;
    }
    while (n >= 8) {
        c = _mm_crc32_u64(c, tg_load64(p));
        p += 8;
        n -= 8;
    }
    while (n--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

static inline uint32_t tg_crc32c(uint32_t crc, const unsigned char *p, size_t n) {
#ifdef TG_CRC_X86
    if (tg_crc_hw) return tg_crc32c_hw(crc, p, n);
#endif
    return tg_crc32c_sw(crc, p, n);
}

static inline int tg_crc32c_hw_available(void) { return tg_crc_hw; }

#endif
