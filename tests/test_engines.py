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
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=60)


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
    out = run_python("import sys, scatterlist as sg; sg.alloc_table_from_pages([1, 2]); "
                     "print('scatterlist._sg' in sys.modules, '_cffi_backend' in sys.modules)",
                     SCATTERLIST_ENGINE="model")
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
