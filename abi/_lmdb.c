/* The gateway-wide shared store's LMDB binding (abi/shared_store_shm.py), in C against the
 * system's liblmdb, with the store's two request-path operations whole in C.
 *
 * Why: a rate limiter does one get and one set of the shared store per request. Driven from
 * Python through py-lmdb, that costs a two-worker gateway 13-14 us per request live (LMDB's
 * own code is ~2 % of a worker's samples; the rest is Python around it, on cold caches between
 * wasm callbacks). Here get_entry() is ShmStore.get in one read transaction and set_entry() the
 * common case of ShmStore.set in one write transaction, each a single call from Python. counters()
 * maps the store's metric values, which an increment changes with one atomic instruction
 * instead of a write transaction.
 *
 * Optional: built at install (setup.py, optional=True, needs liblmdb-dev). Without it,
 * shared_store_shm.py uses py-lmdb with the same records (the tests run both). One process
 * uses one binding for every store (LMDB must never open one environment twice in a process),
 * and every worker of a gateway inherits the same choice.
 *
 * The py-lmdb subset the store uses, with py-lmdb's semantics:
 *   open(path, map_size=, max_readers=, create=, ...) -> Environment
 *   Environment.begin(write=False, buffers=False) -> Transaction; .reader_check(); .info();
 *       .close(); .get_record(key); .get_entry(...); .set_entry(...) (below)
 *   Transaction.get(key, default=None) / put(key, value) / delete(key) / pop(key) / cursor()
 *       / commit() / abort(); a context manager (commit on success, abort on an exception)
 *   Cursor.set_range(key) / key() / value(); iteration yields (key, value) from the current
 *       position (from the first record if unpositioned)
 *   Error, MapFullError
 * Values are always copied into bytes (py-lmdb's buffers=False). The environment is opened
 * with MDB_NOTLS (as py-lmdb does): a read transaction is not tied to a thread. One spare read
 * transaction per environment is reset and renewed (py-lmdb's max_spare_txns=1). The GIL is
 * released only while a write transaction waits for LMDB's writer lock, which another
 * process may hold.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <lmdb.h>
#include <stdint.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static PyObject *LmdbError;
static PyObject *MapFullError;

static PyObject *
raise_mdb(int rc, const char *what)
{
    PyErr_Format(rc == MDB_MAP_FULL ? MapFullError : LmdbError, "%s: %s", what, mdb_strerror(rc));
    return NULL;
}

/* ------------------------------------------------------------------ Environment */

typedef struct {
    PyObject_HEAD
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *spare;         /* a reset read transaction, renewed by the next read */
} EnvObject;

static PyTypeObject EnvType, TxnType, CursorType;

typedef struct TxnObject {
    PyObject_HEAD
    EnvObject *env;         /* strong */
    MDB_txn *txn;           /* NULL once committed or aborted */
    int write;
    PyObject *cursors;      /* list of this transaction's live cursors */
} TxnObject;

typedef struct {
    PyObject_HEAD
    TxnObject *txn;         /* strong */
    MDB_cursor *cur;        /* NULL once its transaction ended */
    MDB_val key, val;
    int positioned, started;
} CursorObject;

static int
env_ok(EnvObject *e)
{
    if (e->env == NULL) {
        PyErr_SetString(LmdbError, "environment is closed");
        return 0;
    }
    return 1;
}

/* A read transaction: the spare renewed, or a new one. */
static int
read_txn(EnvObject *e, MDB_txn **out)
{
    int rc;
    if (e->spare != NULL) {
        MDB_txn *t = e->spare;
        e->spare = NULL;
        rc = mdb_txn_renew(t);
        if (rc == 0) {
            *out = t;
            return 0;
        }
        mdb_txn_abort(t);
    }
    return mdb_txn_begin(e->env, NULL, MDB_RDONLY, out);
}

/* The end of a read transaction: kept as the spare (reset: it pins no pages) if there is none. */
static void
read_done(EnvObject *e, MDB_txn *t)
{
    if (e->spare == NULL && e->env != NULL) {
        mdb_txn_reset(t);
        e->spare = t;
    } else {
        mdb_txn_abort(t);
    }
}

static int
write_txn(EnvObject *e, MDB_txn **out)
{
    int rc;
    MDB_env *env = e->env;
    Py_BEGIN_ALLOW_THREADS
    rc = mdb_txn_begin(env, NULL, 0, out);
    Py_END_ALLOW_THREADS
    return rc;
}

static void
env_close(EnvObject *e)
{
    if (e->spare != NULL) {
        mdb_txn_abort(e->spare);
        e->spare = NULL;
    }
    if (e->env != NULL) {
        mdb_env_close(e->env);
        e->env = NULL;
    }
}

