/* PyTorch pickle verifier (the data.pkl member of a torch zip checkpoint).
 *
 * Strategy: walk the opcode stream with an abstract stack. Each stack slot
 * holds what kind of value it is (a string constant, an allowed global, an
 * integer, a tuple, a dict, an object built by an allowed call, ...) rather
 * than the value. Every global must be on the ALLOW-LIST below, whether it
 * comes from GLOBAL, INST or STACK_GLOBAL; STACK_GLOBAL is accepted only when
 * both operands are string constants (pushed directly or fetched from the
 * memo, which keeps the same abstract slots, so a memo cannot launder a
 * computed value into a name). REDUCE/NEWOBJ/INST/OBJ may only call allowed
 * callables; BUILD only targets objects an allowed call made; extension
 * codes and out-of-band buffers are refused. A deny-list would have to know
 * every dangerous callable; an allow-list only has to know the few a state
 * dict needs.
 *
 * Accounting: persistent ids ('storage', <type>, key, location, numel) give
 * the bytes per dtype (each storage key counted once); _rebuild_tensor_v2
 * calls give the tensor count and, from their size tuples, the parameters.
 */
#include "common.h"

#define MAX_STACK (1u << 20)
#define MAX_MARKS 65536u
#define MAX_MEMO (1u << 20)

enum { ROLE_DATA, ROLE_TENSOR, ROLE_PARAM, ROLE_ODICT, ROLE_PLAIN_CALL };

struct allowed {
    const char *module;
    const char *name;
    u8 callable;
    u8 role;
    const char *dtype; /* storage types: element dtype */
    u8 elem_size;
};

static const struct allowed ALLOW[] = {
    {"torch._utils", "_rebuild_tensor_v2", 1, ROLE_TENSOR, 0, 0},
    {"torch._utils", "_rebuild_tensor", 1, ROLE_TENSOR, 0, 0},
    {"torch._utils", "_rebuild_parameter", 1, ROLE_PARAM, 0, 0},
    {"torch._utils", "_rebuild_parameter_with_state", 1, ROLE_PARAM, 0, 0},
    {"collections", "OrderedDict", 1, ROLE_ODICT, 0, 0},
    {"torch", "Size", 1, ROLE_PLAIN_CALL, 0, 0},
    {"torch", "FloatStorage", 0, ROLE_DATA, "F32", 4},
    {"torch", "DoubleStorage", 0, ROLE_DATA, "F64", 8},
    {"torch", "HalfStorage", 0, ROLE_DATA, "F16", 2},
    {"torch", "BFloat16Storage", 0, ROLE_DATA, "BF16", 2},
    {"torch", "LongStorage", 0, ROLE_DATA, "I64", 8},
    {"torch", "IntStorage", 0, ROLE_DATA, "I32", 4},
    {"torch", "ShortStorage", 0, ROLE_DATA, "I16", 2},
    {"torch", "CharStorage", 0, ROLE_DATA, "I8", 1},
    {"torch", "ByteStorage", 0, ROLE_DATA, "U8", 1},
    {"torch", "BoolStorage", 0, ROLE_DATA, "BOOL", 1},
    {"torch", "ComplexFloatStorage", 0, ROLE_DATA, "C64", 8},
    {"torch", "ComplexDoubleStorage", 0, ROLE_DATA, "C128", 16},
    {"torch", "UntypedStorage", 0, ROLE_DATA, "U8", 1},
    {"torch", "float32", 0, ROLE_DATA, 0, 0},
    {"torch", "float16", 0, ROLE_DATA, 0, 0},
    {"torch", "bfloat16", 0, ROLE_DATA, 0, 0},
    {"torch", "float64", 0, ROLE_DATA, 0, 0},
    {"torch", "int64", 0, ROLE_DATA, 0, 0},
    {"torch", "int32", 0, ROLE_DATA, 0, 0},
    {"torch", "int16", 0, ROLE_DATA, 0, 0},
    {"torch", "int8", 0, ROLE_DATA, 0, 0},
    {"torch", "uint8", 0, ROLE_DATA, 0, 0},
    {"torch", "bool", 0, ROLE_DATA, 0, 0},
};
#define N_ALLOW (sizeof ALLOW / sizeof ALLOW[0])

