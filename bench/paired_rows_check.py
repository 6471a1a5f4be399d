"""Check the AVX-512 build's two-rows-a-vector matmul (gguf_cpu.cpp, tile_pairs) on a CPU without
AVX-512: compile the kernels with the AVX2 flags and EDGELLM_EMULATE_512 (each 16-float vector as two
8-float halves, the same lane operations), then compare block_matmul with the regular AVX2 build,
bit for bit, over every format, row counts 1-33 and widths that take one or several slices.

The avx512 build itself is compared with the avx2 build by tests/test_kernel_variants.py where the
CPU runs AVX-512; this script is for developing that path elsewhere. It compiles for about two
minutes. Usage: python bench/paired_rows_check.py
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch.utils import cpp_extension

from edgellm.kernels import NATIVE_FORMATS, load_variant
from edgellm.kernels import build as kbuild
from edgellm.quant import gguf_blocks


def emulated_module():
    flags = [*kbuild.VARIANTS["avx2"].cflags, "-DEDGELLM_EMULATE_512"]
    return cpp_extension.load(name="edgellm_paired_rows_emulated", sources=[str(kbuild.SOURCE)], extra_cflags=flags,
                              extra_ldflags=list(kbuild.LDFLAGS), build_directory=tempfile.mkdtemp(), verbose=False)


def random_blocks(fmt: str, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2).numpy()
    if fmt.endswith("KR"):
        from edgellm.quant import repack

        raw = gguf_blocks.quantize(w, fmt[:-1]).view("uint8").reshape(n, -1)
        return repack.repack(torch.from_numpy(raw.copy()), fmt[:-1], n, k)
    return torch.from_numpy(gguf_blocks.quantize(w, fmt).view("uint8").reshape(n, -1).copy())


def main() -> int:
    if "avx2" not in kbuild.runnable_variants():
        print("this CPU does not run the avx2 build: nothing to compare")
        return 0
    emu, avx2 = emulated_module(), load_variant("avx2")
    bad = 0
    for fmt, code in NATIVE_FORMATS.items():
        for k in (256, 768, 1536):
            raw = random_blocks(fmt, 24, k, seed=k)
            for rows in (*range(1, 18), 24, 31, 33):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                got, want = emu.block_matmul(x, raw, code, 24), avx2.block_matmul(x, raw, code, 24)
                if not torch.equal(got, want):
                    bad += 1
                    print(f"DIFFER {fmt} K={k} rows={rows}: max |diff| {float((got - want).abs().max()):.3g}")
    print("paired rows (emulated) equal the avx2 build bit for bit" if not bad else f"{bad} cases differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
