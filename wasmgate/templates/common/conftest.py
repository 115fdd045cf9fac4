from pathlib import Path

from wasmgate.testing import build_if_stale

HERE = Path(__file__).resolve().parent
WASM = HERE / "dist" / "{{lib}}.wasm"


def pytest_sessionstart(session):
    build_if_stale(WASM, sources=[{{sources}}], command=["bash", str(HERE / "build.sh")])
