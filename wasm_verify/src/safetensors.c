/* safetensors structural verifier.
 *
 * Input: the first 8 + N bytes of the file (the little-endian header length N
 * and the JSON header) and the total file size. The tensor data itself never
 * enters the sandbox: the checks below prove that the header describes
 * exactly the bytes that follow it.
 *
 * Strategy: a strict, schema-directed JSON parser (RFC 8259 lexically; the
 * only shapes accepted are the ones the format defines) collects one record
 * per tensor; then the records are sorted by offsets and must tile the data
 * section from 0 to its end with no gap, overlap or trailing byte, each span
 * equal to shape x dtype size. It is stricter than the reference library
 * (duplicate keys, unknown fields and floats are refused), never looser.
 */
#include "common.h"

/* The parser state must stay in wasm locals, not in linear memory: every
 * function that takes it is inlined into verify_safetensors. */
#define INLINE static inline __attribute__((always_inline))

#define MAX_HEADER 100000000u /* the reference library's limit */
#define MAX_RANK 64
#define MAX_METADATA 65536u

struct dtype_info {
    const char *name;
    u32 bits;
};

static const struct dtype_info DTYPES[] = {
    {"BOOL", 8},     {"U8", 8},        {"I8", 8},        {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8},
    {"I16", 16},     {"U16", 16},      {"F16", 16},      {"BF16", 16},   {"I32", 32},    {"U32", 32},
    {"F32", 32},     {"F64", 64},      {"I64", 64},      {"U64", 64},    {"C64", 64},    {"F4", 4},
    {"F6_E2M3", 6},  {"F6_E3M2", 6},
};
#define N_DTYPES (sizeof DTYPES / sizeof DTYPES[0])

struct tensor {
    u64 start;
    u64 end;
    u64 hash;
    u64 nelem;
    u32 name_off;
    u32 name_len;
    u32 dtype;
    u32 pad;
};

struct parser {
    const u8 *s;
    usize i;
    usize n;
    u8 *scratch; /* decoded strings */
    usize scratch_used;
    usize scratch_cap;
};

