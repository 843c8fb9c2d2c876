/* Shared freestanding runtime of the verifier modules.
 *
 * No libc, no WASI, no imports: the module sees only its own linear memory.
 * The host writes the bytes to check at input_ptr(len), calls verify_<kind>,
 * and reads the fixed-layout result at result_ptr(). Every module is one
 * translation unit that includes this file, so the build is a single clang
 * call per module and the output is byte-identical on every build.
 */
#ifndef AGV_COMMON_H
#define AGV_COMMON_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;
typedef unsigned long usize;

#define EXPORT(name) __attribute__((export_name(name), visibility("default")))

enum { ST_OK = 1, ST_REJECT = 2, ST_NEED_MORE = 3 };

/* Reason codes; wasm_verify/_runtime.py maps them to names. */
enum {
    R_TRUNCATED = 1,
    R_HEADER_TOO_LARGE = 2,
    R_HEADER_BEYOND_FILE = 3,
    R_BAD_UTF8 = 4,
    R_BAD_JSON = 5,
    R_BAD_SCHEMA = 6,
    R_UNKNOWN_DTYPE = 7,
    R_SHAPE_MISMATCH = 8,
    R_OUT_OF_BOUNDS = 9,
    R_OVERLAP = 10,
    R_GAP = 11,
    R_TRAILING_BYTES = 12,
    R_DUPLICATE = 13,
    R_LIMIT = 14,
    R_FORBIDDEN_GLOBAL = 15,
    R_FORBIDDEN_OPCODE = 16,
    R_COMPUTED_GLOBAL = 17,
    R_BAD_PICKLE = 18,
    R_BAD_MAGIC = 19,
    R_BAD_VERSION = 20,
    R_MISALIGNED = 21,
    R_OVERFLOW = 22,
    R_METADATA = 23,
    R_OUT_OF_MEMORY = 24,
    R_FORBIDDEN_CALL = 25
};

#define RESULT_MAGIC 0x52564741u /* "AGVR" little-endian */
#define REASON_MAX 240
#define DTYPE_SLOTS 32
#define DTYPE_NAME 16

struct dtype_bytes {
    char name[DTYPE_NAME];
    u64 bytes;
};

/* Layout read by wasm_verify/_runtime.py; keep both in step. */
struct result {
    u32 magic;
    u32 status;
    u32 reason_code;
    u32 reason_len;
    u64 tensor_count;
    u64 param_count;
    u64 need_bytes;
    u32 n_dtypes;
    u32 flags;
    char reason[REASON_MAX];
    struct dtype_bytes dtypes[DTYPE_SLOTS];
};

/* Exported by address (wasm-ld --export): the host reads both once per module. */
struct result agv_result;
#define g_result agv_result

/* The input region starts at __heap_base (also exported); the host grows the
 * memory to fit it and writes the bytes before calling verify_<kind>. */
extern u8 __heap_base;
static usize g_heap;   /* bump pointer */
static usize g_limit;  /* end of memory the bump pointer may use */

#define PAGE 65536u

static void *bump(usize n) {
    usize p = (g_heap + 7u) & ~(usize)7u;
    if (n > 0xF0000000u || p + n < p) return 0;
    usize end = p + n;
    if (end > g_limit) {
        usize need = (end - g_limit + PAGE - 1) / PAGE;
        if (__builtin_wasm_memory_grow(0, need) == (usize)-1) return 0;
        g_limit = __builtin_wasm_memory_size(0) * PAGE;
    }
    g_heap = end;
    return (void *)p;
}

/* Claims [__heap_base, +len) as the input; 0 if the host did not make room. */
static const u8 *input_begin(u32 len) {
    usize base = (usize)&__heap_base;
    g_limit = __builtin_wasm_memory_size(0) * PAGE;
    if (base + len < base || base + len > g_limit) return 0;
    g_heap = base + len;
    return (const u8 *)base;
}

static void mem_zero(void *p, usize n) { __builtin_memset(p, 0, n); }

static usize cstr_len(const char *s) {
    usize n = 0;
    while (s[n]) n++;
    return n;
}

static int bytes_eq(const u8 *a, usize alen, const char *b) {
    usize i = 0;
    for (; i < alen; i++) {
        if (b[i] == 0 || (u8)b[i] != a[i]) return 0;
    }
    return b[i] == 0;
}