static PyObject *
lmdb_open(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "map_size", "subdir", "max_dbs", "max_readers",
                             "max_spare_txns", "sync", "metasync", "writemap", "readahead",
                             "meminit", "lock", "create", NULL};
    const char *path;
    unsigned long long map_size = 10485760;
    int subdir = 1, max_dbs = 0, max_readers = 126, max_spare = 1, sync = 1, metasync = 1;
    int writemap = 0, readahead = 1, meminit = 1, lock = 1, create = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|Kpiiippppppp", kwlist, &path, &map_size,
                                     &subdir, &max_dbs, &max_readers, &max_spare, &sync,
                                     &metasync, &writemap, &readahead, &meminit, &lock, &create))
        return NULL;
    /* max_spare_txns is accepted as py-lmdb takes it; this binding always keeps one spare. */
    (void)max_spare;
    if (!subdir || !lock || max_dbs != 0) {
        PyErr_SetString(PyExc_ValueError, "abi._lmdb supports subdir=True, lock=True, max_dbs=0 only");
        return NULL;
    }
    struct stat st;
    if (stat(path, &st) != 0) {                    /* py-lmdb: create= makes the directory */
        if (!create)
            return PyErr_Format(LmdbError, "%s: No such file or directory", path);
        if (mkdir(path, 0700) != 0)
            return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    unsigned int flags = MDB_NOTLS;
    if (!sync) flags |= MDB_NOSYNC;
    if (!metasync) flags |= MDB_NOMETASYNC;
    if (writemap) flags |= MDB_WRITEMAP;
    if (!readahead) flags |= MDB_NORDAHEAD;
    if (!meminit) flags |= MDB_NOMEMINIT;

    EnvObject *e = PyObject_New(EnvObject, &EnvType);
    if (e == NULL)
        return NULL;
    e->env = NULL;
    e->spare = NULL;
    MDB_env *env;
    int rc = mdb_env_create(&env);
    if (rc)
        goto fail_new;
    if ((rc = mdb_env_set_mapsize(env, (size_t)map_size))
            || (rc = mdb_env_set_maxreaders(env, (unsigned int)max_readers)))
        goto fail_env;
    Py_BEGIN_ALLOW_THREADS
    rc = mdb_env_open(env, path, flags, 0644);
    Py_END_ALLOW_THREADS
    if (rc)
        goto fail_env;
    e->env = env;
    MDB_txn *t;
    if ((rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &t)))
        goto fail_open;
    rc = mdb_dbi_open(t, NULL, 0, &e->dbi);
    mdb_txn_abort(t);
    if (rc)
        goto fail_open;
    return (PyObject *)e;
fail_env:
    mdb_env_close(env);
fail_new:
    Py_DECREF(e);
    return raise_mdb(rc, path);
fail_open:
    Py_DECREF(e);                 /* closes env */
    return raise_mdb(rc, path);
}

static void
env_dealloc(EnvObject *e)
{
    env_close(e);
    PyObject_Free(e);
}

static PyObject *
env_close_m(EnvObject *e, PyObject *unused)
{
    env_close(e);
    Py_RETURN_NONE;
}

static PyObject *
env_reader_check(EnvObject *e, PyObject *unused)
{
    int dead = 0, rc;
    if (!env_ok(e))
        return NULL;
    if ((rc = mdb_reader_check(e->env, &dead)))
        return raise_mdb(rc, "reader_check");
    return PyLong_FromLong(dead);
}

static PyObject *
env_info(EnvObject *e, PyObject *unused)
{
    MDB_envinfo info;
    int rc;
    if (!env_ok(e))
        return NULL;
    if ((rc = mdb_env_info(e->env, &info)))
        return raise_mdb(rc, "info");
    return Py_BuildValue("{s:K,s:K,s:K,s:I,s:I}",
                         "map_size", (unsigned long long)info.me_mapsize,
                         "last_pgno", (unsigned long long)info.me_last_pgno,
                         "last_txnid", (unsigned long long)info.me_last_txnid,
                         "max_readers", info.me_maxreaders, "num_readers", info.me_numreaders);
}

static PyObject *
env_begin(EnvObject *e, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"write", "buffers", NULL};
    int write = 0, buffers = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|pp", kwlist, &write, &buffers))
        return NULL;
    if (!env_ok(e))
        return NULL;
    MDB_txn *t;
    int rc = write ? write_txn(e, &t) : read_txn(e, &t);
    if (rc)
        return raise_mdb(rc, "begin");
    TxnObject *txn = PyObject_New(TxnObject, &TxnType);
    if (txn == NULL || (txn->cursors = PyList_New(0)) == NULL) {
        mdb_txn_abort(t);
        if (txn != NULL) {
            txn->txn = NULL;
            txn->env = NULL;
            Py_DECREF(txn);
        }
        return NULL;
    }
    Py_INCREF(e);
    txn->env = e;
    txn->txn = t;
    txn->write = write;
    return (PyObject *)txn;
}

/* ------------------------------------------------------------------ the request path */

#define REC_LEN 12                              /* cas u32 BE, deadline u64 BE */
#define META_LEN 64                             /* 8 x u64 LE (shared_store_shm.py docstring) */
#define MISSING_CAS 0xFFFFFFFFu
#define STATUS_OK 0
#define STATUS_CAS_MISMATCH 8
#define SLOW (-1)                               /* set_entry: take the Python path instead */
#define RAISED (-2)                             /* set_core: an exception is set */
#define LONG_KEY 480                            /* shared_store_shm.LONG_KEY: longer keys hash */

