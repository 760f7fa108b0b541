"""The examples run as documented (so they cannot rot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES, "examples/ is empty"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("engine", ["native", "model"])
def test_example_runs(path, engine):
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, SCATTERLIST_ENGINE=engine),
    )
    assert result.returncode == 0, result.stderr
    assert "bug caught: IOMMU fault" in result.stdout
