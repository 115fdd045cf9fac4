/* The two hot crossings of abi/engine/crossing.py in C, without ctypes in between, and the
 * epoch ticker of abi/engine/ticker.py as a C thread that never takes the GIL (below).
 *
 * Optional: built at install (setup.py, optional=True); when it is missing, crossing.py does
 * the same through ctypes prototypes (the tests run both). It links against nothing: the
 * address of wasmtime_func_call_unchecked comes from crossing.py (ctypes resolved it in
 * wasmtime-py's library), so this file never needs wasmtime's headers or library.
 *
 *   call(ctx, func, args, nargs, trap_out) -> int
 *       wasmtime_func_call_unchecked with the GIL released (other Python threads, e.g. a
 *       build's, run meanwhile), the thread marked as running a guest for the ticker;
 *       returns the wasmtime_error_t* as an int (0: none). Same arguments and result as
 *       crossing.py's ctypes prototype ``_call_unchecked``.
 *   HOST_TRAMPOLINE: address of a wasmtime_func_unchecked_callback_t whose env is a Python
 *       callable; it calls ``env(None, caller, slots, len)`` with the GIL, where ``slots`` is
 *       a writable memoryview over the len * 16 bytes of arguments and results (where the
 *       ctypes path passes their address, and the callback pays ~0.5 us to wrap it), and
 *       returns its int result (a wasm_trap_t* or 0), as ctypes' CFUNCTYPE closure would.
 *   HostFn, TYPED_TRAMPOLINE: the same for integer signatures, with the generated callback's
 *       work done in C too (see "typed host functions" below).
 *   set_call_target(address): the address of wasmtime_func_call_unchecked.
 *   ticker_*, charged_ns, gc_callback: the epoch ticker (see "the epoch ticker without the
 *       GIL" below; ticker.py's _NativeTicker drives it).
 *   mem_read, mem_header_pair, mem_put_result: what host functions do with guest memory most,
 *       for instance.py's Memory (see "guest memory for host functions" below).
 *   Guarded: abi/hostcalls.py's error wrapper of a host function (see "guarded host functions").
 *   serialize_pairs: abi/pairs.py's header-map serialization (see "header maps as the guest
 *       reads them").
 *   GuestFn, CallCore, Tally: a guest export's whole caller (what call() is the core of), the
 *       store state it reads, what its top-level calls add up to (see "guest calls" below).
 *   set_deadline_target: where GuestFn's re-arm sets the epoch deadline (see "deadline
 *       re-arm" below).
 *   ContextCore, HeaderMapCore: the C bases of abi/context.py's HttpContext and
 *       abi/buffers.py's HeaderMap (see "an HTTP context's construction" below).
 *   header_edit, time_ns: host functions of every request whole in C on their common path
 *       (see "host calls of every request" below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void *(*call_unchecked_t)(void *ctx, void *func, void *args, size_t nargs, void **trap);

static call_unchecked_t call_target = NULL;

static PyObject *set_call_target(PyObject *self, PyObject *arg) {
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && PyErr_Occurred())
        return NULL;
    call_target = (call_unchecked_t)p;
    Py_RETURN_NONE;
}


/* -- the epoch ticker without the GIL ---------------------------------------------------
 * The same rules as ticker.py's _Ticker (read its docstring first), in a C thread that never
 * takes the GIL: every TICKER_PERIOD it reads the CPU clock (minus Python GC time) of each
 * thread that runs guest calls, adds the largest advance to the deadline clock and brings
 * every registered engine's epoch up to it. What differs, and why:
 *
 * - It follows threads, not stores. A thread is counted while a guest call runs on it
 *   (``calls``, kept by call() below and by enter()/leave() around an instantiation) or while
 *   it armed a deadline less than REARM ago. The generated Python caller checks the re-arm
 *   rate limit before call() raises ``calls``, so the ticker may forget the thread in between;
 *   call() then finds ``live`` cleared and registers the thread again itself (the ticker clears
 *   ``live`` before it reads ``calls``, call() raises ``calls`` before it reads ``live``:
 *   sequentially consistent, so one of the two sees the other).
 * - One ticker thread per process serves every engine (each keeps its own epoch, from the
 *   deadline clock at its registration). A guest of one engine advances the others too: that
 *   only makes their deadlines come early, and deadline_reached() (store.py) charges each
 *   call its own thread's CPU and lets it go on.
 * - GC time: gc_callback() is in gc.callbacks (ticker.py adds it) and keeps each thread's GC
 *   time in its slot, where the ticker thread reads it.
 * - A slot lives as long as its thread (a pthread key's destructor frees it).
 */
#define EPOCH_NS 1000000LL          /* ticker.py EPOCH_MS */

typedef void (*increment_epoch_t)(void *engine);

typedef struct slot {               /* one per thread that ever armed a deadline */
    struct slot *next;
    clockid_t clock;                /* this thread's CPU clock (the process's if none) */
    _Atomic int64_t gc_ns;          /* CPU time spent in Python's cyclic GC */
    _Atomic int64_t gc_started;     /* the CPU clock when a running collection began; 0 */
    _Atomic int calls;              /* guest calls running on this thread */
    _Atomic int live;               /* counted by the ticker (changed under mu) */
    int64_t last;                   /* charged reading at the last tick (under mu) */
    int64_t armed_ns;               /* CLOCK_MONOTONIC of the last arm (under mu) */
} slot;

typedef struct engine_ref {
    struct engine_ref *next;
    void *engine;                   /* wasm_engine_t* */
    int64_t base;                   /* deadline clock (epochs) at registration */
    int64_t epoch;                  /* epochs this ticker added to it */
} engine_ref;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cv = PTHREAD_COND_INITIALIZER;
static slot *slots;
static engine_ref *engines;
static int64_t cpu_ns;              /* the deadline clock: CPU ns charged to guest calls */
static int idle = 1;
static int thread_started;
static int64_t period_ns = 2000000, rearm_ns = 2000000;
static increment_epoch_t increment_epoch;
static pthread_key_t slot_key;
static __thread slot *my_slot;

static int64_t read_ns(clockid_t clock) {   /* -1: the clock is gone (its thread exited) */
    struct timespec ts;
    if (clock_gettime(clock, &ts) != 0)
        return -1;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A thread's CPU time minus its GC time; a running collection stands still at its start.
 * gc_callback() stores gc_ns before it clears gc_started, and this loads them the other way
 * round: a reading may come out low for one tick (the next makes up for it), never high. */
static int64_t charged(slot *s) {
    int64_t now = read_ns(s->clock);
    if (now < 0)
        return -1;
    int64_t started = atomic_load(&s->gc_started);
    return (started ? started : now) - atomic_load(&s->gc_ns);
}

/* CPU charged since the last tick; ``me``'s reading is ``mine`` (a thread CPU clock read is a
 * system call, ~0.7 us here: the caller has just read its own). me NULL: read every clock. */
static int64_t pending_locked(slot *me, int64_t mine) {
    int64_t step = 0;
    for (slot *s = slots; s; s = s->next) {
        if (!atomic_load(&s->live))
            continue;
        int64_t r = s == me ? mine : charged(s);
        if (r >= 0 && r - s->last > step)
            step = r - s->last;
    }
    return step;
}

static int any_live_locked(void) {
    if (engines == NULL)
        return 0;
    for (slot *s = slots; s; s = s->next)
        if (atomic_load(&s->live))
            return 1;
    return 0;
}

static void tick_locked(void) {
    int64_t now = read_ns(CLOCK_MONOTONIC), step = 0;
    for (slot *s = slots; s; s = s->next) {
        if (!atomic_load(&s->live))
            continue;
        atomic_store(&s->live, 0);          /* before reading calls: see call() */
        if (atomic_load(&s->calls) == 0 && now - s->armed_ns > rearm_ns)
            continue;                       /* no call on that thread: forget it */
        int64_t r = charged(s);
        if (r < 0)
            continue;                       /* the thread has exited */
        atomic_store(&s->live, 1);
        if (r - s->last > step)
            step = r - s->last;
        s->last = r;
    }
    cpu_ns += step;
    int64_t target = cpu_ns / EPOCH_NS;
    for (engine_ref *e = engines; e; e = e->next)
        while (e->epoch < target - e->base) {
            increment_epoch(e->engine);     /* an atomic add in wasmtime */
            e->epoch++;
        }
}

static void *ticker_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!any_live_locked()) {        /* nothing to count: nap until an arm */
            idle = 1;
            pthread_cond_wait(&wake_cv, &mu);
        }
        idle = 0;
        pthread_mutex_unlock(&mu);
        struct timespec ts = {0, (long)period_ns};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&mu);
        tick_locked();
    }
    return NULL;
}

/* Count this thread again from now (mu held); r: its charged() reading now. */
static void revive_locked(slot *s, int64_t r) {
    if (!atomic_load(&s->live)) {
        s->last = r < 0 ? 0 : r;
        atomic_store(&s->live, 1);
    }
    s->armed_ns = read_ns(CLOCK_MONOTONIC);
    if (idle)
        pthread_cond_signal(&wake_cv);
}

static void slot_gone(void *p) {            /* pthread key destructor: the thread exits */
    pthread_mutex_lock(&mu);
    for (slot **pp = &slots; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = ((slot *)p)->next;
            break;
        }
    pthread_mutex_unlock(&mu);
    free(p);
}

static slot *this_slot(void) {              /* NULL: out of memory (exception set) */
    slot *s = my_slot;
    if (s != NULL)
        return s;
    s = calloc(1, sizeof(slot));
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (pthread_getcpuclockid(pthread_self(), &s->clock) != 0)
        s->clock = CLOCK_PROCESS_CPUTIME_ID;    /* others' CPU counts too: early, never late */
    pthread_setspecific(slot_key, s);
    pthread_mutex_lock(&mu);
    s->next = slots;
    slots = s;
    pthread_mutex_unlock(&mu);
    my_slot = s;
    return s;
}

static void after_fork_child(void) {        /* only the forking thread survives */
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&wake_cv, NULL);
    thread_started = 0;
    idle = 1;
}

static int start_locked(void) {
    if (thread_started)
        return 0;
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, ticker_main, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    thread_started = 1;
    return 0;
}

static PyObject *ticker_configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "ticker_configure(increment_epoch_address, period_ns, rearm_ns)");
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(args[0]);
    long long period = PyLong_AsLongLong(args[1]), rearm = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&mu);
    increment_epoch = (increment_epoch_t)p;
    period_ns = period;
    rearm_ns = rearm;
    pthread_mutex_unlock(&mu);
    Py_RETURN_NONE;
}

static PyObject *ticker_add(PyObject *self, PyObject *arg) {
    void *engine = PyLong_AsVoidPtr(arg);
    if (engine == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "null engine");
        return NULL;
    }
    if (increment_epoch == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ticker_configure() was not called");
        return NULL;
    }
    engine_ref *e = calloc(1, sizeof(engine_ref));
    if (e == NULL)
        return PyErr_NoMemory();
    e->engine = engine;
    pthread_mutex_lock(&mu);
    if (start_locked() < 0) {
        pthread_mutex_unlock(&mu);
        free(e);
        return NULL;
    }
    e->base = cpu_ns / EPOCH_NS;
    e->next = engines;
    engines = e;
    pthread_mutex_unlock(&mu);
    Py_RETURN_NONE;
}

static PyObject *ticker_remove(PyObject *self, PyObject *arg) {
    void *engine = PyLong_AsVoidPtr(arg);
    if (engine == NULL && PyErr_Occurred())
        return NULL;
    engine_ref *gone = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&mu);                /* after this, the ticker never touches it */
    for (engine_ref **pp = &engines; *pp; pp = &(*pp)->next)
        if ((*pp)->engine == engine) {
            gone = *pp;
            *pp = gone->next;
            break;
        }
    pthread_mutex_unlock(&mu);
    Py_END_ALLOW_THREADS
    free(gone);
    Py_RETURN_NONE;
}

static engine_ref *find_locked(void *engine) {
    for (engine_ref *e = engines; e; e = e->next)
        if (e->engine == engine)
            return e;
    return NULL;
}

/* register() -> lag: count this thread's CPU from now on (a deadline is being armed);
 * returns how far the epoch may still jump at once (ms), as _Ticker.register does. */
static int64_t register_thread(slot *s, int64_t r) {   /* r: charged(s) just now */
    pthread_mutex_lock(&mu);
    revive_locked(s, r);
    int64_t lag = (cpu_ns + pending_locked(s, r)) / EPOCH_NS - cpu_ns / EPOCH_NS;
    pthread_mutex_unlock(&mu);
    return lag;
}

static PyObject *ticker_register(PyObject *self, PyObject *noarg) {
    slot *s = this_slot();
    if (s == NULL)
        return NULL;
    return PyLong_FromLongLong(register_thread(s, charged(s)));
}

/* state(engine) -> (epoch, now_ms, idle): the engine's epoch, the deadline clock in that
 * engine's epochs (the epoch never runs ahead of it), whether the ticker naps. */
static PyObject *ticker_state(PyObject *self, PyObject *arg) {
    void *engine = PyLong_AsVoidPtr(arg);
    if (engine == NULL && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&mu);
    engine_ref *e = find_locked(engine);
    long long epoch = e ? e->epoch : 0, base = e ? e->base : 0;
    long long now = (cpu_ns + pending_locked(NULL, 0)) / EPOCH_NS - base;
    int napping = idle;
    pthread_mutex_unlock(&mu);
    return Py_BuildValue("(LLO)", epoch, now, napping ? Py_True : Py_False);
}

/* enter()/leave(): a guest runs on this thread outside call() (instantiation through
 * wasmtime-py runs the start function): keep the thread counted meanwhile. */
static PyObject *ticker_enter(PyObject *self, PyObject *noarg) {
    slot *s = this_slot();
    if (s == NULL)
        return NULL;
    atomic_fetch_add(&s->calls, 1);
    Py_RETURN_NONE;
}

static PyObject *ticker_leave(PyObject *self, PyObject *noarg) {
    slot *s = my_slot;
    if (s != NULL)
        atomic_fetch_sub(&s->calls, 1);
    Py_RETURN_NONE;
}

/* charged_ns(): this thread's deadline clock, as the ticker reads it. */
static PyObject *charged_ns(PyObject *self, PyObject *noarg) {
    slot *s = my_slot;
    int64_t r = s ? charged(s) : read_ns(CLOCK_THREAD_CPUTIME_ID);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong(r);
}

/* gc.callbacks entry: count this thread's time in the cyclic GC (threads with a slot). */
static PyObject *gc_callback(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    slot *s = my_slot;
    if (s == NULL || nargs < 1 || !PyUnicode_Check(args[0]))
        Py_RETURN_NONE;
    int64_t now = read_ns(s->clock);
    if (now < 0)
        Py_RETURN_NONE;
    if (PyUnicode_READ_CHAR(args[0], 2) == 'a') {       /* "start" */
        atomic_store(&s->gc_started, now);
    } else {                                            /* "stop" */
        int64_t started = atomic_load(&s->gc_started);
        if (started) {
            atomic_fetch_add(&s->gc_ns, now - started);
            atomic_store(&s->gc_started, 0);
        }
    }
    Py_RETURN_NONE;
}

/* Set on a thread once it runs a chain walk (walk_headers): a thread that serves requests.
 * Its guest calls keep the GIL. Releasing and re-taking it costs two mutex round trips per
 * call (a request makes ~25), and on the event loop's thread it buys nothing: the loop waits
 * for the guest either way, and the epoch ticker that ends a runaway guest needs no GIL. A
 * build thread never walks a chain, so its guest calls (a start or on_configure that computes
 * for a second) still release the GIL and let the loop run. */
static __thread int serving;

/* wasmtime_func_call_unchecked, this thread counted by the ticker meanwhile, with the GIL
 * released unless the thread serves requests (``serving``); returns the wasmtime_error_t*
 * (NULL: none). call() and GuestFn's entry. */
static void *run_guest(void *ctx, void *func, void *vals, size_t n, void **trap) {
    slot *s = my_slot;              /* NULL: this thread never armed (the Python ticker) */
    if (s != NULL) {
        atomic_fetch_add(&s->calls, 1);
        if (!atomic_load(&s->live)) {       /* forgotten since the arm: count it again */
            pthread_mutex_lock(&mu);
            revive_locked(s, charged(s));
            pthread_mutex_unlock(&mu);
        }
    }
    void *err;
    if (serving) {
        err = call_target(ctx, func, vals, n, trap);
    } else {
        Py_BEGIN_ALLOW_THREADS
        err = call_target(ctx, func, vals, n, trap);
        Py_END_ALLOW_THREADS
    }
    if (s != NULL)
        atomic_fetch_sub(&s->calls, 1);
    return err;
}

