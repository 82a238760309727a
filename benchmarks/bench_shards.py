"""Benchmark appending a night to a light-curve shard: generation files against a rewrite.

A shard of ``--stars`` stars holds ``--nights`` nights of ``--frames`` frames each
(flux and error, float32, frames × stars). Appending one more night with
:func:`autowisp.io.shards.write_shard_generation` writes that night and a table of
members; the peer is what a shard kept in one file must do to stay atomic (write a new
file with every night and rename it; h5py, the same layout). Prints time and bytes
written per append for each history length, and the ratio rewrite / generation; no
assertions on wall-clock time.

Usage (from the repository root): python -m benchmarks.bench_shards
  [--stars 1000] [--frames 300] [--nights 10,100,300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from autowisp.io.atomic import atomic_path
from autowisp.io.provenance import Provenance
from autowisp.io.shards import NightBlock, read_shard_generation, write_shard_generation

PROVENANCE = Provenance("lightcurves", "bench", "bench")


def _block(night: int, frames: int, stars: int, rng: np.random.Generator) -> NightBlock:
    flux = rng.normal(1000.0, 10.0, (frames, stars)).astype(np.float32)
    return NightBlock(night, f"2024-{1 + night // 28 % 12:02d}-{1 + night % 28:02d}", 1, {
        "flux": flux, "error": np.sqrt(flux), "jd": np.linspace(night, night + 0.4, frames),
    })  # fmt: skip


def _rewrite(path: Path, blocks: list[NightBlock]) -> None:
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as out:
        for block in blocks:
            group = out.create_group(f"nights/{block.night_id}")
            for name, values in block.columns.items():
                group.create_dataset(name, data=values)


def run(stars: int, frames: int, histories: list[int]) -> list[tuple[int, float, int, float, int]]:
    rng = np.random.default_rng(5)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        blocks: list[NightBlock] = []
        previous = None
        generation = 0
        for target in histories:
            while generation < target:
                generation += 1
                block = _block(generation, frames, stars, rng)
                blocks.append(block)
                path = root / f"s-g{generation}.h5"
                write_shard_generation(
                    path, shard="s", field_name="f", star_lo=0, star_hi=stars,
                    generation=generation, provenance=PROVENANCE, previous=previous,
                    written=[block],
                )  # fmt: skip
                previous = path
            # Time one more append against a rewrite of the whole history.
            block = _block(generation + 1, frames, stars, rng)
            appended = root / f"s-g{generation + 1}.h5"
            start = time.perf_counter()
            write_shard_generation(
                appended, shard="s", field_name="f", star_lo=0, star_hi=stars,
                generation=generation + 1, provenance=PROVENANCE, previous=previous,
                written=[block],
            )  # fmt: skip
            ours = time.perf_counter() - start
            assert len(read_shard_generation(appended, columns=False).nights) == generation + 1
            whole = root / "whole.h5"
            start = time.perf_counter()
            _rewrite(whole, [*blocks, block])
            theirs = time.perf_counter() - start
            rows.append((generation, ours, appended.stat().st_size, theirs, whole.stat().st_size))
            appended.unlink()
            whole.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stars", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--nights", default="10,100,300")
    args = parser.parse_args()
    histories = sorted(int(n) for n in args.nights.split(","))
    print(f"shard of {args.stars} stars, {args.frames} frames a night (flux, error: float32)")
    print(f"{'nights held':>11} {'append s':>9} {'append MB':>10} {'rewrite s':>10} "
          f"{'rewrite MB':>11} {'ratio s':>8}")  # fmt: skip
    for held, ours, our_bytes, theirs, their_bytes in run(args.stars, args.frames, histories):
        print(
            f"{held:>11} {ours:>9.3f} {our_bytes / 1e6:>10.1f} {theirs:>10.3f} "
            f"{their_bytes / 1e6:>11.1f} {theirs / ours:>8.1f}"
        )


if __name__ == "__main__":
    main()
