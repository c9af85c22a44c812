/* pairpack._native: the four hot loops of pairpack, in C.
 *
 *   take      locate a batch's pairs and bounds-check every segment (twin: read/dataset.py, Dataset.take)
 *   assemble  write a batch's int64 rows and masks in one pass, GIL released (twin: batch/triplets.py)
 *   layout    write a batch in the packed or prefix_shared layout in one pass (twin: batch/layouts.py)
 *   scan_ids  a strict JSONL reader for pre-tokenized records that hands any line it is not sure of
 *             to the exact Python path (twin: ingest/blocks.py)
 *
 * Optional: pairpack works without it (each kernel's twin gives the same bytes; tests/test_native.py
 * compares them). Every segment is bounds-checked against its token buffer before anything is
 * written: never an out-of-bounds read, whatever the index arrays say.
 *
 * Uses only the buffer protocol: no numpy C API, so it builds against any numpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)(p))
#endif

/* Buffers of a tuple's items, acquired on first use (a batch touches few of many shards). */
typedef struct {
    PyObject *seq;
    Py_buffer *views;
    Py_ssize_t count;
} Lazy;

static int lazy_init(Lazy *lz, PyObject *seq, const char *name) {
    lz->seq = seq;
    lz->views = NULL;
    lz->count = 0;
    if (!PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple", name);
        return -1;
    }
    lz->count = PyTuple_GET_SIZE(seq);
    lz->views = PyMem_Calloc((size_t)(lz->count ? lz->count : 1), sizeof(Py_buffer));
    if (lz->views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static Py_buffer *lazy_get(Lazy *lz, Py_ssize_t k) {
    Py_buffer *v = &lz->views[k];
    if (v->obj == NULL && PyObject_GetBuffer(PyTuple_GET_ITEM(lz->seq, k), v, PyBUF_C_CONTIGUOUS) < 0) {
        v->obj = NULL;
        return NULL;
    }
    return v;
}

static void lazy_release(Lazy *lz) {
    if (lz->views)
        for (Py_ssize_t k = 0; k < lz->count; k++)
            if (lz->views[k].obj) PyBuffer_Release(&lz->views[k]);
    PyMem_Free(lz->views);
    lz->views = NULL;
}

/* Borrow a C-contiguous buffer of exactly `bytes` bytes (any multiple of 8 when bytes < 0) whose
 * items are `itemsize` bytes wide, writable when asked. On failure nothing is held and view->obj
 * is NULL. */
static int get_exact(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, Py_ssize_t itemsize, int writable,
                     const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: items of %zd bytes, expected %zd", name, view->itemsize, itemsize);
    } else if (bytes < 0 ? view->len % 8 != 0 : view->len != bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, view->len, bytes);
    } else {
        return 0;
    }
    PyBuffer_Release(view);
    view->obj = NULL;
    return -1;
}

#define WIDEN(NAME, T)                                                                         \
    static inline void NAME(int64_t *dst, const void *src, int64_t start, int64_t len) {      \
        const T *s = (const T *)src + start;                                                   \
        for (int64_t j = 0; j < len; j++) dst[j] = (int64_t)s[j];                              \
    }
WIDEN(widen_u16, uint16_t)
WIDEN(widen_u32, uint32_t)

/* Padding is most of a batch's bytes. Fast-string stores (memset's, `rep stosq`) write a freshly
 * allocated output without first reading its cache lines, which a store loop does. */