static PyObject *call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "call(ctx, func, args, nargs, trap_out)");
        return NULL;
    }
    if (call_target == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_call_target() was not called");
        return NULL;
    }
    void *ctx = PyLong_AsVoidPtr(args[0]);
    void *func = PyLong_AsVoidPtr(args[1]);
    void *vals = PyLong_AsVoidPtr(args[2]);
    size_t n = PyLong_AsSize_t(args[3]);
    void **trap = (void **)PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromVoidPtr(run_guest(ctx, func, vals, n, trap));
}

/* wasmtime_func_unchecked_callback_t: (env, caller, args_and_results, len) -> wasm_trap_t* */
static void *host_trampoline(void *env, void *caller, void *vals, size_t n) {
    PyGILState_STATE gil = PyGILState_Ensure();
    void *trap = NULL;
    PyObject *argv[4];
    argv[0] = Py_None;
    argv[1] = PyLong_FromVoidPtr(caller);
    static char none[16];   /* a function without params or results may get no buffer */
    argv[2] = PyMemoryView_FromMemory(n && vals ? (char *)vals : none, (Py_ssize_t)n * 16,
                                      PyBUF_WRITE);
    argv[3] = PyLong_FromSize_t(n);
    if (argv[1] && argv[2] && argv[3]) {
        PyObject *r = PyObject_Vectorcall((PyObject *)env, argv, 4, NULL);
        if (r != NULL) {
            if (r != Py_None) {
                trap = PyLong_AsVoidPtr(r);
                if (trap == NULL && PyErr_Occurred())
                    PyErr_WriteUnraisable((PyObject *)env);
            }
            Py_DECREF(r);
        } else {
            /* The generated callback catches BaseException: only a bug of ours gets here. */
            PyErr_WriteUnraisable((PyObject *)env);
        }
    } else {
        PyErr_WriteUnraisable((PyObject *)env);
    }
    Py_XDECREF(argv[1]);
    Py_XDECREF(argv[2]);
    Py_XDECREF(argv[3]);
    PyGILState_Release(gil);
    return trap;
}


/* -- typed host functions: the whole callback in C ---------------------------------------
 * HostFn(st, fn, params, result) is what a generated callback does (crossing.py's
 * _HOST_CALLBACK_SRC) for the common signatures: i32/i64 parameters (params: "I" per i32,
 * "q" per i64) and at most one i32/i64 result ("I", "Q" or ""). TYPED_TRAMPOLINE, with a
 * HostFn as env, reads the arguments from the slots (i32 unsigned, i64 signed), calls fn,
 * writes the result masked to its width, then asks st: a failure goes to st.host_failed(exc),
 * a store poisoned meanwhile to st.unwind(). No Python frame, memoryview or struct per call. */
#define MAX_TYPED_PARAMS 16

typedef struct {
    PyObject_HEAD
    PyObject *st;
    PyObject *fn;
    int nparams;
    char params[MAX_TYPED_PARAMS];
    char result;                    /* 0, 'I' or 'Q' */
} HostFn;

static PyObject *str_poisoned, *str_unwind, *str_host_failed;

static int hostfn_init(HostFn *self, PyObject *args, PyObject *kw) {
    PyObject *st, *fn;
    const char *params, *result;
    if (!PyArg_ParseTuple(args, "OOss", &st, &fn, &params, &result))
        return -1;
    size_t np = strlen(params);
    if (np > MAX_TYPED_PARAMS || strspn(params, "Iq") != np || strlen(result) > 1 ||
            strspn(result, "IQ") != strlen(result)) {
        PyErr_SetString(PyExc_ValueError, "HostFn: params of I/q (at most 16), result I, Q or ''");
        return -1;
    }
    Py_INCREF(st);
    Py_INCREF(fn);
    Py_XSETREF(self->st, st);
    Py_XSETREF(self->fn, fn);
    self->nparams = (int)np;
    memcpy(self->params, params, np);
    self->result = result[0];
    return 0;
}

static int hostfn_traverse(HostFn *self, visitproc visit, void *arg) {
    Py_VISIT(self->st);
    Py_VISIT(self->fn);
    return 0;
}

static int hostfn_clear(HostFn *self) {
    Py_CLEAR(self->st);
    Py_CLEAR(self->fn);
    return 0;
}

static void hostfn_dealloc(HostFn *self) {
    PyObject_GC_UnTrack(self);
    hostfn_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject HostFnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.HostFn",
    .tp_basicsize = sizeof(HostFn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "HostFn(st, fn, params, result): a host function TYPED_TRAMPOLINE calls",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hostfn_init,
    .tp_traverse = (traverseproc)hostfn_traverse,
    .tp_clear = (inquiry)hostfn_clear,
    .tp_dealloc = (destructor)hostfn_dealloc,
};

/* The trap to return for what st answers (an int address or 0); never raises. */
static void *trap_from(PyObject *r, HostFn *h) {
    void *trap = NULL;
    if (r != NULL) {
        if (r != Py_None) {
            trap = PyLong_AsVoidPtr(r);
            if (trap == NULL && PyErr_Occurred())
                PyErr_WriteUnraisable(h->st);
        }
        Py_DECREF(r);
    } else {
        PyErr_WriteUnraisable(h->st);   /* st.host_failed/unwind never raise: a bug of ours */
    }
    return trap;
}

static void *typed_trampoline(void *env, void *caller, void *vals, size_t n) {
    HostFn *h = (HostFn *)env;
    PyGILState_STATE gil = PyGILState_Ensure();
    unsigned char *slot = (unsigned char *)vals;
    void *trap = NULL;
    PyObject *argv[MAX_TYPED_PARAMS];
    int i, made = 0;
    PyObject *r = NULL;
    for (; made < h->nparams; made++) {
        unsigned char *p = slot + 16 * made;
        argv[made] = h->params[made] == 'I' ? PyLong_FromUnsignedLong(*(uint32_t *)p)
                                            : PyLong_FromLongLong(*(int64_t *)p);
        if (argv[made] == NULL)
            break;
    }
    if (made == h->nparams)
        r = PyObject_Vectorcall(h->fn, argv, (size_t)h->nparams, NULL);
    for (i = 0; i < made; i++)
        Py_DECREF(argv[i]);
    if (r != NULL && h->result) {
        if (!PyLong_Check(r)) {
            PyErr_Format(PyExc_TypeError, "host function returned %.100s, not an int",
                         Py_TYPE(r)->tp_name);
            Py_CLEAR(r);
        } else {
            unsigned long long v = PyLong_AsUnsignedLongLongMask(r);
            Py_CLEAR(r);
            if (!(v == (unsigned long long)-1 && PyErr_Occurred())) {
                memset(slot, 0, 16);
                if (h->result == 'I')
                    *(uint32_t *)slot = (uint32_t)v;
                else
                    *(uint64_t *)slot = (uint64_t)v;
                r = Py_NewRef(Py_None);
            }
        }
    }
    if (r == NULL) {                    /* as ``except BaseException as e: st.host_failed(e)`` */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL && value != NULL)
            PyException_SetTraceback(value, tb);
        trap = trap_from(PyObject_CallMethodOneArg(h->st, str_host_failed,
                                                   value ? value : Py_None), h);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    } else {
        Py_DECREF(r);
        PyObject *poisoned = PyObject_GetAttr(h->st, str_poisoned);
        int yes = poisoned == NULL ? -1 : PyObject_IsTrue(poisoned);
        Py_XDECREF(poisoned);
        if (yes < 0)
            PyErr_WriteUnraisable(h->st);
        else if (yes)
            trap = trap_from(PyObject_CallMethodNoArgs(h->st, str_unwind), h);
    }
    PyGILState_Release(gil);
    return trap;
}

/* -- guest memory for host functions ------------------------------------------------------
 * What instance.py's Memory does for the hot host functions, without a Python frame each (the
 * Memory binds them to itself when its instance is native; its Python methods are the
 * fallback and the reference):
 *   mem_read(mem, ptr, n) -> bytes                        Memory.read
 *   mem_header_pair(mem, kp, ks, vp, vs) -> (key, value)  Memory.header_pair
 *   mem_put_result(mem, alloc, data, ret_pp, ret_size_p) -> bool   Memory.put_result
 * ``mem`` is the Memory: its ``_view`` (a memoryview over linear memory) is read on each call,
 * and a range outside it is handed to ``mem._check(ptr, n)``, which re-reads the size (the
 * guest may have grown) and raises MemoryAccessError when the range is still outside: the
 * bounds are exactly the Python path's. */
static PyObject *str_view, *str_check;

/* A buffer over mem._view that holds [ptr, ptr + n); -1 with an exception set. */
static int mem_span(PyObject *mem, PyObject *ptr_obj, PyObject *n_obj, long long ptr,
                    long long n, Py_buffer *buf, int writable) {
    for (int attempt = 0;; attempt++) {
        PyObject *view = PyObject_GetAttr(mem, str_view);
        if (view == NULL)
            return -1;
        int rc = PyObject_GetBuffer(view, buf, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE);
        Py_DECREF(view);
        if (rc < 0)
            return -1;
        if (ptr >= 0 && n >= 0 && ptr <= buf->len && n <= buf->len - ptr)
            return 0;
        PyBuffer_Release(buf);
        if (attempt) {      /* _check accepted the range, yet the view does not hold it */
            PyErr_SetString(PyExc_SystemError, "Memory._check and Memory._view disagree");
            return -1;
        }
        PyObject *r = ptr_obj && n_obj
            ? PyObject_CallMethodObjArgs(mem, str_check, ptr_obj, n_obj, NULL)
            : PyObject_CallMethod(mem, "_check", "LL", ptr, n);
        if (r == NULL)
            return -1;      /* MemoryAccessError */
        Py_DECREF(r);
    }
}

/* An argument as a signed 64-bit int; a value out of that range becomes -1 (out of bounds:
 * _check raises for it, as the Python path would). */
static int as_offset(PyObject *o, long long *out) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = overflow ? -1 : v;
    return 0;
}

static PyObject *mem_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long ptr, n;
    Py_buffer buf;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "mem_read(mem, ptr, n)");
        return NULL;
    }
    if (as_offset(args[1], &ptr) < 0 || as_offset(args[2], &n) < 0 ||
            mem_span(args[0], args[1], args[2], ptr, n, &buf, 0) < 0)
        return NULL;
    PyObject *r = PyBytes_FromStringAndSize((const char *)buf.buf + ptr, (Py_ssize_t)n);
    PyBuffer_Release(&buf);
    return r;
}

/* A latin-1 str of guest bytes, ASCII upper case lowered when ``lower`` (bytes.lower()). A
 * zero-length string is "" whatever its pointer (Filter.read answers b"" without a check). */
static PyObject *guest_str(PyObject *mem, PyObject *ptr_obj, PyObject *n_obj, int lower) {
    long long ptr, n;
    Py_buffer buf;
    if (as_offset(ptr_obj, &ptr) < 0 || as_offset(n_obj, &n) < 0)
        return NULL;
    if (n == 0)
        return PyUnicode_New(0, 0);
    if (mem_span(mem, ptr_obj, n_obj, ptr, n, &buf, 0) < 0)
        return NULL;
    const unsigned char *src = (const unsigned char *)buf.buf + ptr;
    PyObject *r;
    if (!lower) {
        r = PyUnicode_DecodeLatin1((const char *)src, (Py_ssize_t)n, NULL);
    } else {
        char small[256];
        char *tmp = n <= (long long)sizeof small ? small : PyMem_Malloc((size_t)n);
        if (tmp == NULL) {
            PyBuffer_Release(&buf);
            return PyErr_NoMemory();
        }
        for (long long i = 0; i < n; i++) {
            unsigned char c = src[i];
            tmp[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
        }
        r = PyUnicode_DecodeLatin1(tmp, (Py_ssize_t)n, NULL);
        if (tmp != small)
            PyMem_Free(tmp);
    }
    PyBuffer_Release(&buf);
    return r;
}

static PyObject *mem_header_pair(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "mem_header_pair(mem, key_ptr, key_size, value_ptr, "
                                         "value_size)");
        return NULL;
    }
    PyObject *key = guest_str(args[0], args[1], args[2], 1);
    if (key == NULL)
        return NULL;
    PyObject *value = guest_str(args[0], args[3], args[4], 0);
    if (value == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *r = PyTuple_New(2);
    if (r == NULL) {
        Py_DECREF(key);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(r, 0, key);
    PyTuple_SET_ITEM(r, 1, value);
    return r;
}

/* Copy n bytes (or a little-endian u32) to guest memory at ptr, bounds-checked. */
static int guest_put(PyObject *mem, long long ptr, const void *src, long long n) {
    Py_buffer buf;
    if (mem_span(mem, NULL, NULL, ptr, n, &buf, 1) < 0)
        return -1;
    memcpy((char *)buf.buf + ptr, src, (size_t)n);
    PyBuffer_Release(&buf);
    return 0;
}

static void put_u32le(unsigned char *p, uint32_t v) {
    p[0] = v & 0xFF;
    p[1] = (v >> 8) & 0xFF;
    p[2] = (v >> 16) & 0xFF;
    p[3] = v >> 24;
}

static int guest_put_u32(PyObject *mem, PyObject *ptr_obj, uint32_t v) {
    long long ptr;
    unsigned char le[4];
    put_u32le(le, v);
    if (as_offset(ptr_obj, &ptr) < 0)
        return -1;
    return guest_put(mem, ptr, le, 4);
}

/* put_result: data into a block of the guest's allocator, then its address and size into the
 * two out-pointers (in that order; a bad out-pointer raises after the allocation, as cpp-host).
 * Empty data allocates nothing and writes (0, 0). False: the allocator answered 0. */
static PyObject *mem_put_result(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "mem_put_result(mem, alloc, data, ret_pp, ret_size_p)");
        return NULL;
    }
    PyObject *mem = args[0], *alloc = args[1];
    Py_buffer data;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    uint32_t addr = 0;
    if (data.len > 0) {
        PyObject *n = PyLong_FromSsize_t(data.len);
        PyObject *a = n ? PyObject_CallOneArg(alloc, n) : NULL;
        Py_XDECREF(n);
        if (a == NULL)
            goto done;                          /* a Trap of the allocator: propagates */
        long long at = 0;
        int truth = PyObject_IsTrue(a);         /* ``if not addr`` (None from a void export) */
        int bad = truth < 0 || (truth && as_offset(a, &at) < 0);
        Py_DECREF(a);
        if (bad)
            goto done;
        if (!truth) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        if (guest_put(mem, at, data.buf, data.len) < 0)
            goto done;
        addr = (uint32_t)at;
    }
    if (guest_put_u32(mem, args[3], addr) < 0 ||
            guest_put_u32(mem, args[4], (uint32_t)data.len) < 0)
        goto done;
    result = Py_NewRef(Py_True);
done:
    PyBuffer_Release(&data);
    return result;
}

/* -- guarded host functions ----------------------------------------------------------------
 * Guarded(fn, first, bad_memory, internal, on_error, memory_error, passthrough) is what
 * abi/hostcalls.py's guarded() wrapper does, as a C callable (no Python frame per host call):
 * called with the wasm arguments, it returns fn(first, *args); when fn raises, a
 * ``memory_error`` answers ``bad_memory``, a ``passthrough`` exception (the deliberate traps)
 * and anything that is not an Exception propagate, any other Exception goes to on_error(exc)
 * and answers ``internal``. */
#define MAX_GUARDED_ARGS 16

typedef struct {
    PyObject_HEAD
    PyObject *fn, *first, *bad_memory, *internal, *on_error, *memory_error, *passthrough;
    vectorcallfunc vectorcall;
} Guarded;