enum { T_STR = 1, T_GLOBAL, T_INT, T_TUPLE, T_LIST, T_DICT, T_SET, T_OBJ, T_VAL, T_STORAGE };

/* flags */
#define F_NEG 1u          /* T_INT: negative or too big to matter */
#define F_ALLINT 2u       /* T_TUPLE: every element is a small non-negative int; num = product */
#define F_E2_INTS 4u      /* T_TUPLE: element 2 is an F_ALLINT tuple; aux = its product */
#define F_E0_STORAGE 8u   /* T_TUPLE: element 0 is a storage */
#define F_STORAGE_DESC 16u
#define F_ESCAPED 32u     /* T_STR: raw-unicode-escape text with a backslash */

struct item {
    u8 tag;
    u8 flags;
    u16 g;
    u32 sptr;
    u32 slen;
    u32 n;
    u64 num;
    u64 aux;
};

struct memo_slot {
    struct item it;
    u32 set;
    u32 pad;
};

struct vm {
    const u8 *s;
    usize i, n;
    struct item *stack;
    u32 sp, cap;
    u32 *marks;
    u32 nmarks;
    struct memo_slot *memo;
    u32 memo_cap;
    u32 memo_count;
    u32 *seen; /* open-addressed set of storage keys: item index + 1 */
    struct item *keys;
    u32 seen_cap, nkeys;
};

static i32 bad(struct vm *v, const char *what) {
    reject(R_BAD_PICKLE, "malformed pickle: ");
    reason_str(what);
    reason_str(" at byte ");
    reason_u64(v->i);
    return ST_REJECT;
}

static u32 base(struct vm *v) { return v->nmarks ? v->marks[v->nmarks - 1] : 0; }

static struct item *push(struct vm *v, u8 tag) {
    if (v->sp >= v->cap) return 0;
    struct item *it = &v->stack[v->sp++];
    mem_zero(it, sizeof *it);
    it->tag = tag;
    return it;
}

static int lookup(const u8 *mod, usize mlen, const u8 *name, usize nlen) {
    for (u32 k = 0; k < N_ALLOW; k++)
        if (bytes_eq(mod, mlen, ALLOW[k].module) && bytes_eq(name, nlen, ALLOW[k].name)) return (int)k;
    return -1;
}

static i32 forbidden_global(const u8 *mod, usize mlen, const u8 *name, usize nlen) {
    reject(R_FORBIDDEN_GLOBAL, "forbidden global ");
    reason_bytes(mod, mlen);
    reason_str(".");
    reason_bytes(name, nlen);
    reason_str(" (not on the state-dict allow-list)");
    return ST_REJECT;
}

/* Reads a '\n'-terminated argument; returns its length or -1. */
static i64 line(struct vm *v, const u8 **out) {
    usize j = v->i;
    while (j < v->n && v->s[j] != '\n') j++;
    if (j >= v->n) return -1;
    *out = v->s + v->i;
    i64 len = (i64)(j - v->i);
    v->i = j + 1;
    return len;
}

static int take(struct vm *v, usize k, const u8 **out) {
    if (v->n - v->i < k) return 0;
    *out = v->s + v->i;
    v->i += k;
    return 1;
}