static uint64_t
be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static void
put_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static uint64_t
le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void
put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (unsigned char)v;
}

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* get_record(dk) -> bytes | None: the record under dk, in one read transaction. */
static PyObject *
env_get_record(EnvObject *e, PyObject *arg)
{
    char *k;
    Py_ssize_t klen;
    if (PyBytes_AsStringAndSize(arg, &k, &klen) < 0 || !env_ok(e))
        return NULL;
    MDB_txn *t;
    int rc = read_txn(e, &t);
    if (rc)
        return raise_mdb(rc, "get");
    MDB_val key = {(size_t)klen, k}, val;
    rc = mdb_get(t, e->dbi, &key, &val);
    PyObject *out;
    if (rc == 0)
        out = PyBytes_FromStringAndSize(val.mv_data, (Py_ssize_t)val.mv_size);
    else if (rc == MDB_NOTFOUND)
        out = Py_NewRef(Py_None);
    else
        out = raise_mdb(rc, "get");
    read_done(e, t);
    return out;
}

#define HREC_LEN (REC_LEN + 2)                  /* hashed keys: + the key's length (u16 BE) */

/* shared_store_shm._record_cost: the accounted bytes of the record raw_size long under dk. */
static long long
record_cost(const char *dk, size_t dklen, size_t raw_size, long long overhead)
{
    if (dk[0] == 'h')
        return (long long)raw_size - HREC_LEN + overhead;
    return (long long)dklen - 1 + (long long)raw_size - REC_LEN + overhead;
}

/* "E" + deadline (u64 BE) + data key, in buf (9 + 511 bytes): dk's record in the deadline index. */
static MDB_val
exp_key(unsigned char *buf, uint64_t due, const char *dk, size_t dklen)
{
    buf[0] = 'E';
    put_be64(buf + 1, due);
    memcpy(buf + 9, dk, dklen);
    return (MDB_val){dklen + 9, buf};
}

/* Take dk's entry (cost accounted bytes, deadline due) out of the deadline index, as
 * _set_txn and _drop_txn do: 0, or -1 on an LMDB error. */
static int
unindex(MDB_txn *t, MDB_dbi dbi, uint64_t *meta, uint64_t due, const char *dk, size_t dklen,
        long long cost)
{
    unsigned char buf[9 + 511];
    MDB_val k = exp_key(buf, due, dk, dklen);
    int rc = mdb_del(t, dbi, &k, NULL);
    if (rc && rc != MDB_NOTFOUND)
        return -1;
    meta[4] -= (uint64_t)cost;
    if (!meta[4])
        meta[7] = UINT64_MAX;                       /* the deadline index is empty */
    return 0;
}

/* ShmStore._drop_txn: delete a data record (and its deadline record); the bytes freed, or -1
 * on an LMDB error. */
static long long
drop(MDB_txn *t, MDB_dbi dbi, uint64_t *meta, const char *dk, size_t dklen, size_t raw_size,
     uint64_t due, uint64_t now, int counted, long long overhead)
{
    long long cost = record_cost(dk, dklen, raw_size, overhead);
    MDB_val k = {dklen, (void *)dk};
    if (mdb_del(t, dbi, &k, NULL))
        return -1;
    meta[1] -= (uint64_t)cost;
    if (due) {
        if (unindex(t, dbi, meta, due, dk, dklen, cost) < 0)
            return -1;
        if (counted)
            meta[due <= now ? 5 : 6] += 1;
    }
    return cost;
}

/* ShmStore._reap: drop up to reap_max expired entries, earliest deadline first; meta[7]
 * becomes exact. 0, or -1 on an LMDB error or a deadline record without its data record. */
static int
reap(MDB_txn *t, MDB_dbi dbi, uint64_t *meta, uint64_t now, long reap_max, long long overhead)
{
    MDB_cursor *cur;
    if (mdb_cursor_open(t, dbi, &cur))
        return -1;
    int dropped = 0, result = 0;
    for (;;) {
        MDB_val k = {1, "E"}, v;
        int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND || (rc == 0 && (k.mv_size < 9 || ((char *)k.mv_data)[0] != 'E'))) {
            meta[7] = UINT64_MAX;                   /* the deadline index is empty */
            break;
        }
        if (rc) {
            result = -1;
            break;
        }
        uint64_t due = be64((unsigned char *)k.mv_data + 1);
        if (due > now || dropped == reap_max) {
            meta[7] = due;
            break;
        }
        char dk[511];                               /* copied: the deletes move the pages */
        size_t dklen = k.mv_size - 9;
        memcpy(dk, (char *)k.mv_data + 9, dklen);
        MDB_val dkv = {dklen, dk}, raw;
        if (mdb_get(t, dbi, &dkv, &raw) || raw.mv_size < REC_LEN
                || drop(t, dbi, meta, dk, dklen, raw.mv_size,
                        be64((unsigned char *)raw.mv_data + 4), now, 1, overhead) < 0) {
            result = -1;
            break;
        }
        dropped++;
    }
    mdb_cursor_close(cur);
    return result;
}

