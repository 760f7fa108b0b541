"""The cffi build script, tested like any code: a stale or incomplete build must not ship."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_builder():
    spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "csrc" / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_source_and_header_is_built_and_tracked():
    builder = load_builder()
    c_files = {f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.c")}
    headers = {f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.h")}
    assert set(builder.C_SOURCES) == c_files
    # Without every header in depends=, a header-only edit ships a stale extension.
    assert set(builder.C_HEADERS) == headers
    # Absolute paths break `python -m build`.
    assert all(not Path(path).is_absolute() for path in builder.C_SOURCES + builder.C_HEADERS)


def test_the_c_core_has_no_python():
    for path in (ROOT / "csrc").glob("*.[ch]"):
        assert "Python.h" not in path.read_text(), path


def test_only_native_module_touches_the_extension():
    package = ROOT / "src" / "scatterlist"
    touching = {
        path.name
        for path in package.rglob("*.py")
        if "_sg" in path.read_text() and "from ._sg" in path.read_text()
    }
    assert touching == {"_native.py"}


def test_manifest_ships_the_c_sources():
    assert "graft csrc" in (ROOT / "MANIFEST.in").read_text()