/* Builds one abstract tuple from the slots at [from, sp). */
static void make_tuple(struct vm *v, u32 from) {
    u32 count = v->sp - from;
    struct item *e = &v->stack[from];
    struct item t;
    mem_zero(&t, sizeof t);
    t.tag = T_TUPLE;
    t.n = count;
    t.flags = F_ALLINT;
    t.num = 1;
    for (u32 k = 0; k < count; k++) {
        if (e[k].tag != T_INT || (e[k].flags & F_NEG) || !mul_ok(t.num, e[k].num, &t.num)) t.flags &= (u8)~F_ALLINT;
    }
    if (!(t.flags & F_ALLINT)) t.num = 0;
    if (count >= 3 && e[2].tag == T_TUPLE && (e[2].flags & F_ALLINT)) {
        t.flags |= F_E2_INTS;
        t.aux = e[2].num;
    }
    if (count >= 1 && e[0].tag == T_STORAGE) t.flags |= F_E0_STORAGE;
    if (count == 5 && e[0].tag == T_STR && bytes_eq(v->s + e[0].sptr, e[0].slen, "storage") && e[1].tag == T_GLOBAL &&
        ALLOW[e[1].g].dtype && e[2].tag == T_STR && e[4].tag == T_INT && !(e[4].flags & F_NEG)) {
        t.flags |= F_STORAGE_DESC;
        t.g = e[1].g;
        t.sptr = e[2].sptr;
        t.slen = e[2].slen;
        t.aux = e[4].num;
    }
    v->sp = from;
    v->stack[v->sp++] = t;
}

/* 1: seen before; 0: newly added; -1: the key table is full. */
static int storage_seen(struct vm *v, const struct item *d) {
    if (v->nkeys >= v->seen_cap / 2) return -1;
    u64 h = fnv1a(v->s + d->sptr, d->slen);
    u32 mask = v->seen_cap - 1;
    for (u32 probe = (u32)h & mask;; probe = (probe + 1) & mask) {
        u32 slot = v->seen[probe];
        if (!slot) {
            v->keys[v->nkeys] = *d;
            v->seen[probe] = ++v->nkeys;
            return 0;
        }
        struct item *k = &v->keys[slot - 1];
        if (span_eq(v->s + k->sptr, k->slen, v->s + d->sptr, d->slen)) return 1;
    }
}

/* An allowed call: callable slot + args tuple slot -> result slot. */
static i32 call(struct vm *v, struct item *fn, struct item *args, const char *op) {
    if (fn->tag != T_GLOBAL) {
        reject(R_FORBIDDEN_CALL, op);
        reason_str(" on a value that is not an allowed global");
        return ST_REJECT;
    }
    const struct allowed *a = &ALLOW[fn->g];
    if (!a->callable) {
        reject(R_FORBIDDEN_CALL, op);
        reason_str(" calls ");
        reason_str(a->module);
        reason_str(".");
        reason_str(a->name);
        reason_str(", which is allowed as data only");
        return ST_REJECT;
    }
    if (args->tag != T_TUPLE) return bad(v, "call arguments are not a tuple");
    u8 role = a->role;
    u16 g = fn->g;
    if (role == ROLE_TENSOR) {
        if (!(args->flags & F_E0_STORAGE) || !(args->flags & F_E2_INTS)) {
            reject(R_FORBIDDEN_CALL, "tensor rebuild without a storage and a constant size tuple");
            return ST_REJECT;
        }
        g_result.tensor_count++;
        if (!add_ok(g_result.param_count, args->aux, &g_result.param_count)) return reject(R_OVERFLOW, "parameter count overflows");
    }
    struct item *r = fn; /* result replaces the callable's slot */
    mem_zero(r, sizeof *r);
    r->tag = (role == ROLE_PLAIN_CALL) ? T_VAL : T_OBJ;
    r->g = g;
    return 0;
}

static int is_dictlike(const struct item *it) {
    return it->tag == T_DICT || (it->tag == T_OBJ && ALLOW[it->g].role == ROLE_ODICT);
}

static i32 memo_put(struct vm *v, u64 key) {
    if (v->sp == base(v)) return bad(v, "memo store from an empty stack");
    if (key >= v->memo_cap) return reject(R_LIMIT, "memo index over the limit");
    struct memo_slot *m = &v->memo[key];
    if (!m->set) v->memo_count++;
    m->set = 1;
    m->it = v->stack[v->sp - 1];
    return 0;
}