/* The budget and reaping arguments every write takes (ShmStore.max_bytes, ENTRY_OVERHEAD,
 * REAP_PER_WRITE). */
typedef struct {
    long long max_bytes, overhead;
    long reap_max;
} Budget;

/* ShmStore._set_txn for a short key dk (not hashed; due: the new deadline, 0 = never expires;
 * expire_now: a CAS-guarded delete) when the write fits the budget without evicting: the same
 * reads, checks and writes (reaping included), in one write transaction. Returns 0 (OK), 8
 * (CAS_MISMATCH), RAISED (an exception is set: no write transaction), or SLOW when the write
 * would have to evict, or on any LMDB error (a full map included): nothing was written, and
 * the caller runs the Python _set_txn, which handles every case. */
static long
set_core(EnvObject *e, const char *dk, Py_ssize_t dklen, long long key_len, const char *value,
         Py_ssize_t vlen, uint32_t cas, uint64_t now, uint64_t due, int expire_now,
         const Budget *b)
{
    long long max_bytes = b->max_bytes, overhead = b->overhead;
    long reap_max = b->reap_max;
    MDB_txn *t;
    int rc = write_txn(e, &t);
    if (rc) {
        raise_mdb(rc, "begin");
        return RAISED;
    }
    long status = SLOW;
    MDB_val mk = {1, "M"}, mv, rk = {(size_t)dklen, (void *)dk}, rv;
    uint64_t meta[8];
    unsigned char meta_le[META_LEN];
    if (mdb_get(t, e->dbi, &mk, &mv) || mv.mv_size != META_LEN)
        goto abort;
    for (int i = 0; i < 8; i++)                     /* the meta record is 8 x u64 LE */
        meta[i] = le64((unsigned char *)mv.mv_data + 8 * i);
    uint64_t prev_due = 0;
    long long prev_cost = 0;
    rc = mdb_get(t, e->dbi, &rk, &rv);
    if (rc == 0) {                                  /* what occupies dk (maybe expired) */
        if (rv.mv_size < REC_LEN)
            goto abort;
        uint32_t prev_cas = be32(rv.mv_data);
        prev_due = be64((unsigned char *)rv.mv_data + 4);
        int live = !prev_due || prev_due > now;
        if (live && cas && cas != prev_cas) {
            status = STATUS_CAS_MISMATCH;
            goto abort;
        }
        prev_cost = record_cost(dk, (size_t)dklen, rv.mv_size, overhead);
        if (expire_now) {                           /* a CAS-guarded delete */
            if (drop(t, e->dbi, meta, dk, (size_t)dklen, rv.mv_size, prev_due, now, !live,
                     overhead) < 0)
                goto abort;
            goto commit;
        }
    } else if (rc != MDB_NOTFOUND) {
        goto abort;
    }
    if (expire_now) {
        status = STATUS_OK;                         /* nothing to delete */
        goto abort;
    }
    long long new_cost = key_len + vlen + overhead;
    if (new_cost > prev_cost && (long long)meta[1] + (new_cost - prev_cost) > max_bytes)
        goto abort;                                 /* would have to evict: Python does */

    if (prev_due && unindex(t, e->dbi, meta, prev_due, dk, (size_t)dklen, prev_cost) < 0)
        goto abort;
    uint32_t fresh = (uint32_t)(meta[0] % (MISSING_CAS - 1) + 1);  /* skips 0 and MISSING_CAS */
    meta[0] = fresh;
    meta[1] += (uint64_t)(new_cost - prev_cost);
    rv.mv_size = REC_LEN + (size_t)vlen;
    rv.mv_data = NULL;
    if (mdb_put(t, e->dbi, &rk, &rv, MDB_RESERVE))
        goto abort;
    put_be32(rv.mv_data, fresh);
    put_be64((unsigned char *)rv.mv_data + 4, due);
    memcpy((unsigned char *)rv.mv_data + REC_LEN, value, (size_t)vlen);
    if (due) {
        unsigned char ik[9 + 511];
        MDB_val ikv = exp_key(ik, due, dk, (size_t)dklen), empty = {0, ""};
        if (mdb_put(t, e->dbi, &ikv, &empty, 0))
            goto abort;
        meta[4] += (uint64_t)new_cost;
        if (due < meta[7])
            meta[7] = due;
        if (meta[7] <= now && reap(t, e->dbi, meta, now, reap_max, overhead) < 0)
            goto abort;
    }
commit:
    for (int i = 0; i < 8; i++)
        put_le64(meta_le + 8 * i, meta[i]);
    mv.mv_size = META_LEN;
    mv.mv_data = meta_le;
    if (mdb_put(t, e->dbi, &mk, &mv, 0))
        goto abort;
    if (mdb_txn_commit(t))                          /* (a failed commit has freed t) */
        return SLOW;
    return STATUS_OK;
abort:
    mdb_txn_abort(t);
    return status;
}