static inline void fill64(int64_t *dst, int64_t value, int64_t len) {
    if (len <= 0) return;
    if (value == 0) {
        memset(dst, 0, (size_t)len * 8);
        return;
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (len >= 64) {
        __asm__ volatile("rep stosq" : "+D"(dst), "+c"(len) : "a"(value) : "memory");
        return;
    }
#endif
    for (int64_t j = 0; j < len; j++) dst[j] = value;
}

/* The coordinates both batch writers (assemble, layout) take: B pairs, each with a shard, a
 * prompt segment and two completion segments. Parsed and released in one place; coords_check
 * bounds-checks one pair before anything is written. */
typedef struct {
    Lazy sh;
    Py_buffer ps, pl, cs, cl, sof;
    Py_ssize_t B, nshards, itemsize;
    const int64_t *P0, *PL, *C0, *CL, *SOF;
} Coords;

static int coords_init(Coords *k, PyObject *shard_seq, PyObject *shard_of_obj, PyObject *ps_obj, PyObject *pl_obj,
                       PyObject *cs_obj, PyObject *cl_obj) {
    memset(k, 0, sizeof(*k));
    if (!PyTuple_Check(shard_seq) || PyTuple_GET_SIZE(shard_seq) < 1) {
        PyErr_SetString(PyExc_TypeError, "shards must be a non-empty tuple of token buffers");
        return -1;
    }
    k->nshards = PyTuple_GET_SIZE(shard_seq);
    /* only the shards the batch uses are acquired (a dataset may have hundreds) */
    if (lazy_init(&k->sh, shard_seq, "shards") < 0) return -1;
    /* B comes from prompt_start's size; every other buffer is checked against it */
    if (get_exact(ps_obj, &k->ps, -1, 8, 0, "prompt_start") < 0) return -1;
    Py_ssize_t B = k->B = k->ps.len / 8;
    if (get_exact(pl_obj, &k->pl, 8 * B, 8, 0, "prompt_len") < 0) return -1;
    if (get_exact(cs_obj, &k->cs, 16 * B, 8, 0, "completion_start") < 0) return -1;
    if (get_exact(cl_obj, &k->cl, 16 * B, 8, 0, "completion_len") < 0) return -1;
    if (shard_of_obj != Py_None) {
        if (get_exact(shard_of_obj, &k->sof, 8 * B, 8, 0, "shard_of") < 0) return -1;
        k->SOF = k->sof.buf;
    } else if (k->nshards != 1) {
        PyErr_SetString(PyExc_ValueError, "shard_of is required with more than one shard");
        return -1;
    }
    k->P0 = k->ps.buf;
    k->PL = k->pl.buf;
    k->C0 = k->cs.buf;
    k->CL = k->cl.buf;
    return 0;
}

/* Pair i: its shard in range and of the batch's item width, its three segments inside it. */
static int coords_check(Coords *k, Py_ssize_t i) {
    int64_t s = k->SOF ? k->SOF[i] : 0;
    if (s < 0 || s >= k->nshards) {
        PyErr_Format(PyExc_ValueError, "pair %zd: shard %lld out of range", i, (long long)s);
        return -1;
    }
    Py_buffer *v = lazy_get(&k->sh, s);
    if (v == NULL) return -1;
    if ((v->itemsize != 2 && v->itemsize != 4) || (k->itemsize && v->itemsize != k->itemsize)) {
        PyErr_Format(PyExc_ValueError, "shards[%lld]: itemsize %zd (all shards must be uint16 or all uint32)",
                     (long long)s, v->itemsize);
        return -1;
    }
    k->itemsize = v->itemsize;
    int64_t len = v->len / v->itemsize, B = k->B;
    int64_t segs[3][2] = {{k->P0[i], k->PL[i]}, {k->C0[i], k->CL[i]}, {k->C0[B + i], k->CL[B + i]}};
    for (int g = 0; g < 3; g++) {
        int64_t a = segs[g][0], l = segs[g][1];
        if (a < 0 || l < 0 || a > len || l > len - a) {
            PyErr_Format(PyExc_ValueError, "pair %zd: segment %d [%lld, +%lld) outside shard of %lld tokens", i, g,
                         (long long)a, (long long)l, (long long)len);
            return -1;
        }
    }
    return 0;
}

/* The token buffer of pair i (after coords_check). */
static inline const char *coords_src(const Coords *k, Py_ssize_t i) {
    return k->sh.views[k->SOF ? k->SOF[i] : 0].buf;
}

/* Ask early for pair i's segments in `mask` (bit 0 prompt, 1 chosen, 2 rejected): they start at
 * random places in the shard. */
static inline void coords_prefetch(const Coords *k, Py_ssize_t i, int mask) {
    const char *src = coords_src(k, i);
    Py_ssize_t w = k->itemsize, B = k->B;
    int64_t a[3] = {k->P0[i], k->C0[i], k->C0[B + i]}, l[3] = {k->PL[i], k->CL[i], k->CL[B + i]};
    for (int g = 0; g < 3; g++)
        if (mask & (1 << g))
            for (int64_t q = 0; q < l[g] * w; q += 64) PREFETCH(src + a[g] * w + q);
}

static void coords_release(Coords *k) {
    lazy_release(&k->sh);
    Py_buffer *v[5] = {&k->ps, &k->pl, &k->cs, &k->cl, &k->sof};
    for (int j = 0; j < 5; j++)
        if (v[j]->obj) PyBuffer_Release(v[j]);
}

PyDoc_STRVAR(assemble_doc,
"assemble(shards, shard_of, prompt_start, prompt_len, completion_start, completion_len, n, pad_id, out, masks)\n"
"\n"
"Write the padded int64 rows and the three masks of a batch of B pairs.\n"
"\n"
"shards: tuple of 1-D C-contiguous token buffers, all uint16 or all uint32 (itemsize 2 or 4).\n"
"shard_of: int64 (B,) index into shards per pair, or None when there is one shard.\n"
"prompt_start, prompt_len: int64 (B,); completion_start, completion_len: int64 (2, B) (chosen, rejected).\n"
"n: padded row length; pad_id: value written after each row's tokens.\n"
"out: writable int64 (2, B, n): row [s, i] = prompt ++ completion s ++ pad.\n"
"masks: writable 1-byte (3, B, n) or None: [0] j < P, [1] j < P + C, [2] j < P + R.\n"
"Raises ValueError (nothing written) if a segment lies outside its buffer or P + C > n.");

static PyObject *native_assemble(PyObject *self, PyObject *args) {
    PyObject *shard_seq, *shard_of_obj, *ps_obj, *pl_obj, *cs_obj, *cl_obj, *out_obj, *masks_obj;
    Py_ssize_t n;
    long long pad;
    if (!PyArg_ParseTuple(args, "OOOOOOnLOO", &shard_seq, &shard_of_obj, &ps_obj, &pl_obj, &cs_obj, &cl_obj, &n,
                          &pad, &out_obj, &masks_obj))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    Coords k;
    Py_buffer out = {0}, masks = {0};
    int have_masks = 0, ok = 0;
    if (coords_init(&k, shard_seq, shard_of_obj, ps_obj, pl_obj, cs_obj, cl_obj) < 0) goto done;
    Py_ssize_t B = k.B;
    if (n > 0 && B > PY_SSIZE_T_MAX / 16 / n) {
        PyErr_SetString(PyExc_OverflowError, "batch too large");
        goto done;
    }
    if (get_exact(out_obj, &out, 16 * B * n, 8, 1, "out") < 0) goto done;
    if (masks_obj != Py_None) {
        if (get_exact(masks_obj, &masks, 3 * B * n, 1, 1, "masks") < 0) goto done;
        have_masks = 1;
    }
    const int64_t *P0 = k.P0, *PL = k.PL, *C0 = k.C0, *CL = k.CL;
    /* every coordinate checked before any byte is written */
    for (Py_ssize_t i = 0; i < B; i++) {
        if (coords_check(&k, i) < 0) goto done;
        if (PL[i] > n - CL[i] || PL[i] > n - CL[B + i]) {
            PyErr_Format(PyExc_ValueError, "pair %zd: row longer than n = %zd", i, n);
            goto done;
        }
    }

    Py_BEGIN_ALLOW_THREADS
    int64_t *o = out.buf;
    for (int s = 0; s < 2; s++) {
        for (Py_ssize_t i = 0; i < B; i++) {
            const void *src = coords_src(&k, i);
            int64_t *row = o + ((int64_t)s * B + i) * n;
            if (i + 1 < B) coords_prefetch(&k, i + 1, s == 0 ? 3 : 4); /* the prompt is read with chosen */
            int64_t p = PL[i], c = CL[s * B + i];
            if (k.itemsize == 2) {
                widen_u16(row, src, P0[i], p);
                widen_u16(row + p, src, C0[s * B + i], c);
            } else {
                widen_u32(row, src, P0[i], p);
                widen_u32(row + p, src, C0[s * B + i], c);
            }
            fill64(row + p + c, (int64_t)pad, n - p - c);
        }
    }
    if (have_masks) {
        uint8_t *m = masks.buf;
        for (Py_ssize_t i = 0; i < B; i++) {
            int64_t ends[3] = {PL[i], PL[i] + CL[i], PL[i] + CL[B + i]};
            for (int g = 0; g < 3; g++) {
                uint8_t *r = m + ((int64_t)g * B + i) * n;
                memset(r, 1, (size_t)ends[g]);
                memset(r + ends[g], 0, (size_t)(n - ends[g]));
            }
        }
    }
    Py_END_ALLOW_THREADS
    ok = 1;

done:
    coords_release(&k);
    if (out.obj) PyBuffer_Release(&out);
    if (masks.obj) PyBuffer_Release(&masks);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}


/* The layout kernel's per-token stores, each on its own restrict pointers so the compiler
 * vectorises them (one int64 output could otherwise alias another). */
static inline void iota64(int64_t *restrict d, int64_t v0, int64_t n) {
    for (int64_t j = 0; j < n; j++) d[j] = v0 + j;
}
static inline void fill32(int32_t *restrict d, int32_t v, int64_t n) {
    for (int64_t j = 0; j < n; j++) d[j] = v;
}

PyDoc_STRVAR(layout_doc,
"layout(shards, shard_of, prompt_start, prompt_len, completion_start, completion_len, rows, shared, pad_id, outs)\n"
"    -> int\n"
"\n"
"Write a batch of B pairs in the packed (shared = 0) or prefix_shared (shared = 1) layout (twin:\n"
"batch/layouts.py, build). Inputs as for assemble; rows: int64 (R + 1,) pair boundaries of the rows\n"
"(0 = rows[0] <= ... <= rows[R] = B). outs: tuple of 9 writable C-contiguous buffers, in order:\n"
"input_ids int64 (R, T), position_ids int64 (R, T), sequence_ids int32 (R, T), token_part int8 (R, T),\n"
"attention_mask 1-byte (R, T), cu_seqlens int32 (S + 1,), sequence_pair int64 (S,), sequence_side\n"
"int8 (S,), completion_span int64 (S, 2); S = B (shared) or 2 B, T from input_ids' size. (The\n"
"scoring map is derived from these on the batch's device: PackedBatch.score_map.)\n"
"Returns the longest sequence (max_seqlen). Raises ValueError (nothing written) if a segment lies\n"
"outside its buffer, the rows are not boundaries of the B pairs, a row is longer than T, or a buffer\n"
"has the wrong size.");

#define LAYOUT_OUTS 9

/* A pair's segments in each layout, by part (0 prompt, 1 chosen, 2 rejected), -1 ends:
 * [0] packed: [prompt][chosen] [prompt][rejected]; [1] prefix_shared: [prompt][chosen][rejected]. */
static const int8_t LAYOUT_SEGS[2][4] = {{0, 1, 0, 2}, {0, 1, 2, -1}};

static PyObject *native_layout(PyObject *self, PyObject *args) {
    PyObject *shard_seq, *shard_of_obj, *ps_obj, *pl_obj, *cs_obj, *cl_obj, *rows_obj, *outs_obj;
    int shared;
    long long pad;
    if (!PyArg_ParseTuple(args, "OOOOOOOpLO", &shard_seq, &shard_of_obj, &ps_obj, &pl_obj, &cs_obj, &cl_obj,
                          &rows_obj, &shared, &pad, &outs_obj))
        return NULL;
    if (!PyTuple_Check(outs_obj) || PyTuple_GET_SIZE(outs_obj) != LAYOUT_OUTS) {
        PyErr_SetString(PyExc_TypeError, "outs must be a tuple of 9 buffers");
        return NULL;
    }
    Coords k;
    Py_buffer rw = {0};
    Py_buffer o[LAYOUT_OUTS];
    memset(o, 0, sizeof(o));
    int ok = 0;
    long long longest = 0;
    if (coords_init(&k, shard_seq, shard_of_obj, ps_obj, pl_obj, cs_obj, cl_obj) < 0) goto done;
    Py_ssize_t B = k.B;
    if (get_exact(rows_obj, &rw, -1, 8, 0, "rows") < 0) goto done;
    Py_ssize_t R = rw.len / 8 - 1;
    const int64_t *P0 = k.P0, *PL = k.PL, *C0 = k.C0, *CL = k.CL, *RW = rw.buf;
    if (R < 0 || RW[0] != 0 || RW[R] != B) {
        PyErr_SetString(PyExc_ValueError, "rows must run from 0 to the pair count");
        goto done;
    }
    for (Py_ssize_t r = 0; r < R; r++)
        if (RW[r + 1] < RW[r]) {
            PyErr_Format(PyExc_ValueError, "rows decrease at row %zd", r);
            goto done;
        }
    /* every coordinate checked, and every sum formed, before any byte is written */
    int64_t longest_row = 0;
    for (Py_ssize_t r = 0; r < R; r++) {
        int64_t row = 0;
        for (int64_t i = RW[r]; i < RW[r + 1]; i++) {
            if (coords_check(&k, i) < 0) goto done;
            /* each length is below 2^62 (inside a buffer), so these sums cannot overflow */
            int64_t p = PL[i], c = CL[i], q = CL[B + i];
            int64_t need = shared ? p + c + q : 2 * p + c + q;
            int64_t seq = shared ? p + c + q : (c > q ? p + c : p + q);
            if (seq > longest) longest = seq;
            if (need > INT64_MAX / 4 - row) {
                PyErr_SetString(PyExc_OverflowError, "batch too large");
                goto done;
            }
            row += need;
        }
        if (row > longest_row) longest_row = row;
    }
    static const char *names[LAYOUT_OUTS] = {"input_ids", "position_ids", "sequence_ids", "token_part",
                                             "attention_mask", "cu_seqlens", "sequence_pair", "sequence_side",
                                             "completion_span"};
    /* T comes from input_ids' size; every other output is checked against it, N and S */
    if (get_exact(PyTuple_GET_ITEM(outs_obj, 0), &o[0], -1, 8, 1, names[0]) < 0) goto done;
    if (R == 0 ? o[0].len != 0 : (o[0].len / 8) % R != 0) {
        PyErr_SetString(PyExc_ValueError, "input_ids: size is not a multiple of the row count");
        goto done;
    }
    int64_t T = R ? (int64_t)(o[0].len / 8 / R) : 0, RT = (int64_t)R * T;
    if (longest_row > T) {
        PyErr_Format(PyExc_ValueError, "a row of %lld tokens is longer than T = %lld", (long long)longest_row,
                     (long long)T);
        goto done;
    }
    Py_ssize_t S = shared ? B : 2 * B;
    Py_ssize_t sizes[LAYOUT_OUTS] = {8 * RT, 8 * RT, 4 * RT, RT, RT, 4 * (S + 1), 8 * S, S, 16 * S};
    Py_ssize_t items[LAYOUT_OUTS] = {8, 8, 4, 1, 1, 4, 8, 1, 8};
    for (int j = 1; j < LAYOUT_OUTS; j++)
        if (get_exact(PyTuple_GET_ITEM(outs_obj, j), &o[j], sizes[j], items[j], 1, names[j]) < 0) goto done;

    Py_BEGIN_ALLOW_THREADS
    int64_t *ids = o[0].buf, *pos = o[1].buf;
    int32_t *sq = o[2].buf, *cu = o[5].buf;
    int8_t *part = o[3].buf, *qside = o[7].buf;
    uint8_t *am = o[4].buf;
    int64_t *qpair = o[6].buf, *span = o[8].buf;
    int64_t cum = 0; /* cumulative sequence length */
    cu[0] = 0;
    for (Py_ssize_t r = 0; r < R; r++) {
        int64_t base = (int64_t)r * T, col = 0;
        for (int64_t i = RW[r]; i < RW[r + 1]; i++) {
            const void *src = coords_src(&k, i);
            if (i + 1 < B) coords_prefetch(&k, i + 1, 7);
            int64_t p = PL[i], lens[2] = {CL[i], CL[B + i]};
            /* segments from LAYOUT_SEGS: their part (0 prompt, 1 chosen, 2 rejected) names the source */
            const int8_t *segs = LAYOUT_SEGS[shared];
            int64_t seg_start[3] = {P0[i], C0[i], C0[B + i]}, seg_len[3] = {p, lens[0], lens[1]};
            for (int g = 0; g < 4 && segs[g] >= 0; g++) {
                int8_t what = segs[g];
                int64_t at = base + col, l = seg_len[what];
                if (k.itemsize == 2) widen_u16(ids + at, src, seg_start[what], l);
                else widen_u32(ids + at, src, seg_start[what], l);
                iota64(pos + at, what ? p : 0, l);  /* completions continue from P, in both layouts */
                fill32(sq + at, (int32_t)(shared ? i : 2 * i + g / 2), l);
                memset(part + at, what, (size_t)l);
                memset(am + at, 1, (size_t)l);
                col += l;
            }
            if (shared) {
                int64_t len = p + lens[0] + lens[1];
                cum += len;
                cu[i + 1] = (int32_t)cum;
                qpair[i] = i;
                qside[i] = -1;
                span[2 * i] = p;
                span[2 * i + 1] = len;
            } else {
                for (int s = 0; s < 2; s++) {
                    int64_t len = p + lens[s];
                    cum += len;
                    cu[2 * i + s + 1] = (int32_t)cum;
                    qpair[2 * i + s] = i;
                    qside[2 * i + s] = (int8_t)s;
                    span[4 * i + 2 * s] = p;
                    span[4 * i + 2 * s + 1] = len;
                }
            }
        }
        int64_t rest = T - col, at = base + col;
        fill64(ids + at, (int64_t)pad, rest);
        fill64(pos + at, 0, rest);
        fill32(sq + at, -1, rest);
        memset(part + at, 0xFF, (size_t)rest);
        memset(am + at, 0, (size_t)rest);
    }
    Py_END_ALLOW_THREADS
    ok = 1;

done:
    coords_release(&k);
    if (rw.obj) PyBuffer_Release(&rw);
    for (int j = 0; j < LAYOUT_OUTS; j++)
        if (o[j].obj) PyBuffer_Release(&o[j]);
    if (!ok) return NULL;
    return PyLong_FromLongLong(longest);
}


PyDoc_STRVAR(take_doc,
"take(indices, num_pairs, bounds, starts, lengths, num_tokens, coords) -> int\n"
"\n"
"Locate pairs for a batch: indices int64 (B,) (negative counts from the end); bounds int64 (S + 1,)\n"
"first global pair index of each shard; starts/lengths: tuples of S int64 (3, n_s) buffers;\n"
"num_tokens int64 (S,). Writes int64 coords (8, B): index, shard, prompt/chosen/rejected start,\n"
"prompt/chosen/rejected length, and returns the longest row (max of P + C and P + R; 0 if B = 0).\n"
"Raises IndexError for an index out of range and ValueError for a segment outside its shard's\n"
"tokens or empty (FORMAT.md section 8 R13; the caller re-derives the detailed error).");

static PyObject *native_take(PyObject *self, PyObject *args) {
    PyObject *idx_obj, *bounds_obj, *st_seq, *ln_seq, *nt_obj, *co_obj;
    long long num_pairs;
    if (!PyArg_ParseTuple(args, "OLOOOOO", &idx_obj, &num_pairs, &bounds_obj, &st_seq, &ln_seq, &nt_obj, &co_obj))
        return NULL;
    Py_buffer idx = {0}, bounds = {0}, nt = {0}, co = {0};
    Lazy st = {0}, ln = {0};
    long long longest = 0;
    int ok = 0;
    if (lazy_init(&st, st_seq, "starts") < 0 || lazy_init(&ln, ln_seq, "lengths") < 0) goto done;
    Py_ssize_t S = st.count;
    if (ln.count != S) {
        PyErr_SetString(PyExc_ValueError, "starts and lengths differ in length");
        goto done;
    }
    if (num_pairs < 0 || (S == 0 && num_pairs > 0)) {
        PyErr_Format(PyExc_ValueError, "%lld pairs in %zd shards", num_pairs, S);
        goto done;
    }
    if (get_exact(idx_obj, &idx, -1, 8, 0, "indices") < 0) goto done;
    Py_ssize_t B = idx.len / 8;
    if (get_exact(bounds_obj, &bounds, 8 * (S + 1), 8, 0, "bounds") < 0) goto done;
    if (get_exact(nt_obj, &nt, 8 * S, 8, 0, "num_tokens") < 0) goto done;
    if (get_exact(co_obj, &co, 64 * B, 8, 1, "coords") < 0) goto done;
    const int64_t *I = idx.buf, *BD = bounds.buf, *NT = nt.buf;
    /* bounds must run from 0 to num_pairs without decreasing: then the search below always lands on
     * a shard that holds the pair (the kernel does not trust its caller for memory safety) */
    if (BD[0] != 0 || BD[S] != num_pairs) {
        PyErr_Format(PyExc_ValueError, "bounds run from %lld to %lld, expected 0 to %lld", (long long)BD[0],
                     (long long)BD[S], num_pairs);
        goto done;
    }
    for (Py_ssize_t k = 0; k < S; k++)
        if (BD[k + 1] < BD[k]) {
            PyErr_Format(PyExc_ValueError, "bounds decrease at shard %zd", k);
            goto done;
        }
    int64_t *C = co.buf;
    for (Py_ssize_t i = 0; i < B; i++) { /* every index first: an IndexError wins, as in the numpy path */
        if (I[i] < -num_pairs || I[i] >= num_pairs) {
            PyErr_Format(PyExc_IndexError, "pair index %lld out of range for %lld pairs", (long long)I[i], num_pairs);
            goto done;
        }
    }
    if (S == 1) { /* ask for every pair's index entries first: they sit at random places */
        Py_buffer *sv = lazy_get(&st, 0), *lv = lazy_get(&ln, 0);
        if (sv == NULL || lv == NULL) goto done;
        int64_t npairs = BD[1] - BD[0];
        if (sv->len == 24 * npairs && lv->len == 24 * npairs) {
            const int64_t *SB = sv->buf, *LB = lv->buf;
            for (Py_ssize_t i = 0; i < B; i++) {
                int64_t g = I[i] < 0 ? I[i] + num_pairs : I[i];
                if (g < 0 || g >= npairs) continue;
                for (int r = 0; r < 3; r++) {
                    PREFETCH(SB + r * npairs + g);
                    PREFETCH(LB + r * npairs + g);
                }
            }
        }
    }
    for (Py_ssize_t i = 0; i < B; i++) {
        int64_t g = I[i] < 0 ? I[i] + num_pairs : I[i];
        /* the shard holding g: the last k with bounds[k] <= g (binary search) */
        Py_ssize_t lo = 0, hi = S - 1;
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi + 1) / 2;
            if (BD[mid] <= g) lo = mid; else hi = mid - 1;
        }
        int64_t local = g - BD[lo], npairs = BD[lo + 1] - BD[lo];
        if (local < 0 || local >= npairs) {
            PyErr_Format(PyExc_ValueError, "pair %lld: bounds inconsistent", (long long)g);
            goto done;
        }
        Py_buffer *sv = lazy_get(&st, lo), *lv = lazy_get(&ln, lo);
        if (sv == NULL || lv == NULL) goto done;
        if (sv->len != 24 * npairs || lv->len != 24 * npairs) {
            PyErr_Format(PyExc_ValueError, "shard %zd: index arrays are not int64 (3, %lld)", lo, (long long)npairs);
            goto done;
        }
        const int64_t *SB = sv->buf, *LB = lv->buf;
        int64_t t = NT[lo];
        C[i] = g;
        C[B + i] = lo;
        for (int r = 0; r < 3; r++) {
            int64_t a = SB[r * npairs + local], l = LB[r * npairs + local];
            if (a < 0 || l < 1 || a > t || l > t - a) {
                PyErr_Format(PyExc_ValueError, "pair %lld: segment %d outside tokens", (long long)g, r);
                goto done;
            }
            C[(2 + r) * B + i] = a;
            C[(5 + r) * B + i] = l;
        }
        int64_t p = C[5 * B + i], row = p + (C[6 * B + i] > C[7 * B + i] ? C[6 * B + i] : C[7 * B + i]);
        if (row > longest) longest = row;
    }
    ok = 1;