static PyObject *guarded_vectorcall(Guarded *g, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || n > MAX_GUARDED_ARGS) {
        PyErr_SetString(PyExc_TypeError, "Guarded: at most 16 positional arguments");
        return NULL;
    }
    PyObject *argv[MAX_GUARDED_ARGS + 1];
    argv[0] = g->first;
    for (Py_ssize_t i = 0; i < n; i++)
        argv[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(g->fn, argv, (size_t)n + 1, NULL);
    if (r != NULL)
        return r;
    if (PyErr_ExceptionMatches(g->memory_error)) {
        PyErr_Clear();
        return Py_NewRef(g->bad_memory);
    }
    if (PyErr_ExceptionMatches(g->passthrough) || !PyErr_ExceptionMatches(PyExc_Exception))
        return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *logged = PyObject_CallOneArg(g->on_error, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (logged == NULL)
        return NULL;        /* as an exception raised in the wrapper's except clause */
    Py_DECREF(logged);
    return Py_NewRef(g->internal);
}

static int guarded_init(Guarded *self, PyObject *args, PyObject *kw) {
    PyObject *o[7];
    if (!PyArg_ParseTuple(args, "OOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6]))
        return -1;
    PyObject **slots[7] = {&self->fn, &self->first, &self->bad_memory, &self->internal,
                           &self->on_error, &self->memory_error, &self->passthrough};
    for (int i = 0; i < 7; i++)
        Py_XSETREF(*slots[i], Py_NewRef(o[i]));
    self->vectorcall = (vectorcallfunc)guarded_vectorcall;
    return 0;
}

static int guarded_traverse(Guarded *self, visitproc visit, void *arg) {
    Py_VISIT(self->fn);
    Py_VISIT(self->first);
    Py_VISIT(self->bad_memory);
    Py_VISIT(self->internal);
    Py_VISIT(self->on_error);
    Py_VISIT(self->memory_error);
    Py_VISIT(self->passthrough);
    return 0;
}

static int guarded_clear(Guarded *self) {
    Py_CLEAR(self->fn);
    Py_CLEAR(self->first);
    Py_CLEAR(self->bad_memory);
    Py_CLEAR(self->internal);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->memory_error);
    Py_CLEAR(self->passthrough);
    return 0;
}

static void guarded_dealloc(Guarded *self) {
    PyObject_GC_UnTrack(self);
    guarded_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject GuardedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.Guarded",
    .tp_basicsize = sizeof(Guarded),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Guarded(fn, first, bad_memory, internal, on_error, memory_error, passthrough)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)guarded_init,
    .tp_traverse = (traverseproc)guarded_traverse,
    .tp_clear = (inquiry)guarded_clear,
    .tp_dealloc = (destructor)guarded_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Guarded, vectorcall),
};

/* -- header maps as the guest reads them ----------------------------------------------------
 * serialize_pairs(items) -> bytes | None: abi/pairs.py serialize_str() of a list of
 * (name, value) str pairs (reference §4.1: u32 N, N x (u32 name_len, u32 value_len),
 * N x (name NUL value NUL); b"" for no pair), each str taken as latin-1 bytes. None when an
 * item is not a pair of one-byte (latin-1) strs: the caller's Python path handles those. */
static PyObject *serialize_pairs(PyObject *self, PyObject *items) {
    if (!PyList_Check(items))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (n == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    if (n > (Py_ssize_t)UINT32_MAX)
        Py_RETURN_NONE;
    Py_ssize_t total = 4 + 8 * n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2)
            Py_RETURN_NONE;
        for (int j = 0; j < 2; j++) {
            PyObject *str = PyTuple_GET_ITEM(t, j);
            if (!PyUnicode_Check(str) || PyUnicode_KIND(str) != PyUnicode_1BYTE_KIND)
                Py_RETURN_NONE;
            total += PyUnicode_GET_LENGTH(str) + 1;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    unsigned char *head = (unsigned char *)PyBytes_AS_STRING(out), *data = head + 4 + 8 * n;
    put_u32le(head, (uint32_t)n);
    head += 4;
    for (Py_ssize_t i = 0; i < n; i++) {        /* no Python code runs: items cannot change */
        PyObject *t = PyList_GET_ITEM(items, i);
        for (int j = 0; j < 2; j++) {
            PyObject *str = PyTuple_GET_ITEM(t, j);
            Py_ssize_t len = PyUnicode_GET_LENGTH(str);
            put_u32le(head, (uint32_t)len);
            head += 4;
            memcpy(data, PyUnicode_1BYTE_DATA(str), (size_t)len);
            data[len] = 0;
            data += len + 1;
        }
    }
    return out;
}

/* -- guest calls: the whole generated caller in C ----------------------------------------
 * CallCore is the base of store.py's _StoreState: what every guest call reads or counts
 * (depth, poisoned, armed_at, tally) as C fields, which Python reads and sets as attributes.
 *
 * GuestFn(st, name, ctx, func, trap_out, params, result) is what crossing.py's generated
 * caller (_GUEST_CALL_SRC, top-level and nested) does, for integer signatures: params "I" per
 * i32 (masked to 32 bits, either sign accepted), "Q" per i64 (masked to 64 bits); at most one
 * result, "I" (i32, returned unsigned), "q" (i64, returned signed) or "" (None).
 * A top-level call (depth 0, not poisoned) raises depth to 1, re-arms the deadline when the last
 * arm is older than the ticker's re-arm period (ticker_configure; rearm(), "deadline re-arm"
 * below: in C on _NativeTicker, else st.arm()), runs the guest as call() does
 * and raises st.failure(err) on an error, a trap or a store poisoned meanwhile; with a Tally
 * in st.tally, it adds itself and its wall time there (one more clock read: the rate limit's
 * reading is its start). A call from inside a host function (depth > 0: e.g. the guest
 * allocator) or on a poisoned store takes the nested path: st.refusal() if poisoned, else
 * depth + 1 around the call, st.failure(err) on an error or trap. The arguments and results
 * live in a buffer on this C frame, so a re-entered export keeps each level's values. No
 * Python frame, struct or tuple per call. */
#define MAX_GUEST_PARAMS 16

typedef struct {                    /* Tally(): what top-level guest calls add up to */
    PyObject_HEAD
    long long calls;
    long long ns;                   /* their wall time (CLOCK_MONOTONIC, as perf_counter) */
} Tally;

static PyMemberDef tally_members[] = {
    {"calls", T_LONGLONG, offsetof(Tally, calls), 0, "top-level guest calls"},
    {"ns", T_LONGLONG, offsetof(Tally, ns), 0, "their wall time, ns"},
    {NULL},
};

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.Tally",
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tally(): calls and wall ns of the top-level guest calls of the stores it is given to",
    .tp_new = PyType_GenericNew,
    .tp_members = tally_members,
};

typedef struct {
    PyObject_HEAD
    int depth;                      /* guest calls in progress on this store */
    char poisoned;
    double armed_at;                /* time.monotonic() of the last arm() */
    Tally *tally;                   /* NULL: top-level calls are not counted */
    /* store.py _StoreState.arm's state, which rearm() (see "deadline re-arm") keeps in C */
    long long deadline_ticks, arm_cpu_ns, budget_ns;
    char native_arm;                /* on _NativeTicker: rearm() arms in C, not st.arm() */
} CallCore;

static PyMemberDef callcore_members[] = {
    {"depth", T_INT, offsetof(CallCore, depth), 0, "guest calls in progress (nesting)"},
    {"poisoned", T_BOOL, offsetof(CallCore, poisoned), 0, "a trap made the store unusable"},
    {"armed_at", T_DOUBLE, offsetof(CallCore, armed_at), 0, "time.monotonic() of the last arm"},
    {"deadline_ticks", T_LONGLONG, offsetof(CallCore, deadline_ticks), 0,
     "epochs (ms of CPU) a call of an arm may run"},
    {"arm_cpu_ns", T_LONGLONG, offsetof(CallCore, arm_cpu_ns), 0,
     "the arming thread's deadline clock at the last arm"},
    {"budget_ns", T_LONGLONG, offsetof(CallCore, budget_ns), 0, "the CPU the calls of that arm may use"},
    {"native_arm", T_BOOL, offsetof(CallCore, native_arm), 0,
     "GuestFn re-arms in C (the store's ticker is _NativeTicker)"},
    {NULL},
};

static PyObject *callcore_get_tally(CallCore *self, void *closure) {
    return Py_NewRef(self->tally ? (PyObject *)self->tally : Py_None);
}

static int callcore_set_tally(CallCore *self, PyObject *value, void *closure) {
    if (value != NULL && value != Py_None && !PyObject_TypeCheck(value, &TallyType)) {
        PyErr_SetString(PyExc_TypeError, "tally must be a Tally or None");
        return -1;
    }
    Py_XSETREF(self->tally, value == NULL || value == Py_None ? NULL : (Tally *)Py_NewRef(value));
    return 0;
}

static PyGetSetDef callcore_getset[] = {
    {"tally", (getter)callcore_get_tally, (setter)callcore_set_tally,
     "the Tally this store's top-level calls add to (None: not counted)", NULL},
    {NULL},
};

static void callcore_dealloc(CallCore *self) {
    Py_CLEAR(self->tally);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject CallCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.CallCore",
    .tp_basicsize = sizeof(CallCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "the per-store call state GuestFn reads in C (base of store._StoreState)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)callcore_dealloc,
    .tp_members = callcore_members,
    .tp_getset = callcore_getset,
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    CallCore *st;
    PyObject *name;
    PyObject *dict;                 /* _owner, _func: what the caller keeps alive */
    void *ctx, *func;
    void **trap;                    /* st.trap_slot's address */
    int nparams, nslots;
    char params[MAX_GUEST_PARAMS];
    char result;                    /* 0, 'I' or 'q' */
} GuestFn;

static PyObject *str_arm, *str_failure, *str_refusal;

static int64_t monotonic_ns(void) {     /* time.monotonic()'s and perf_counter()'s clock */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Raise what st.failure(err) / st.refusal() returns; always NULL. */
static PyObject *raise_from(PyObject *exc) {
    if (exc == NULL)
        return NULL;
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else
        PyErr_Format(PyExc_TypeError, "expected an exception, got %.100s", Py_TYPE(exc)->tp_name);
    Py_DECREF(exc);
    return NULL;
}

static PyObject *guest_failure(GuestFn *g, void *err) {
    PyObject *e = PyLong_FromVoidPtr(err);
    if (e == NULL)
        return NULL;
    PyObject *exc = PyObject_CallMethodOneArg((PyObject *)g->st, str_failure, e);
    Py_DECREF(e);
    return raise_from(exc);
}

static int rearm(CallCore *st, void *ctx, int64_t now_ns);     /* "deadline re-arm" below */

static PyObject *guestfn_call(GuestFn *g, PyObject *const *args, size_t nargsf, PyObject *kw) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((kw != NULL && PyTuple_GET_SIZE(kw)) || nargs != g->nparams) {
        PyErr_Format(PyExc_TypeError, "%U() takes %d positional arguments (%zd given)",
                     g->name, g->nparams, nargs);
        return NULL;
    }
    CallCore *st = g->st;
    int top = !(st->depth || st->poisoned);
    if (!top && st->poisoned)
        return raise_from(PyObject_CallMethodNoArgs((PyObject *)st, str_refusal));
    uint64_t vals[2 * (MAX_GUEST_PARAMS + 1)];      /* 16 bytes a slot, 8-aligned */
    memset(vals, 0, (size_t)g->nslots * 16);
    for (int i = 0; i < g->nparams; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLongMask(args[i]);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        if (g->params[i] == 'I') {
            uint32_t v32 = (uint32_t)v;
            memcpy(&vals[2 * i], &v32, 4);
        } else {
            vals[2 * i] = (uint64_t)v;
        }
    }
    void *err;
    if (top) {
        st->depth = 1;              /* before the rate limit: the ticker relies on it */
        int64_t t0 = monotonic_ns();
        if (t0 * 1e-9 - st->armed_at > rearm_ns * 1e-9 && rearm(st, g->ctx, t0) < 0) {
            st->depth = 0;
            return NULL;
        }
        err = run_guest(g->ctx, g->func, vals, (size_t)g->nslots, g->trap);
        st->depth = 0;
        Tally *tally = st->tally;
        if (tally != NULL) {
            tally->calls++;
            tally->ns += monotonic_ns() - t0;
        }
        if (err || *g->trap || st->poisoned)
            return guest_failure(g, err);
    } else {
        st->depth += 1;
        err = run_guest(g->ctx, g->func, vals, (size_t)g->nslots, g->trap);
        st->depth -= 1;
        if (err || *g->trap)
            return guest_failure(g, err);
    }
    if (g->result == 'I') {
        uint32_t r;
        memcpy(&r, &vals[0], 4);
        return PyLong_FromUnsignedLong(r);
    }
    if (g->result == 'q')
        return PyLong_FromLongLong((int64_t)vals[0]);
    Py_RETURN_NONE;
}

static int guestfn_init(GuestFn *self, PyObject *args, PyObject *kw) {
    PyObject *st, *name, *ctx, *func, *trap;
    const char *params, *result;
    if (!PyArg_ParseTuple(args, "O!UOOOss", &CallCoreType, &st, &name, &ctx, &func, &trap,
                          &params, &result))
        return -1;
    size_t np = strlen(params);
    if (np > MAX_GUEST_PARAMS || strspn(params, "IQ") != np || strlen(result) > 1 ||
            strspn(result, "Iq") != strlen(result)) {
        PyErr_SetString(PyExc_ValueError, "GuestFn: params of I/Q (at most 16), result I, q or ''");
        return -1;
    }
    void *c = PyLong_AsVoidPtr(ctx), *f = PyLong_AsVoidPtr(func), *t = PyLong_AsVoidPtr(trap);
    if (PyErr_Occurred())
        return -1;
    if (c == NULL || f == NULL || t == NULL) {
        PyErr_SetString(PyExc_ValueError, "GuestFn: null context, function or trap slot");
        return -1;
    }
    Py_INCREF(st);
    Py_INCREF(name);
    Py_XSETREF(self->st, (CallCore *)st);
    Py_XSETREF(self->name, name);
    self->ctx = c;
    self->func = f;
    self->trap = (void **)t;
    self->nparams = (int)np;
    memcpy(self->params, params, np);
    self->result = result[0];
    self->nslots = (int)np > 1 ? (int)np : 1;
    self->vectorcall = (vectorcallfunc)guestfn_call;
    return 0;
}

static int guestfn_traverse(GuestFn *self, visitproc visit, void *arg) {
    Py_VISIT(self->st);
    Py_VISIT(self->dict);
    return 0;
}

static int guestfn_clear(GuestFn *self) {
    Py_CLEAR(self->st);
    Py_CLEAR(self->dict);
    return 0;
}

static void guestfn_dealloc(GuestFn *self) {
    PyObject_GC_UnTrack(self);
    guestfn_clear(self);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *guestfn_repr(GuestFn *self) {
    return PyUnicode_FromFormat("<guest function %R>", self->name ? self->name : Py_None);
}

static PyMemberDef guestfn_members[] = {
    {"__name__", T_OBJECT, offsetof(GuestFn, name), READONLY, "the export's name"},
    {NULL},
};

static PyTypeObject GuestFnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.GuestFn",
    .tp_basicsize = sizeof(GuestFn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "GuestFn(st, name, ctx, func, trap_out, params, result): a guest export's caller",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)guestfn_init,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(GuestFn, vectorcall),
    .tp_dictoffset = offsetof(GuestFn, dict),
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_traverse = (traverseproc)guestfn_traverse,
    .tp_clear = (inquiry)guestfn_clear,
    .tp_dealloc = (destructor)guestfn_dealloc,
    .tp_repr = (reprfunc)guestfn_repr,
    .tp_members = guestfn_members,
};

static int guest_module_init(PyObject *m) {
    str_arm = PyUnicode_InternFromString("arm");
    str_failure = PyUnicode_InternFromString("failure");
    str_refusal = PyUnicode_InternFromString("refusal");
    if (str_arm == NULL || str_failure == NULL || str_refusal == NULL ||
            PyType_Ready(&TallyType) < 0 || PyType_Ready(&CallCoreType) < 0 ||
            PyType_Ready(&GuestFnType) < 0 ||
            PyModule_AddObjectRef(m, "Tally", (PyObject *)&TallyType) < 0 ||
            PyModule_AddObjectRef(m, "CallCore", (PyObject *)&CallCoreType) < 0 ||
            PyModule_AddObjectRef(m, "GuestFn", (PyObject *)&GuestFnType) < 0)
        return -1;
    return 0;
}

/* == deadline re-arm =======================================================================
 * What store.py's _StoreState.arm does, for GuestFn's top-level call when the last arm is
 * stale (every REARM_S at most), without a Python frame: the thread's deadline clock read
 * (charged(), as charged_ns()), the thread registered with the ticker (register_thread(), as
 * ticker_register()), armed_at set, and wasmtime_context_set_epoch_deadline(ctx, ticks + lag).
 * Only for a store on _NativeTicker (CallCore.native_arm, set by _StoreState); any other store,
 * or a module whose set_deadline_target() was not called, gets st.arm(), which stays the
 * reference (and what instantiation and the ctypes crossings use).
 *
 *   set_deadline_target(address): the address of wasmtime_context_set_epoch_deadline.
 *
 * Fewer clock reads than arm(): armed_at is GuestFn's monotonic reading just before (an arm
 * that reads as a few ns older only comes due that much sooner), and the thread's CPU clock,
 * a system call (~0.7 us here), is read once for arm_cpu_ns, the ticker's count of this
 * thread and the lag (arm() reads it in charged_ns() and again in ticker_register()). */
typedef void (*set_deadline_t)(void *ctx, uint64_t ticks);

static set_deadline_t set_deadline;

static PyObject *set_deadline_target(PyObject *self, PyObject *arg) {
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && PyErr_Occurred())
        return NULL;
    set_deadline = (set_deadline_t)p;
    Py_RETURN_NONE;
}