static i32 memo_get(struct vm *v, u64 key) {
    if (key >= v->memo_cap || !v->memo[key].set) return bad(v, "memo fetch of an unset index");
    struct item *it = push(v, 0);
    if (!it) return reject(R_LIMIT, "pickle stack deeper than the limit");
    *it = v->memo[key].it;
    return 0;
}

static int parse_decimal(const u8 *p, i64 len, u64 *out, int *neg) {
    i64 k = 0;
    *neg = 0;
    if (len > 0 && (p[0] == '-' || p[0] == '+')) {
        *neg = p[0] == '-';
        k = 1;
    }
    if (len > k && p[len - 1] == 'L') len--; /* protocol 0 longs */
    if (k >= len) return 0;
    u64 val = 0;
    int big = 0;
    for (; k < len; k++) {
        if (p[k] < '0' || p[k] > '9') return 0;
        if (!big && !mul10_add(&val, p[k] - '0')) big = 1;
    }
    if (big) *neg = 1; /* too big to be a dimension: treat as opaque */
    *out = val;
    return 1;
}

static i32 push_int(struct vm *v, u64 val, int neg) {
    struct item *it = push(v, T_INT);
    if (!it) return reject(R_LIMIT, "pickle stack deeper than the limit");
    it->num = neg ? 0 : val;
    if (neg) it->flags |= F_NEG;
    return 0;
}

static i32 push_str(struct vm *v, const u8 *p, usize len, u8 tag) {
    struct item *it = push(v, tag);
    if (!it) return reject(R_LIMIT, "pickle stack deeper than the limit");
    it->sptr = (u32)(p - v->s);
    it->slen = (u32)len;
    return 0;
}

#define NEED_ITEMS(k)                                                     \
    do {                                                                  \
        if (v->sp < base(v) + (k)) return bad(v, "stack underflow");      \
    } while (0)