done:
    lazy_release(&st);
    lazy_release(&ln);
    if (idx.obj) PyBuffer_Release(&idx);
    if (bounds.obj) PyBuffer_Release(&bounds);
    if (nt.obj) PyBuffer_Release(&nt);
    if (co.obj) PyBuffer_Release(&co);
    if (!ok) return NULL;
    return PyLong_FromLongLong(longest);
}

/* ---------------------------------------------------------------------------------------------
 * scan_ids: the JSONL fast path of `pairpack build` for pre-tokenized records.
 *
 * A strict, conservative JSON reader: it accepts a line only when it is certain that orjson
 * (the exact path) would read the same object and that pairpack's exact path would accept the
 * record as it is. Anything else (escapes or non-ASCII in a key, a repeated target key, a
 * non-integer, negative or out-of-range id, an empty list, a missing field, a float, a number
 * longer than 15 characters or with a 3-digit exponent (skip_number), nesting deeper than 64, a
 * surrogate escape, a byte-order mark, a NUL or other control byte, invalid UTF-8,
 * a line over max_record_bytes, ...) makes it give up on the whole block, which the caller then
 * processes with the exact path. So the fast path never decides an error and never accepts a
 * record the exact path would reject.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const unsigned char *p, *end;
} Cursor;

#define SCAN_BAIL (-1)

static inline void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r' || *c->p == '\n')) c->p++;
}

static inline int hexval(unsigned char h) {
    if (h >= '0' && h <= '9') return h - '0';
    if (h >= 'a' && h <= 'f') return h - 'a' + 10;
    if (h >= 'A' && h <= 'F') return h - 'A' + 10;
    return -1;
}

/* One UTF-8 sequence starting at a byte >= 0x80 (no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_seq(Cursor *c) {
    const unsigned char *p = c->p;
    Py_ssize_t left = c->end - p;
    unsigned char b0 = p[0];
    int n;
    if (b0 >= 0xC2 && b0 <= 0xDF) n = 1;
    else if (b0 >= 0xE0 && b0 <= 0xEF) n = 2;
    else if (b0 >= 0xF0 && b0 <= 0xF4) n = 3;
    else return SCAN_BAIL;
    if (left < n + 1) return SCAN_BAIL;
    for (int k = 1; k <= n; k++)
        if ((p[k] & 0xC0) != 0x80) return SCAN_BAIL;
    if (b0 == 0xE0 && p[1] < 0xA0) return SCAN_BAIL;
    if (b0 == 0xED && p[1] >= 0xA0) return SCAN_BAIL;
    if (b0 == 0xF0 && p[1] < 0x90) return SCAN_BAIL;
    if (b0 == 0xF4 && p[1] >= 0x90) return SCAN_BAIL;
    c->p += n + 1;
    return 0;
}

/* A string starting at '"'. With `plain` set (keys), escapes and non-ASCII give up; the raw
 * bytes between the quotes are returned through start/len. */