/* Arm st's deadline for the calls of the next REARM (now_ns: CLOCK_MONOTONIC); -1: error set. */
static int rearm(CallCore *st, void *ctx, int64_t now_ns) {
    if (!st->native_arm || set_deadline == NULL) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)st, str_arm);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    slot *s = this_slot();
    if (s == NULL)
        return -1;
    int64_t cpu = charged(s);
    if (cpu < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    st->arm_cpu_ns = cpu;
    st->budget_ns = st->deadline_ticks * EPOCH_NS;
    int64_t lag = register_thread(s, cpu);      /* one clock read for both (a syscall) */
    st->armed_at = now_ns * 1e-9;
    set_deadline(ctx, (uint64_t)(st->deadline_ticks + lag));
    return 0;
}
/* == end of: deadline re-arm ============================================================== */

/* == an HTTP context's construction (abi/context.py's HttpContext) ==========================
 * ContextCore is the C base of abi/context.py's HttpContext, built for every request and
 * filter (FilterCore.new_http_context calls the class): ContextCore(filter, context_id,
 * generation, chain) sets the fields HttpContext.__init__ sets in Python where _crossing.c is
 * not built (filter, id, generation, chain; bodies = [None, None], resumed = [False, False],
 * pending_calls = set()) without a Python frame. They are C fields that Python reads and sets
 * as attributes; everything else (_props, waiter, edited, limit_hit...) lives in the
 * instance's __dict__, as before. */
typedef struct {
    PyObject_HEAD
    PyObject *filter, *id, *generation, *chain, *bodies, *resumed, *pending_calls;
    PyObject *dict;
    PyObject *weakrefs;             /* last: not a field the GC visits (see fields_traverse) */
} ContextCore;

static int ctxcore_init(ContextCore *self, PyObject *args, PyObject *kw) {
    PyObject *filter, *cid, *generation, *chain;
    if ((kw != NULL && PyDict_GET_SIZE(kw)) ||
            !PyArg_UnpackTuple(args, "HttpContext", 4, 4, &filter, &cid, &generation, &chain)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "HttpContext(filter, context_id, generation, chain)");
        return -1;
    }
    PyObject *bodies = PyList_New(2), *resumed = PyList_New(2), *pending = PySet_New(NULL);
    if (bodies == NULL || resumed == NULL || pending == NULL) {
        Py_XDECREF(bodies);
        Py_XDECREF(resumed);
        Py_XDECREF(pending);
        return -1;
    }
    PyList_SET_ITEM(bodies, 0, Py_NewRef(Py_None));
    PyList_SET_ITEM(bodies, 1, Py_NewRef(Py_None));
    PyList_SET_ITEM(resumed, 0, Py_NewRef(Py_False));
    PyList_SET_ITEM(resumed, 1, Py_NewRef(Py_False));
    Py_XSETREF(self->filter, Py_NewRef(filter));
    Py_XSETREF(self->id, Py_NewRef(cid));
    Py_XSETREF(self->generation, Py_NewRef(generation));
    Py_XSETREF(self->chain, Py_NewRef(chain));
    Py_XSETREF(self->bodies, bodies);
    Py_XSETREF(self->resumed, resumed);
    Py_XSETREF(self->pending_calls, pending);
    return 0;
}

/* ContextCore and HeaderMapCore are PyObject_HEAD and then only object fields (a weak-reference
 * list last, if any): the GC visits and clears those of the instance's C base. (A heap
 * subtype's type reference is visited and released by subtype_traverse/_dealloc.) */
static Py_ssize_t nfields(PyObject *self) {
    PyTypeObject *t = Py_TYPE(self);
    while (t->tp_flags & Py_TPFLAGS_HEAPTYPE)       /* HttpContext, HeaderMap: add no fields */
        t = t->tp_base;
    Py_ssize_t size = t->tp_basicsize - (t->tp_weaklistoffset ? (Py_ssize_t)sizeof(PyObject *) : 0);
    return (size - (Py_ssize_t)sizeof(PyObject)) / (Py_ssize_t)sizeof(PyObject *);
}

#define FIELDS(self) ((PyObject **)((char *)(self) + sizeof(PyObject)))

static int fields_traverse(PyObject *self, visitproc visit, void *arg) {
    for (Py_ssize_t i = 0, n = nfields(self); i < n; i++)
        Py_VISIT(FIELDS(self)[i]);
    return 0;
}

static int fields_clear(PyObject *self) {
    for (Py_ssize_t i = 0, n = nfields(self); i < n; i++)
        Py_CLEAR(FIELDS(self)[i]);
    return 0;
}

static void fields_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    Py_ssize_t weak = Py_TYPE(self)->tp_weaklistoffset;
    if (weak && *(PyObject **)((char *)self + weak) != NULL)
        PyObject_ClearWeakRefs(self);
    fields_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyMemberDef ctxcore_members[] = {
    {"filter", T_OBJECT, offsetof(ContextCore, filter), 0, "the filter (instance) of this context"},
    {"id", T_OBJECT, offsetof(ContextCore, id), 0, "the context id"},
    {"generation", T_OBJECT, offsetof(ContextCore, generation), 0, "the filter's instance generation"},
    {"chain", T_OBJECT, offsetof(ContextCore, chain), 0, "the request's chain (None: released)"},
    {"bodies", T_OBJECT, offsetof(ContextCore, bodies), 0, "[request, response] body buffers"},
    {"resumed", T_OBJECT, offsetof(ContextCore, resumed), 0, "[request, response] continued"},
    {"pending_calls", T_OBJECT, offsetof(ContextCore, pending_calls), 0, "callout tokens in flight"},
    {NULL},
};

static PyGetSetDef ctxcore_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject ContextCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.ContextCore",
    .tp_basicsize = sizeof(ContextCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ContextCore(filter, context_id, generation, chain): the C base of HttpContext",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ctxcore_init,
    .tp_dictoffset = offsetof(ContextCore, dict),
    .tp_weaklistoffset = offsetof(ContextCore, weakrefs),
    .tp_traverse = fields_traverse,
    .tp_clear = fields_clear,
    .tp_dealloc = fields_dealloc,
    .tp_members = ctxcore_members,
    .tp_getset = ctxcore_getset,
};

/* == end of: an HTTP context's construction ============================================== */

/* == a header map's construction (abi/buffers.py's HeaderMap) ==============================
 * HeaderMapCore is the C base of abi/buffers.py's HeaderMap, built twice per request (the
 * request's and the response's map): HeaderMapCore(items) sets what _HeaderMapFields.__init__
 * sets in Python where _crossing.c is not built (items; _ser None, unsafe False, grown 0)
 * without a Python frame; the four are C fields Python reads and sets as attributes (any
 * object, as before). No __dict__: HeaderMap has __slots__ = (). */
typedef struct {
    PyObject_HEAD
    PyObject *items, *ser, *unsafe, *grown;
} HeaderMapCore;

static int hmcore_init(HeaderMapCore *self, PyObject *args, PyObject *kw) {
    PyObject *items;
    if ((kw != NULL && PyDict_GET_SIZE(kw)) || !PyArg_UnpackTuple(args, "HeaderMap", 1, 1, &items)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "HeaderMap(items)");
        return -1;
    }
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL)
        return -1;
    Py_XSETREF(self->items, Py_NewRef(items));
    Py_XSETREF(self->ser, Py_NewRef(Py_None));
    Py_XSETREF(self->unsafe, Py_NewRef(Py_False));
    Py_XSETREF(self->grown, zero);
    return 0;
}

static PyMemberDef hmcore_members[] = {
    {"items", T_OBJECT, offsetof(HeaderMapCore, items), 0, "(name, value) pairs, names lower-case"},
    {"_ser", T_OBJECT, offsetof(HeaderMapCore, ser), 0, "the cached serialization (None: stale)"},
    {"unsafe", T_OBJECT, offsetof(HeaderMapCore, unsafe), 0, "an entry must not reach the wire"},
    {"grown", T_OBJECT, offsetof(HeaderMapCore, grown), 0, "serialized bytes the edits added"},
    {NULL},
};

static PyTypeObject HeaderMapCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.HeaderMapCore",
    .tp_basicsize = sizeof(HeaderMapCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "HeaderMapCore(items): the C base of HeaderMap",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hmcore_init,
    .tp_traverse = fields_traverse,
    .tp_clear = fields_clear,
    .tp_dealloc = fields_dealloc,
    .tp_members = hmcore_members,
};
/* == end of: a header map's construction ================================================= */

static int context_core_init(PyObject *m) {     /* ContextCore and HeaderMapCore */
    if (PyType_Ready(&ContextCoreType) < 0 || PyType_Ready(&HeaderMapCoreType) < 0 ||
            PyModule_AddObjectRef(m, "ContextCore", (PyObject *)&ContextCoreType) < 0 ||
            PyModule_AddObjectRef(m, "HeaderMapCore", (PyObject *)&HeaderMapCoreType) < 0)
        return -1;
    return 0;
}

/* == host calls of every request (abi/hostcalls.py) ========================================
 * The host functions a filter chain calls on every request, done whole in C on their common
 * path; anything else (no memory yet, a map or context the fast path does not know, an edit
 * the host_limit bound refuses) is handed to ``fallback``, the Python host function, which
 * is the reference and does exactly what it always did (the pure-Python path runs it alone).
 *
 *   header_edit(fallback, replace, limit, map_names, f, map_type, kp, ks, vp, vs) -> status
 *       proxy_replace_header_map_value (``replace`` true: Envoy setCopy) or
 *       proxy_add_header_map_value on a stream's HeaderMap (abi/buffers.py): the name read
 *       lower-cased and the value latin-1 (mem_header_pair), the context's ``edited`` set,
 *       the map's ``items`` / ``grown`` / ``_ser`` / ``unsafe`` updated as HeaderMap.replace
 *       / add and valid_header() would. ``map_names``: the chain attribute of each stream
 *       map type (context.STREAM_MAPS); ``limit``: MAX_HEADER_MAP_BYTES.
 *   time_ns(fallback, f, ret_p) -> status
 *       proxy_get_current_time_nanoseconds: f.now_ns() as a u64 at ret_p.
 *   stream_property(fallback, table, invalid, f, path_ptr, path_size, ret_pp, ret_size_p)
 *       -> status
 *       proxy_get_property of a stream property filters read on every request (``table``:
 *       properties.STREAM_PROPERTIES, path -> getter of an HTTP context's chain): the value
 *       into a block of the guest's allocator as Filter.write_result puts it (``invalid``:
 *       Status.INVALID_MEMORY_ACCESS when the allocator answers 0). Any other path, an
 *       absent value, or no allocator free to call goes to the fallback.
 *   shared_data_get(fallback, invalid, f, key_ptr, key_size, ret_pp, ret_size_p, ret_cas_p)
 *       -> status
 *       proxy_get_shared_data: f.store.get(key) (NOT_FOUND, 1, when absent); the cas pointer
 *       checked before allocating, the value written as Filter.write_result puts it, then the
 *       cas. An empty key, a store answering otherwise, or no allocator free to call goes to
 *       the fallback.
 *   foreign_set_ttl(fallback, name, invalid, f, name_ptr, name_size, args_ptr, args_size,
 *                   ret_pp, ret_size_p) -> status
 *       proxy_call_foreign_function of ``name`` (foreign.SET_SHARED_DATA_TTL): its arguments
 *       parsed as foreign.set_shared_data_ttl does, f.store.set(key, value, cas, ttl_ns), and
 *       the write's status (u32 LE) written as write_result puts it. Another name, malformed
 *       arguments, or no allocator free to call (checked before the write) go to the fallback.
 *
 * They answer Status.OK (0) themselves (and NOT_FOUND for an absent shared-data key), and
 * ``invalid`` when the guest's allocator answers 0 (as Filter.write_result does); every other
 * status comes from the fallback. A bad guest pointer raises MemoryAccessError (through
 * Memory._check, as above), which the Guarded wrapper turns into INVALID_MEMORY_ACCESS. */
static PyObject *str_mem, *str_effective, *str_current, *str_vm_ctx, *str_chain, *str_edited,
                *str_items, *str_grown, *str_ser, *str_unsafe, *str_now_ns, *str_alloc,
                *str_allocating, *str_store, *str_get, *str_set;
static PyObject *mem_put_result(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* fallback(*args): the Python host function, given the arguments the host function has */
static PyObject *fall_back(PyObject *fallback, PyObject *const *args, Py_ssize_t nargs) {
    return PyObject_Vectorcall(fallback, args, (size_t)nargs, NULL);
}

/* f._effective or f._current or f._vm_ctx (Filter.ctx()); NULL with an exception set */
static PyObject *current_ctx(PyObject *f) {
    PyObject *names[3] = {str_effective, str_current, str_vm_ctx};
    for (int i = 0; i < 3; i++) {
        PyObject *c = PyObject_GetAttr(f, names[i]);
        if (c == NULL)
            return NULL;
        int yes = i == 2 ? 1 : PyObject_IsTrue(c);
        if (yes)
            return yes < 0 ? (Py_DECREF(c), NULL) : c;
        Py_DECREF(c);
    }
    return NULL;    /* not reached */
}

/* buffers._NAME: ``:?[!#$%&'*+\-.^_`|~0-9a-z]+`` (an HTTP token, lower case, or a pseudo-header) */
static int token_name(PyObject *name) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(name), i = 0;
    if (PyUnicode_KIND(name) != PyUnicode_1BYTE_KIND)
        return 0;
    const unsigned char *s = PyUnicode_1BYTE_DATA(name);
    if (n > 0 && s[0] == ':')
        i = 1;
    if (i == n)
        return 0;
    for (; i < n; i++) {
        unsigned char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || strchr("!#$%&'*+-.^_`|~", c)) ||
                c == 0)
            return 0;
    }
    return 1;
}

/* not buffers.BAD_VALUE.search(value): no control character but HTAB */
static int clean_value(PyObject *value) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(value);
    int kind = PyUnicode_KIND(value);
    const void *data = PyUnicode_DATA(value);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return 0;
    }
    return 1;
}

static int same_str(PyObject *a, PyObject *b) {   /* both exact str */
    if (a == b)
        return 1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    if (n != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b))
        return 0;   /* (compact strs of one content have one kind) */
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

/* The HeaderMap edit itself: 1 done, 0 not done (the bound refuses it, or the map is not the
 * plain HeaderMap this knows: nothing changed, the fallback decides), -1 error. The list is
 * changed before anything that could run Python code (an allocation may start the GC). */
static int edit_map(PyObject *m, PyObject *key, PyObject *value, int replace, long long limit) {
    PyObject *items = PyObject_GetAttr(m, str_items);
    PyObject *grown_obj = items == NULL ? NULL : PyObject_GetAttr(m, str_grown);
    PyObject *pair = grown_obj == NULL ? NULL : PyTuple_Pack(2, key, value);
    int rc = pair == NULL ? -1 : 0, overflow = 0;
    long long grown = rc == 0 && PyLong_CheckExact(grown_obj)
        ? PyLong_AsLongLongAndOverflow(grown_obj, &overflow) : 0;
    if (rc < 0 || !PyList_CheckExact(items) || !PyLong_CheckExact(grown_obj) || overflow)
        goto done;                              /* rc 0: not a map of ours (or an error) */
    Py_ssize_t n = PyList_GET_SIZE(items), first = -1, count = 0;
    long long dropped = 0, klen = PyUnicode_GET_LENGTH(key), vlen = PyUnicode_GET_LENGTH(value);
    for (Py_ssize_t j = 0; replace && j < n; j++) {
        PyObject *kv = PyList_GET_ITEM(items, j);
        if (!PyTuple_CheckExact(kv) || PyTuple_GET_SIZE(kv) != 2 ||
                !PyUnicode_CheckExact(PyTuple_GET_ITEM(kv, 0)) ||
                !PyUnicode_CheckExact(PyTuple_GET_ITEM(kv, 1)))
            goto done;
        if (!same_str(PyTuple_GET_ITEM(kv, 0), key))
            continue;
        if (count++ == 0)
            first = j;
        else            /* buffers._entry of a later occurrence */
            dropped += klen + PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(kv, 1)) + 10;
    }
    long long delta = count == 0 ? klen + vlen + 10
        : vlen - PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(PyList_GET_ITEM(items, first), 1)) - dropped;
    if (delta > 0 && grown + delta > limit)
        goto done;                              /* refused: HeaderMap's False */
    if (count == 0) {
        rc = PyList_Append(items, pair);
    } else {
        for (Py_ssize_t j = n - 1; rc == 0 && count > 1 && j > first; j--)
            if (same_str(PyTuple_GET_ITEM(PyList_GET_ITEM(items, j), 0), key))
                rc = PyList_SetSlice(items, j, j + 1, NULL);
        if (rc == 0)
            rc = PyList_SetItem(items, first, Py_NewRef(pair));
    }
    PyObject *new_grown = rc < 0 ? NULL : PyLong_FromLongLong(grown + delta);
    rc = new_grown == NULL || PyObject_SetAttr(m, str_grown, new_grown) < 0 ||
         PyObject_SetAttr(m, str_ser, Py_None) < 0 ? -1 : 1;
    Py_XDECREF(new_grown);
    if (rc > 0 && !(token_name(key) && clean_value(value)) &&
            PyObject_SetAttr(m, str_unsafe, Py_True) < 0)   /* it never reaches the wire */
        rc = -1;