/* CLOCK_MONOTONIC in nanoseconds: time.monotonic_ns(), ShmStore's default clock. */
static uint64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* "k" + key in buf (LONG_KEY bytes): a short key's data key; 0 if key is not short bytes. */
static Py_ssize_t
short_data_key(PyObject *key, char *buf)
{
    if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) >= LONG_KEY)
        return 0;
    buf[0] = 'k';
    memcpy(buf + 1, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
    return PyBytes_GET_SIZE(key) + 1;
}

/* The clock argument: None for CLOCK_MONOTONIC read here, else the caller's reading. */
static int
clock_arg(PyObject *arg, uint64_t *now)
{
    if (arg == Py_None) {
        *now = monotonic_ns();
        return 0;
    }
    *now = PyLong_AsUnsignedLongLong(arg);
    return *now == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

/* get_entry(key, now) -> (value, cas) | None | NotImplemented: ShmStore.get whole, for a short
 * key — its record read in one read transaction, absent once expired (now: None reads
 * CLOCK_MONOTONIC). NotImplemented (nothing read) for a long key, a key that is not bytes, or
 * a closed environment: the caller takes its Python path. Never releases the GIL, so no other
 * thread of the process can close the environment under it. */
static PyObject *
env_get_entry(EnvObject *e, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get_entry takes 2 arguments");
        return NULL;
    }
    char dk[LONG_KEY];
    Py_ssize_t dklen = short_data_key(args[0], dk);
    if (dklen == 0 || e->env == NULL)
        Py_RETURN_NOTIMPLEMENTED;
    MDB_txn *t;
    int rc = read_txn(e, &t);
    if (rc)
        return raise_mdb(rc, "get");
    MDB_val key = {(size_t)dklen, dk}, val;
    rc = mdb_get(t, e->dbi, &key, &val);
    PyObject *out;
    uint64_t now;
    if (rc == MDB_NOTFOUND) {
        out = Py_NewRef(Py_None);
    } else if (rc) {
        out = raise_mdb(rc, "get");
    } else if (val.mv_size < REC_LEN) {
        out = PyErr_Format(LmdbError, "bad data record (%zu bytes)", val.mv_size);
    } else {
        uint64_t due = be64((unsigned char *)val.mv_data + 4);
        if (due && (clock_arg(args[1], &now) < 0 || due <= now))
            out = PyErr_Occurred() ? NULL : Py_NewRef(Py_None);   /* expired: absent */
        else
            out = Py_BuildValue("(y#k)", (char *)val.mv_data + REC_LEN,
                                (Py_ssize_t)(val.mv_size - REC_LEN),
                                (unsigned long)be32(val.mv_data));
    }
    read_done(e, t);
    return out;
}

/* set_entry(key, value, cas, ttl_ns, now, max_bytes, entry_overhead, reap_max) -> status
 *
 * ShmStore.set whole, for a short key when nothing has to be evicted: the data key, the cas
 * (mod 2**32) and the deadline (ttl_ns None: never expires; 0: expires at once, a CAS-guarded
 * delete; else now + ttl_ns, capped at 2**64 - 1; now None reads CLOCK_MONOTONIC) derived here,
 * then set_core's write. SLOW (nothing written) for a long key, a key or value that is not
 * bytes, a closed environment, and every case set_core hands back. */
static PyObject *
env_set_entry(EnvObject *e, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "set_entry takes 8 arguments");
        return NULL;
    }
    char dk[LONG_KEY];
    Py_ssize_t dklen = short_data_key(args[0], dk);
    if (dklen == 0 || !PyBytes_CheckExact(args[1]) || e->env == NULL)
        return PyLong_FromLong(SLOW);
    uint32_t cas = (uint32_t)PyLong_AsUnsignedLongMask(args[2]);
    uint64_t now, ttl = 0, due = 0;
    int expire_now = 0;
    if (args[3] != Py_None) {
        ttl = (uint64_t)PyLong_AsUnsignedLongLongMask(args[3]);
        expire_now = ttl == 0;
    }
    Budget b = {PyLong_AsLongLong(args[5]), PyLong_AsLongLong(args[6]), PyLong_AsLong(args[7])};
    if (PyErr_Occurred() || clock_arg(args[4], &now) < 0)
        return NULL;
    if (args[3] != Py_None && !expire_now)
        due = ttl > UINT64_MAX - now ? UINT64_MAX : now + ttl;     /* shared_store.deadline */
    long status = set_core(e, dk, dklen, dklen - 1, PyBytes_AS_STRING(args[1]),
                           PyBytes_GET_SIZE(args[1]), cas, now, due, expire_now, &b);
    return status == RAISED ? NULL : PyLong_FromLong(status);
}

static PyMethodDef env_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))env_begin, METH_VARARGS | METH_KEYWORDS, NULL},
    {"reader_check", (PyCFunction)env_reader_check, METH_NOARGS, NULL},
    {"info", (PyCFunction)env_info, METH_NOARGS, NULL},
    {"close", (PyCFunction)env_close_m, METH_NOARGS, NULL},
    {"get_record", (PyCFunction)env_get_record, METH_O, NULL},
    {"get_entry", (PyCFunction)(void (*)(void))env_get_entry, METH_FASTCALL, NULL},
    {"set_entry", (PyCFunction)(void (*)(void))env_set_entry, METH_FASTCALL, NULL},
    {NULL}
};