static int scan_string(Cursor *c, int plain, const unsigned char **start, Py_ssize_t *len) {
    c->p++; /* the opening quote */
    const unsigned char *s = c->p;
    while (c->p < c->end) {
        unsigned char ch = *c->p;
        if (ch == '"') {
            if (start) *start = s;
            if (len) *len = c->p - s;
            c->p++;
            return 0;
        }
        if (ch < 0x20) return SCAN_BAIL;
        if (ch == '\\') {
            if (plain || c->end - c->p < 2) return SCAN_BAIL;
            unsigned char e = c->p[1];
            if (e == 'u') {
                if (c->end - c->p < 6) return SCAN_BAIL;
                int v = 0;
                for (int k = 2; k < 6; k++) {
                    int h = hexval(c->p[k]);
                    if (h < 0) return SCAN_BAIL;
                    v = v * 16 + h;
                }
                if (v >= 0xD800 && v <= 0xDFFF) return SCAN_BAIL; /* surrogate pairs: leave to orjson */
                c->p += 6;
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' || e == 't') {
                c->p += 2;
            } else {
                return SCAN_BAIL;
            }
            continue;
        }
        if (ch >= 0x80) {
            if (plain || utf8_seq(c) < 0) return SCAN_BAIL;
            continue;
        }
        c->p++;
    }
    return SCAN_BAIL;
}