done:
    Py_XDECREF(items);
    Py_XDECREF(grown_obj);
    Py_XDECREF(pair);
    return rc;
}

static PyObject *header_edit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "header_edit(fallback, replace, limit, map_names, "
                                         "f, map_type, key_ptr, key_size, value_ptr, value_size)");
        return NULL;
    }
    int replace = PyObject_IsTrue(args[1]);
    long long limit = PyLong_AsLongLong(args[2]);
    PyObject *names = args[3], *f = args[4];
    long long map_type;
    if (replace < 0 || (limit == -1 && PyErr_Occurred()) || as_offset(args[5], &map_type) < 0)
        return NULL;
    if (!PyTuple_Check(names) || map_type < 0 || map_type >= PyTuple_GET_SIZE(names))
        return fall_back(args[0], args + 4, nargs - 4);
    PyObject *mem = PyObject_GetAttr(f, str_mem);
    if (mem == NULL)
        return NULL;
    PyObject *ctx = mem == Py_None ? NULL : current_ctx(f);
    PyObject *chain = ctx == NULL ? NULL : PyObject_GetAttr(ctx, str_chain);
    PyObject *key = NULL, *value = NULL, *m = NULL, *r = NULL;
    if (chain == NULL || chain == Py_None) {
        if (!PyErr_Occurred())
            r = fall_back(args[0], args + 4, nargs - 4);
        goto done;
    }
    /* the key and value first: a bad pointer is reported whatever the map (as cpp-host) */
    key = guest_str(mem, args[6], args[7], 1);
    value = key == NULL ? NULL : guest_str(mem, args[8], args[9], 0);
    if (value == NULL || PyObject_SetAttr(ctx, str_edited, Py_True) < 0)
        goto done;
    m = PyObject_GetAttr(chain, PyTuple_GET_ITEM(names, map_type));
    if (m == NULL)
        goto done;
    int done = m == Py_None ? 0 : edit_map(m, key, value, replace, limit);
    if (done > 0)
        r = PyLong_FromLong(0);                    /* Status.OK */
    else if (done == 0)
        r = fall_back(args[0], args + 4, nargs - 4);
done:
    Py_XDECREF(mem);
    Py_XDECREF(ctx);
    Py_XDECREF(chain);
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_XDECREF(m);
    return r;
}

static PyObject *time_ns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "time_ns(fallback, f, ret_p)");
        return NULL;
    }
    PyObject *f = args[1];
    PyObject *mem = PyObject_GetAttr(f, str_mem);
    if (mem == NULL)
        return NULL;
    if (mem == Py_None) {
        Py_DECREF(mem);
        return fall_back(args[0], args + 1, nargs - 1);
    }
    PyObject *now = PyObject_CallMethodNoArgs(f, str_now_ns);
    unsigned long long v = now == NULL ? 0 : PyLong_AsUnsignedLongLongMask(now);
    long long ptr;
    PyObject *r = NULL;
    if (now != NULL && !(v == (unsigned long long)-1 && PyErr_Occurred()) &&
            as_offset(args[2], &ptr) == 0) {
        unsigned char le[8];
        for (int i = 0; i < 8; i++)
            le[i] = (unsigned char)(v >> (8 * i));
        if (guest_put(mem, ptr, le, 8) == 0)
            r = PyLong_FromLong(0);                /* Status.OK */
    }
    Py_XDECREF(now);
    Py_DECREF(mem);
    return r;
}

/* The getter's value for the path at (path_ptr, path_size); NULL: none (fall back), or an
 * exception set. */
static PyObject *stream_property_value(PyObject *table, PyObject *f, PyObject *mem,
                                       PyObject *path_ptr, PyObject *path_size) {
    long long n;
    if (as_offset(path_size, &n) < 0 || n == 0)
        return NULL;                            /* (an empty path: the fallback's, unchecked) */
    PyObject *read_args[3] = {mem, path_ptr, path_size};
    PyObject *path = mem_read(NULL, read_args, 3);
    if (path == NULL)
        return NULL;
    PyObject *getter = PyDict_GetItemWithError(table, path);   /* borrowed */
    Py_DECREF(path);
    if (getter == NULL)
        return NULL;
    PyObject *ctx = current_ctx(f);
    if (ctx == NULL)
        return NULL;
    PyObject *chain = PyObject_GetAttr(ctx, str_chain);
    Py_DECREF(ctx);
    if (chain == NULL || chain == Py_None) {
        Py_XDECREF(chain);
        return NULL;
    }
    PyObject *value = PyObject_CallOneArg(getter, chain);
    Py_DECREF(chain);
    if (value != NULL && (!PyBytes_CheckExact(value) || PyBytes_GET_SIZE(value) == 0)) {
        Py_DECREF(value);                       /* None (absent), or empty: the fallback's */
        return NULL;
    }
    return value;
}

/* 1 when f's allocator is free to call (write_result would use it for a non-empty result), 0
 * when not (booting, or an allocator calling back in), -1 with an exception set. ``alloc``
 * (may be NULL): f._alloc, a new reference, unless -1. */
static int allocator_free(PyObject *f, PyObject **alloc) {
    PyObject *a = PyObject_GetAttr(f, str_alloc);
    if (a == NULL)
        return -1;
    PyObject *busy = PyObject_GetAttr(f, str_allocating);
    int allocating = busy == NULL ? -1 : PyObject_IsTrue(busy);
    Py_XDECREF(busy);
    int free = allocating < 0 ? -1 : a != Py_None && !allocating;
    if (alloc != NULL && free >= 0)
        *alloc = a;
    else
        Py_DECREF(a);
    return free;
}

/* Filter.write_result of ``value`` (bytes) for a host function done in C: 1 with *status the
 * answer (Status.OK, or ``invalid`` when the guest's allocator answers 0); 0 when no allocator
 * is free to call (booting, or an allocator calling back in: the caller falls back, as
 * write_result would refuse); -1 with an exception set (a Trap of the allocator, a bad
 * out-pointer's MemoryAccessError). f._allocating is set around the allocator call and comes
 * down whatever happened, as in write_result. */
static int put_result(PyObject *f, PyObject *mem, PyObject *value, PyObject *ret_pp,
                      PyObject *ret_size_p, PyObject *invalid, PyObject **status) {
    PyObject *alloc;
    int free = allocator_free(f, &alloc);
    if (free < 0)
        return -1;
    if ((!free && PyBytes_GET_SIZE(value) > 0) || PyObject_SetAttr(f, str_allocating, Py_True) < 0) {
        Py_DECREF(alloc);                       /* (empty data needs no allocator) */
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *put_args[5] = {mem, alloc, value, ret_pp, ret_size_p};
    PyObject *written = mem_put_result(NULL, put_args, 5);
    Py_DECREF(alloc);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);                 /* the flag comes down whatever happened */
    int reset = PyObject_SetAttr(f, str_allocating, Py_False);
    if (et != NULL) {
        if (reset < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    if (written == NULL || reset < 0) {
        Py_XDECREF(written);
        return -1;
    }
    *status = written == Py_True ? PyLong_FromLong(0) : Py_NewRef(invalid);   /* OK / invalid */
    Py_DECREF(written);
    return *status == NULL ? -1 : 1;
}

static PyObject *stream_property(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "stream_property(fallback, table, invalid, f, path_ptr, "
                                         "path_size, ret_pp, ret_size_p)");
        return NULL;
    }
    PyObject *table = args[1], *f = args[3];
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "stream_property: table must be a dict");
        return NULL;
    }
    PyObject *mem = PyObject_GetAttr(f, str_mem);
    if (mem == NULL)
        return NULL;
    PyObject *value = NULL, *result = NULL;
    if (mem == Py_None)
        goto fallback;
    value = stream_property_value(table, f, mem, args[4], args[5]);
    if (value == NULL) {
        if (PyErr_Occurred())
            goto done;                          /* MemoryAccessError, or the getter raised */
        goto fallback;
    }
    if (put_result(f, mem, value, args[6], args[7], args[2], &result) != 0)
        goto done;
fallback:
    result = fall_back(args[0], args + 3, nargs - 3);
done:
    Py_XDECREF(value);
    Py_DECREF(mem);
    return result;
}

/* A bounds check of [ptr, ptr + n) without writing (Filter.check_out): -1 with
 * MemoryAccessError set when it is outside the guest's memory. */
static int guest_check(PyObject *mem, PyObject *ptr_obj, long long n) {
    long long ptr;
    Py_buffer buf;
    if (as_offset(ptr_obj, &ptr) < 0 || mem_span(mem, NULL, NULL, ptr, n, &buf, 0) < 0)
        return -1;
    PyBuffer_Release(&buf);
    return 0;
}

static PyObject *shared_data_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "shared_data_get(fallback, invalid, f, key_ptr, "
                                         "key_size, ret_pp, ret_size_p, ret_cas_p)");
        return NULL;
    }
    PyObject *f = args[2];
    PyObject *mem = PyObject_GetAttr(f, str_mem);
    if (mem == NULL)
        return NULL;
    PyObject *key = NULL, *store = NULL, *found = NULL, *result = NULL;
    long long n;
    if (mem == Py_None || as_offset(args[4], &n) < 0 || n == 0)
        goto fallback;                          /* (an empty key: Filter.read's b"", unchecked) */
    PyObject *read_args[3] = {mem, args[3], args[4]};
    if ((key = mem_read(NULL, read_args, 3)) == NULL || (store = PyObject_GetAttr(f, str_store)) == NULL
            || (found = PyObject_CallMethodOneArg(store, str_get, key)) == NULL)
        goto done;
    if (found == Py_None) {
        result = PyLong_FromLong(1);            /* Status.NOT_FOUND */
        goto done;
    }
    unsigned long cas;
    if (!PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 2
            || !PyBytes_CheckExact(PyTuple_GET_ITEM(found, 0))
            || ((cas = PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(found, 1))) == (unsigned long)-1
                && PyErr_Occurred())) {
        PyErr_Clear();
        goto fallback;                          /* (a store answering otherwise: Python's) */
    }
    if (guest_check(mem, args[7], 4) < 0)       /* the cas pointer before allocating */
        goto done;
    int put = put_result(f, mem, PyTuple_GET_ITEM(found, 0), args[5], args[6], args[1], &result);
    if (put < 0)
        goto done;
    if (put == 0)
        goto fallback;
    if (PyLong_AsLong(result) == 0 && guest_put_u32(mem, args[7], (uint32_t)cas) < 0)
        Py_CLEAR(result);
    goto done;
fallback:
    result = fall_back(args[0], args + 2, nargs - 2);
done:
    Py_XDECREF(key);
    Py_XDECREF(store);
    Py_XDECREF(found);
    Py_DECREF(mem);
    return result;
}

static uint64_t le_u64(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static PyObject *foreign_set_ttl(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "foreign_set_ttl(fallback, name, invalid, f, name_ptr, "
                                         "name_size, args_ptr, args_size, ret_pp, ret_size_p)");
        return NULL;
    }
    PyObject *f = args[3];
    if (!PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "foreign_set_ttl: name must be bytes");
        return NULL;
    }
    PyObject *mem = PyObject_GetAttr(f, str_mem);
    if (mem == NULL)
        return NULL;
    PyObject *name = NULL, *call = NULL, *store = NULL, *key = NULL, *value = NULL;
    PyObject *status = NULL, *packed = NULL, *result = NULL;
    long long name_size, args_size;
    if (mem == Py_None || as_offset(args[5], &name_size) < 0 || as_offset(args[7], &args_size) < 0
            || name_size != PyBytes_GET_SIZE(args[1]) || args_size < 16)
        goto fallback;                          /* another function, or malformed: Python's */
    int free = allocator_free(f, NULL);         /* before the write: the result needs it */
    if (free <= 0) {
        if (free < 0)
            goto done;
        goto fallback;
    }
    PyObject *name_args[3] = {mem, args[4], args[5]};
    if ((name = mem_read(NULL, name_args, 3)) == NULL)
        goto done;
    if (memcmp(PyBytes_AS_STRING(name), PyBytes_AS_STRING(args[1]), (size_t)name_size) != 0)
        goto fallback;
    PyObject *call_args[3] = {mem, args[6], args[7]};
    if ((call = mem_read(NULL, call_args, 3)) == NULL)
        goto done;
    /* cas u32 | ttl_ns u64 | key_size u32 | key | value, little-endian (foreign.py) */
    const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(call);
    uint64_t key_size = le_u64(a + 12, 4);
    if (key_size > (uint64_t)args_size - 16)
        goto fallback;
    if ((key = PyBytes_FromStringAndSize((const char *)a + 16, (Py_ssize_t)key_size)) == NULL
            || (value = PyBytes_FromStringAndSize((const char *)a + 16 + key_size,
                                                  (Py_ssize_t)(args_size - 16 - key_size))) == NULL
            || (store = PyObject_GetAttr(f, str_store)) == NULL)
        goto done;
    PyObject *cas = PyLong_FromUnsignedLongLong(le_u64(a, 4));
    PyObject *ttl = cas == NULL ? NULL : PyLong_FromUnsignedLongLong(le_u64(a + 4, 8));
    if (ttl != NULL) {
        PyObject *set_args[5] = {store, key, value, cas, ttl};
        status = PyObject_VectorcallMethod(str_set, set_args, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(cas);
    Py_XDECREF(ttl);
    if (status == NULL)
        goto done;
    unsigned long st = PyLong_AsUnsignedLongMask(status);
    if (st == (unsigned long)-1 && PyErr_Occurred())
        goto done;
    unsigned char le[4];
    put_u32le(le, (uint32_t)st);
    if ((packed = PyBytes_FromStringAndSize((const char *)le, 4)) == NULL)
        goto done;
    if (put_result(f, mem, packed, args[8], args[9], args[2], &result) == 0)
        result = Py_NewRef(args[2]);            /* (not reached: allocator_free said free) */
    goto done;
fallback:
    result = fall_back(args[0], args + 3, nargs - 3);
done:
    Py_XDECREF(name);
    Py_XDECREF(call);
    Py_XDECREF(store);
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_XDECREF(status);
    Py_XDECREF(packed);
    Py_DECREF(mem);
    return result;
}

static PyMethodDef hostcall_methods[] = {
    {"header_edit", (PyCFunction)(void (*)(void))header_edit, METH_FASTCALL,
     "proxy_replace/add_header_map_value on a stream's map (see the section comment)"},
    {"time_ns", (PyCFunction)(void (*)(void))time_ns, METH_FASTCALL,
     "proxy_get_current_time_nanoseconds (see the section comment)"},
    {"stream_property", (PyCFunction)(void (*)(void))stream_property, METH_FASTCALL,
     "proxy_get_property of a stream property (see the section comment)"},
    {"shared_data_get", (PyCFunction)(void (*)(void))shared_data_get, METH_FASTCALL,
     "proxy_get_shared_data (see the section comment)"},
    {"foreign_set_ttl", (PyCFunction)(void (*)(void))foreign_set_ttl, METH_FASTCALL,
     "proxy_call_foreign_function of wasmgate.set_shared_data_ttl (see the section comment)"},
    {NULL, NULL, 0, NULL},
};

static int hostcall_module_init(PyObject *m) {
    struct { PyObject **slot; const char *name; } strs[] = {
        {&str_mem, "_mem"}, {&str_effective, "_effective"}, {&str_current, "_current"},
        {&str_vm_ctx, "_vm_ctx"}, {&str_chain, "chain"}, {&str_edited, "edited"},
        {&str_items, "items"}, {&str_grown, "grown"}, {&str_ser, "_ser"},
        {&str_unsafe, "unsafe"}, {&str_now_ns, "now_ns"}, {&str_alloc, "_alloc"},
        {&str_allocating, "_allocating"}, {&str_store, "store"}, {&str_get, "get"},
        {&str_set, "set"},
    };
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        if ((*strs[i].slot = PyUnicode_InternFromString(strs[i].name)) == NULL)
            return -1;
    return PyModule_AddFunctions(m, hostcall_methods);
}
/* == end of: host calls of every request ================================================ */

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL,
     "wasmtime_func_call_unchecked(ctx, func, args, nargs, trap_out), GIL released"},
    {"set_call_target", set_call_target, METH_O,
     "the address of wasmtime_func_call_unchecked"},
    {"ticker_configure", (PyCFunction)(void (*)(void))ticker_configure, METH_FASTCALL,
     "the address of wasmtime_engine_increment_epoch, the tick period and re-arm rate (ns)"},
    {"ticker_add", ticker_add, METH_O, "tick this wasm_engine_t* (starts the ticker thread)"},
    {"ticker_remove", ticker_remove, METH_O, "stop ticking this wasm_engine_t*"},
    {"ticker_register", ticker_register, METH_NOARGS,
     "count this thread's CPU (a deadline is armed); returns the epoch's lag (ms)"},
    {"ticker_state", ticker_state, METH_O, "(epoch, now_ms, idle) of a wasm_engine_t*"},
    {"ticker_enter", ticker_enter, METH_NOARGS, "a guest runs on this thread outside call()"},
    {"ticker_leave", ticker_leave, METH_NOARGS, "the end of ticker_enter()'s guest run"},
    {"charged_ns", charged_ns, METH_NOARGS, "this thread's CPU ns minus its GC time"},
    {"gc_callback", (PyCFunction)(void (*)(void))gc_callback, METH_FASTCALL,
     "for gc.callbacks: counts each thread's GC time"},
    {"mem_read", (PyCFunction)(void (*)(void))mem_read, METH_FASTCALL,
     "Memory.read(ptr, n) of the Memory given first"},
    {"mem_header_pair", (PyCFunction)(void (*)(void))mem_header_pair, METH_FASTCALL,
     "Memory.header_pair(key_ptr, key_size, value_ptr, value_size) of the Memory given first"},
    {"mem_put_result", (PyCFunction)(void (*)(void))mem_put_result, METH_FASTCALL,
     "Memory.put_result(alloc, data, ret_pp, ret_size_p) of the Memory given first"},
    {"set_deadline_target", set_deadline_target, METH_O,
     "the address of wasmtime_context_set_epoch_deadline (GuestFn's re-arm in C)"},
    {"serialize_pairs", serialize_pairs, METH_O,
     "abi/pairs.py serialize_str() of a list of latin-1 str pairs; None for anything else"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "abi.engine._crossing",
    "Hot crossings of abi/engine/crossing.py without ctypes (optional).", -1, methods,
};

