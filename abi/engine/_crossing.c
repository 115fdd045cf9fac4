/* The two hot crossings of abi/engine/crossing.py in C, without ctypes in between.
 *
 * Optional: built at install (setup.py, optional=True); when it is missing, crossing.py does
 * the same through ctypes prototypes (the tests run both). It links against nothing: the
 * address of wasmtime_func_call_unchecked comes from crossing.py (ctypes resolved it in
 * wasmtime-py's library), so this file never needs wasmtime's headers or library.
 *
 *   call(ctx, func, args, nargs, trap_out) -> int
 *       wasmtime_func_call_unchecked with the GIL released (the epoch ticker thread must run
 *       while a guest spins); returns the wasmtime_error_t* as an int (0: none). Same
 *       arguments and result as crossing.py's ctypes prototype ``_call_unchecked``.
 *   HOST_TRAMPOLINE: address of a wasmtime_func_unchecked_callback_t whose env is a Python
 *       callable; it calls ``env(None, caller, slots, len)`` with the GIL, where ``slots`` is
 *       a writable memoryview over the len * 16 bytes of arguments and results (where the
 *       ctypes path passes their address, and the callback pays ~0.5 us to wrap it), and
 *       returns its int result (a wasm_trap_t* or 0), as ctypes' CFUNCTYPE closure would.
 *   set_call_target(address): the address of wasmtime_func_call_unchecked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef void *(*call_unchecked_t)(void *ctx, void *func, void *args, size_t nargs, void **trap);

static call_unchecked_t call_target = NULL;

static PyObject *set_call_target(PyObject *self, PyObject *arg) {
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && PyErr_Occurred())
        return NULL;
    call_target = (call_unchecked_t)p;
    Py_RETURN_NONE;
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
    void *err;
    Py_BEGIN_ALLOW_THREADS
    err = call_target(ctx, func, vals, n, trap);
    Py_END_ALLOW_THREADS
    return PyLong_FromVoidPtr(err);
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

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL,
     "wasmtime_func_call_unchecked(ctx, func, args, nargs, trap_out), GIL released"},
    {"set_call_target", set_call_target, METH_O,
     "the address of wasmtime_func_call_unchecked"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "abi.engine._crossing",
    "Hot crossings of abi/engine/crossing.py without ctypes (optional).", -1, methods,
};

PyMODINIT_FUNC PyInit__crossing(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *addr = PyLong_FromVoidPtr((void *)host_trampoline);
    if (addr == NULL || PyModule_AddObject(m, "HOST_TRAMPOLINE", addr) < 0) {
        Py_XDECREF(addr);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
