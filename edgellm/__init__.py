"""edgellm: an LLM inference engine for the hardware people have.

Public API::

    from edgellm import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.generate("Hello", SamplingParams(max_tokens=20), chat=True).text)
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):  # lazy, so `import edgellm` (and the CLI's --help) does not import torch
    if name == "LLM":
        from edgellm.llm import LLM

        return LLM
    if name == "SamplingParams":
        from edgellm.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
