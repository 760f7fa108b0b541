"""Run part of the Python test suite against an AddressSanitizer build of the extension.

The C core's own tests run under ASan (``make -C csrc test``), but they call the C API the way
C code does.  This script builds ``scatterlist._sg`` with ``-fsanitize=address``, puts it in a
copy of the package in a temporary directory, and runs the native half of the tests that drive
lifetimes, threads, isolation and device access through the Python layer, with the ASan
runtime preloaded into the interpreter: a read of freed memory from any Python call sequence
those tests make aborts the run.  Used by ``.ci/run``; ``python tests/reliability/asan_suite.py
[pytest args]`` runs it by hand.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The tests whose native half runs under ASan: the ones that exercise lifetimes, threads,
#: isolation and device access (the bad-input matrix and the property tests are left to the
#: ordinary run: they take long, and their native calls are the same kinds).
TESTS = [
    "tests/test_lifetime_protocol.py",
    "tests/test_lifetime_hardening.py",
    "tests/test_lifetime.py",
    "tests/test_isolation.py",
    "tests/test_edges.py",
    "tests/test_sgtable.py",
    "tests/test_dma.py",
    "tests/test_debug.py",
    "tests/test_faults.py",
    "tests/test_copy.py",
    "tests/test_memory.py",
    "tests/test_table_kernel.py",
    "tests/test_table_errors.py",
    "tests/test_threads.py",
]


#: A use after free through the raw bindings, which ASan must report.
CANARY = """
from scatterlist._native import ffi, lib
out = ffi.new("struct physmem **")
assert lib.physmem_create(1 << 20, 4096, out) == 0
lib.physmem_destroy(out[0])
lib.physmem_read(out[0], 0, ffi.new("uint8_t[]", 8), 8)
"""


def asan_runtime() -> str:
    path = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"asan_suite: gcc has no libasan.so ({path!r})")
    return path


def build(workdir: Path) -> Path:
    """The package with an ASan-built extension, in workdir/pkg; returns that directory."""
    spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "csrc" / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    build_ffi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_ffi)
    flags = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
    builder = build_ffi.make_ffibuilder(str(ROOT), flags, ["-fsanitize=address"])
    built = Path(builder.compile(tmpdir=str(workdir / "build"), verbose=False))
    package = workdir / "pkg" / "scatterlist"
    shutil.copytree(
        ROOT / "src" / "scatterlist",
        package,
        ignore=shutil.ignore_patterns("_sg*.so", "_sg*.pyd", "__pycache__"),
    )
    shutil.copy(built, package / built.name)
    return workdir / "pkg"


def main(argv: list) -> int:
    with tempfile.TemporaryDirectory(prefix="scatterlist-asan-") as tmp:
        package_dir = build(Path(tmp))
        env = dict(
            os.environ,
            PYTHONPATH=str(package_dir),
            LD_PRELOAD=asan_runtime(),
            SCATTERLIST_ENGINE="native",
            # Python itself leaks at exit by design; every error aborts the process.
            ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1",
        )
        probe = subprocess.run(
            [sys.executable, "-c", "import scatterlist._sg as m; print(m.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        loaded = probe.stdout.strip()
        if probe.returncode != 0 or not loaded.startswith(str(package_dir)):
            print(probe.stderr)
            print(f"asan_suite: the ASan extension did not load (got {loaded!r})")
            return 1
        # The instrumentation must be live: a deliberate use after free has to be caught.
        canary = subprocess.run(
            [sys.executable, "-c", CANARY], env=env, capture_output=True, text=True, cwd=tmp
        )
        if canary.returncode == 0 or "heap-use-after-free" not in canary.stderr:
            print(canary.stderr[-2000:])
            print("asan_suite: ASan did not catch the canary use after free")
            return 1
        print(f"asan_suite: running against {loaded} (canary caught)", flush=True)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not model",
            *TESTS,
            *argv,
        ]
        return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
