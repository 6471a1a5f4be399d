"""edgellm: an LLM inference engine for the hardware people have.

Public API::

    from edgellm import LLM, Engine, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.generate("Hello", SamplingParams(max_tokens=20), chat=True).text)

    engine = Engine(llm, kv_memory="256MB")          # many conversations, paged KV, sessions
    s = engine.session(system="Be brief.")
    for piece in s.send("Hello!"):
        print(piece, end="")
    s.close()
"""

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "Session", "SamplingParams"]

# name -> module that defines it; imported on first use, so `import edgellm` (and the CLI's
# --help) does not import torch
_LAZY = {"LLM": "edgellm.llm", "SamplingParams": "edgellm.sampling",
         "Engine": "edgellm.runtime.engine", "Session": "edgellm.runtime.session"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
