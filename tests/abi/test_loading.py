"""Loading: ABI version, imports, start sequence, WASI, errors a user can cause (§1, §2.3)."""
from __future__ import annotations

import pytest

from abi.api import FilterLoadError, Forward, LogInfo

from abi_helpers import REQ, info
from abi_wat import OUT, Wat, status

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"


async def expect_load_error(load, module, **kw) -> str:
    with pytest.raises(FilterLoadError) as ei:
        await load(module, **kw)
    msg = str(ei.value)
    assert msg.startswith('filter "f"') and "f.wat" in msg
    return msg


async def test_missing_abi_marker(load):
    msg = await expect_load_error(load, '(module (memory (export "memory") 1))')
    assert "missing or unknown Proxy-Wasm ABI version" in msg


async def test_unknown_abi_marker(load):
    msg = await expect_load_error(load, '(module (func (export "proxy_abi_version_9_9_9")))')
    assert "ABI version" in msg


async def test_unknown_imports_are_listed(load):
    msg = await expect_load_error(load, """(module
      (import "env" "proxy_resume_http_request" (func (result i32)))
      (import "env" "totally_unknown" (func))
      (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
      (func (export "proxy_abi_version_0_2_1")))""")
    assert "env.proxy_resume_http_request" in msg and "env.totally_unknown" in msg
    assert "env.proxy_log" not in msg


async def test_wrong_import_signature(load):
    msg = await expect_load_error(load, """(module
      (import "env" "proxy_log" (func (param i32) (result i32)))
      (func (export "proxy_abi_version_0_2_1")))""")
    assert "env.proxy_log is (i32) -> (i32), expected (i32, i32, i32) -> (i32)" in msg


async def test_invalid_wasm_and_missing_file(load, tmp_path, engine, services):
    msg = await expect_load_error(load, "(module (this is not wat")
    assert "invalid" in msg.lower() or "error" in msg.lower()
    from abi.api import FilterSpec
    from abi.filter_host import FilterHost
    with pytest.raises(FilterLoadError) as ei:
        await FilterHost.load([FilterSpec("gone", tmp_path / "nope.wasm")], services, engine=engine)
    assert "cannot read" in str(ei.value) and "nope.wasm" in str(ei.value)


async def test_configure_false_names_callback(load):
    w = Wat().on("proxy_on_configure", "(i32.const 0)")
    msg = await expect_load_error(load, w)
    assert "proxy_on_configure" in msg and "returned false" in msg


async def test_vm_start_false_names_callback(load):
    msg = await expect_load_error(load, Wat().on("proxy_on_vm_start", "(i32.const 0)"))
    assert "proxy_on_vm_start" in msg


async def test_trap_during_initialize(load):
    w = Wat()
    w.extra.append('(func (export "_initialize") unreachable)')
    msg = await expect_load_error(load, w)
    assert "_initialize" in msg and "trap" in msg


async def test_initialize_then_main_then_root(load, trace):
    w = Wat()
    w.extra.append(f'(func (export "_initialize") (drop (call $proxy_log (i32.const 2) {w.s("init")})))')
    w.extra.append(f'(func (export "main") (param i32 i32) (result i32) (call $trace {w.s("main")} (i32.const 2) (local.get 0) (local.get 1) (i32.const 0)) (i32.const 0))')
    w.extra.append(f'(func (export "_start") (drop (call $proxy_log (i32.const 2) {w.s("start")})))')
    await load(w)
    assert trace.lines("f")[:3] == ["init", "main 0 0", "proxy_on_context_create 1 0"]


async def test_start_command_with_proc_exit_zero(load, trace):
    # TinyGo >= 0.35 commands call proc_exit(0) at the end of _start.
    w = Wat()
    w.extra.append(f'(func (export "_start") (drop (call $proxy_log (i32.const 2) {w.s("start")})) (call $proc_exit (i32.const 0)))')
    host = await load(w)
    assert trace.lines("f")[:2] == ["start", "proxy_on_context_create 1 0"]
    s = host.stream(["f"], info())
    assert isinstance(await s.request(REQ, None), Forward)


async def test_abi_0_1_0_two_arg_headers_and_legacy_calls(load, trace):
    imports = {"proxy_log": 3, "proxy_get_configuration": 2, "proxy_continue_request": 0,
               "proxy_continue_response": 0, "proxy_clear_route_cache": 0,
               "proxy_get_header_map_value": 5}
    w = Wat("0_1_0", imports=imports)
    w.callbacks["proxy_on_request_headers"] = None
    w.callbacks["proxy_on_response_headers"] = None
    w.extra.append(f'(func (export "proxy_on_request_headers") (param $a i32) (param $b i32) (result i32) '
                   f'{w.trace("req", 2)} (drop (call $proxy_clear_route_cache)) '
                   f'(drop (call $proxy_continue_request)) (i32.const 1))')
    w.extra.append(f'(func (export "proxy_on_response_headers") (param $a i32) (param $b i32) (result i32) '
                   f'{w.trace("resp", 2)} (i32.const 0))')
    w.on("proxy_on_configure",
         status(w, "cfg", f"(call $proxy_get_configuration {O})")
         + f"(drop (call $proxy_log (i32.const 2) (i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4})))) (i32.const 1)")
    host = await load(w, configuration=b"legacy")
    assert trace.lines("f")[-2:] == ["cfg 0", "legacy"]
    assert host.filters["f"].loaded.abi_version == "0.1.0"
    s = host.stream(["f"], info())
    # Paused, but resumed through the 0.1.0 continue_request during the same callback.
    assert isinstance(await s.request(REQ, None), Forward)
    await s.response(200, [], None)
    await s.finish(LogInfo())
    assert "req 2 6" in trace.lines("f") and "resp 2 1" in trace.lines("f")


