/* GGUF structural verifier (versions 2 and 3, little-endian).
 *
 * Input: a prefix of the file that covers the header, the key/value section
 * and the tensor infos, plus the file size. When the prefix ends before the
 * tensor infos do, the module asks the host for four times as much (ST_NEED_MORE).
 *
 * Checks: magic and version; counts that could fit in the file at all;
 * every string and array inside the prefix; general.alignment a power of two;
 * tensor infos with at most 4 dimensions, a known ggml type, a first
 * dimension that is a whole number of blocks, aligned offsets, data inside
 * the file and no two tensors overlapping or sharing a name.
 */
#include "common.h"

#define MAX_TENSORS (1u << 20)
#define MAX_KV (1u << 20)
#define MAX_NAME 256u
#define MAX_KEY 65536u
#define MAX_DIMS 4u
#define DEFAULT_ALIGNMENT 32u

struct ggml_type {
    const char *name;
    u32 block;
    u32 size;
};

/* From ggml (gguf-py GGML_QUANT_SIZES); index = ggml_type id, 0 block = unused. */
static const struct ggml_type TYPES[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},     [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},     [7] = {"Q5_1", 32, 24},      [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 40},
    [10] = {"Q2_K", 256, 84},   [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},  [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},  [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},  [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110},
    [22] = {"IQ2_S", 256, 82},  [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},       [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},       [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},       [29] = {"IQ1_M", 256, 56},
    [30] = {"BF16", 1, 2},      [34] = {"TQ1_0", 256, 54},   [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},
};
#define N_TYPES (sizeof TYPES / sizeof TYPES[0])

