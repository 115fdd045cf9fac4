"""Only the optional C extension lives here; everything else is in pyproject.toml.

abi/engine/_crossing.c speeds up the guest-call and host-callback crossings and runs the epoch
ticker without the GIL. optional=True: without a C compiler the install still succeeds and
abi/engine/crossing.py uses ctypes (ticker.py a Python thread).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("abi.engine._crossing", ["abi/engine/_crossing.c"], optional=True)])
