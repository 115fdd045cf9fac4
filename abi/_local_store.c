/* LocalStore.set in C: abi/shared_store.py's LocalStore._set (the reference: keep them alike)
 * without its Python frames. A rate limiter writes its bucket on every request, with an expiry,
 * and each such write also pops the bucket's previous deadline off the heap: in Python that is
 * two to three frames, tuple unpacking and heapq calls per write.
 *
 * Optional: built at install (setup.py, optional=True). Without it LocalStore is plain Python;
 * with WASMGATE_PURE_PYTHON=1 (read when a store is made) this set calls the Python one,
 * LocalStore._locked_set. The tests run both.
 *
 *   StoreCore: LocalStore's base. It holds the fields set() reads and writes as C fields that
 *       Python reads and sets as attributes (_data, _deadlines, _by_deadline, _lock, clock,
 *       _bytes, _evictable, _next_cas, max_bytes, _pure); everything else lives in the
 *       instance's __dict__.
 *   StoreCore.set(key, value, cas, ttl_ns=None) -> status: what
 *       ``with self._lock: return self._set(key, value, cas, ttl_ns)`` returns, with the same
 *       effect on the store. The rarer steps call the store's Python methods, under the lock
 *       as _set does: _drop (a write that expires at once), _fits (a write that needs room),
 *       _compact and _reap. Arguments other than the host's (key and value bytes, cas a u32,
 *       ttl_ns None or a u64) go to _locked_set. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

#define U64_MAX_ ((unsigned long long)-1)

typedef struct {
    PyObject_HEAD
    PyObject *data, *deadlines, *by_deadline, *lock, *clock;
    long long bytes, evictable, next_cas, max_bytes;
    char pure;
    PyObject *dict;                 /* a subclass's other attributes (tp_dictoffset) */
    PyObject *weakrefs;
} StoreCore;

static PyObject *s_acquire, *s_release, *s__drop, *s__fits, *s__compact, *s__reap, *s__locked_set;
static PyObject *heappush, *heappop;
static long long entry_overhead = -1, status_ok, status_cas_mismatch, status_internal_failure;

/* A u64 from an int; ok cleared when it is not one (negative, too large, not an int). */
static unsigned long long as_u64(PyObject *o, int *ok) {
    if (!PyLong_Check(o)) {
        *ok = 0;
        return 0;
    }
    int over;
    long long small = PyLong_AsLongLongAndOverflow(o, &over);   /* the fast path for < 2**63 */
    if (!over && small >= 0)
        return (unsigned long long)small;
    if (over <= 0) {                            /* negative (or an error) */
        PyErr_Clear();
        *ok = 0;
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        *ok = 0;
    }
    return v;
}