/* A JSON number that orjson is certain to read as a finite value, with no range question: at most
 * 15 characters and an exponent of at most two digits. So an integer is below 1e15 (no 64-bit
 * overflow, no float fallback) and any other value is 0 or has magnitude in (1e-115, 1e115): never
 * orjson's "number is infinity" error (1e999, 2e308, -1E400). Anything longer or with a longer
 * exponent gives up, even where orjson would accept it (1e-400 reads as 0.0): the exact path decides. */
static int skip_number(Cursor *c) {
    const unsigned char *s = c->p;
    if (c->p < c->end && *c->p == '-') c->p++;
    if (c->p >= c->end) return SCAN_BAIL;
    if (*c->p == '0') c->p++;
    else if (*c->p >= '1' && *c->p <= '9') while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
    else return SCAN_BAIL;
    if (c->p < c->end && *c->p == '.') {
        c->p++;
        if (c->p >= c->end || *c->p < '0' || *c->p > '9') return SCAN_BAIL;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
    }
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        c->p++;
        if (c->p < c->end && (*c->p == '+' || *c->p == '-')) c->p++;
        const unsigned char *digits = c->p;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
        if (c->p == digits || c->p - digits > 2) return SCAN_BAIL;
    }
    return c->p - s <= 15 ? 0 : SCAN_BAIL;
}

