"""mypy sees the type-states as the Rust abstraction has them: SGTable[Owned[Pages]] owns and
closes, SGTable[Borrowed] only reads."""

from __future__ import annotations

import textwrap

from mypy import api

SNIPPET = textwrap.dedent("""
    import scatterlist as sg

    def use(dev: sg.Device, pages: sg.Pages) -> None:
        owned = sg.SGTable.new(dev, pages, sg.DataDirection.TO_DEVICE)
        reveal_type(owned)
        view = owned.borrow()
        reveal_type(view)
        for segment in view:
            reveal_type(segment.dma_address)
        reveal_type(owned.pages)
        owned.close()
        view.close()
""")


def test_type_states(tmp_path):
    path = tmp_path / "snippet.py"
    path.write_text(SNIPPET)
    stdout, stderr, _ = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path), str(path)]
    )
    assert (
        'Revealed type is "scatterlist.sgtable.SGTable[scatterlist.sgtable.Owned['
        'scatterlist.memory.Pages]]"' in stdout
    ), stdout + stderr
    assert 'Revealed type is "scatterlist.sgtable.SGTable[scatterlist.sgtable.Borrowed]"' in stdout
    assert 'Revealed type is "int"' in stdout or 'Revealed type is "builtins.int"' in stdout
    assert 'Revealed type is "scatterlist.memory.Pages"' in stdout
    # close() is only for owners: calling it on a borrowed view is a type error.
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "snippet.py:13" in errors[0], stdout
