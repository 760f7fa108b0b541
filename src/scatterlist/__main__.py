"""Command line: ``python -m scatterlist bench`` (native against model) and ``demo``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import DEFAULT_SIZES, LAYOUTS, bench_build, bench_dma, format_table

    sizes = [1_000, 65_536] if args.quick else (args.sizes or list(DEFAULT_SIZES))
    engines = ["native"] if args.native_only else ["native", "model"]
    print(
        f"scatterlist bench: Python {platform.python_version()} on {platform.machine()}, "
        f"median of up to {args.runs} runs per case",
        flush=True,
    )
    progress = (
        (lambda line: print("  " + line, flush=True)) if args.verbose else (lambda line: None)
    )
    results = bench_build(sizes, args.layouts or LAYOUTS, engines, args.runs, progress)
    if not args.no_dma:
        results += bench_dma(sizes, engines, args.runs, progress)
    print(format_table(results))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from .bench import soak

    every = max(args.cycles // 10, 1)
    print(
        f"scatterlist soak: {args.cycles} create-map-write-read-unmap-close cycles "
        f"({args.engine} engine)",
        flush=True,
    )
    samples = soak(args.cycles, args.engine, every, lambda line: print("  " + line, flush=True))
    if len(samples) >= 3:
        # Growth after warm-up (the first sample) must stay within the allowance.
        growth = samples[-1] - samples[0]
        print(
            f"resident growth after the first {every} cycles: {growth / 2**20:.2f} MiB "
            f"(allowed {args.max_growth_mib} MiB)"
        )
        if growth > args.max_growth_mib * 2**20:
            print("FAIL: resident memory keeps growing")
            return 1
    print("soak OK")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import scatterlist as sg

    with sg.PhysicalMemory(1 << 30, engine=args.engine) as mem:
        with mem.alloc_pages(8, "random", seed=3) as pages:
            print(f"pages: {list(pages.pfns)}")
            with sg.alloc_table_from_pages(
                pages.pfns,
                offset=100,
                size=8 * 4096 - 200,
                max_segment=3 * 4096,
                engine=args.engine,
            ) as table:
                print(table)
                for entry in table:
                    print(f"  {entry}")
                print(f"chunks: {table.chunk_slots()}  pages visited: {list(table.page_pfns())}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scatterlist")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time table building, native against model")
    bench.add_argument(
        "--sizes", type=int, nargs="+", help="page counts (default: 1000 65536 1048576)"
    )
    bench.add_argument("--layouts", nargs="+", choices=["contiguous", "scattered", "random"])
    bench.add_argument("--runs", type=int, default=15, help="runs per case (median taken)")
    bench.add_argument("--quick", action="store_true", help="small sizes only")
    bench.add_argument("--native-only", action="store_true")
    bench.add_argument("--no-dma", action="store_true", help="table building only")
    bench.add_argument("-v", "--verbose", action="store_true")
    bench.set_defaults(func=cmd_bench)
    soak = sub.add_parser("soak", help="many map/unmap cycles; resident memory must stay flat")
    soak.add_argument("--cycles", type=int, default=100_000)
    soak.add_argument("--engine", choices=["native", "model"], default="native")
    soak.add_argument("--max-growth-mib", type=float, default=8.0)
    soak.set_defaults(func=cmd_soak)
    demo = sub.add_parser("demo", help="build a small table and print it")
    demo.add_argument("--engine", choices=["native", "model"])
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