static i32 step(struct vm *v, u8 op, int *stop) {
    const u8 *p;
    i64 len;
    u64 val, key;
    int neg;
    switch (op) {
    case 0x80: /* PROTO */
        if (!take(v, 1, &p)) return bad(v, "truncated PROTO");
        if (p[0] > 5) return reject(R_BAD_VERSION, "pickle protocol above 5");
        return 0;
    case 0x95: /* FRAME */
        if (!take(v, 8, &p)) return bad(v, "truncated FRAME");
        if (rd_u64(p) > v->n - v->i) return bad(v, "frame longer than the data");
        return 0;
    case '.': /* STOP */
        if (v->nmarks || v->sp != 1) return bad(v, "STOP with a stack that is not one value");
        *stop = 1;
        return 0;
    case '(': /* MARK */
        if (v->nmarks >= MAX_MARKS) return reject(R_LIMIT, "too many nested marks");
        v->marks[v->nmarks++] = v->sp;
        return 0;
    case '0': /* POP */
        if (v->sp > base(v)) v->sp--;
        else if (v->nmarks) v->nmarks--;
        else return bad(v, "stack underflow");
        return 0;
    case '1': /* POP_MARK */
        if (!v->nmarks) return bad(v, "POP_MARK without a mark");
        v->sp = v->marks[--v->nmarks];
        return 0;
    case '2': /* DUP */
        NEED_ITEMS(1);
        if (!push(v, 0)) return reject(R_LIMIT, "pickle stack deeper than the limit");
        v->stack[v->sp - 1] = v->stack[v->sp - 2];
        return 0;
    case 'N': /* NONE */
    case 0x88: /* NEWTRUE */
    case 0x89: /* NEWFALSE */
        return push(v, T_VAL) ? 0 : reject(R_LIMIT, "pickle stack deeper than the limit");
    case 'I': /* INT (text) */
        if ((len = line(v, &p)) < 0) return bad(v, "unterminated INT");
        if (len == 2 && p[0] == '0' && (p[1] == '0' || p[1] == '1')) return push(v, T_VAL) ? 0 : reject(R_LIMIT, "stack");
        if (!parse_decimal(p, len, &val, &neg)) return bad(v, "bad INT");
        return push_int(v, val, neg);
    case 'L': /* LONG (text) */
        if ((len = line(v, &p)) < 0) return bad(v, "unterminated LONG");
        if (!parse_decimal(p, len, &val, &neg)) return bad(v, "bad LONG");
        return push_int(v, val, neg);
    case 'J': /* BININT */
        if (!take(v, 4, &p)) return bad(v, "truncated BININT");
        val = rd_u32(p);
        return push_int(v, val, (val >> 31) != 0);
    case 'K': /* BININT1 */
        if (!take(v, 1, &p)) return bad(v, "truncated BININT1");
        return push_int(v, p[0], 0);
    case 'M': /* BININT2 */
        if (!take(v, 2, &p)) return bad(v, "truncated BININT2");
        return push_int(v, rd_u16(p), 0);
    case 0x8a: /* LONG1 */
    case 0x8b: /* LONG4 */
        if (op == 0x8a) {
            if (!take(v, 1, &p)) return bad(v, "truncated LONG1");
            len = p[0];
        } else {
            if (!take(v, 4, &p)) return bad(v, "truncated LONG4");
            len = (i64)rd_u32(p);
            if (len < 0 || (rd_u32(p) >> 31)) return bad(v, "negative LONG4 length");
        }
        if (!take(v, (usize)len, &p)) return bad(v, "truncated LONG");
        val = 0;
        neg = len > 8 || (len > 0 && (p[len - 1] & 0x80));
        for (i64 k = 0; k < len && k < 8; k++) val |= (u64)p[k] << (8 * k);
        return push_int(v, val, neg);
    case 'F': /* FLOAT (text) */
        if (line(v, &p) < 0) return bad(v, "unterminated FLOAT");
        return push(v, T_VAL) ? 0 : reject(R_LIMIT, "stack");
    case 'G': /* BINFLOAT */
        if (!take(v, 8, &p)) return bad(v, "truncated BINFLOAT");
        return push(v, T_VAL) ? 0 : reject(R_LIMIT, "stack");
    case 'S': /* STRING (quoted, text) */
        if ((len = line(v, &p)) < 2 || (p[0] != '\'' && p[0] != '"') || p[len - 1] != p[0])
            return bad(v, "bad STRING");
        return push(v, T_VAL) ? 0 : reject(R_LIMIT, "stack");
    case 'V': { /* UNICODE (raw-unicode-escape, text) */
        if ((len = line(v, &p)) < 0) return bad(v, "unterminated UNICODE");
        if (push_str(v, p, (usize)len, T_STR)) return ST_REJECT;
        for (i64 k = 0; k < len; k++)
            if (p[k] == '\\') v->stack[v->sp - 1].flags |= F_ESCAPED;
        return 0;
    }
    case 'T': /* BINSTRING */
    case 'B': /* BINBYTES */
    case 'X': /* BINUNICODE */
        if (!take(v, 4, &p)) return bad(v, "truncated length");
        val = rd_u32(p);
        if (op == 'T' && (val >> 31)) return bad(v, "negative BINSTRING length");
        if (!take(v, (usize)val, &p)) return bad(v, "string longer than the data");
        return push_str(v, p, (usize)val, op == 'X' ? T_STR : T_VAL);
    case 'U': /* SHORT_BINSTRING */
    case 'C': /* SHORT_BINBYTES */
    case 0x8c: /* SHORT_BINUNICODE */
        if (!take(v, 1, &p)) return bad(v, "truncated length");
        val = p[0];
        if (!take(v, (usize)val, &p)) return bad(v, "string longer than the data");
        return push_str(v, p, (usize)val, op == 0x8c ? T_STR : T_VAL);
    case 0x8d: /* BINUNICODE8 */
    case 0x8e: /* BINBYTES8 */
    case 0x96: /* BYTEARRAY8 */
        if (!take(v, 8, &p)) return bad(v, "truncated length");
        val = rd_u64(p);
        if (val > v->n - v->i) return bad(v, "string longer than the data");
        take(v, (usize)val, &p);
        return push_str(v, p, (usize)val, op == 0x8d ? T_STR : T_VAL);
    case ')': /* EMPTY_TUPLE */
        if (v->sp >= v->cap) return reject(R_LIMIT, "pickle stack deeper than the limit");
        make_tuple(v, v->sp);
        return 0;
    case 0x85: /* TUPLE1 */
    case 0x86: /* TUPLE2 */
    case 0x87: /* TUPLE3 */
        NEED_ITEMS((u32)(op - 0x84));
        make_tuple(v, v->sp - (u32)(op - 0x84));
        return 0;
    case 't': /* TUPLE */
    case 'l': /* LIST */
    case 'd': /* DICT */
    case 0x91: { /* FROZENSET */
        if (!v->nmarks) return bad(v, "collection without a mark");
        u32 from = v->marks[--v->nmarks];
        if (op == 't') {
            make_tuple(v, from);
            return 0;
        }
        if (op == 'd' && (v->sp - from) % 2) return bad(v, "DICT with an odd number of items");
        v->sp = from;
        push(v, op == 'l' ? T_LIST : op == 'd' ? T_DICT : T_VAL);
        return 0;
    }
    case ']': return push(v, T_LIST) ? 0 : reject(R_LIMIT, "stack");
    case '}': return push(v, T_DICT) ? 0 : reject(R_LIMIT, "stack");
    case 0x8f: return push(v, T_SET) ? 0 : reject(R_LIMIT, "stack");
    case 'a': /* APPEND */
        NEED_ITEMS(2);
        if (v->stack[v->sp - 2].tag != T_LIST) return reject(R_FORBIDDEN_CALL, "APPEND to something that is not a list");
        v->sp--;
        return 0;
    case 'e': /* APPENDS */
    case 0x90: /* ADDITEMS */
    case 'u': { /* SETITEMS */
        if (!v->nmarks) return bad(v, "APPENDS/SETITEMS/ADDITEMS without a mark");
        u32 from = v->marks[--v->nmarks];
        if (from == base(v) || from == 0) return bad(v, "no target below the mark");
        struct item *target = &v->stack[from - 1];
        if (op == 'e' && target->tag != T_LIST) return reject(R_FORBIDDEN_CALL, "APPENDS to something that is not a list");
        if (op == 0x90 && target->tag != T_SET) return reject(R_FORBIDDEN_CALL, "ADDITEMS to something that is not a set");
        if (op == 'u') {
            if (!is_dictlike(target)) return reject(R_FORBIDDEN_CALL, "SETITEMS on something that is not a dict");
            if ((v->sp - from) % 2) return bad(v, "SETITEMS with an odd number of items");
        }
        v->sp = from;
        return 0;
    }
    case 's': /* SETITEM */
        NEED_ITEMS(3);
        if (!is_dictlike(&v->stack[v->sp - 3])) return reject(R_FORBIDDEN_CALL, "SETITEM on something that is not a dict");
        v->sp -= 2;
        return 0;
    case 'c': { /* GLOBAL */
        const u8 *mod, *name;
        i64 mlen = line(v, &mod), nlen;
        if (mlen < 0 || (nlen = line(v, &name)) < 0) return bad(v, "unterminated GLOBAL");
        int k = lookup(mod, (usize)mlen, name, (usize)nlen);
        if (k < 0) return forbidden_global(mod, (usize)mlen, name, (usize)nlen);
        struct item *it = push(v, T_GLOBAL);
        if (!it) return reject(R_LIMIT, "stack");
        it->g = (u16)k;
        return 0;
    }
    case 0x93: { /* STACK_GLOBAL */
        NEED_ITEMS(2);
        struct item *m = &v->stack[v->sp - 2], *nm = &v->stack[v->sp - 1];
        if (m->tag != T_STR || nm->tag != T_STR || (m->flags & F_ESCAPED) || (nm->flags & F_ESCAPED))
            return reject(R_COMPUTED_GLOBAL, "STACK_GLOBAL with operands that are not string constants");
        int k = lookup(v->s + m->sptr, m->slen, v->s + nm->sptr, nm->slen);
        if (k < 0) return forbidden_global(v->s + m->sptr, m->slen, v->s + nm->sptr, nm->slen);
        v->sp -= 2;
        struct item *it = push(v, T_GLOBAL);
        it->g = (u16)k;
        return 0;
    }
    case 'R': /* REDUCE */
        NEED_ITEMS(2);
        if (call(v, &v->stack[v->sp - 2], &v->stack[v->sp - 1], "REDUCE")) return ST_REJECT;
        v->sp--;
        return 0;
    case 0x81: /* NEWOBJ */
        NEED_ITEMS(2);
        if (call(v, &v->stack[v->sp - 2], &v->stack[v->sp - 1], "NEWOBJ")) return ST_REJECT;
        v->sp--;
        return 0;
    case 'i': { /* INST module\nname\n, args from the mark */
        const u8 *mod, *name;
        i64 mlen = line(v, &mod), nlen;
        if (mlen < 0 || (nlen = line(v, &name)) < 0) return bad(v, "unterminated INST");
        int k = lookup(mod, (usize)mlen, name, (usize)nlen);
        if (k < 0) return forbidden_global(mod, (usize)mlen, name, (usize)nlen);
        if (!v->nmarks) return bad(v, "INST without a mark");
        u32 from = v->marks[--v->nmarks];
        make_tuple(v, from);
        struct item args = v->stack[v->sp - 1], fn;
        mem_zero(&fn, sizeof fn);
        fn.tag = T_GLOBAL;
        fn.g = (u16)k;
        if (call(v, &fn, &args, "INST")) return ST_REJECT;
        v->stack[v->sp - 1] = fn;
        return 0;
    }
    case 'o': { /* OBJ: mark, callable, args... */
        if (!v->nmarks) return bad(v, "OBJ without a mark");
        u32 from = v->marks[--v->nmarks];
        if (v->sp < from + 1) return bad(v, "OBJ without a class");
        struct item fn = v->stack[from];
        for (u32 k = from; k + 1 < v->sp; k++) v->stack[k] = v->stack[k + 1];
        v->sp--;
        make_tuple(v, from);
        struct item args = v->stack[v->sp - 1];
        if (call(v, &fn, &args, "OBJ")) return ST_REJECT;
        v->stack[v->sp - 1] = fn;
        return 0;
    }
    case 'b': /* BUILD */
        NEED_ITEMS(2);
        if (v->stack[v->sp - 2].tag != T_OBJ)
            return reject(R_FORBIDDEN_CALL, "BUILD on something an allowed call did not make");
        v->sp--;
        return 0;
    case 'Q': { /* BINPERSID */
        NEED_ITEMS(1);
        struct item *d = &v->stack[v->sp - 1];
        if (d->tag != T_TUPLE || !(d->flags & F_STORAGE_DESC))
            return reject(R_FORBIDDEN_CALL, "persistent id is not a ('storage', type, key, location, numel) tuple");
        const struct allowed *a = &ALLOW[d->g];
        int seen = storage_seen(v, d);
        if (seen < 0) return reject(R_LIMIT, "too many storages");
        if (!seen) {
            u64 bytes;
            if (!mul_ok(d->aux, a->elem_size, &bytes) || !add_dtype_bytes(a->dtype, bytes))
                return reject(R_OVERFLOW, "storage size overflows");
        }
        u16 g = d->g;
        mem_zero(d, sizeof *d);
        d->tag = T_STORAGE;
        d->g = g;
        return 0;
    }
    case 'p': /* PUT */
        if ((len = line(v, &p)) < 0 || !parse_decimal(p, len, &key, &neg) || neg) return bad(v, "bad PUT");
        return memo_put(v, key);
    case 'q': /* BINPUT */
        if (!take(v, 1, &p)) return bad(v, "truncated BINPUT");
        return memo_put(v, p[0]);
    case 'r': /* LONG_BINPUT */
        if (!take(v, 4, &p)) return bad(v, "truncated LONG_BINPUT");
        return memo_put(v, rd_u32(p));
    case 0x94: /* MEMOIZE */
        return memo_put(v, v->memo_count);
    case 'g': /* GET */
        if ((len = line(v, &p)) < 0 || !parse_decimal(p, len, &key, &neg) || neg) return bad(v, "bad GET");
        return memo_get(v, key);
    case 'h': /* BINGET */
        if (!take(v, 1, &p)) return bad(v, "truncated BINGET");
        return memo_get(v, p[0]);
    case 'j': /* LONG_BINGET */
        if (!take(v, 4, &p)) return bad(v, "truncated LONG_BINGET");
        return memo_get(v, rd_u32(p));
    case 'P': /* PERSID (text) */
    case 0x82: /* EXT1 */
    case 0x83: /* EXT2 */
    case 0x84: /* EXT4 */
    case 0x92: /* NEWOBJ_EX */
    case 0x97: /* NEXT_BUFFER */
    case 0x98: /* READONLY_BUFFER */
        reject(R_FORBIDDEN_OPCODE, "forbidden pickle opcode 0x");
        {
            const char *hex = "0123456789abcdef";
            char h[3] = {hex[op >> 4], hex[op & 15], 0};
            reason_str(h);
        }
        return ST_REJECT;
    default:
        reject(R_BAD_PICKLE, "unknown pickle opcode at byte ");
        reason_u64(v->i - 1);
        return ST_REJECT;
    }
}