static int filter_core_init(PyObject *m);    /* the last section of this file */

PyMODINIT_FUNC PyInit__crossing(void) {
    static int once;
    if (!once) {
        if (pthread_key_create(&slot_key, slot_gone) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_key_create failed");
            return NULL;
        }
        pthread_atfork(NULL, NULL, after_fork_child);
        once = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *addr = PyLong_FromVoidPtr((void *)host_trampoline);
    if (addr == NULL || PyModule_AddObject(m, "HOST_TRAMPOLINE", addr) < 0) {
        Py_XDECREF(addr);
        Py_DECREF(m);
        return NULL;
    }
    addr = PyLong_FromVoidPtr((void *)typed_trampoline);
    if (addr == NULL || PyModule_AddObject(m, "TYPED_TRAMPOLINE", addr) < 0) {
        Py_XDECREF(addr);
        Py_DECREF(m);
        return NULL;
    }
    str_poisoned = PyUnicode_InternFromString("poisoned");
    str_unwind = PyUnicode_InternFromString("unwind");
    str_host_failed = PyUnicode_InternFromString("host_failed");
    str_view = PyUnicode_InternFromString("_view");
    str_check = PyUnicode_InternFromString("_check");
    if (str_poisoned == NULL || str_unwind == NULL || str_host_failed == NULL ||
            str_view == NULL || str_check == NULL ||
            PyType_Ready(&HostFnType) < 0 ||
            PyModule_AddObjectRef(m, "HostFn", (PyObject *)&HostFnType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (guest_module_init(m) < 0 || filter_core_init(m) < 0 || hostcall_module_init(m) < 0 ||
            context_core_init(m) < 0 ||
            PyType_Ready(&GuardedType) < 0 ||
            PyModule_AddObjectRef(m, "Guarded", (PyObject *)&GuardedType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}


/* == a filter's per-request calls (abi/filter.py's NativeFilter) ============================
 * FilterCore is the C base of abi/filter.py's NativeFilter: the state every guest call of a
 * filter reads (instance, generation, _current, _effective, _funcs, _deferred, contexts, root,
 * _next_id, has_context_create, teardown_callbacks, _context_type; on_headers and
 * body_callbacks for the chain's walks below) as C fields, which Python
 * reads and sets as attributes, and three methods that do what Filter's Python methods of the
 * same names do, without a Python frame (each filter runs them on every request):
 *
 *   call(ctx, name, *args)        Filter.call: the export from _funcs with ctx current, a Trap
 *                                 turned into self._trapped(...)'s FilterFailure, _current and
 *                                 _effective cleared and _deferred run afterwards. The cold
 *                                 paths stay Python methods: _resolve (export not cached, or
 *                                 no instance), _call_nested (called from a host function).
 *   new_http_context(chain)       Filter.new_http_context (ensure_ready() when no instance).
 *   finish_context(ctx, failed)   Filter.finish_context: cancel_calls, on_done/on_log/on_delete
 *                                 with one context switch, the context always released.
 *   headers(chain, i, ctx, d, eos) Filter.headers: Chain._headers's common case (see below).
 *
 * FilterCore.bind(Trap, FilterFailure) names the exception a guest call raises and the one
 * call() raises for it (abi/filter.py, once). */

typedef struct {
    PyObject_HEAD
    PyObject *instance, *generation, *current, *effective, *funcs, *deferred, *contexts, *root;
    PyObject *teardown, *context_type, *headers_eos, *on_headers, *body_callbacks;
    long long next_id;
    char has_context_create;
} FilterCore;

static PyObject *fc_trap_type, *fc_failure_type;     /* FilterCore.bind(Trap, FilterFailure) */
static PyObject *str__resolve, *str__call_nested, *str__trapped, *str__run_deferred,
    *str_ensure_ready, *str_cancel_calls, *str__export, *str_pending_calls, *str_generation,
    *str_id, *str_chain, *str__props, *str_consecutive_failures, *str_context_create;

static PyObject *fc_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    FilterCore *self = (FilterCore *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    PyObject **slots[] = {&self->instance, &self->current, &self->effective, &self->root,
                          &self->context_type, &self->headers_eos, &self->on_headers,
                          &self->body_callbacks};
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        *slots[i] = Py_NewRef(Py_None);
    self->generation = PyLong_FromLong(0);
    self->funcs = PyDict_New();
    self->deferred = PyList_New(0);
    self->contexts = PyDict_New();
    self->teardown = PyTuple_New(0);
    self->next_id = 1;
    if (!self->generation || !self->funcs || !self->deferred || !self->contexts || !self->teardown) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int fc_traverse(FilterCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->instance);
    Py_VISIT(self->current);
    Py_VISIT(self->effective);
    Py_VISIT(self->funcs);
    Py_VISIT(self->deferred);
    Py_VISIT(self->contexts);
    Py_VISIT(self->root);
    Py_VISIT(self->teardown);
    Py_VISIT(self->context_type);
    Py_VISIT(self->headers_eos);
    Py_VISIT(self->on_headers);
    Py_VISIT(self->body_callbacks);
    return 0;
}

static int fc_clear(FilterCore *self) {
    Py_CLEAR(self->instance);
    Py_CLEAR(self->current);
    Py_CLEAR(self->effective);
    Py_CLEAR(self->funcs);
    Py_CLEAR(self->deferred);
    Py_CLEAR(self->contexts);
    Py_CLEAR(self->root);
    Py_CLEAR(self->teardown);
    Py_CLEAR(self->context_type);
    Py_CLEAR(self->headers_eos);
    Py_CLEAR(self->on_headers);
    Py_CLEAR(self->body_callbacks);
    return 0;
}

static void fc_dealloc(FilterCore *self) {
    PyObject_GC_UnTrack(self);
    fc_clear(self);
    Py_CLEAR(self->generation);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A field Python may have deleted (NULL) reads as None here. */
#define FC_FIELD(o) ((o) != NULL ? (o) : Py_None)

static int fc_deferred_pending(FilterCore *self) {
    return self->deferred != NULL && PyList_Check(self->deferred) && PyList_GET_SIZE(self->deferred);
}

/* self._run_deferred() with the exception in flight (if any) kept, as in a finally clause; a
 * new exception from it replaces that one. 0, or -1 with the new exception set. */
static int fc_run_deferred(FilterCore *self) {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str__run_deferred);
    if (r == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(et, ev, tb);
    return 0;
}

/* With a Trap raised by the guest call of export `name`: raise self._trapped(inst, ctx, name,
 * trap) instead (``raise ... from None``). Any other exception is left as it is. */
static void fc_raise_trapped(FilterCore *self, PyObject *inst, PyObject *ctx, PyObject *name) {
    if (fc_trap_type == NULL || !PyErr_ExceptionMatches(fc_trap_type))
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    PyObject *exc = PyObject_CallMethodObjArgs((PyObject *)self, str__trapped, inst, ctx, name,
                                               ev ? ev : Py_None, NULL);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
    if (exc == NULL)
        return;
    if (PyExceptionInstance_Check(exc)) {
        PyException_SetCause(exc, NULL);            /* from None: sets __suppress_context__ */
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    } else {
        PyErr_Format(PyExc_TypeError, "_trapped returned %.100s", Py_TYPE(exc)->tp_name);
    }
    Py_DECREF(exc);
}

static PyObject *fc_call_impl(FilterCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "call(ctx, name, *args)");
        return NULL;
    }
    PyObject *ctx = args[0], *name = args[1];
    PyObject *inst = FC_FIELD(self->instance), *fn = NULL;
    if (inst != Py_None && self->funcs != NULL && PyDict_CheckExact(self->funcs)) {
        fn = PyDict_GetItemWithError(self->funcs, name);
        if (fn == NULL && PyErr_Occurred())
            return NULL;
    }
    if (fn != NULL) {
        Py_INCREF(inst);            /* held: a host function may discard or swap them */
        Py_INCREF(fn);
    } else {
        PyObject *pair = PyObject_CallMethodObjArgs((PyObject *)self, str__resolve, inst, name, NULL);
        if (pair == NULL)
            return NULL;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_DECREF(pair);
            PyErr_SetString(PyExc_TypeError, "_resolve must return (instance, function)");
            return NULL;
        }
        inst = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
        fn = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
        Py_DECREF(pair);
    }
    PyObject *r;
    if (FC_FIELD(self->current) != Py_None) {       /* from inside a host function */
        PyObject *rest = PyTuple_New(nargs - 2);
        if (rest == NULL) {
            r = NULL;
        } else {
            for (Py_ssize_t i = 2; i < nargs; i++)
                PyTuple_SET_ITEM(rest, i - 2, Py_NewRef(args[i]));
            r = PyObject_CallMethodObjArgs((PyObject *)self, str__call_nested, inst, fn, ctx,
                                           name, rest, NULL);
            Py_DECREF(rest);
        }
    } else {
        Py_XSETREF(self->current, Py_NewRef(ctx));  /* (_effective is None between calls) */
        r = PyObject_Vectorcall(fn, args + 2, (size_t)(nargs - 2), NULL);
        if (r == NULL)
            fc_raise_trapped(self, inst, ctx, name);
        Py_XSETREF(self->current, Py_NewRef(Py_None));
        Py_XSETREF(self->effective, Py_NewRef(Py_None));
        if (fc_deferred_pending(self) && fc_run_deferred(self) < 0)
            Py_CLEAR(r);
    }
    Py_DECREF(inst);
    Py_DECREF(fn);
    return r;
}

static PyObject *fc_call(FilterCore *self, PyObject *const *args, Py_ssize_t nargs) {
    return fc_call_impl(self, args, nargs);
}

/* ctx.generation == self.generation: 1, 0, or -1 with an exception set. */
static int fc_alive(FilterCore *self, PyObject *ctx) {
    PyObject *g = PyObject_GetAttr(ctx, str_generation);
    if (g == NULL)
        return -1;
    int same = g == self->generation ? 1 : PyObject_RichCompareBool(g, FC_FIELD(self->generation), Py_EQ);
    Py_DECREF(g);
    return same;
}

static PyObject *fc_new_http_context(FilterCore *self, PyObject *chain) {
    if (FC_FIELD(self->instance) == Py_None) {
        PyObject *ready = PyObject_CallMethodNoArgs((PyObject *)self, str_ensure_ready);
        if (ready == NULL)
            return NULL;
        int ok = PyObject_IsTrue(ready);
        Py_DECREF(ready);
        if (ok <= 0)
            return ok < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (self->contexts == NULL || !PyDict_Check(self->contexts)) {
        PyErr_SetString(PyExc_TypeError, "contexts must be a dict");
        return NULL;
    }
    PyObject *cid = PyLong_FromLongLong(self->next_id);
    if (cid == NULL)
        return NULL;
    self->next_id++;
    PyObject *argv[4] = {(PyObject *)self, cid, FC_FIELD(self->generation), chain};
    PyObject *ctx = PyObject_Vectorcall(self->context_type, argv, 4, NULL);
    if (ctx == NULL || PyDict_SetItem(self->contexts, cid, ctx) < 0) {
        Py_DECREF(cid);
        Py_XDECREF(ctx);
        return NULL;
    }
    if (self->has_context_create) {
        PyObject *root_id = PyObject_GetAttr(FC_FIELD(self->root), str_id);
        PyObject *r = NULL;
        if (root_id != NULL) {
            PyObject *cargs[4] = {ctx, str_context_create, cid, root_id};
            r = fc_call_impl(self, cargs, 4);
            Py_DECREF(root_id);
        }
        if (r == NULL) {
            Py_DECREF(cid);
            Py_DECREF(ctx);
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_DECREF(cid);
    return ctx;
}

/* if ctx.pending_calls: self.cancel_calls(ctx). 0, or -1 with an exception set. */
static int fc_cancel_pending(FilterCore *self, PyObject *ctx) {
    PyObject *pending = PyObject_GetAttr(ctx, str_pending_calls);
    if (pending == NULL)
        return -1;
    int any = PyObject_IsTrue(pending);
    Py_DECREF(pending);
    if (any <= 0)
        return any;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_cancel_calls, ctx);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* The teardown callbacks of a live context, one context switch for them all; stops when the
 * instance dies. 0, or -1 with an exception set (a Trap already turned into FilterFailure). */
static int fc_teardown(FilterCore *self, PyObject *inst, PyObject *ctx) {
    PyObject *funcs = Py_NewRef(FC_FIELD(self->funcs));
    PyObject *teardown = Py_NewRef(FC_FIELD(self->teardown));
    PyObject *cid = PyObject_GetAttr(ctx, str_id);
    PyObject *prev_current = self->current, *prev_effective = self->effective;   /* owned */
    self->current = Py_NewRef(ctx);
    self->effective = Py_NewRef(Py_None);
    int rc = cid != NULL ? 0 : -1;
    if (rc == 0 && !(PyDict_Check(funcs) && PyTuple_Check(teardown))) {
        PyErr_SetString(PyExc_TypeError, "_funcs must be a dict, teardown_callbacks a tuple");
        rc = -1;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < PyTuple_GET_SIZE(teardown); i++) {
        PyObject *name = PyTuple_GET_ITEM(teardown, i);
        int alive = fc_alive(self, ctx);
        if (alive <= 0) {                           /* the instance died (not ctx.alive) */
            rc = alive;
            break;
        }
        PyObject *fn = PyDict_GetItemWithError(funcs, name);
        if (fn != NULL) {
            Py_INCREF(fn);
        } else if (PyErr_Occurred() ||
                   (fn = PyObject_CallMethodObjArgs((PyObject *)self, str__export, inst, name, NULL)) == NULL ||
                   PyDict_SetItem(funcs, name, fn) < 0) {
            Py_XDECREF(fn);
            rc = -1;
            break;
        }
        Py_XSETREF(self->effective, Py_NewRef(Py_None));
        PyObject *r = PyObject_Vectorcall(fn, &cid, 1, NULL);
        Py_DECREF(fn);
        if (r == NULL) {
            fc_raise_trapped(self, inst, ctx, name);
            rc = -1;
            break;
        }
        Py_DECREF(r);
        if (fc_deferred_pending(self) && fc_run_deferred(self) < 0)
            rc = -1;
    }
    Py_XSETREF(self->current, prev_current);
    Py_XSETREF(self->effective, prev_effective);
    Py_XDECREF(cid);
    Py_DECREF(funcs);
    Py_DECREF(teardown);
    return rc;
}

/* What finish_context does before the release; 0, or -1 with an exception set. */
static int fc_finish_body(FilterCore *self, PyObject *ctx, int failed) {
    if (fc_cancel_pending(self, ctx) < 0)
        return -1;
    PyObject *inst = Py_NewRef(FC_FIELD(self->instance));
    int alive = inst != Py_None ? fc_alive(self, ctx) : 0;
    int rc = alive < 0 ? -1 : 0;
    if (alive > 0)
        rc = fc_teardown(self, inst, ctx);
    Py_DECREF(inst);
    if (rc < 0 || failed)
        return rc;
    alive = fc_alive(self, ctx);
    if (alive <= 0)
        return alive;
    PyObject *zero = PyLong_FromLong(0);
    rc = zero ? PyObject_SetAttr((PyObject *)self, str_consecutive_failures, zero) : -1;
    Py_XDECREF(zero);
    return rc;
}

/* The release, whatever happened: what a teardown callback dispatched goes too; the context
 * leaves contexts and is detached from its chain. 0, or -1 with an exception set. */
static int fc_release(FilterCore *self, PyObject *ctx) {
    if (fc_cancel_pending(self, ctx) < 0)
        return -1;
    PyObject *cid = PyObject_GetAttr(ctx, str_id);
    if (cid == NULL)
        return -1;
    int rc = 0;
    if (self->contexts != NULL && PyDict_Check(self->contexts)) {
        PyObject *known = PyDict_GetItemWithError(self->contexts, cid);
        if (known == ctx)
            rc = PyDict_DelItem(self->contexts, cid);
        else if (known == NULL && PyErr_Occurred())
            rc = -1;
    }
    Py_DECREF(cid);
    if (rc < 0 || PyObject_SetAttr(ctx, str_chain, Py_None) < 0 ||
            PyObject_SetAttr(ctx, str__props, Py_None) < 0)
        return -1;
    return 0;
}

static PyObject *fc_finish_context(FilterCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "finish_context(ctx, failed)");
        return NULL;
    }
    PyObject *ctx = args[0];
    int failed = PyObject_IsTrue(args[1]);
    if (failed < 0)
        return NULL;
    Py_INCREF(ctx);
    int rc = fc_finish_body(self, ctx, failed);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);                     /* finally: release */
    if (fc_release(self, ctx) < 0) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        rc = -1;
    } else {
        PyErr_Restore(et, ev, tb);
    }
    Py_DECREF(ctx);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int is_exception_class(PyObject *o) {
    return PyType_Check(o) && PyType_IsSubtype((PyTypeObject *)o, (PyTypeObject *)PyExc_BaseException);
}

static PyObject *fc_bind(PyObject *cls, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !is_exception_class(args[0]) || !is_exception_class(args[1])) {
        PyErr_SetString(PyExc_TypeError, "bind(Trap, FilterFailure): two exception classes");
        return NULL;
    }
    Py_XSETREF(fc_trap_type, Py_NewRef(args[0]));
    Py_XSETREF(fc_failure_type, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

/* -- headers(chain, i, ctx, direction, eos): chain.py's Chain._headers, its common case ----
 * Filter i's headers callback for `direction` (0 request, 1 response) with ctx current,
 * answering chain.py's CONTINUE (0), PAUSED (1) or SKIPPED (2). The uncommon cases are the
 * chain's Python: a finished stream or a dead context go to chain._headers whole; after the
 * call, the chain's trace (when on) notes it, as chain._headers does, then a FilterFailure goes
 * to chain._fail(i), a reply to chain._replied(i, phase) (which raises), an action past
 * MAX_HEADERS_ACTION to chain._invalid(i, name, action). */
#define HEADERS_CONTINUE 0
#define HEADERS_PAUSED 1
#define HEADERS_SKIPPED 2
#define MAX_HEADERS_ACTION 4

static PyObject *headers_cb[2], *str__finished, *str_trace, *str_hmaps[2], *str_items,
    *str_resumed, *str__headers, *str__fail, *str_reply, *str__replied, *str__invalid, *str_note;

/* trace.note(i, phase, action, start): abi/trace.py's FilterTrace records a callback's end.
 * `action` NULL: the callback failed (trace.FAILED). 0, or -1 with an exception set. */
static int trace_note(PyObject *tr, PyObject *i, long phase, PyObject *action, int64_t start) {
    PyObject *ph = PyLong_FromLong(phase);
    PyObject *act = action ? Py_NewRef(action) : PyLong_FromLong(-1);
    PyObject *t = PyLong_FromLongLong(start);
    PyObject *r = ph && act && t ? PyObject_CallMethodObjArgs(tr, str_note, i, ph, act, t, NULL) : NULL;
    Py_XDECREF(ph);
    Py_XDECREF(act);
    Py_XDECREF(t);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* obj.name is truthy: 1, 0, or -1 with an exception set. */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static PyObject *headers_state(int state) {
    return PyLong_FromLong(state);      /* small ints: cached, never fails */
}

/* The callback's answer as chain._headers reads it, after the call returned `action`. */
static PyObject *fc_headers_answer(PyObject *chain, PyObject *i, PyObject *ctx, int d,
                                   PyObject *action) {
    PyObject *reply = PyObject_GetAttr(chain, str_reply);
    if (reply == NULL)
        return NULL;
    int replied = reply != Py_None;
    Py_DECREF(reply);
    if (replied) {
        PyObject *phase = PyLong_FromLong(d * 3);
        PyObject *r = phase ? PyObject_CallMethodObjArgs(chain, str__replied, i, phase, NULL) : NULL;
        Py_XDECREF(phase);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    long long a = PyLong_AsLongLong(action);
    if (a == -1 && PyErr_Occurred())
        return NULL;
    if (a == 0 || a == 2)                   /* Continue, ContinueAndEndStream */
        return headers_state(HEADERS_CONTINUE);
    if (a > MAX_HEADERS_ACTION) {
        PyObject *r = PyObject_CallMethodObjArgs(chain, str__invalid, i, headers_cb[d], action, NULL);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        return headers_state(HEADERS_SKIPPED);
    }
    PyObject *resumed = PyObject_GetAttr(ctx, str_resumed);
    PyObject *on = resumed ? PySequence_GetItem(resumed, d) : NULL;
    Py_XDECREF(resumed);
    int t = on ? PyObject_IsTrue(on) : -1;
    Py_XDECREF(on);
    return t < 0 ? NULL : headers_state(t ? HEADERS_CONTINUE : HEADERS_PAUSED);
}

static PyObject *fc_headers_impl(FilterCore *self, PyObject *chain, PyObject *i, PyObject *ctx,
                                 long d, PyObject *eos_obj) {
    int finished = attr_true(chain, str__finished);
    int alive = finished == 0 ? fc_alive(self, ctx) : !finished;
    if (finished < 0 || alive < 0)
        return NULL;
    if (finished || !alive) {
        PyObject *dir = PyLong_FromLong(d);
        PyObject *r = dir ? PyObject_CallMethodObjArgs(chain, str__headers, i, (PyObject *)self,
                                                       ctx, dir, eos_obj, NULL) : NULL;
        Py_XDECREF(dir);
        return r;
    }
    PyObject *tr = PyObject_GetAttr(chain, str_trace);      /* None: not traced */
    if (tr == NULL)
        return NULL;
    int eos = PyObject_IsTrue(eos_obj);
    PyObject *hmap = eos < 0 ? NULL : PyObject_GetAttr(chain, str_hmaps[d]);
    PyObject *items = hmap ? PyObject_GetAttr(hmap, str_items) : NULL;
    Py_XDECREF(hmap);
    Py_ssize_t n = items ? PyObject_Size(items) : -1;
    Py_XDECREF(items);
    PyObject *resumed = n < 0 ? NULL : PyObject_GetAttr(ctx, str_resumed);
    int rc = resumed ? PySequence_SetItem(resumed, d, Py_False) : -1;
    Py_XDECREF(resumed);
    PyObject *with_eos = rc < 0 ? NULL : PySequence_GetItem(FC_FIELD(self->headers_eos), d);
    int take_eos = with_eos ? PyObject_IsTrue(with_eos) : -1;
    Py_XDECREF(with_eos);
    PyObject *cid = take_eos < 0 ? NULL : PyObject_GetAttr(ctx, str_id);
    PyObject *count = cid ? PyLong_FromSsize_t(n) : NULL;
    PyObject *end = count ? PyLong_FromLong(eos) : NULL;
    if (end == NULL) {
        Py_XDECREF(cid);
        Py_XDECREF(count);
        Py_DECREF(tr);
        return NULL;
    }
    /* 0.1.0 as specified: (context_id, num_headers); later: end_of_stream too */
    PyObject *cargs[5] = {ctx, headers_cb[d], cid, count, end};
    int64_t start = tr != Py_None ? monotonic_ns() : 0;     /* perf_counter_ns()'s clock */
    PyObject *action = fc_call_impl(self, cargs, take_eos ? 5 : 4);
    Py_DECREF(cid);
    Py_DECREF(count);
    Py_DECREF(end);
    if (action == NULL) {
        if (fc_failure_type == NULL || !PyErr_ExceptionMatches(fc_failure_type)) {
            Py_DECREF(tr);
            return NULL;
        }
        PyErr_Clear();
        rc = tr != Py_None ? trace_note(tr, i, d * 3, NULL, start) : 0;
        Py_DECREF(tr);
        PyObject *r = rc < 0 ? NULL : PyObject_CallMethodOneArg(chain, str__fail, i);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        return headers_state(HEADERS_SKIPPED);
    }
    rc = tr != Py_None ? trace_note(tr, i, d * 3, action, start) : 0;
    Py_DECREF(tr);
    PyObject *state = rc < 0 ? NULL : fc_headers_answer(chain, i, ctx, (int)d, action);
    Py_DECREF(action);
    return state;
}

static PyObject *fc_headers(FilterCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "headers(chain, i, ctx, direction, eos)");
        return NULL;
    }
    long d = PyLong_AsLong(args[3]);
    if (d != 0 && d != 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "direction: 0 (request) or 1 (response)");
        return NULL;
    }
    return fc_headers_impl(self, args[0], args[1], args[2], d, args[4]);
}

/* == the chain's per-filter loops (abi/chain.py's Chain.request / response / finish) ========
 * walk_request(chain, i, eos) and walk_response(chain, i, eos) run the plain part of the
 * headers loops from filter i (upwards on the request, downwards on the response);
 * walk_finish(chain) runs the teardown loop. They do what chain.py's
 * _walk_request / _walk_response / _walk_finish do in Python (the reference: keep them alike).
 * A NativeFilter's steps are its FilterCore C above (new_http_context, headers,
 * finish_context), called directly; any other filter's are its Python methods.
 *
 * A headers walk answers None once every filter is done, else i * 4 + state: filter i's
 * headers callback ran and answered `state` (CONTINUE, PAUSED, SKIPPED), and the chain's
 * Python carries on from there, because filter i paused or needs its body staged (a body
 * or trailers callback, a body coming, the filter not skipped). What the chain raises (its
 * _Stop on a reply or a fail-closed failure) goes through to the chain. */

static PyObject *str_filters, *str_ctxs, *str_skipped, *str_failed, *str__request_headers,
    *str_headers, *str_on_headers, *str_body_callbacks, *str_waiter, *str_wake,
    *str_finish_context, *str__teardown_failed;
static PyObject *directions[2];         /* 0 (request), 1 (response) */
static PyTypeObject FilterCoreType;     /* below */

typedef struct {
    PyObject *filters, *ctxs, *skipped;     /* owned: chain.filters (as a fast sequence), ... */
    Py_ssize_t n;
} Walk;

static void walk_close(Walk *w) {
    Py_XDECREF(w->filters);
    Py_XDECREF(w->ctxs);
    Py_XDECREF(w->skipped);
}

/* The chain's lists, read once a walk (the chain never replaces them). 0, or -1. */
static int walk_open(Walk *w, PyObject *chain, PyObject *second) {
    w->ctxs = w->skipped = NULL;
    PyObject *filters = PyObject_GetAttr(chain, str_filters);
    w->filters = filters ? PySequence_Fast(filters, "chain.filters must be a sequence") : NULL;
    Py_XDECREF(filters);
    if (w->filters == NULL)
        return -1;
    w->n = PySequence_Fast_GET_SIZE(w->filters);
    w->ctxs = PyObject_GetAttr(chain, str_ctxs);
    w->skipped = w->ctxs ? PyObject_GetAttr(chain, second) : NULL;
    if (w->skipped == NULL)
        return -1;
    if (!PyList_Check(w->ctxs) || !PyList_Check(w->skipped) ||
            PyList_GET_SIZE(w->ctxs) != w->n || PyList_GET_SIZE(w->skipped) != w->n) {
        PyErr_SetString(PyExc_TypeError, "chain.ctxs and its flags: lists, one item a filter");
        return -1;
    }
    return 0;
}

/* A truth value without a call for the bools it nearly always is: 1, 0, or -1. */
static int truth(PyObject *v) {
    return v == Py_True ? 1 : v == Py_False ? 0 : PyObject_IsTrue(v);
}

/* list[i] is true (the chain's skipped / failed flags; the walk checked the size). */
static int flag_at(PyObject *list, Py_ssize_t i) {
    if (i >= PyList_GET_SIZE(list)) {
        PyErr_SetString(PyExc_IndexError, "chain flags changed size");
        return -1;
    }
    return truth(PyList_GET_ITEM(list, i));
}

/* f.on_headers[d] (which 0) or f.body_callbacks[d] (which 1): 1, 0, or -1. */
static int filter_flag(PyObject *f, int which, long d) {
    PyObject *pair;
    if (PyObject_TypeCheck(f, &FilterCoreType)) {
        FilterCore *fc = (FilterCore *)f;
        pair = Py_NewRef(FC_FIELD(which ? fc->body_callbacks : fc->on_headers));
    } else {
        pair = PyObject_GetAttr(f, which ? str_body_callbacks : str_on_headers);
        if (pair == NULL)
            return -1;
    }
    int t;
    if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2) {
        t = truth(PyTuple_GET_ITEM(pair, d));
    } else {
        PyObject *v = PySequence_GetItem(pair, d);
        t = v ? PyObject_IsTrue(v) : -1;
        Py_XDECREF(v);
    }
    Py_DECREF(pair);
    return t;
}

/* A headers step's answer (new reference or NULL) as a state 0..2; -1 with an exception. */
static long as_state(PyObject *r) {
    if (r == NULL)
        return -1;
    long v = PyLong_AsLong(r);
    Py_DECREF(r);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < HEADERS_CONTINUE || v > HEADERS_SKIPPED) {
        PyErr_Format(PyExc_ValueError, "a headers step answered %ld", v);
        return -1;
    }
    return v;
}

/* chain._request_headers(i, eos) for filter f: its context opened (a failure to open is
 * chain._fail(i) and SKIPPED), its request headers callback run. A state, or -1. */
static long request_step(PyObject *chain, PyObject *f, PyObject *io, Py_ssize_t i,
                         PyObject *eos_obj, PyObject *ctxs) {
    if (!PyObject_TypeCheck(f, &FilterCoreType))
        return as_state(PyObject_CallMethodObjArgs(chain, str__request_headers, io, eos_obj, NULL));
    FilterCore *fc = (FilterCore *)f;
    PyObject *ctx = fc_new_http_context(fc, chain);
    if (ctx == NULL) {
        if (fc_failure_type == NULL || !PyErr_ExceptionMatches(fc_failure_type))
            return -1;
        PyErr_Clear();
        ctx = Py_NewRef(Py_None);
    }
    if (ctx == Py_None) {
        Py_DECREF(ctx);
        PyObject *r = PyObject_CallMethodOneArg(chain, str__fail, io);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return HEADERS_SKIPPED;
    }
    if (PyList_SetItem(ctxs, i, Py_NewRef(ctx)) < 0) {     /* steals the new reference */
        Py_DECREF(ctx);
        return -1;
    }
    int on = filter_flag(f, 0, 0);
    long state = on < 0 ? -1 : HEADERS_CONTINUE;
    if (on > 0)
        state = as_state(fc_headers_impl(fc, chain, io, ctx, 0, eos_obj));
    Py_DECREF(ctx);
    return state;
}

/* After filter i's headers step answered `state`: whether the chain's Python must carry on
 * there (it paused, or it needs its body staged): 1, 0, or -1. */
static int hand_back(Walk *w, PyObject *f, Py_ssize_t i, long d, long state, int eos) {
    if (state == HEADERS_PAUSED)
        return 1;
    if (eos)
        return 0;
    int skipped = flag_at(w->skipped, i);
    if (skipped != 0)
        return skipped < 0 ? -1 : 0;
    return filter_flag(f, 1, d);
}

static int walk_args(PyObject *const *args, Py_ssize_t nargs, const char *usage,
                     Py_ssize_t *i, int *eos) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s", usage);
        return -1;
    }
    *i = PyLong_AsSsize_t(args[1]);
    if (*i == -1 && PyErr_Occurred())
        return -1;
    *eos = PyObject_IsTrue(args[2]);
    return *eos < 0 ? -1 : 0;
}