/* After a value inside a container: 1 if ',' (another item follows), 0 if `close` (consumed). */
static int after_item(Cursor *c, unsigned char close) {
    skip_ws(c);
    if (c->p >= c->end) return SCAN_BAIL;
    if (*c->p == ',') {
        c->p++;
        skip_ws(c);
        return 1;
    }
    if (*c->p == close) {
        c->p++;
        return 0;
    }
    return SCAN_BAIL;
}

static int skip_value(Cursor *c, int depth);

static int skip_container(Cursor *c, int depth, unsigned char close, int object) {
    if (depth > 64) return SCAN_BAIL;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    for (;;) {
        if (object) {
            if (c->p >= c->end || *c->p != '"' || scan_string(c, 0, NULL, NULL) < 0) return SCAN_BAIL;
            skip_ws(c);
            if (c->p >= c->end || *c->p != ':') return SCAN_BAIL;
            c->p++;
            skip_ws(c);
        }
        if (skip_value(c, depth + 1) < 0) return SCAN_BAIL;
        int more = after_item(c, close);
        if (more <= 0) return more;
    }
}

static int skip_literal(Cursor *c, const char *lit, Py_ssize_t n) {
    if (c->end - c->p < n || memcmp(c->p, lit, (size_t)n) != 0) return SCAN_BAIL;
    c->p += n;
    return 0;
}

