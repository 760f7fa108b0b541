"""Every behavioural test runs once per engine: ``native`` (C through cffi) and ``model``."""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, settings

import scatterlist as sg

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("SCATTERLIST_HYPOTHESIS_PROFILE", "ci"))

ENGINES = ("native", "model")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def table_from(engine: str):  # type: ignore[no-untyped-def]
    """``alloc_table_from_pages`` bound to the engine under test."""

    def build(pfns, **kwargs):  # type: ignore[no-untyped-def]
        return sg.alloc_table_from_pages(pfns, engine=engine, **kwargs)

    return build


@pytest.fixture
def memory(engine: str) -> sg.PhysicalMemory:
    """A 1 GiB sparse memory with 4 KiB pages on the engine under test."""
    return sg.PhysicalMemory(1 << 30, engine=engine)


class System(NamedTuple):
    mem: sg.PhysicalMemory
    iommu: sg.Iommu
    dev: sg.Device  #: "nic", behind the IOMMU
    direct: sg.Device  #: "direct", without one


@pytest.fixture
def system(engine: str) -> System:
    """Memory of 64 MiB, an IOMMU with 4 KiB granules, a device "nic" behind it and a device
    "direct" without one.  The one shared world of the DMA tests: a module that needs other
    settings changes them on these objects (see test_debug's ``debugged``)."""
    mem = sg.PhysicalMemory(64 << 20, engine=engine)
    iommu = sg.Iommu(mem)
    return System(
        mem, iommu, sg.Device(mem, iommu=iommu, name="nic"), sg.Device(mem, name="direct")
    )
