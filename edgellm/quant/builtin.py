"""The built-in weight formats, loaded: the one module that imports every format module.

Each format module registers itself with :mod:`edgellm.quant.registry` when imported; code that
converts or rebuilds matrices by format name (:mod:`edgellm.loading.convert`, the edgellm file
loader) asks :func:`entry`, which is only reachable once all of them are imported. No format
module imports this one, so the imports run one way: builtin -> formats -> base, registry.
"""

from __future__ import annotations

from edgellm.quant import dense, fp8, gguf_weights, int4, int8, ternary
from edgellm.quant.registry import FormatEntry, registered

#: the modules imported above, each of which registered its kind
MODULES = (dense, gguf_weights, int8, int4, fp8, ternary)


def entry(kind: str) -> FormatEntry:
    """The registered format ``kind`` (dense, gguf, int8, int4, fp8, ternary); KeyError if none."""
    return registered(kind)