static int skip_value(Cursor *c, int depth) {
    if (c->p >= c->end) return SCAN_BAIL;
    switch (*c->p) {
    case '"': return scan_string(c, 0, NULL, NULL);
    case '{': return skip_container(c, depth, '}', 1);
    case '[': return skip_container(c, depth, ']', 0);
    case 't': return skip_literal(c, "true", 4);
    case 'f': return skip_literal(c, "false", 5);
    case 'n': return skip_literal(c, "null", 4);
    default: return skip_number(c);
    }
}

/* A non-empty list of ids in [0, limit): plain non-negative integers, written to out[*pos...]. */
static int scan_ids_list(Cursor *c, uint32_t *out, Py_ssize_t cap, Py_ssize_t *pos, int64_t limit) {
    if (c->p >= c->end || *c->p != '[') return SCAN_BAIL;
    c->p++;
    skip_ws(c);
    Py_ssize_t k = *pos;
    for (;;) {
        if (c->p >= c->end) return SCAN_BAIL;
        const unsigned char *s = c->p;
        int64_t v = 0;
        if (*c->p == '0') {
            c->p++;
        } else if (*c->p >= '1' && *c->p <= '9') {
            while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
                if (c->p - s >= 12) return SCAN_BAIL; /* far beyond any vocabulary */
                v = v * 10 + (*c->p - '0');
                c->p++;
            }
        } else {
            return SCAN_BAIL; /* '-', ']', a float, a string, true/false, ... */
        }
        if (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E')) return SCAN_BAIL;
        if (v >= limit || k >= cap) return SCAN_BAIL;
        out[k++] = (uint32_t)v;
        int more = after_item(c, ']');
        if (more < 0) return SCAN_BAIL;
        if (more == 0) break;
    }
    *pos = k;
    return 0;
}

PyDoc_STRVAR(scan_ids_doc,
"scan_ids(data, keys, limit, drop_identical, max_record_bytes, tokens, lengths) -> tuple | None\n"
"\n"
"Read a block of JSONL lines whose records are objects with three lists of token ids under the\n"
"byte-string keys (prompt, chosen, rejected). tokens: writable uint32 buffer (capacity in ids);\n"
"lengths: writable int64 (3, cap) (cap records). Returns (ntokens, npairs, nrecords, identical,\n"
"identical_dropped), or None when any line needs the exact path (see the comment above).");

