/* pairpack._native: the batch gather of pairpack.triplets.assemble in one pass, in C.
 *
 * Optional: pairpack works without it (pairpack/triplets.py has the numpy path, which gives the
 * same bytes; tests compare the two). Why it exists: the numpy path joins ~5 memory-map slices
 * per pair with np.concatenate, and the Python cost of making those slices, plus a second pass
 * that widens to int64, dominates a batch (tools/bench_reader.py). Here every output byte is
 * written once, the GIL is released while copying, and every segment is bounds-checked against
 * its token buffer before anything is written (never an out-of-bounds read).
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

typedef struct {
    Py_buffer *views;
    Py_ssize_t count;
} Shards;

static void release_shards(Shards *sh) {
    for (Py_ssize_t k = 0; k < sh->count; k++) PyBuffer_Release(&sh->views[k]);
    PyMem_Free(sh->views);
    sh->views = NULL;
    sh->count = 0;
}

/* Borrow a C-contiguous buffer of exactly `bytes` bytes (any multiple of 8 when bytes < 0),
 * writable when asked. On failure nothing is held and view->obj is NULL. */
static int get_exact(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (bytes < 0 ? view->len % 8 != 0 : view->len != bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, view->len, bytes);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

#define WIDEN(NAME, T)                                                                         \
    static inline void NAME(int64_t *dst, const void *src, int64_t start, int64_t len) {      \
        const T *s = (const T *)src + start;                                                   \
        for (int64_t j = 0; j < len; j++) dst[j] = (int64_t)s[j];                              \
    }
WIDEN(widen_u16, uint16_t)
WIDEN(widen_u32, uint32_t)

static inline void fill64(int64_t *dst, int64_t value, int64_t len) {
    for (int64_t j = 0; j < len; j++) dst[j] = value;
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
    if (!PyTuple_Check(shard_seq) || PyTuple_GET_SIZE(shard_seq) < 1) {
        PyErr_SetString(PyExc_TypeError, "shards must be a non-empty tuple of token buffers");
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    Shards sh = {NULL, 0};
    Py_buffer ps = {0}, pl = {0}, cs = {0}, cl = {0}, sof = {0}, out = {0}, masks = {0};
    int have_sof = 0, have_masks = 0, ok = 0;
    Py_ssize_t nshards = PyTuple_GET_SIZE(shard_seq);
    Py_ssize_t itemsize = 0;
    sh.views = PyMem_Calloc((size_t)nshards, sizeof(Py_buffer));
    if (sh.views == NULL) return PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < nshards; k++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(shard_seq, k), &sh.views[k], PyBUF_C_CONTIGUOUS) < 0) goto done;
        sh.count = k + 1;
        Py_ssize_t isz = sh.views[k].itemsize;
        if ((isz != 2 && isz != 4) || (itemsize && isz != itemsize)) {
            PyErr_Format(PyExc_ValueError, "shards[%zd]: itemsize %zd (all shards must be uint16 or all uint32)", k, isz);
            goto done;
        }
        itemsize = isz;
    }
    /* B comes from prompt_start's size; every other buffer is checked against it */
    if (get_exact(ps_obj, &ps, -1, 0, "prompt_start") < 0) goto done;
    Py_ssize_t B = ps.len / 8;
    if (n > 0 && B > PY_SSIZE_T_MAX / 16 / n) {
        PyErr_SetString(PyExc_OverflowError, "batch too large");
        goto done;
    }
    if (get_exact(pl_obj, &pl, 8 * B, 0, "prompt_len") < 0) goto done;
    if (get_exact(cs_obj, &cs, 16 * B, 0, "completion_start") < 0) goto done;
    if (get_exact(cl_obj, &cl, 16 * B, 0, "completion_len") < 0) goto done;
    if (shard_of_obj != Py_None) {
        if (get_exact(shard_of_obj, &sof, 8 * B, 0, "shard_of") < 0) goto done;
        have_sof = 1;
    } else if (nshards != 1) {
        PyErr_SetString(PyExc_ValueError, "shard_of is required with more than one shard");
        goto done;
    }
    if (get_exact(out_obj, &out, 16 * B * n, 1, "out") < 0) goto done;
    if (masks_obj != Py_None) {
        if (get_exact(masks_obj, &masks, 3 * B * n, 1, "masks") < 0) goto done;
        have_masks = 1;
    }

    const int64_t *P0 = ps.buf, *PL = pl.buf, *C0 = cs.buf, *CL = cl.buf;
    const int64_t *SOF = have_sof ? sof.buf : NULL;
    /* every coordinate checked before any byte is written */
    for (Py_ssize_t i = 0; i < B; i++) {
        int64_t k = SOF ? SOF[i] : 0;
        if (k < 0 || k >= nshards) {
            PyErr_Format(PyExc_ValueError, "pair %zd: shard %lld out of range", i, (long long)k);
            goto done;
        }
        int64_t len = sh.views[k].len / itemsize;
        int64_t segs[3][2] = {{P0[i], PL[i]}, {C0[i], CL[i]}, {C0[B + i], CL[B + i]}};
        for (int g = 0; g < 3; g++) {
            int64_t a = segs[g][0], l = segs[g][1];
            if (a < 0 || l < 0 || a > len || l > len - a) {
                PyErr_Format(PyExc_ValueError, "pair %zd: segment %d [%lld, +%lld) outside shard of %lld tokens", i,
                             g, (long long)a, (long long)l, (long long)len);
                goto done;
            }
        }
        if (PL[i] > n - CL[i] || PL[i] > n - CL[B + i]) {
            PyErr_Format(PyExc_ValueError, "pair %zd: row longer than n = %zd", i, n);
            goto done;
        }
    }

    Py_BEGIN_ALLOW_THREADS
    int64_t *o = out.buf;
    for (int s = 0; s < 2; s++) {
        for (Py_ssize_t i = 0; i < B; i++) {
            const void *src = sh.views[SOF ? SOF[i] : 0].buf;
            int64_t *row = o + ((int64_t)s * B + i) * n;
            if (i + 1 < B) { /* the next row's segments start at random places: ask for them early */
                const char *nsrc = sh.views[SOF ? SOF[i + 1] : 0].buf;
                const char *a = nsrc + P0[i + 1] * itemsize, *c = nsrc + C0[s * B + i + 1] * itemsize;
                int64_t la = PL[i + 1] * itemsize, lc = CL[s * B + i + 1] * itemsize;
                if (s == 0) for (int64_t q = 0; q < la; q += 64) PREFETCH(a + q);
                for (int64_t q = 0; q < lc; q += 64) PREFETCH(c + q);
            }
            int64_t p = PL[i], c = CL[s * B + i];
            if (itemsize == 2) {
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
    release_shards(&sh);
    if (ps.obj) PyBuffer_Release(&ps);
    if (pl.obj) PyBuffer_Release(&pl);
    if (cs.obj) PyBuffer_Release(&cs);
    if (cl.obj) PyBuffer_Release(&cl);
    if (sof.obj) PyBuffer_Release(&sof);
    if (out.obj) PyBuffer_Release(&out);
    if (masks.obj) PyBuffer_Release(&masks);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}


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
    if (get_exact(idx_obj, &idx, -1, 0, "indices") < 0) goto done;
    Py_ssize_t B = idx.len / 8;
    if (get_exact(bounds_obj, &bounds, 8 * (S + 1), 0, "bounds") < 0) goto done;
    if (get_exact(nt_obj, &nt, 8 * S, 0, "num_tokens") < 0) goto done;
    if (get_exact(co_obj, &co, 64 * B, 1, "coords") < 0) goto done;
    const int64_t *I = idx.buf, *BD = bounds.buf, *NT = nt.buf;
    int64_t *C = co.buf;
    for (Py_ssize_t i = 0; i < B; i++) { /* every index first: an IndexError wins, as in the numpy path */
        if (I[i] < -num_pairs || I[i] >= num_pairs) {
            PyErr_Format(PyExc_IndexError, "pair index %lld out of range for %lld pairs", (long long)I[i], num_pairs);
            goto done;
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

static PyMethodDef methods[] = {
    {"take", native_take, METH_VARARGS, take_doc},
    {"assemble", native_assemble, METH_VARARGS, assemble_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pairpack._native",
    "Optional compiled batch gather for pairpack (see pairpack/_native.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