static PyTypeObject EnvType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi._lmdb.Environment",
    .tp_basicsize = sizeof(EnvObject),
    .tp_dealloc = (destructor)env_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = env_methods,
};

/* ------------------------------------------------------------------ Transaction */

static int
txn_ok(TxnObject *t)
{
    if (t->txn == NULL) {
        PyErr_SetString(LmdbError, "transaction has ended");
        return 0;
    }
    if (t->env->env == NULL) {
        PyErr_SetString(LmdbError, "environment is closed");
        return 0;
    }
    return 1;
}

/* Invalidate the cursors (LMDB frees a write transaction's cursors itself; a read
 * transaction's must be closed), then end the transaction. */
static int
txn_end(TxnObject *t, int commit)
{
    int rc = 0;
    Py_ssize_t n = PyList_GET_SIZE(t->cursors);
    for (Py_ssize_t i = 0; i < n; i++) {
        CursorObject *c = (CursorObject *)PyList_GET_ITEM(t->cursors, i);
        if (c->cur != NULL && !t->write)
            mdb_cursor_close(c->cur);
        c->cur = NULL;
    }
    if (n)
        PyList_SetSlice(t->cursors, 0, n, NULL);
    MDB_txn *txn = t->txn;
    t->txn = NULL;
    if (t->write)
        rc = commit ? mdb_txn_commit(txn) : (mdb_txn_abort(txn), 0);
    else
        read_done(t->env, txn);
    return rc;
}

static void
txn_dealloc(TxnObject *t)
{
    if (t->txn != NULL && t->env != NULL && t->env->env != NULL)
        txn_end(t, 0);
    Py_XDECREF(t->cursors);
    Py_XDECREF(t->env);
    PyObject_Free(t);
}

static PyObject *
txn_commit(TxnObject *t, PyObject *unused)
{
    if (!txn_ok(t))
        return NULL;
    int rc = txn_end(t, 1);
    if (rc)
        return raise_mdb(rc, "commit");
    Py_RETURN_NONE;
}

static PyObject *
txn_abort(TxnObject *t, PyObject *unused)
{
    if (t->txn != NULL && t->env->env != NULL)
        txn_end(t, 0);
    Py_RETURN_NONE;
}

static int
as_key(PyObject *o, MDB_val *v)
{
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(o, &p, &n) < 0)
        return 0;
    v->mv_data = p;
    v->mv_size = (size_t)n;
    return 1;
}

static PyObject *
txn_get(TxnObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    MDB_val k, v;
    if (!as_key(args[0], &k) || !txn_ok(t))
        return NULL;
    int rc = mdb_get(t->txn, t->env->dbi, &k, &v);
    if (rc == 0)
        return PyBytes_FromStringAndSize(v.mv_data, (Py_ssize_t)v.mv_size);
    if (rc == MDB_NOTFOUND)
        return Py_NewRef(nargs == 2 ? args[1] : Py_None);
    return raise_mdb(rc, "get");
}

static PyObject *
txn_put(TxnObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "put(key, value)");
        return NULL;
    }
    MDB_val k, v;
    if (!as_key(args[0], &k) || !as_key(args[1], &v) || !txn_ok(t))
        return NULL;
    int rc = mdb_put(t->txn, t->env->dbi, &k, &v, 0);
    if (rc)
        return raise_mdb(rc, "put");
    Py_RETURN_TRUE;
}

static PyObject *
txn_delete(TxnObject *t, PyObject *arg)
{
    MDB_val k;
    if (!as_key(arg, &k) || !txn_ok(t))
        return NULL;
    int rc = mdb_del(t->txn, t->env->dbi, &k, NULL);
    if (rc == MDB_NOTFOUND)
        Py_RETURN_FALSE;
    if (rc)
        return raise_mdb(rc, "delete");
    Py_RETURN_TRUE;
}

static PyObject *
txn_pop(TxnObject *t, PyObject *arg)
{
    MDB_val k, v;
    if (!as_key(arg, &k) || !txn_ok(t))
        return NULL;
    int rc = mdb_get(t->txn, t->env->dbi, &k, &v);
    if (rc == MDB_NOTFOUND)
        Py_RETURN_NONE;
    if (rc)
        return raise_mdb(rc, "pop");
    PyObject *out = PyBytes_FromStringAndSize(v.mv_data, (Py_ssize_t)v.mv_size);
    if (out == NULL)
        return NULL;
    if ((rc = mdb_del(t->txn, t->env->dbi, &k, NULL))) {
        Py_DECREF(out);
        return raise_mdb(rc, "pop");
    }
    return out;
}

static PyObject *
txn_cursor(TxnObject *t, PyObject *unused)
{
    if (!txn_ok(t))
        return NULL;
    CursorObject *c = PyObject_New(CursorObject, &CursorType);
    if (c == NULL)
        return NULL;
    c->cur = NULL;
    Py_INCREF(t);
    c->txn = t;
    c->positioned = c->started = 0;
    int rc = mdb_cursor_open(t->txn, t->env->dbi, &c->cur);
    if (rc) {
        c->cur = NULL;
        Py_DECREF(c);
        return raise_mdb(rc, "cursor");
    }
    if (PyList_Append(t->cursors, (PyObject *)c) < 0) {
        mdb_cursor_close(c->cur);
        c->cur = NULL;
        Py_DECREF(c);
        return NULL;
    }
    return (PyObject *)c;
}