async def test_wasi_stdout_stderr_environ_args_clock_random(load, trace):
    w = Wat()
    w.imports = dict(w.imports)
    extra_imports = [
        '(import "wasi_unstable" "fd_write" (func $u_fd_write (param i32 i32 i32 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))',
        '(import "wasi_snapshot_preview1" "sock_send" (func $sock_send (param i32 i32 i32 i32 i32) (result i32)))',
    ]
    hello, oops = w.s("hello\n"), w.s("oops")
    iov = 0x9100
    body = (
        f"(i32.store (i32.const {iov}) {hello.split(') (')[0]}))"
        f"(i32.store (i32.const {iov + 4}) (i32.const 6))"
        + status(w, "stdout", f"(call $fd_write (i32.const 1) (i32.const {iov}) (i32.const 1) (i32.const {OUT}))")
        + f"(i32.store (i32.const {iov}) {oops.split(') (')[0]}))(i32.store (i32.const {iov + 4}) (i32.const 4))"
        + status(w, "stderr", f"(call $u_fd_write (i32.const 2) (i32.const {iov}) (i32.const 1) (i32.const {OUT}))")
        + status(w, "badfd", f"(call $fd_write (i32.const 5) (i32.const {iov}) (i32.const 1) (i32.const {OUT}))")
        + status(w, "envsizes", f"(call $env_sizes {O})")
        + f"(call $trace {w.s('env')} (i32.const 2) (i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4})) (i32.const 0))"
        + status(w, "envget", "(call $env_get (i32.const 0x9200) (i32.const 0x9300))")
        + "(drop (call $proxy_log (i32.const 2) (i32.load (i32.const 0x9200)) (i32.const 7)))"
        + status(w, "args", f"(call $args_sizes {O})")
        + f"(call $trace {w.s('argn')} (i32.const 2) (i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4})) (i32.const 0))"
        + status(w, "clock", f"(call $clock (i32.const 1) (i64.const 1) (i32.const {OUT}))")
        + status(w, "clock-bad", f"(call $clock (i32.const 9) (i64.const 1) (i32.const {OUT}))")
        + status(w, "random", f"(call $random (i32.const {OUT}) (i32.const 16))")
        + status(w, "random-big", f"(call $random (i32.const {OUT}) (i32.const 100000))")
        + status(w, "fault", "(call $fd_write (i32.const 1) (i32.const -8) (i32.const 1) (i32.const 0))")
        + status(w, "open", "(call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 0))")
        + status(w, "sock", "(call $sock_send (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))")
        + "(i32.const 0)")
    w.on("proxy_on_request_headers", body)
    text = w.render().replace("(memory", "\n".join(extra_imports) + "\n(memory", 1)
    host = await load(text, environment=(("A", "1"), ("B", "22")))
    trace.records.clear()
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    lines = trace.lines("f")
    assert lines[1:] == ["stdout 0", "stderr 0", "badfd 8", "envsizes 0", "env 2 9", "envget 0",
                         "A=1\0B=2"[:7], "args 0", "argn 0 0", "clock 0", "clock-bad 58",
                         "random 0", "random-big 28", "fault 21", "open 44", "sock 76"]
    stdio = [r for r in trace.records if '" stdout: ' in r.getMessage() or '" stderr: ' in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in stdio] == [
        ("INFO", 'filter "f" stdout: hello'), ("ERROR", 'filter "f" stderr: oops')]


async def test_callback_with_wrong_signature_refused(load):
    w = Wat()
    w.callbacks["proxy_on_request_headers"] = None
    w.extra.append('(func (export "proxy_on_request_headers") (param i32 i32) (result i32) (i32.const 0))')
    msg = await expect_load_error(load, w)
    assert "proxy_on_request_headers is (i32, i32) -> (i32), expected (i32, i32, i32) -> (i32)" in msg


async def test_start_section_host_call_reads_guest_memory(load, trace):
    # AssemblyScript modules run code at instantiation: host calls made from a (start) function
    # must already see the module's memory.
    await load('''(module
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "from-start")
      (func $boot (drop (call $log (i32.const 2) (i32.const 16) (i32.const 10))))
      (start $boot)
      (func (export "proxy_abi_version_0_2_1")))''')
    assert trace.lines("f")[0] == "from-start"


async def test_emscripten_imported_memory_loads(load, trace):
    # Some Emscripten builds import their memory from env instead of exporting one they own.
    await load('''(module
      (import "env" "memory" (memory 1))
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (data (i32.const 32) "imported")
      (func (export "_initialize") (drop (call $log (i32.const 2) (i32.const 32) (i32.const 8))))
      (func (export "proxy_abi_version_0_2_1")))''')
    assert trace.lines("f")[0] == "imported"