/* Value types: fixed sizes, 0 for string (8) and array (9). */
static const u8 VSIZE[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

struct tinfo {
    u64 offset;
    u64 size;
    u64 hash;
    u32 name_off;
    u32 name_len;
};

struct rd {
    const u8 *s;
    u64 i, n, file_size;
};

/* Fails the check for want bytes past the prefix: more input, or truncation. */
static i32 short_input(struct rd *r, u64 want) {
    if (r->n < r->file_size) {
        u64 more = r->n * 4;
        if (more < r->i + want) more = r->i + want;
        return need_more(more < r->file_size ? more : r->file_size);
    }
    reject(R_TRUNCATED, "GGUF metadata runs past the end of the file at byte ");
    reason_u64(r->i);
    return ST_REJECT;
}

#define NEED(r, k)                                            \
    do {                                                      \
        if ((r)->n - (r)->i < (u64)(k)) return short_input((r), (u64)(k)); \
    } while (0)

static i32 read_string(struct rd *r, u64 max, u64 *off, u64 *len) {
    NEED(r, 8);
    u64 n = rd_u64(r->s + r->i);
    r->i += 8;
    if (n > max) {
        reject(R_LIMIT, "GGUF string of ");
        reason_u64(n);
        reason_str(" bytes at byte ");
        reason_u64(r->i - 8);
        reason_str(" is over the limit");
        return ST_REJECT;
    }
    if (n > r->file_size - r->i) return reject(R_TRUNCATED, "GGUF string runs past the end of the file");
    NEED(r, n);
    *off = r->i;
    *len = n;
    r->i += n;
    return 0;
}

static i32 skip_value(struct rd *r, u32 type, int in_array) {
    if (type > 12) {
        reject(R_BAD_SCHEMA, "unknown GGUF value type ");
        reason_u64(type);
        return ST_REJECT;
    }
    if (type == 8) {
        u64 off, len;
        return read_string(r, r->file_size, &off, &len);
    }
    if (type == 9) {
        if (in_array) return reject(R_BAD_SCHEMA, "nested GGUF arrays are not supported");
        NEED(r, 12);
        u32 et = (u32)rd_u32(r->s + r->i);
        u64 count = rd_u64(r->s + r->i + 4);
        r->i += 12;
        if (et > 12) return reject(R_BAD_SCHEMA, "unknown GGUF array element type");
        u64 min = et == 8 ? 8 : et == 9 ? 12 : VSIZE[et];
        u64 bytes;
        if (!mul_ok(count, min, &bytes) || bytes > r->file_size - r->i) {
            reject(R_LIMIT, "GGUF array of ");
            reason_u64(count);
            reason_str(" elements cannot fit in the file");
            return ST_REJECT;
        }
        if (et != 8 && et != 9) {
            NEED(r, bytes);
            r->i += bytes;
            return 0;
        }
        for (u64 k = 0; k < count; k++)
            if (skip_value(r, et, 1)) return g_result.status;
        return 0;
    }
    NEED(r, VSIZE[type]);
    r->i += VSIZE[type];
    return 0;
}

static int by_offset(const void *a, const void *b) {
    const struct tinfo *x = a, *y = b;
    return x->offset < y->offset || (x->offset == y->offset && x->size < y->size);
}

EXPORT("verify_gguf") i32 verify_gguf(u32 len, u64 file_size) {
    const u8 *input = input_begin(len);
    result_begin();
    if (!input) return reject(R_OUT_OF_MEMORY, "input does not fit the sandbox memory");
    struct rd r = {input, 0, len, file_size};
    if (file_size < 24) return reject(R_TRUNCATED, "file is shorter than a GGUF header");
    NEED(&r, 24);
    if (!bytes_eq(r.s, 4, "GGUF")) return reject(R_BAD_MAGIC, "not a GGUF file (bad magic)");
    u32 version = (u32)rd_u32(r.s + 4);
    if (version != 2 && version != 3) {
        reject(R_BAD_VERSION, "unsupported GGUF version ");
        reason_u64(version);
        return ST_REJECT;
    }
    u64 n_tensors = rd_u64(r.s + 8), n_kv = rd_u64(r.s + 16);
    r.i = 24;
    /* A tensor info takes at least 8+4+8+4+8 bytes, a key/value 8+4+1. */
    if (n_tensors > MAX_TENSORS || n_tensors * 32 > file_size) {
        reject(R_LIMIT, "absurd GGUF tensor count ");
        reason_u64(n_tensors);
        return ST_REJECT;
    }
    if (n_kv > MAX_KV || n_kv * 13 > file_size) {
        reject(R_LIMIT, "absurd GGUF key/value count ");
        reason_u64(n_kv);
        return ST_REJECT;
    }
    u64 alignment = DEFAULT_ALIGNMENT;
    /* Keys are remembered to refuse duplicates, as llama.cpp does: two parsers
     * must never disagree on which of two values a file means. */
    struct tinfo *keys = bump((usize)(n_kv ? n_kv : 1) * sizeof(struct tinfo));
    if (!keys) return reject(R_OUT_OF_MEMORY, "too many GGUF keys for the sandbox memory limit");
    for (u64 k = 0; k < n_kv; k++) {
        u64 koff, klen;
        if (read_string(&r, MAX_KEY, &koff, &klen)) return g_result.status;
        keys[k].hash = fnv1a(r.s + koff, (usize)klen);
        keys[k].name_off = (u32)koff;
        keys[k].name_len = (u32)klen;
        NEED(&r, 4);
        u32 type = (u32)rd_u32(r.s + r.i);
        r.i += 4;
        if (bytes_eq(r.s + koff, klen, "general.alignment")) {
            if (type != 4) return reject(R_BAD_SCHEMA, "general.alignment is not a uint32");
            NEED(&r, 4);
            alignment = rd_u32(r.s + r.i);
            if (alignment == 0 || (alignment & (alignment - 1))) return reject(R_MISALIGNED, "general.alignment is not a power of two");
        }
        if (skip_value(&r, type, 0)) return g_result.status;
    }
    i64 dup_key = find_duplicate((const u8 *)keys, (usize)n_kv, sizeof *keys, __builtin_offsetof(struct tinfo, hash),
                                 __builtin_offsetof(struct tinfo, name_off), r.s);
    if (dup_key == -2) return reject(R_OUT_OF_MEMORY, "too many GGUF keys for the sandbox memory limit");
    if (dup_key >= 0) {
        reject(R_DUPLICATE, "GGUF metadata key '");
        reason_bytes(r.s + keys[dup_key].name_off, keys[dup_key].name_len);
        reason_str("' is listed twice");
        return ST_REJECT;
    }
    struct tinfo *ts = bump((usize)(n_tensors ? n_tensors : 1) * sizeof(struct tinfo));
    if (!ts) return reject(R_OUT_OF_MEMORY, "too many tensors for the sandbox memory limit");
    u64 params = 0;
    for (u64 k = 0; k < n_tensors; k++) {
        struct tinfo *t = &ts[k];
        u64 noff, nlen;
        if (read_string(&r, MAX_NAME, &noff, &nlen)) return g_result.status;
        const u8 *name = r.s + noff;
        NEED(&r, 4);
        u32 nd = (u32)rd_u32(r.s + r.i);
        r.i += 4;
        if (nd == 0 || nd > MAX_DIMS) {
            reject(R_BAD_SCHEMA, "tensor '");
            reason_bytes(name, nlen);
            reason_str("' has ");
            reason_u64(nd);
            reason_str(" dimensions (1..4 allowed)");
            return ST_REJECT;
        }
        NEED(&r, 8 * nd + 12);
        u64 nelem = 1, dim0 = rd_u64(r.s + r.i);
        for (u32 d = 0; d < nd; d++) {
            u64 dim = rd_u64(r.s + r.i + 8 * d);
            if ((dim >> 62) || !mul_ok(nelem, dim, &nelem) || (nelem >> 62)) {
                reject(R_OVERFLOW, "tensor '");
                reason_bytes(name, nlen);
                reason_str("' has an element count that overflows");
                return ST_REJECT;
            }
        }
        r.i += 8 * nd;
        u32 type = (u32)rd_u32(r.s + r.i);
        t->offset = rd_u64(r.s + r.i + 4);
        r.i += 12;
        if (type >= N_TYPES || TYPES[type].block == 0) {
            reject(R_UNKNOWN_DTYPE, "tensor '");
            reason_bytes(name, nlen);
            reason_str("' has unknown ggml type ");
            reason_u64(type);
            return ST_REJECT;
        }
        const struct ggml_type *gt = &TYPES[type];
        if (dim0 % gt->block) {
            reject(R_SHAPE_MISMATCH, "tensor '");
            reason_bytes(name, nlen);
            reason_str("' first dimension is not a multiple of the ");
            reason_str(gt->name);
            reason_str(" block size");
            return ST_REJECT;
        }
        t->size = nelem / gt->block * gt->size;
        if (t->offset % alignment) {
            reject(R_MISALIGNED, "tensor '");
            reason_bytes(name, nlen);
            reason_str("' offset ");
            reason_u64(t->offset);
            reason_str(" is not a multiple of the alignment ");
            reason_u64(alignment);
            return ST_REJECT;
        }
        t->name_off = (u32)noff;
        t->name_len = (u32)nlen;
        t->hash = fnv1a(name, nlen);
        if (!add_ok(params, nelem, &params) || !add_dtype_bytes(gt->name, t->size))
            return reject(R_OVERFLOW, "parameter or byte count overflows");
    }
    u64 data_start = (r.i + alignment - 1) / alignment * alignment;
    if (data_start > file_size) return reject(R_TRUNCATED, "GGUF data section starts past the end of the file");
    u64 data_len = file_size - data_start;
    for (u64 k = 0; k < n_tensors; k++) {
        struct tinfo *t = &ts[k];
        if (t->offset > data_len || t->size > data_len - t->offset) {
            reject(R_OUT_OF_BOUNDS, "tensor '");
            reason_bytes(r.s + t->name_off, t->name_len);
            reason_str("' data [");
            reason_u64(t->offset);
            reason_str(", +");
            reason_u64(t->size);
            reason_str(") is outside the ");
            reason_u64(data_len);
            reason_str("-byte data section");
            return ST_REJECT;
        }
    }
    i64 dup = find_duplicate((const u8 *)ts, (usize)n_tensors, sizeof *ts, __builtin_offsetof(struct tinfo, hash),
                             __builtin_offsetof(struct tinfo, name_off), r.s);
    if (dup == -2) return reject(R_OUT_OF_MEMORY, "too many tensors for the sandbox memory limit");
    if (dup >= 0) {
        reject(R_DUPLICATE, "tensor '");
        reason_bytes(r.s + ts[dup].name_off, ts[dup].name_len);
        reason_str("' is listed twice");
        return ST_REJECT;
    }
    int sorted = 1;
    for (u64 k = 1; k < n_tensors && sorted; k++) sorted = !by_offset(&ts[k], &ts[k - 1]);
    if (!sorted) heap_sort(ts, (usize)n_tensors, sizeof *ts, by_offset);
    for (u64 k = 1; k < n_tensors; k++) {
        if (ts[k].offset < ts[k - 1].offset + ts[k - 1].size) {
            reject(R_OVERLAP, "tensor '");
            reason_bytes(r.s + ts[k].name_off, ts[k].name_len);
            reason_str("' overlaps another tensor at offset ");
            reason_u64(ts[k].offset);
            return ST_REJECT;
        }
    }
    g_result.tensor_count = n_tensors;
    g_result.param_count = params;
    g_result.need_bytes = data_start;
    return accept();
}