INLINE void ws(struct parser *p) {
    while (p->i < p->n) {
        u8 c = p->s[p->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->i++;
    }
}

INLINE int expect(struct parser *p, u8 c) {
    ws(p);
    if (p->i < p->n && p->s[p->i] == c) {
        p->i++;
        return 1;
    }
    return 0;
}

INLINE int peek(struct parser *p, u8 c) {
    ws(p);
    return p->i < p->n && p->s[p->i] == c;
}

INLINE int hexval(u8 c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

INLINE int read_hex4(struct parser *p, u32 *out) {
    if (p->n - p->i < 4) return 0;
    u32 v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(p->s[p->i + k]);
        if (h < 0) return 0;
        v = (v << 4) | (u32)h;
    }
    p->i += 4;
    *out = v;
    return 1;
}

INLINE void put_cp(struct parser *p, u32 cp) {
    u8 *o = p->scratch + p->scratch_used;
    if (cp < 0x80) {
        o[0] = (u8)cp;
        p->scratch_used += 1;
    } else if (cp < 0x800) {
        o[0] = (u8)(0xC0 | (cp >> 6));
        o[1] = (u8)(0x80 | (cp & 0x3F));
        p->scratch_used += 2;
    } else if (cp < 0x10000) {
        o[0] = (u8)(0xE0 | (cp >> 12));
        o[1] = (u8)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (u8)(0x80 | (cp & 0x3F));
        p->scratch_used += 3;
    } else {
        o[0] = (u8)(0xF0 | (cp >> 18));
        o[1] = (u8)(0x80 | ((cp >> 12) & 0x3F));
        o[2] = (u8)(0x80 | ((cp >> 6) & 0x3F));
        o[3] = (u8)(0x80 | (cp & 0x3F));
        p->scratch_used += 4;
    }
}

/* Length of the valid UTF-8 sequence at s[0..n) (1..4), or 0 if invalid. */
INLINE usize utf8_seq(const u8 *s, usize n) {
    u8 c = s[0];
    if (c < 0x80) return 1;
    usize len;
    u32 cp;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len) return 0;
    for (usize k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

/* Decodes a JSON string into scratch at (off, len). 0: malformed, -1: bad UTF-8. */
INLINE int parse_string(struct parser *p, u32 *off, u32 *len) {
    if (!expect(p, '"')) return 0;
    usize start = p->scratch_used;
    while (p->i < p->n) {
        u8 c = p->s[p->i];
        if (c == '"') {
            p->i++;
            *off = (u32)start;
            *len = (u32)(p->scratch_used - start);
            return 1;
        }
        if (c < 0x20) return 0;
        if (c < 0x80 && c != '\\') { /* a run of plain ASCII: one bulk copy */
            usize j = p->i + 1;
            /* Eight bytes at a time while none is a control, non-ASCII, '"' or '\\'. */
            while (p->n - j >= 8) {
                u64 w;
                __builtin_memcpy(&w, p->s + j, 8);
                const u64 ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
                u64 q = w ^ (ones * '"'), b = w ^ (ones * '\\');
                u64 special = ((w - ones * 0x20) | (q - ones) | (b - ones)) & ~w & highs;
                if (special | (w & highs)) break;
                j += 8;
            }
            while (j < p->n) {
                u8 d = p->s[j];
                if (d < 0x20 || d >= 0x80 || d == '"' || d == '\\') break;
                j++;
            }
            __builtin_memcpy(p->scratch + p->scratch_used, p->s + p->i, j - p->i);
            p->scratch_used += j - p->i;
            p->i = j;
            continue;
        }
        if (c == '\\') {
            if (p->n - p->i < 2) return 0;
            u8 e = p->s[p->i + 1];
            p->i += 2;
            u32 cp;
            switch (e) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = 8; break;
            case 'f': cp = 12; break;
            case 'n': cp = 10; break;
            case 'r': cp = 13; break;
            case 't': cp = 9; break;
            case 'u':
                if (!read_hex4(p, &cp)) return 0;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return 0;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    u32 lo;
                    if (p->n - p->i < 2 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u') return 0;
                    p->i += 2;
                    if (!read_hex4(p, &lo) || lo < 0xDC00 || lo > 0xDFFF) return 0;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                break;
            default: return 0;
            }
            put_cp(p, cp);
            continue;
        }
        usize k = utf8_seq(p->s + p->i, p->n - p->i);
        if (!k) return -1;
        for (usize j = 0; j < k; j++) p->scratch[p->scratch_used++] = p->s[p->i + j];
        p->i += k;
    }
    return 0;
}

/* A non-negative JSON integer without fraction or exponent. */
INLINE int parse_uint(struct parser *p, u64 *out) {
    ws(p);
    usize start = p->i;
    u64 v = 0;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') {
        if (!mul10_add(&v, p->s[p->i] - '0')) return 0;
        p->i++;
    }
    if (p->i == start) return 0;
    if (p->s[start] == '0' && p->i - start > 1) return 0;
    if (p->i < p->n && (p->s[p->i] == '.' || p->s[p->i] == 'e' || p->s[p->i] == 'E')) return 0;
    *out = v;
    return 1;
}

__attribute__((noinline)) static i32 bad_json_at(usize at, const char *what) {
    reject(R_BAD_JSON, "header is not valid JSON: ");
    reason_str(what);
    reason_str(" at byte ");
    reason_u64(at + 8);
    return ST_REJECT;
}

#define bad_json(p, what) bad_json_at((p)->i, what)

__attribute__((noinline)) static i32 bad_schema(const u8 *name, usize len, const char *what) {
    reject(R_BAD_SCHEMA, "tensor '");
    reason_bytes(name, len);
    reason_str("': ");
    reason_str(what);
    return ST_REJECT;
}

INLINE i32 parse_metadata(struct parser *p) {
    if (!expect(p, '{')) return bad_json(p, "__metadata__ must be an object");
    u32 count = 0;
    if (expect(p, '}')) return 0;
    for (;;) {
        u32 off, len;
        usize mark = p->scratch_used;
        int r = parse_string(p, &off, &len);
        if (r < 0) return reject(R_BAD_UTF8, "header has invalid UTF-8");
        if (!r) return bad_json(p, "bad metadata key");
        if (!expect(p, ':')) return bad_json(p, "expected ':'");
        if (!peek(p, '"')) return reject(R_METADATA, "__metadata__ values must be strings");
        r = parse_string(p, &off, &len);
        if (r < 0) return reject(R_BAD_UTF8, "header has invalid UTF-8");
        if (!r) return bad_json(p, "bad metadata value");
        p->scratch_used = mark; /* metadata text is not kept */
        if (++count > MAX_METADATA) return reject(R_LIMIT, "more than 65536 metadata entries");
        if (expect(p, '}')) return 0;
        if (!expect(p, ',')) return bad_json(p, "expected ',' or '}'");
    }
}

INLINE i32 parse_tensor(struct parser *p, struct tensor *t) {
    const u8 *name = p->scratch + t->name_off;
    int seen_dtype = 0, seen_shape = 0, seen_off = 0;
    u64 nelem = 1;
    int nelem_ok = 1;
    u32 rank = 0;
    if (!expect(p, '{')) return bad_schema(name, t->name_len, "info must be an object");
    if (expect(p, '}')) return bad_schema(name, t->name_len, "missing dtype, shape or data_offsets");
    for (;;) {
        u32 koff, klen;
        usize mark = p->scratch_used;
        int r = parse_string(p, &koff, &klen);
        if (r < 0) return reject(R_BAD_UTF8, "header has invalid UTF-8");
        if (!r) return bad_json(p, "bad key");
        const u8 *key = p->scratch + koff;
        if (!expect(p, ':')) return bad_json(p, "expected ':'");
        if (bytes_eq(key, klen, "dtype")) {
            if (seen_dtype++) return bad_schema(name, t->name_len, "dtype given twice");
            u32 voff, vlen;
            r = parse_string(p, &voff, &vlen);
            if (r < 0) return reject(R_BAD_UTF8, "header has invalid UTF-8");
            if (!r) return bad_schema(name, t->name_len, "dtype must be a string");
            u32 d = 0;
            for (; d < N_DTYPES; d++)
                if (bytes_eq(p->scratch + voff, vlen, DTYPES[d].name)) break;
            if (d == N_DTYPES) {
                reject(R_UNKNOWN_DTYPE, "tensor '");
                reason_bytes(name, t->name_len);
                reason_str("' has unknown dtype '");
                reason_bytes(p->scratch + voff, vlen);
                reason_str("'");
                return ST_REJECT;
            }
            t->dtype = d;
        } else if (bytes_eq(key, klen, "shape")) {
            if (seen_shape++) return bad_schema(name, t->name_len, "shape given twice");
            if (!expect(p, '[')) return bad_schema(name, t->name_len, "shape must be an array");
            if (!expect(p, ']')) {
                for (;;) {
                    u64 dim;
                    if (!parse_uint(p, &dim)) return bad_schema(name, t->name_len, "shape must hold non-negative integers");
                    if (++rank > MAX_RANK) return bad_schema(name, t->name_len, "more than 64 dimensions");
                    if (nelem_ok && !mul_ok(nelem, dim, &nelem)) nelem_ok = 0;
                    if (expect(p, ']')) break;
                    if (!expect(p, ',')) return bad_json(p, "expected ',' or ']'");
                }
            }
        } else if (bytes_eq(key, klen, "data_offsets")) {
            if (seen_off++) return bad_schema(name, t->name_len, "data_offsets given twice");
            if (!expect(p, '[') || !parse_uint(p, &t->start) || !expect(p, ',') || !parse_uint(p, &t->end) ||
                !expect(p, ']'))
                return bad_schema(name, t->name_len, "data_offsets must be [begin, end]");
        } else {
            reject(R_BAD_SCHEMA, "tensor '");
            reason_bytes(name, t->name_len);
            reason_str("' has unknown field '");
            reason_bytes(key, klen);
            reason_str("'");
            return ST_REJECT;
        }
        p->scratch_used = mark;
        if (expect(p, '}')) break;
        if (!expect(p, ',')) return bad_json(p, "expected ',' or '}'");
    }
    if (!seen_dtype || !seen_shape || !seen_off) return bad_schema(name, t->name_len, "missing dtype, shape or data_offsets");
    if (!nelem_ok) {
        reject(R_OVERFLOW, "tensor '");
        reason_bytes(name, t->name_len);
        reason_str("' has a shape whose element count overflows");
        return ST_REJECT;
    }
    t->nelem = nelem;
    return 0;
}

static int by_offsets(const void *a, const void *b) {
    const struct tensor *x = a, *y = b;
    return x->start < y->start || (x->start == y->start && x->end < y->end);
}

EXPORT("verify_safetensors") i32 verify_safetensors(u32 len, u64 file_size) {
    const u8 *input = input_begin(len);
    result_begin();
    if (!input) return reject(R_OUT_OF_MEMORY, "input does not fit the sandbox memory");
    const u8 *in = input;
    if (file_size < 8) return reject(R_TRUNCATED, "file is shorter than the 8-byte header length");
    if (len < 8) return need_more(8);
    u64 n = rd_u64(in);
    if (n > MAX_HEADER) {
        reject(R_HEADER_TOO_LARGE, "header length ");
        reason_u64(n);
        reason_str(" is over the 100000000-byte limit");
        return ST_REJECT;
    }
    if (n + 8 > file_size) {
        reject(R_HEADER_BEYOND_FILE, "header length ");
        reason_u64(n);
        reason_str(" runs past the end of the ");
        reason_u64(file_size);
        reason_str("-byte file");
        return ST_REJECT;
    }
    if (len < n + 8) return need_more(n + 8);
    u64 data_len = file_size - 8 - n;

    struct parser p = {in + 8, 0, (usize)n, 0, 0, (usize)n};
    p.scratch = bump(n + 4);
    usize cap = (usize)n / 40 + 1;
    struct tensor *ts = bump(cap * sizeof(struct tensor));
    if (!p.scratch || !ts) return reject(R_OUT_OF_MEMORY, "header too large for the sandbox memory limit");
    usize count = 0;
    int seen_meta = 0;

    if (n == 0 || in[8] != '{') return reject(R_BAD_JSON, "header does not start with '{'");
    p.i = 1;
    if (!expect(&p, '}')) {
        for (;;) {
            u32 off, klen;
            int r = parse_string(&p, &off, &klen);
            if (r < 0) return reject(R_BAD_UTF8, "header has invalid UTF-8");
            if (!r) return bad_json(&p, "expected a string key");
            if (!expect(&p, ':')) return bad_json(&p, "expected ':'");
            if (bytes_eq(p.scratch + off, klen, "__metadata__")) {
                if (seen_meta++) return reject(R_DUPLICATE, "__metadata__ given twice");
                p.scratch_used = off;
                if (parse_metadata(&p)) return ST_REJECT;
            } else {
                if (count >= cap) return reject(R_LIMIT, "too many tensors for the header size");
                struct tensor *t = &ts[count++];
                t->name_off = off;
                t->name_len = klen;
                t->hash = fnv1a(p.scratch + off, klen);
                if (parse_tensor(&p, t)) return ST_REJECT;
            }
            if (expect(&p, '}')) break;
            if (!expect(&p, ',')) return bad_json(&p, "expected ',' or '}'");
        }
    }
    ws(&p);
    if (p.i != p.n) return bad_json(&p, "bytes after the header object");

    i64 dup = find_duplicate((const u8 *)ts, count, sizeof *ts, __builtin_offsetof(struct tensor, hash),
                             __builtin_offsetof(struct tensor, name_off), p.scratch);
    if (dup == -2) return reject(R_OUT_OF_MEMORY, "too many tensors for the sandbox memory limit");
    if (dup >= 0) {
        reject(R_DUPLICATE, "tensor '");
        reason_bytes(p.scratch + ts[dup].name_off, ts[dup].name_len);
        reason_str("' is listed twice");
        return ST_REJECT;
    }
    for (usize k = 0; k < count; k++) {
        struct tensor *t = &ts[k];
        if (t->end < t->start || t->end > data_len) {
            reject(R_OUT_OF_BOUNDS, "tensor '");
            reason_bytes(p.scratch + t->name_off, t->name_len);
            reason_str("' has data_offsets [");
            reason_u64(t->start);
            reason_str(", ");
            reason_u64(t->end);
            reason_str("] outside the ");
            reason_u64(data_len);
            reason_str("-byte data section");
            return ST_REJECT;
        }
    }
    int sorted = 1; /* writers usually emit offset order: skip the sort then */
    for (usize k = 1; k < count && sorted; k++) sorted = !by_offsets(&ts[k], &ts[k - 1]);
    if (!sorted) heap_sort(ts, count, sizeof *ts, by_offsets);
    u64 pos = 0, params = 0;
    for (usize k = 0; k < count; k++) {
        struct tensor *t = &ts[k];
        const u8 *name = p.scratch + t->name_off;
        if (t->start != pos) {
            reject(t->start < pos ? R_OVERLAP : R_GAP, "tensor '");
            reason_bytes(name, t->name_len);
            reason_str(t->start < pos ? "' overlaps the previous tensor at byte " : "' leaves a gap before byte ");
            reason_u64(t->start);
            return ST_REJECT;
        }
        u64 bits, want;
        if (!mul_ok(t->nelem, DTYPES[t->dtype].bits, &bits) || bits % 8 != 0) {
            reject(R_SHAPE_MISMATCH, "tensor '");
            reason_bytes(name, t->name_len);
            reason_str("' shape does not fill whole bytes");
            return ST_REJECT;
        }
        want = bits / 8;
        if (want != t->end - t->start) {
            reject(R_SHAPE_MISMATCH, "tensor '");
            reason_bytes(name, t->name_len);
            reason_str("' shape x ");
            reason_str(DTYPES[t->dtype].name);
            reason_str(" needs ");
            reason_u64(want);
            reason_str(" bytes but its span has ");
            reason_u64(t->end - t->start);
            return ST_REJECT;
        }
        if (!add_ok(params, t->nelem, &params)) return reject(R_OVERFLOW, "parameter count overflows");
        if (!add_dtype_bytes(DTYPES[t->dtype].name, want)) return reject(R_OVERFLOW, "dtype byte count overflows");
        pos = t->end;
    }
    if (pos != data_len) {
        reject(R_TRAILING_BYTES, "data section has ");
        reason_u64(data_len - pos);
        reason_str(" bytes after the last tensor");
        return ST_REJECT;
    }
    g_result.tensor_count = count;
    g_result.param_count = params;
    return accept();
}