static int span_eq(const u8 *a, usize alen, const u8 *b, usize blen) {
    if (alen != blen) return 0;
    for (usize i = 0; i < alen; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static u64 rd_u16(const u8 *p) { return (u64)p[0] | ((u64)p[1] << 8); }
static u64 rd_u32(const u8 *p) { return rd_u16(p) | (rd_u16(p + 2) << 16); }
static u64 rd_u64(const u8 *p) { return rd_u32(p) | (rd_u32(p + 4) << 32); }

/* Overflow-checked arithmetic: return 0 on overflow. */
static int mul_ok(u64 a, u64 b, u64 *out) {
    /* By 32-bit halves: no 128-bit multiply (__multi3) on the hot paths. */
    u64 ah = a >> 32, al = a & 0xFFFFFFFFu, bh = b >> 32, bl = b & 0xFFFFFFFFu;
    if (ah && bh) return 0;
    u64 cross = ah * bl + al * bh; /* one term is zero */
    if (cross >> 32) return 0;
    u64 low = al * bl, hi = cross << 32;
    if (low + hi < low) return 0;
    *out = low + hi;
    return 1;
}

/* *v = *v * 10 + d, or 0 on overflow. */
static int mul10_add(u64 *v, u32 d) {
    if (*v > 0x1999999999999999ull) return 0;
    u64 t = *v * 10;
    if (t + d < t) return 0;
    *v = t + d;
    return 1;
}

static int add_ok(u64 a, u64 b, u64 *out) { return !__builtin_add_overflow(a, b, out); }

static void result_begin(void) {
    mem_zero(&g_result, sizeof g_result);
    g_result.magic = RESULT_MAGIC;
}

/* Reason text: a short sentence built from pieces, printable ASCII only. */
static void reason_str(const char *s) {
    while (*s && g_result.reason_len < REASON_MAX) g_result.reason[g_result.reason_len++] = *s++;
}

static void reason_bytes(const u8 *s, usize n) {
    usize max = n > 64 ? 64 : n;
    for (usize i = 0; i < max && g_result.reason_len < REASON_MAX; i++) {
        u8 c = s[i];
        g_result.reason[g_result.reason_len++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (n > max) reason_str("...");
}

static void reason_u64(u64 v) {
    char buf[24];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < 24);
    while (n > 0 && g_result.reason_len < REASON_MAX) g_result.reason[g_result.reason_len++] = buf[--n];
}

static i32 reject(u32 code, const char *msg) {
    g_result.status = ST_REJECT;
    g_result.reason_code = code;
    g_result.reason_len = 0;
    reason_str(msg);
    return ST_REJECT;
}

/* reject() then append detail with reason_*; returns ST_REJECT for chaining. */
static i32 need_more(u64 bytes) {
    g_result.status = ST_NEED_MORE;
    g_result.need_bytes = bytes;
    return ST_NEED_MORE;
}

static i32 accept(void) {
    g_result.status = ST_OK;
    return ST_OK;
}

/* Adds bytes to the per-dtype total; 0 when the table or a counter overflows. */
static int add_dtype_bytes(const char *name, u64 bytes) {
    for (u32 i = 0; i < g_result.n_dtypes; i++) {
        if (bytes_eq((const u8 *)g_result.dtypes[i].name, cstr_len(g_result.dtypes[i].name), name))
            return add_ok(g_result.dtypes[i].bytes, bytes, &g_result.dtypes[i].bytes);
    }
    if (g_result.n_dtypes >= DTYPE_SLOTS) return 0;
    struct dtype_bytes *d = &g_result.dtypes[g_result.n_dtypes++];
    for (u32 i = 0; name[i] && i < DTYPE_NAME - 1; i++) d->name[i] = name[i];
    d->bytes = bytes;
    return 1;
}

/* In-place heapsort (no recursion, no libc) of fixed-size records by a key. */
typedef int (*less_fn)(const void *a, const void *b);

/* Records are arrays of u64 (every record struct is 8-byte aligned and sized). */
static void swap_rec(u8 *a, u8 *b, usize size) {
    u64 *x = (u64 *)a, *y = (u64 *)b;
    for (usize i = 0; i < size / 8; i++) {
        u64 t = x[i];
        x[i] = y[i];
        y[i] = t;
    }
}

static void sift_down(u8 *base, usize size, usize start, usize n, less_fn less) {
    usize root = start;
    for (;;) {
        usize child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && less(base + child * size, base + (child + 1) * size)) child++;
        if (!less(base + root * size, base + child * size)) return;
        swap_rec(base + root * size, base + child * size, size);
        root = child;
    }
}

static void heap_sort(void *v, usize n, usize size, less_fn less) {
    u8 *base = (u8 *)v;
    if (n < 2) return;
    for (usize i = n / 2; i-- > 0;) sift_down(base, size, i, n, less);
    for (usize end = n - 1; end > 0; end--) {
        swap_rec(base, base + end * size, size);
        sift_down(base, size, 0, end, less);
    }
}

/* Index of a record whose name equals an earlier one, or -1; -2 when out of memory.
 * Records hold a u64 hash at hash_at and u32 name offset/length at name_at. */
static i64 find_duplicate(const u8 *recs, usize count, usize stride, usize hash_at, usize name_at, const u8 *names) {
    usize cap = 16;
    while (cap < 2 * count) cap <<= 1;
    u32 *table = bump(cap * sizeof(u32));
    if (!table) return -2;
    mem_zero(table, cap * sizeof(u32));
    for (usize k = 0; k < count; k++) {
        const u8 *r = recs + k * stride;
        u64 h = *(const u64 *)(r + hash_at);
        const u32 *nm = (const u32 *)(r + name_at);
        for (usize slot = (usize)h & (cap - 1);; slot = (slot + 1) & (cap - 1)) {
            if (!table[slot]) {
                table[slot] = (u32)k + 1;
                break;
            }
            const u8 *o = recs + (table[slot] - 1) * stride;
            const u32 *onm = (const u32 *)(o + name_at);
            if (*(const u64 *)(o + hash_at) == h && span_eq(names + onm[0], onm[1], names + nm[0], nm[1])) return (i64)k;
        }
    }
    return -1;
}

/* A word-at-a-time hash (names only select hash-table slots; equality is exact). */
static u64 fnv1a(const u8 *p, usize n) {
    u64 h = 1469598103934665603ull ^ n;
    usize i = 0;
    for (; n - i >= 8; i += 8) {
        u64 w;
        __builtin_memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
    }
    for (; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h ^ (h >> 32);
}

#endif