EXPORT("verify_pickle") i32 verify_pickle(u32 len, u64 file_size) {
    const u8 *input = input_begin(len);
    result_begin();
    if (!input) return reject(R_OUT_OF_MEMORY, "input does not fit the sandbox memory");
    if (len != file_size) return need_more(file_size);
    struct vm v;
    mem_zero(&v, sizeof v);
    v.s = input;
    v.n = len;
    u32 stack_cap = len + 1 < MAX_STACK ? len + 1 : MAX_STACK;
    v.memo_cap = len + 1 < MAX_MEMO ? len + 1 : MAX_MEMO;
    v.seen_cap = 16;
    while (v.seen_cap < len / 8 + 16) v.seen_cap <<= 1;
    v.stack = bump(stack_cap * sizeof(struct item));
    v.marks = bump(MAX_MARKS * sizeof(u32));
    v.memo = bump(v.memo_cap * sizeof(struct memo_slot));
    v.seen = bump(v.seen_cap * sizeof(u32));
    v.keys = bump(v.seen_cap / 2 * sizeof(struct item));
    v.cap = stack_cap;
    if (!v.stack || !v.marks || !v.memo || !v.seen || !v.keys)
        return reject(R_OUT_OF_MEMORY, "pickle too large for the sandbox memory limit");
    mem_zero(v.memo, v.memo_cap * sizeof(struct memo_slot));
    mem_zero(v.seen, v.seen_cap * sizeof(u32));
    int stop = 0;
    while (!stop) {
        if (v.i >= v.n) return bad(&v, "no STOP opcode");
        u8 op = v.s[v.i++];
        if (step(&v, op, &stop)) return ST_REJECT;
    }
    if (v.i != v.n) {
        reject(R_TRAILING_BYTES, "pickle has ");
        reason_u64(v.n - v.i);
        reason_str(" bytes after STOP");
        return ST_REJECT;
    }
    return accept();
}