#define NOT_OPENED (-2)          /* a response step's filter never opened, or is skipped */

/* chain._walk_response's step for filter i: its response headers callback, if it has one. */
static long response_step(Walk *w, PyObject *chain, PyObject *f, PyObject *io, Py_ssize_t i,
                          PyObject *eos_obj) {
    PyObject *ctx = PyList_GET_ITEM(w->ctxs, i);
    if (ctx == Py_None)
        return NOT_OPENED;
    int skipped = flag_at(w->skipped, i);
    if (skipped != 0)
        return skipped < 0 ? -1 : NOT_OPENED;
    Py_INCREF(ctx);                     /* held: what follows may run Python */
    int on = filter_flag(f, 0, 1);
    long state = on < 0 ? -1 : HEADERS_CONTINUE;
    if (on > 0 && PyObject_TypeCheck(f, &FilterCoreType))
        state = as_state(fc_headers_impl((FilterCore *)f, chain, io, ctx, 1, eos_obj));
    else if (on > 0)
        state = as_state(PyObject_CallMethodObjArgs(f, str_headers, chain, io, ctx, directions[1],
                                                    eos_obj, NULL));
    Py_DECREF(ctx);
    return state;
}

/* walk_request (d 0: filters i, i+1, ...) and walk_response (d 1: filters i, i-1, ..., 0). */
static PyObject *walk_headers(long d, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t i;
    int eos;
    if (walk_args(args, nargs, d ? "walk_response(chain, i, eos)" : "walk_request(chain, i, eos)",
                  &i, &eos) < 0)
        return NULL;
    PyObject *chain = args[0];
    serving = 1;                        /* see run_guest */
    Walk w;
    if (walk_open(&w, chain, str_skipped) < 0) {
        walk_close(&w);
        return NULL;
    }
    if (d && i >= w.n)
        i = w.n - 1;
    PyObject *result = NULL;
    for (; i >= 0 && i < w.n; i += d ? -1 : 1) {
        PyObject *f = PySequence_Fast_GET_ITEM(w.filters, i);
        PyObject *io = PyLong_FromSsize_t(i);
        long state = io == NULL ? -1 : d ? response_step(&w, chain, f, io, i, args[2])
                                         : request_step(chain, f, io, i, args[2], w.ctxs);
        Py_XDECREF(io);
        if (state == NOT_OPENED)
            continue;
        int back = state < 0 ? -1 : hand_back(&w, f, i, d, state, eos);
        if (back < 0)
            goto done;
        if (back) {
            result = PyLong_FromSsize_t(i * 4 + state);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    walk_close(&w);
    return result;
}

static PyObject *walk_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    return walk_headers(0, args, nargs);
}

static PyObject *walk_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    return walk_headers(1, args, nargs);
}