static PyObject *call_method(PyObject *self, PyObject *name, PyObject *const *args, size_t n) {
    PyObject *argv[5] = {self, NULL, NULL, NULL, NULL};
    for (size_t i = 0; i < n; i++)
        argv[i + 1] = args[i];
    return PyObject_VectorcallMethod(name, argv, (n + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static int call_method_void(PyObject *self, PyObject *name, PyObject *const *args, size_t n) {
    PyObject *r = call_method(self, name, args, n);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The reap's first steps, as _set reaches them (its test reads the heap it pushed to, _compact
 * or not) and as _reap's _earliest takes them: items whose key has another deadline now
 * (usually this bucket's previous one) are stale and popped. Returns 1 when a live entry is
 * due (_reap's to drop and count), 0 when none, -1 on an error. */
static int pop_stale(StoreCore *st, PyObject *pushed_to, unsigned long long now) {
    if (PyList_GET_SIZE(pushed_to) == 0)
        return 0;
    int ok = 1;
    if (as_u64(PyTuple_GET_ITEM(PyList_GET_ITEM(pushed_to, 0), 0), &ok) > now || !ok)
        return 0;
    PyObject *heap = st->by_deadline;
    while (PyList_CheckExact(heap) && PyList_GET_SIZE(heap)) {
        PyObject *top = PyList_GET_ITEM(heap, 0);
        PyObject *cur = PyDict_GetItemWithError(st->deadlines, PyTuple_GET_ITEM(top, 1));
        if (cur == NULL && PyErr_Occurred())
            return -1;
        int same = cur != NULL ? PyObject_RichCompareBool(cur, PyTuple_GET_ITEM(top, 0), Py_EQ) : 0;
        if (same < 0)
            return -1;
        if (same) {
            ok = 1;
            return as_u64(PyTuple_GET_ITEM(top, 0), &ok) <= now && ok;
        }
        PyObject *popped = PyObject_CallOneArg(heappop, heap);
        if (popped == NULL)
            return -1;
        Py_DECREF(popped);
    }
    return 0;
}

/* _set's body, the lock held: the status, or -1 with an exception set. */
static long long set_locked(StoreCore *st, PyObject *key, PyObject *value, unsigned long long cas,
                            int has_ttl, unsigned long long ttl) {
    PyObject *self = (PyObject *)st;
    if (!PyDict_CheckExact(st->data) || !PyDict_CheckExact(st->deadlines)
            || !PyList_CheckExact(st->by_deadline)) {
        PyErr_SetString(PyExc_TypeError, "LocalStore: _data, _deadlines must be dicts, _by_deadline a list");
        return -1;
    }
    long long status = -1;
    PyObject *old = PyDict_GetItemWithError(st->data, key);     /* (value, cas) */
    if (old == NULL && PyErr_Occurred())
        return -1;
    Py_XINCREF(old);
    PyObject *now_obj = NULL, *old_due_obj = NULL, *pushed_to = NULL;
    unsigned long long now = 0, old_due = 0;
    int ok = 1;
    if (PyDict_GET_SIZE(st->deadlines) || has_ttl) {
        now_obj = PyObject_CallNoArgs(st->clock);
        if (now_obj == NULL)
            goto done;
        now = as_u64(now_obj, &ok);
    } else {
        now_obj = PyLong_FromLong(0);
        if (now_obj == NULL)
            goto done;
    }
    if (old != NULL && PyDict_GET_SIZE(st->deadlines)) {
        old_due_obj = PyDict_GetItemWithError(st->deadlines, key);
        if (old_due_obj == NULL && PyErr_Occurred())
            goto done;
        Py_XINCREF(old_due_obj);
        if (old_due_obj != NULL)
            old_due = as_u64(old_due_obj, &ok);
    }
    if (!ok || (old != NULL && (!PyTuple_CheckExact(old) || PyTuple_GET_SIZE(old) != 2
                                || !PyBytes_Check(PyTuple_GET_ITEM(old, 0))))) {
        PyErr_SetString(PyExc_ValueError, "LocalStore: a clock reading, deadline or entry of an unexpected type");
        goto done;
    }
    int live = old != NULL && (old_due_obj == NULL || old_due > now);
    if (live && cas != 0) {
        unsigned long long held = as_u64(PyTuple_GET_ITEM(old, 1), &ok);
        if (!ok || cas != held) {               /* (a stored cas is always a u32) */
            status = status_cas_mismatch;
            goto done;
        }
    }
    if (has_ttl && ttl == 0) {                  /* expires at once: a CAS-guarded delete */
        if (old != NULL) {
            PyObject *args[3] = {key, now_obj, live ? Py_False : Py_True};
            if (call_method_void(self, s__drop, args, 3) < 0)
                goto done;
        }
        status = status_ok;
        goto done;
    }
    Py_ssize_t klen = PyBytes_GET_SIZE(key);
    long long old_cost = old != NULL ? klen + PyBytes_GET_SIZE(PyTuple_GET_ITEM(old, 0)) + entry_overhead : 0;
    long long new_cost = klen + PyBytes_GET_SIZE(value) + entry_overhead;
    long long grow = new_cost - old_cost;
    if (grow > 0 && st->bytes + grow > st->max_bytes) {
        PyObject *g = PyLong_FromLongLong(grow);
        PyObject *kc = PyLong_FromLongLong(old_due_obj != NULL ? old_cost : 0);
        PyObject *r = NULL;
        if (g != NULL && kc != NULL) {
            PyObject *args[4] = {g, now_obj, key, kc};
            r = call_method(self, s__fits, args, 4);
        }
        Py_XDECREF(g);
        Py_XDECREF(kc);
        if (r == NULL)
            goto done;
        int fits = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (fits < 0)
            goto done;
        if (!fits) {
            status = status_internal_failure;
            goto done;
        }
    }
    if (old_due_obj != NULL) {
        st->evictable -= old_cost;
        if (PyDict_DelItem(st->deadlines, key) < 0)     /* its heap item is stale from now on */
            goto done;
    }
    st->bytes += grow;
    long long new_cas = st->next_cas;
    /* Never 0 (Rust maps it to None) and never 0xFFFFFFFF ("create only if absent"). */
    st->next_cas = new_cas < 0xFFFFFFFELL ? new_cas + 1 : 1;
    PyObject *cas_obj = PyLong_FromLongLong(new_cas);
    PyObject *entry = cas_obj != NULL ? PyTuple_Pack(2, value, cas_obj) : NULL;
    Py_XDECREF(cas_obj);
    if (entry == NULL)
        goto done;
    int r = PyDict_SetItem(st->data, key, entry);
    Py_DECREF(entry);
    if (r < 0)
        goto done;
    if (has_ttl) {
        unsigned long long due = ttl > U64_MAX_ - now ? U64_MAX_ : now + ttl;
        PyObject *due_obj = PyLong_FromUnsignedLongLong(due);
        PyObject *item = due_obj != NULL ? PyTuple_Pack(2, due_obj, key) : NULL;
        r = item != NULL ? PyDict_SetItem(st->deadlines, key, due_obj) : -1;
        Py_XDECREF(due_obj);
        pushed_to = st->by_deadline;
        Py_INCREF(pushed_to);                   /* _compact replaces it */
        PyObject *pargs[2] = {pushed_to, item};
        PyObject *pushed = r == 0 ? PyObject_Vectorcall(heappush, pargs, 2, NULL) : NULL;
        Py_XDECREF(item);
        if (pushed == NULL)
            goto done;
        Py_DECREF(pushed);
        if (PyList_GET_SIZE(pushed_to) > 2 * PyDict_GET_SIZE(st->deadlines) + 64
                && call_method_void(self, s__compact, NULL, 0) < 0)
            goto done;
        st->evictable += new_cost;
        int reap = pop_stale(st, pushed_to, now);
        if (reap < 0 || (reap && call_method_void(self, s__reap, &now_obj, 1) < 0))
            goto done;
    }
    status = status_ok;
done:
    Py_XDECREF(old);
    Py_XDECREF(old_due_obj);
    Py_XDECREF(now_obj);
    Py_XDECREF(pushed_to);
    return status;
}

static PyObject *store_set(StoreCore *st, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const usage = "set(key, value, cas, ttl_ns=None)";
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *ttl_obj = Py_None;
    if (nargs + nkw < 3 || nargs + nkw > 4 || nargs < 3
            || (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "ttl_ns") != 0)) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (nargs + nkw == 4)
        ttl_obj = args[3];
    PyObject *key = args[0], *value = args[1];
    int ok = 1;
    unsigned long long cas = as_u64(args[2], &ok), ttl = 0;
    if (ttl_obj != Py_None)
        ttl = as_u64(ttl_obj, &ok);
    if (st->pure || entry_overhead < 0 || !ok || cas > 0xFFFFFFFFULL
            || !PyBytes_CheckExact(key) || !PyBytes_CheckExact(value) || st->lock == NULL) {
        PyObject *pargs[4] = {key, value, args[2], ttl_obj};
        return call_method((PyObject *)st, s__locked_set, pargs, 4);
    }
    PyObject *lock = st->lock;
    Py_INCREF(lock);
    PyObject *got = PyObject_VectorcallMethod(s_acquire, &lock, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (got == NULL) {
        Py_DECREF(lock);
        return NULL;
    }
    Py_DECREF(got);
    long long status = set_locked(st, key, value, cas, ttl_obj != Py_None, ttl);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);                 /* release even when a step raised */
    PyObject *rel = PyObject_VectorcallMethod(s_release, &lock, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(lock);
    if (rel == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(rel);
    if (et != NULL) {
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    return PyLong_FromLongLong(status);
}

static int store_traverse(StoreCore *st, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(st));
    Py_VISIT(st->data);
    Py_VISIT(st->deadlines);
    Py_VISIT(st->by_deadline);
    Py_VISIT(st->lock);
    Py_VISIT(st->clock);
    Py_VISIT(st->dict);
    return 0;
}

static int store_clear(StoreCore *st) {
    Py_CLEAR(st->data);
    Py_CLEAR(st->deadlines);
    Py_CLEAR(st->by_deadline);
    Py_CLEAR(st->lock);
    Py_CLEAR(st->clock);
    Py_CLEAR(st->dict);
    return 0;
}

static void store_dealloc(StoreCore *st) {
    PyTypeObject *tp = Py_TYPE(st);
    PyObject_GC_UnTrack(st);
    if (st->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)st);
    store_clear(st);
    tp->tp_free((PyObject *)st);
    Py_DECREF(tp);
}

static PyMemberDef store_members[] = {
    {"_data", T_OBJECT_EX, offsetof(StoreCore, data), 0, NULL},
    {"_deadlines", T_OBJECT_EX, offsetof(StoreCore, deadlines), 0, NULL},
    {"_by_deadline", T_OBJECT_EX, offsetof(StoreCore, by_deadline), 0, NULL},
    {"_lock", T_OBJECT_EX, offsetof(StoreCore, lock), 0, NULL},
    {"clock", T_OBJECT_EX, offsetof(StoreCore, clock), 0, NULL},
    {"_bytes", T_LONGLONG, offsetof(StoreCore, bytes), 0, NULL},
    {"_evictable", T_LONGLONG, offsetof(StoreCore, evictable), 0, NULL},
    {"_next_cas", T_LONGLONG, offsetof(StoreCore, next_cas), 0, NULL},
    {"max_bytes", T_LONGLONG, offsetof(StoreCore, max_bytes), 0, NULL},
    {"_pure", T_BOOL, offsetof(StoreCore, pure), 0, NULL},
    {"__dictoffset__", T_PYSSIZET, offsetof(StoreCore, dict), READONLY, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(StoreCore, weakrefs), READONLY, NULL},
    {NULL},
};

static PyMethodDef store_methods[] = {
    {"set", (PyCFunction)(void (*)(void))store_set, METH_FASTCALL | METH_KEYWORDS,
     "set(key, value, cas, ttl_ns=None) -> status (LocalStore._set in C, under _lock)"},
    {NULL},
};

static PyType_Slot store_slots[] = {
    {Py_tp_doc, "LocalStore's base: the fields its set() in C reads (abi/_local_store.c)"},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, store_dealloc},
    {Py_tp_traverse, store_traverse},
    {Py_tp_clear, store_clear},
    {Py_tp_members, store_members},
    {Py_tp_methods, store_methods},
    {0, NULL},
};

static PyType_Spec store_spec = {
    "abi._local_store.StoreCore", sizeof(StoreCore), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, store_slots,
};

/* configure(entry_overhead, ok, cas_mismatch, internal_failure): shared_store.py's constants,
 * given once at import so that they have one definition. */
static PyObject *configure(PyObject *module, PyObject *args) {
    long long ovh, okv, cm, inf;
    if (!PyArg_ParseTuple(args, "LLLL", &ovh, &okv, &cm, &inf))
        return NULL;
    entry_overhead = ovh;
    status_ok = okv;
    status_cas_mismatch = cm;
    status_internal_failure = inf;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(entry_overhead, ok, cas_mismatch, internal_failure)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "abi._local_store", "LocalStore.set in C (see abi/_local_store.c)", -1, methods,
};

PyMODINIT_FUNC PyInit__local_store(void) {
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_acquire, "acquire"}, {&s_release, "release"}, {&s__drop, "_drop"}, {&s__fits, "_fits"},
        {&s__compact, "_compact"}, {&s__reap, "_reap"}, {&s__locked_set, "_locked_set"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    PyObject *hq = PyImport_ImportModule("heapq");
    if (hq == NULL)
        return NULL;
    heappush = PyObject_GetAttrString(hq, "heappush");
    heappop = PyObject_GetAttrString(hq, "heappop");
    Py_DECREF(hq);
    if (heappush == NULL || heappop == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    PyObject *tp = PyType_FromSpec(&store_spec);
    if (tp == NULL || PyModule_AddObject(m, "StoreCore", tp) < 0) {
        Py_XDECREF(tp);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
