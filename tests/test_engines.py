"""Engine choice is explicit: by argument or SCATTERLIST_ENGINE, never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import scatterlist as sg
from scatterlist import _engine
from scatterlist.errors import Reason


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_engine_attribute_follows_environment():
    out = run_python("import scatterlist; print(scatterlist.engine)", SCATTERLIST_ENGINE="model")
    assert out.stdout.strip() == "model"
    out = run_python("import scatterlist; print(scatterlist.engine)", SCATTERLIST_ENGINE="")
    assert out.stdout.strip() == "native"


def test_bad_engine_name_fails_loudly():
    out = run_python("import scatterlist", SCATTERLIST_ENGINE="turbo")
    assert out.returncode != 0
    assert "SCATTERLIST_ENGINE='turbo' is not an engine" in out.stderr


def test_model_engine_never_loads_the_extension():
    out = run_python(
        "import sys, scatterlist as sg; sg.alloc_table_from_pages([1, 2]); "
        "print('scatterlist._sg' in sys.modules, '_cffi_backend' in sys.modules)",
        SCATTERLIST_ENGINE="model",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_objects_report_their_engine(engine):
    assert sg.alloc_table_from_pages([0], engine=engine).engine == engine
    assert sg.PhysicalMemory(4096, engine=engine).engine == engine
    assert _engine.get_engine(engine).name == engine


def test_native_extension_is_current():
    from scatterlist import _native

    assert _native.lib.sl_abi_version() == _native.EXPECTED_ABI_VERSION


def test_reason_codes_match_the_c_header():
    """errors.Reason mirrors enum sl_reason: a renumbered C enum must not go unnoticed."""
    import re
    from pathlib import Path

    header = Path(__file__).resolve().parents[1] / "csrc" / "sl_common.h"
    if not header.exists():
        pytest.fail("csrc/sl_common.h not found next to the tests")
    pairs = re.findall(r"SL_REASON_([A-Z_]+) = (\d+)", header.read_text())
    assert pairs, "no reason codes found"
    by_name = {name: int(value) for name, value in pairs}
    for reason in Reason:
        assert by_name.get(reason.name) == reason.value, reason


def test_every_reason_is_mirrored_both_ways_and_has_a_message():
    import re
    from pathlib import Path

    from scatterlist.errors import ErrorDetail, message_for

    header = (Path(__file__).resolve().parents[1] / "csrc" / "sl_common.h").read_text()
    in_c = {name for name in re.findall(r"SL_REASON_([A-Z_0-9]+) = \d+", header)}
    assert in_c == {reason.name for reason in Reason}
    for reason in Reason:
        if reason is Reason.NONE:
            continue
        text = message_for(ErrorDetail(reason, 1, 2, 3, 1), 22)
        assert not text.startswith("failed with"), f"{reason.name} has no message"


ENGINE_ONLY_FOR_TESTS = {
    # What fail_maps() armed, as it stands: read by the bad-input matrix to prove that a
    # refused call changed nothing; no public API needs it.
    "device_injection",
}


def _engine_methods() -> set:
    from scatterlist._contract import Engine

    return {
        name for name, value in vars(Engine).items() if callable(value) and not name.startswith("_")
    }


def test_every_engine_method_is_used_by_the_pythonic_layer():
    """No dead engine methods: each one of the contract is called above the engines."""
    from pathlib import Path

    package = Path(sg.__file__).parent
    layer = "".join(
        path.read_text()
        for path in package.glob("*.py")
        if path.name not in ("_native.py", "_contract.py")
    )
    unused = {
        name for name in _engine_methods() if f".{name}(" not in layer
    } - ENGINE_ONLY_FOR_TESTS
    assert not unused, f"engine methods nobody calls: {sorted(unused)}"


def test_both_engines_implement_the_whole_contract(engine):
    missing = {
        name
        for name in _engine_methods()
        if not callable(getattr(_engine.get_engine(engine), name, None))
    }
    assert not missing


def test_every_cdef_function_is_called_by_the_native_engine():
    """No cdef export nobody calls: the extension's surface is what _native.py uses."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("build_ffi", root / "csrc" / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    declared = set(re.findall(r"^[a-z][\w\s\*]*?\b(\w+)\(", builder.CDEF, re.MULTILINE))
    native = (root / "src" / "scatterlist" / "_native.py").read_text()
    uncalled = {name for name in declared if f"lib.{name}(" not in native}
    assert declared and not uncalled, f"cdef functions nobody calls: {sorted(uncalled)}"


def test_engines_check_integer_arguments_alike(engine):
    """Each engine refuses an integer its C parameter type cannot hold, the model as cffi
    does (iommu_map(iova=-4096) used to succeed on the model)."""
    eng = _engine.get_engine(engine)
    iommu = eng.iommu_create(4096, 48)
    try:
        with pytest.raises(OverflowError):
            eng.iommu_map(iommu, -4096, 0, 4096, 3)
        with pytest.raises(OverflowError):
            eng.iommu_unmap(iommu, 0, 1 << 64)
        with pytest.raises(OverflowError):
            eng.iommu_iova_alloc(iommu, -1, 100)
        with pytest.raises(TypeError):
            eng.iommu_translate(iommu, "0", 1)
        assert eng.iommu_info(iommu)[0] == 0
    finally:
        eng.iommu_destroy(iommu)