static PyObject *
txn_enter(TxnObject *t, PyObject *unused)
{
    return Py_NewRef(t);
}

static PyObject *
txn_exit(TxnObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (t->txn == NULL || t->env->env == NULL)
        Py_RETURN_FALSE;
    int ok = nargs == 0 || args[0] == Py_None;
    int rc = txn_end(t, ok);
    if (rc)
        return raise_mdb(rc, "commit");
    Py_RETURN_FALSE;
}

static PyMethodDef txn_methods[] = {
    {"get", (PyCFunction)(void (*)(void))txn_get, METH_FASTCALL, NULL},
    {"put", (PyCFunction)(void (*)(void))txn_put, METH_FASTCALL, NULL},
    {"delete", (PyCFunction)txn_delete, METH_O, NULL},
    {"pop", (PyCFunction)txn_pop, METH_O, NULL},
    {"cursor", (PyCFunction)txn_cursor, METH_NOARGS, NULL},
    {"commit", (PyCFunction)txn_commit, METH_NOARGS, NULL},
    {"abort", (PyCFunction)txn_abort, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)txn_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))txn_exit, METH_FASTCALL, NULL},
    {NULL}
};

static PyTypeObject TxnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi._lmdb.Transaction",
    .tp_basicsize = sizeof(TxnObject),
    .tp_dealloc = (destructor)txn_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = txn_methods,
};

/* ------------------------------------------------------------------ Cursor */

static int
cur_ok(CursorObject *c)
{
    if (c->cur == NULL || c->txn->txn == NULL) {
        PyErr_SetString(LmdbError, "cursor's transaction has ended");
        return 0;
    }
    return txn_ok(c->txn);
}

static void
cur_dealloc(CursorObject *c)
{
    /* A live cursor is in its transaction's list, which holds a reference: dealloc only runs
     * once the transaction has ended and invalidated it (c->cur == NULL). */
    if (c->cur != NULL && c->txn != NULL && c->txn->txn != NULL && !c->txn->write)
        mdb_cursor_close(c->cur);
    Py_XDECREF(c->txn);
    PyObject_Free(c);
}

static PyObject *
cur_set_range(CursorObject *c, PyObject *arg)
{
    MDB_val k;
    if (!as_key(arg, &k) || !cur_ok(c))
        return NULL;
    c->key = k;
    c->started = 0;
    int rc = mdb_cursor_get(c->cur, &c->key, &c->val, MDB_SET_RANGE);
    if (rc == MDB_NOTFOUND) {
        c->positioned = 0;
        Py_RETURN_FALSE;
    }
    if (rc)
        return raise_mdb(rc, "set_range");
    c->positioned = 1;
    Py_RETURN_TRUE;
}

static PyObject *
cur_key(CursorObject *c, PyObject *unused)
{
    if (!cur_ok(c))
        return NULL;
    if (!c->positioned)
        return PyBytes_FromStringAndSize("", 0);
    return PyBytes_FromStringAndSize(c->key.mv_data, (Py_ssize_t)c->key.mv_size);
}

static PyObject *
cur_value(CursorObject *c, PyObject *unused)
{
    if (!cur_ok(c))
        return NULL;
    if (!c->positioned)
        return PyBytes_FromStringAndSize("", 0);
    return PyBytes_FromStringAndSize(c->val.mv_data, (Py_ssize_t)c->val.mv_size);
}

static PyObject *
cur_iter(CursorObject *c)
{
    return Py_NewRef(c);
}

static PyObject *
cur_next(CursorObject *c)
{
    if (!cur_ok(c))
        return NULL;
    MDB_cursor_op op = c->started ? MDB_NEXT : (c->positioned ? MDB_GET_CURRENT : MDB_FIRST);
    c->started = 1;
    int rc = mdb_cursor_get(c->cur, &c->key, &c->val, op);
    if (rc == MDB_NOTFOUND) {
        c->positioned = 0;
        return NULL;                                /* StopIteration */
    }
    if (rc)
        return raise_mdb(rc, "next");
    c->positioned = 1;
    return Py_BuildValue("(y#y#)", c->key.mv_data, (Py_ssize_t)c->key.mv_size,
                         c->val.mv_data, (Py_ssize_t)c->val.mv_size);
}

