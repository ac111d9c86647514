/* CRC32C (Castagnoli) for the record accelerator (core/storage/_record_speedups.pyx).
 *
 * Same function as the `crc32c` package's crc32c(data, value): `crc` is the CRC of the bytes before `p`
 * (0 to start), so tg_crc32c(tg_crc32c(0, a), b) == crc32c(a + b).
 * x86-64 with GCC or Clang uses the SSE4.2 crc32 instruction when the CPU has it (checked once at run time, so
 * the module is built without -msse4.2 and still loads on any x86-64); everything else uses slicing-by-8 tables.
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

static uint32_t tg_crc_table[8][256];
static int tg_crc_hw = 0;

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
__attribute__((target("sse4.2"))) static uint32_t tg_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = (uint32_t)~crc, word;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
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