static PyObject *native_scan_ids(PyObject *self, PyObject *args) {
    Py_buffer data = {0}, tok = {0}, lens = {0};
    PyObject *keys;
    long long limit;
    int drop;
    Py_ssize_t max_record;
    if (!PyArg_ParseTuple(args, "y*O!Lpnw*w*", &data, &PyTuple_Type, &keys, &limit, &drop, &max_record, &tok, &lens))
        return NULL;
    PyObject *result = NULL;
    const char *kp[3];
    Py_ssize_t kl[3];
    if (PyTuple_GET_SIZE(keys) != 3) {
        PyErr_SetString(PyExc_ValueError, "keys must be three byte strings");
        goto done;
    }
    for (int k = 0; k < 3; k++) {
        PyObject *o = PyTuple_GET_ITEM(keys, k);
        if (!PyBytes_Check(o)) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            goto done;
        }
        kp[k] = PyBytes_AS_STRING(o);
        kl[k] = PyBytes_GET_SIZE(o);
    }
    if (limit < 0 || limit > 0x100000000LL || max_record < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must be in [0, 2**32] and max_record_bytes >= 0");
        goto done;
    }
    if (tok.len % 4 || lens.len % 24) {
        PyErr_SetString(PyExc_ValueError, "tokens must be uint32 and lengths int64 (3, cap)");
        goto done;
    }
    Py_ssize_t tcap = tok.len / 4, rcap = lens.len / 24;
    uint32_t *T = tok.buf;
    int64_t *L = lens.buf;
    Py_ssize_t ntok = 0, npairs = 0, nrec = 0, identical = 0, dropped = 0;
    int bail = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *p = data.buf, *end = p + data.len;
    while (p <= end && !bail) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));
        const unsigned char *le = nl ? nl : end;
        if (le - p > max_record) {
            bail = 1;
            break;
        }
        /* a line of bytes.strip() whitespace only is skipped, as block_records does */
        const unsigned char *q = p;
        while (q < le && (*q == ' ' || *q == '\t' || *q == '\r' || *q == 0x0b || *q == 0x0c)) q++;
        if (q < le) {
            nrec++;
            Cursor c = {p, le};
            Py_ssize_t start = ntok, seg[3] = {-1, -1, -1}, segoff[3] = {0, 0, 0};
            skip_ws(&c);
            if (c.p >= c.end || *c.p != '{') { bail = 1; break; }
            c.p++;
            skip_ws(&c);
            if (c.p < c.end && *c.p == '}') { bail = 1; break; } /* no fields: the exact path says which */
            for (;;) {
                const unsigned char *ks;
                Py_ssize_t klen;
                if (c.p >= c.end || *c.p != '"' || scan_string(&c, 1, &ks, &klen) < 0) { bail = 1; break; }
                skip_ws(&c);
                if (c.p >= c.end || *c.p != ':') { bail = 1; break; }
                c.p++;
                skip_ws(&c);
                int which = -1;
                for (int k = 0; k < 3; k++)
                    if (klen == kl[k] && memcmp(ks, kp[k], (size_t)klen) == 0) which = k;
                if (which >= 0) {
                    if (seg[which] >= 0) { bail = 1; break; } /* repeated key: leave to orjson */
                    Py_ssize_t before = ntok;
                    if (scan_ids_list(&c, T, tcap, &ntok, limit) < 0) { bail = 1; break; }
                    seg[which] = ntok - before;
                    segoff[which] = before;
                } else if (skip_value(&c, 1) < 0) {
                    bail = 1;
                    break;
                }
                int more = after_item(&c, '}');
                if (more < 0) bail = 1;
                if (more <= 0) break;
            }
            if (bail) break;
            skip_ws(&c);
            if (c.p != c.end || seg[0] < 0 || seg[1] < 0 || seg[2] < 0 || npairs >= rcap) { bail = 1; break; }
            /* the ids were written in key order; the output wants prompt, chosen, rejected */
            if (!(segoff[0] == start && segoff[1] == start + seg[0] && segoff[2] == start + seg[0] + seg[1])) {
                Py_ssize_t total = ntok - start;
                uint32_t *tmp = PyMem_RawMalloc((size_t)(total ? total : 1) * 4);
                if (tmp == NULL) { bail = 2; break; }
                Py_ssize_t w = 0;
                for (int k = 0; k < 3; k++) {
                    memcpy(tmp + w, T + segoff[k], (size_t)seg[k] * 4);
                    w += seg[k];
                }
                memcpy(T + start, tmp, (size_t)total * 4);
                PyMem_RawFree(tmp);
            }
            int same = seg[1] == seg[2] &&
                       memcmp(T + start + seg[0], T + start + seg[0] + seg[1], (size_t)seg[1] * 4) == 0;
            if (same) {
                identical++;
                if (drop) {
                    dropped++;
                    ntok = start;
                    goto next;
                }
            }
            L[npairs] = seg[0];
            L[rcap + npairs] = seg[1];
            L[2 * rcap + npairs] = seg[2];
            npairs++;
        }
    next:
        if (nl == NULL) break;
        p = nl + 1;
    }
    Py_END_ALLOW_THREADS
    if (bail == 2) {
        PyErr_NoMemory();
        goto done;
    }
    if (bail) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    result = Py_BuildValue("nnnnn", ntok, npairs, nrec, identical, dropped);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&lens);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_ids", native_scan_ids, METH_VARARGS, scan_ids_doc},
    {"take", native_take, METH_VARARGS, take_doc},
    {"assemble", native_assemble, METH_VARARGS, assemble_doc},
    {"layout", native_layout, METH_VARARGS, layout_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pairpack._native",
    "Optional compiled batch gather for pairpack (see pairpack/_native.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
