"""Only the optional C extensions live here; everything else is in pyproject.toml.

abi/engine/_crossing.c speeds up the guest-call and host-callback crossings and runs the epoch
ticker without the GIL. abi/_local_store.c is LocalStore.set (the in-process shared store's
write) in C. abi/_lmdb.c is the gateway-wide shared store's LMDB binding, with its
request-path get and set whole in C (needs liblmdb-dev). optional=True: without a C compiler
(or without liblmdb) the install still succeeds; abi/engine/crossing.py then uses ctypes,
ticker.py a Python thread, abi/shared_store.py its Python _set, and abi/shared_store_shm.py
py-lmdb.
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("abi.engine._crossing", ["abi/engine/_crossing.c"], optional=True),
    Extension("abi._local_store", ["abi/_local_store.c"], optional=True),
    Extension("abi._lmdb", ["abi/_lmdb.c"], libraries=["lmdb"], optional=True),
])
