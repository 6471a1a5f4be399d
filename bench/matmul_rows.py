"""One block-quantised matmul against the number of activation rows, A/B between built kernel modules.

    PYTHONPATH=. python bench/matmul_rows.py --other main=PATH.so [--rows 1,2,3,4,8] [--threads 1]
    PYTHONPATH=. python bench/matmul_rows.py --paired-ab --rows 5,8,16   # avx512: two rows a vector on/off
    PYTHONPATH=. python bench/matmul_rows.py --row-lanes-ab --rows 1,4,16 --threads 2   # int8: row lanes vs tile

``--int8`` times ``block_matmul_q8`` (``--activations int8``) instead; ``--row-lanes-ab`` compiles the
avx512 build once more with ``-DEDGELLM_ROW_LANES=0`` (about a minute; the VNNI copy's older
``tile`` for every format) and compares its int8 matmul with this tree's (row lanes). Those two
sum in different orders, so they print "DIFFER"; tests/test_int8_activations.py holds both to
the same float64 reference.

For SmolLM2's matrix shapes (gate|up, down, the Q8_0 lm_head) and a few other formats, with random
weights quantised by the ``gguf`` package, calls ``block_matmul`` of this tree's module ("new") and
of each other module in alternating order, and prints the medians, the ratio other / new, and
whether the two give the same bits. Kernel changes that keep the arithmetic must print "same";
a module built from main sits in the kernel cache (``~/.cache/edgellm/kernels/*/``; its file name
must stay as built, the module's name is taken from it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from kernel_rows import load_module  # bench/kernel_rows.py: this folder is on sys.path when run as a script
from torch.utils import cpp_extension

SHAPES = [("Q4_1", 3072, 576, "gate|up"), ("Q4_1", 576, 1536, "down"), ("Q8_0", 49152, 576, "lm_head"),
          ("Q4_0", 1024, 576, ""), ("Q5_0", 1024, 576, "")]


class PairedRows:
    """The module with its paired-rows path set on or off before each call."""

    def __init__(self, module, on: bool):
        self.module, self.on = module, on

    def block_matmul(self, *args):
        self.module.set_paired_rows(self.on)
        return self.module.block_matmul(*args)


class Int8Matmul:
    """A module's int8-activation matmul under block_matmul's name."""

    def __init__(self, module):
        self.module = module

    def block_matmul(self, *args):
        return self.module.block_matmul_q8(*args)


def tile_module():
    """The avx512 build with the int8 row lanes compiled out (the older tile() for every format)."""
    from edgellm.kernels import build as kbuild

    flags = [*kbuild.VARIANTS["avx512"].cflags, "-DEDGELLM_ROW_LANES=0"]
    return cpp_extension.load(name="edgellm_int8_tile", sources=[str(kbuild.SOURCE)], extra_cflags=flags,
                              extra_ldflags=list(kbuild.LDFLAGS), build_directory=tempfile.mkdtemp(), verbose=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--other", action="append", default=[], metavar="NAME=PATH",
                   help="another built kernel module (.so) to compare with")
    p.add_argument("--paired-ab", action="store_true",
                   help="compare this module with its two-rows-a-vector path on ('new') and off ('unpaired')")
    p.add_argument("--int8", action="store_true", help="time block_matmul_q8 (--activations int8)")
    p.add_argument("--row-lanes-ab", action="store_true",
                   help="int8: this module (row lanes, 'new') against the avx512 build without them ('tile')")
    p.add_argument("--rows", default="1,2,3,4,8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from edgellm.kernels import NATIVE_FORMATS, native

    torch.set_num_threads(args.threads)
    mods = {"new": native()}
    if args.paired_ab:
        if not native().set_paired_rows(True):
            p.error("this build has no paired-rows path (only the avx512 build has)")
        mods = {"new": PairedRows(native(), True), "unpaired": PairedRows(native(), False)}
    if args.row_lanes_ab:
        from edgellm.kernels import build as kbuild

        if "avx512" not in kbuild.runnable_variants() or native().int8_dot_product() != "vnni":
            p.error("row lanes are in the avx512 build's VNNI copy; this CPU does not run it")
        mods["tile"] = tile_module()
    if len(mods) + len(args.other) < 2:
        p.error("give --other NAME=PATH, --paired-ab or --row-lanes-ab")
    for spec in args.other:
        name, path = spec.split("=", 1)
        mods[name] = load_module(Path(path))
    if args.int8 or args.row_lanes_ab:
        mods = {name: Int8Matmul(mod) for name, mod in mods.items()}
    rng = np.random.default_rng(0)
    what_ran = "block_matmul_q8" if args.int8 or args.row_lanes_ab else "block_matmul"
    print(f"{what_ran}, {args.threads} thread(s), medians of {args.rounds} alternating calls")
    print(f"{'matrix':>24} {'rows':>5} {'new ms':>9}" + "".join(f"{n + ' ms':>10}{n + '/new':>9} bits" for n in mods
                                                            if n != "new"))
    for fmt, n, k, what in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        raw = torch.from_numpy(quants.quantize(w, getattr(GGMLQuantizationType, fmt)).view(np.uint8).reshape(n, -1))
        code = NATIVE_FORMATS[fmt]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            ref = mods["new"].block_matmul(x, raw, code, n)
            same = {name: torch.equal(mod.block_matmul(x, raw, code, n), ref) for name, mod in mods.items()}
            times = {name: [] for name in mods}
            order = list(mods.items())
            for r in range(args.rounds):
                for name, mod in order if r % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    mod.block_matmul(x, raw, code, n)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            line = f"{f'{fmt} {n}x{k} {what}':>24} {rows:>5} {1e3 * med['new']:>9.3f}"
            for name in mods:
                if name != "new":
                    line += (f"{1e3 * med[name]:>10.3f}{med[name] / med['new']:>9.2f} "
                             f"{'same' if same[name] else 'DIFFER'}")
            print(line)


if __name__ == "__main__":
    main()