static PyMethodDef cur_methods[] = {
    {"set_range", (PyCFunction)cur_set_range, METH_O, NULL},
    {"key", (PyCFunction)cur_key, METH_NOARGS, NULL},
    {"value", (PyCFunction)cur_value, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject CursorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi._lmdb.Cursor",
    .tp_basicsize = sizeof(CursorObject),
    .tp_dealloc = (destructor)cur_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_iter = (getiterfunc)cur_iter,
    .tp_iternext = (iternextfunc)cur_next,
    .tp_methods = cur_methods,
};

/* ------------------------------------------------------------------ metric counters */

/* counters(path, count) -> Counters: the store's metric values (counters and gauges), one u64
 * per metric sequence number in a file of count slots that every process maps shared, updated
 * with atomic instructions (Envoy keeps its stats the same way). An increment is then one
 * locked add instead of an LMDB write transaction, and never waits for another worker's write.
 *   add(i, delta)    slot i += delta (mod 2**64; a negative delta wraps as i64 arithmetic does)
 *   store(i, value)  slot i = value (mod 2**64)
 *   load(i) -> int   slot i, as a u64
 * An index outside the file raises IndexError. The mapping is undone when the object goes. */
typedef struct {
    PyObject_HEAD
    uint64_t *slots;
    Py_ssize_t count;
} CountersObject;

static PyTypeObject CountersType;

static PyObject *
counters_open(PyObject *self, PyObject *args)
{
    const char *path;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "sn", &path, &count))
        return NULL;
    if (count <= 0) {
        PyErr_SetString(PyExc_ValueError, "counters: count must be positive");
        return NULL;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    struct stat st;
    size_t len = (size_t)count * sizeof(uint64_t);
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < len) {
        close(fd);
        return PyErr_Format(PyExc_ValueError, "%s: shorter than %zd counters", path, count);
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);                                      /* the mapping keeps the file */
    if (p == MAP_FAILED)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    CountersObject *c = PyObject_New(CountersObject, &CountersType);
    if (c == NULL) {
        munmap(p, len);
        return NULL;
    }
    c->slots = p;
    c->count = count;
    return (PyObject *)c;
}

static void
counters_dealloc(CountersObject *c)
{
    munmap(c->slots, (size_t)c->count * sizeof(uint64_t));
    PyObject_Free(c);
}

/* The slot args[0] names, or NULL with IndexError set. */
static uint64_t *
counter_slot(CountersObject *c, PyObject *arg)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= c->count) {
        PyErr_SetString(PyExc_IndexError, "counter index out of range");
        return NULL;
    }
    return c->slots + i;
}

/* add/store's arguments: the slot and the value (mod 2**64); -1 with an exception set. */
static int
counter_args(CountersObject *c, PyObject *const *args, Py_ssize_t nargs, uint64_t **slot,
             uint64_t *value)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add and store take 2 arguments");
        return -1;
    }
    if ((*slot = counter_slot(c, args[0])) == NULL)
        return -1;
    *value = (uint64_t)PyLong_AsUnsignedLongLongMask(args[1]);
    return *value == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *
counters_add(CountersObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *slot, delta;
    if (counter_args(c, args, nargs, &slot, &delta) < 0)
        return NULL;
    __atomic_fetch_add(slot, delta, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
counters_store(CountersObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *slot, value;
    if (counter_args(c, args, nargs, &slot, &value) < 0)
        return NULL;
    __atomic_store_n(slot, value, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
counters_load(CountersObject *c, PyObject *arg)
{
    uint64_t *slot = counter_slot(c, arg);
    if (slot == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(slot, __ATOMIC_RELAXED));
}

static PyMethodDef counters_methods[] = {
    {"add", (PyCFunction)(void (*)(void))counters_add, METH_FASTCALL, NULL},
    {"store", (PyCFunction)(void (*)(void))counters_store, METH_FASTCALL, NULL},
    {"load", (PyCFunction)counters_load, METH_O, NULL},
    {NULL}
};

static PyTypeObject CountersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "abi._lmdb.Counters",
    .tp_basicsize = sizeof(CountersObject),
    .tp_dealloc = (destructor)counters_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = counters_methods,
};

/* ------------------------------------------------------------------ module */

static PyMethodDef module_methods[] = {
    {"open", (PyCFunction)(void (*)(void))lmdb_open, METH_VARARGS | METH_KEYWORDS, NULL},
    {"counters", (PyCFunction)counters_open, METH_VARARGS, NULL},
    {NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "abi._lmdb", NULL, -1, module_methods,
};

PyMODINIT_FUNC
PyInit__lmdb(void)
{
    if (PyType_Ready(&EnvType) < 0 || PyType_Ready(&TxnType) < 0 || PyType_Ready(&CursorType) < 0
            || PyType_Ready(&CountersType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    LmdbError = PyErr_NewException("abi._lmdb.Error", NULL, NULL);
    MapFullError = PyErr_NewException("abi._lmdb.MapFullError", LmdbError, NULL);
    if (LmdbError == NULL || MapFullError == NULL
            || PyModule_AddObjectRef(m, "Error", LmdbError) < 0
            || PyModule_AddObjectRef(m, "MapFullError", MapFullError) < 0
            || PyModule_AddObjectRef(m, "Environment", (PyObject *)&EnvType) < 0
            || PyModule_AddIntConstant(m, "SLOW", SLOW) < 0
            || PyModule_AddIntConstant(m, "LONG_KEY", LONG_KEY) < 0
            || PyModule_AddStringConstant(m, "LMDB_VERSION", MDB_VERSION_STRING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