/* One context's teardown as chain._finish_one(i) does it; 0, or -1 with an exception. */
static int finish_step(PyObject *chain, PyObject *f, PyObject *ctx, PyObject *failed,
                       Py_ssize_t i) {
    PyObject *attached = PyObject_GetAttr(ctx, str_chain);
    if (attached == NULL)
        return -1;
    int deleted = attached == Py_None;               /* never opened, or already deleted */
    Py_DECREF(attached);
    if (deleted)
        return 0;
    PyObject *waiter = PyObject_GetAttr(ctx, str_waiter);
    PyObject *r = waiter;
    if (waiter != NULL && waiter != Py_None) {
        r = PyObject_CallMethodNoArgs(ctx, str_wake);
    }
    Py_XDECREF(waiter);
    if (r != NULL) {
        if (PyObject_TypeCheck(f, &FilterCoreType)) {
            PyObject *fargs[2] = {ctx, failed};
            r = fc_finish_context((FilterCore *)f, fargs, 2);
        } else {
            r = PyObject_CallMethodObjArgs(f, str_finish_context, ctx, failed, NULL);
        }
    }
    if (r != NULL) {
        Py_DECREF(r);
        return 0;
    }
    if (fc_failure_type != NULL && PyErr_ExceptionMatches(fc_failure_type)) {
        PyErr_Clear();
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *et, *ev, *tb;                          /* teardown must never fail the gateway */
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (tb != NULL && ev != NULL)
        PyException_SetTraceback(ev, tb);
    PyObject *io = PyLong_FromSsize_t(i);
    r = io ? PyObject_CallMethodObjArgs(chain, str__teardown_failed, io, ev ? ev : Py_None, NULL)
           : NULL;
    Py_XDECREF(io);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyObject *walk_finish(PyObject *module, PyObject *chain) {
    Walk w;
    if (walk_open(&w, chain, str_failed) < 0) {
        walk_close(&w);
        return NULL;
    }
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < w.n; i++) {
        if (i >= PyList_GET_SIZE(w.ctxs) || i >= PyList_GET_SIZE(w.skipped)) {
            PyErr_SetString(PyExc_IndexError, "chain.ctxs changed size");
            goto done;
        }
        PyObject *ctx = PyList_GET_ITEM(w.ctxs, i);
        if (ctx == Py_None)
            continue;
        Py_INCREF(ctx);
        PyObject *failed = Py_NewRef(PyList_GET_ITEM(w.skipped, i));     /* chain.failed */
        int rc = finish_step(chain, PySequence_Fast_GET_ITEM(w.filters, i), ctx, failed, i);
        Py_DECREF(ctx);
        Py_DECREF(failed);
        if (rc < 0)
            goto done;
    }
    result = Py_NewRef(Py_None);
done:
    walk_close(&w);
    return result;
}

/* stream_head(status, headers, has_body): chain.py's _stream_head (the reference) for the
 * headers the gateway hands over: a list of (name, value) str pairs. The map's items (a copy;
 * for a response, status not None, with ":status" first and set to str(status)) and the
 * first content-length as an int when there is a body (None otherwise). None when the
 * headers are anything else, or the content-length is not plain ASCII digits: the reference
 * decides those. */
static PyObject *str_status_name, *str_content_length;

static int name_is(PyObject *name, PyObject *want) {
    if (name == want)
        return 1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(want);
    return PyUnicode_GET_LENGTH(name) == n && PyUnicode_KIND(name) == PyUnicode_1BYTE_KIND &&
           memcmp(PyUnicode_DATA(name), PyUnicode_DATA(want), (size_t)n) == 0;
}

/* An exact str of ASCII digits only: its int; NULL without an exception otherwise. */
static PyObject *plain_length(PyObject *v) {
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v) || PyUnicode_GET_LENGTH(v) == 0 ||
            PyUnicode_GET_LENGTH(v) > 18)
        return NULL;
    const char *p = (const char *)PyUnicode_DATA(v);
    long long n = 0;
    for (Py_ssize_t k = 0; k < PyUnicode_GET_LENGTH(v); k++) {
        if (p[k] < '0' || p[k] > '9')
            return NULL;
        n = n * 10 + (p[k] - '0');
    }
    return PyLong_FromLongLong(n);
}

static PyObject *stream_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stream_head(status, headers, has_body)");
        return NULL;
    }
    PyObject *status = args[0], *headers = args[1];
    int has_body = PyObject_IsTrue(args[2]);
    if (has_body < 0)
        return NULL;
    if (!PyList_CheckExact(headers))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(headers), statuses = 0;
    PyObject *cl = NULL;                            /* borrowed: the first content-length */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *h = PyList_GET_ITEM(headers, k);
        if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2 ||
                !PyUnicode_CheckExact(PyTuple_GET_ITEM(h, 0)))
            Py_RETURN_NONE;
        PyObject *name = PyTuple_GET_ITEM(h, 0);
        if (name_is(name, str_status_name))
            statuses++;
        else if (cl == NULL && name_is(name, str_content_length))
            cl = PyTuple_GET_ITEM(h, 1);
    }
    PyObject *length = Py_None;
    if (has_body && cl != NULL) {
        length = plain_length(cl);
        if (length == NULL) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
    } else {
        Py_INCREF(length);
    }
    PyObject *items;
    if (status == Py_None) {
        items = PyList_GetSlice(headers, 0, n);
    } else {
        PyObject *text = PyObject_Str(status);
        PyObject *first = text ? PyTuple_Pack(2, str_status_name, text) : NULL;
        Py_XDECREF(text);
        int in_place = n > 0 && statuses == 1 &&
                       name_is(PyTuple_GET_ITEM(PyList_GET_ITEM(headers, 0), 0), str_status_name);
        items = first ? PyList_New(in_place ? n : n - statuses + 1) : NULL;
        if (items != NULL) {
            PyList_SET_ITEM(items, 0, Py_NewRef(first));
            Py_ssize_t at = 1;
            for (Py_ssize_t k = in_place ? 1 : 0; k < n; k++) {
                PyObject *h = PyList_GET_ITEM(headers, k);
                if (!in_place && name_is(PyTuple_GET_ITEM(h, 0), str_status_name))
                    continue;
                PyList_SET_ITEM(items, at++, Py_NewRef(h));
            }
        }
        Py_XDECREF(first);
    }
    if (items == NULL) {
        Py_DECREF(length);
        return NULL;
    }
    PyObject *r = PyTuple_Pack(2, items, length);
    Py_DECREF(items);
    Py_DECREF(length);
    return r;
}

static PyMethodDef walk_methods[] = {
    {"walk_request", (PyCFunction)(void (*)(void))walk_request, METH_FASTCALL,
     "walk_request(chain, i, eos): chain.py's _walk_request in C"},
    {"walk_response", (PyCFunction)(void (*)(void))walk_response, METH_FASTCALL,
     "walk_response(chain, i, eos): chain.py's _walk_response in C"},
    {"walk_finish", (PyCFunction)walk_finish, METH_O,
     "walk_finish(chain): chain.py's _walk_finish in C"},
    {"stream_head", (PyCFunction)(void (*)(void))stream_head, METH_FASTCALL,
     "stream_head(status, headers, has_body): chain.py's _stream_head in C, or None"},
    {NULL},
};

static PyMethodDef fc_methods[] = {
    {"call", (PyCFunction)(void (*)(void))fc_call, METH_FASTCALL,
     "call(ctx, name, *args): Filter.call in C"},
    {"new_http_context", (PyCFunction)fc_new_http_context, METH_O,
     "new_http_context(chain): Filter.new_http_context in C"},
    {"finish_context", (PyCFunction)(void (*)(void))fc_finish_context, METH_FASTCALL,
     "finish_context(ctx, failed): Filter.finish_context in C"},
    {"headers", (PyCFunction)(void (*)(void))fc_headers, METH_FASTCALL,
     "headers(chain, i, ctx, direction, eos): Chain._headers's common case in C"},
    {"bind", (PyCFunction)(void (*)(void))fc_bind, METH_FASTCALL | METH_CLASS,
     "bind(Trap, FilterFailure): what a guest call raises, what call() raises for it"},
    {NULL},
};

static PyMemberDef fc_members[] = {
    {"instance", T_OBJECT_EX, offsetof(FilterCore, instance), 0, "the live Instance or None"},
    {"generation", T_OBJECT_EX, offsetof(FilterCore, generation), 0, "instance generation"},
    {"_current", T_OBJECT_EX, offsetof(FilterCore, current), 0, "context of the call in progress"},
    {"_effective", T_OBJECT_EX, offsetof(FilterCore, effective), 0, "proxy_set_effective_context's"},
    {"_funcs", T_OBJECT_EX, offsetof(FilterCore, funcs), 0, "export name -> caller"},
    {"_deferred", T_OBJECT_EX, offsetof(FilterCore, deferred), 0, "actions after the call"},
    {"contexts", T_OBJECT_EX, offsetof(FilterCore, contexts), 0, "context id -> context"},
    {"root", T_OBJECT_EX, offsetof(FilterCore, root), 0, "the root context or None"},
    {"teardown_callbacks", T_OBJECT_EX, offsetof(FilterCore, teardown), 0,
     "the exported on_done/on_log/on_delete, in order"},
    {"_context_type", T_OBJECT_EX, offsetof(FilterCore, context_type), 0,
     "what new_http_context builds: (filter, id, generation, chain)"},
    {"headers_eos", T_OBJECT_EX, offsetof(FilterCore, headers_eos), 0,
     "(request, response): the headers callback takes end_of_stream"},
    {"on_headers", T_OBJECT_EX, offsetof(FilterCore, on_headers), 0,
     "(request, response): the headers callback is exported"},
    {"body_callbacks", T_OBJECT_EX, offsetof(FilterCore, body_callbacks), 0,
     "(request, response): a body or trailers callback is exported"},
    {"_next_id", T_LONGLONG, offsetof(FilterCore, next_id), 0, "the next context id"},
    {"has_context_create", T_BOOL, offsetof(FilterCore, has_context_create), 0,
     "proxy_on_context_create is exported"},
    {NULL},
};

static PyTypeObject FilterCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi.engine._crossing.FilterCore",
    .tp_basicsize = sizeof(FilterCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "the C base of abi/filter.py's NativeFilter: its per-request calls",
    .tp_new = fc_new,
    .tp_traverse = (traverseproc)fc_traverse,
    .tp_clear = (inquiry)fc_clear,
    .tp_dealloc = (destructor)fc_dealloc,
    .tp_methods = fc_methods,
    .tp_members = fc_members,
};

static int filter_core_init(PyObject *m) {
    struct { PyObject **slot; const char *s; } names[] = {
        {&str__resolve, "_resolve"}, {&str__call_nested, "_call_nested"},
        {&str__trapped, "_trapped"}, {&str__run_deferred, "_run_deferred"},
        {&str_ensure_ready, "ensure_ready"}, {&str_cancel_calls, "cancel_calls"},
        {&str__export, "_export"}, {&str_pending_calls, "pending_calls"},
        {&str_generation, "generation"}, {&str_id, "id"}, {&str_chain, "chain"},
        {&str__props, "_props"}, {&str_consecutive_failures, "consecutive_failures"},
        {&str_context_create, "proxy_on_context_create"},
        {&headers_cb[0], "proxy_on_request_headers"}, {&headers_cb[1], "proxy_on_response_headers"},
        {&str__finished, "_finished"}, {&str_trace, "trace"},
        {&str_hmaps[0], "request_headers"}, {&str_hmaps[1], "response_headers"},
        {&str_items, "items"}, {&str_resumed, "resumed"}, {&str__headers, "_headers"},
        {&str__fail, "_fail"}, {&str_reply, "reply"}, {&str__replied, "_replied"},
        {&str__invalid, "_invalid"}, {&str_note, "note"},
        {&str_filters, "filters"}, {&str_ctxs, "ctxs"}, {&str_skipped, "skipped"},
        {&str_failed, "failed"}, {&str__request_headers, "_request_headers"},
        {&str_headers, "headers"}, {&str_on_headers, "on_headers"},
        {&str_body_callbacks, "body_callbacks"}, {&str_waiter, "waiter"}, {&str_wake, "wake"},
        {&str_finish_context, "finish_context"}, {&str__teardown_failed, "_teardown_failed"},
        {&str_status_name, ":status"}, {&str_content_length, "content-length"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].s)) == NULL)
            return -1;
    if ((directions[0] = PyLong_FromLong(0)) == NULL || (directions[1] = PyLong_FromLong(1)) == NULL)
        return -1;
    if (PyType_Ready(&FilterCoreType) < 0 ||
            PyModule_AddObjectRef(m, "FilterCore", (PyObject *)&FilterCoreType) < 0 ||
            PyModule_AddFunctions(m, walk_methods) < 0)
        return -1;
    return 0;
}
