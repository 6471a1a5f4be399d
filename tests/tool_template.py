"""SmolLM2 with a chat template that renders tools, for the tool-call tests that CI runs.

SmolLM2-135M's own template has no tools, so the server refuses ``tools`` for it (as it should:
it was not trained to call functions). The tests of the tool-call plumbing -- constrained calls,
streaming deltas, tool turns in the history -- need a tool-aware template on a model small enough
for CI; SmolLM2 speaks ChatML as Qwen2.5 does, so a copy of its GGUF file with the template below
(written for these tests: tools listed in the system turn, calls and results in Qwen2.5's
``<tool_call>`` / ``<tool_response>`` format) is one. Constrained decoding makes its calls valid;
Qwen2.5-Coder (tests/test_serve_qwen.py, slow) is the model that calls tools on its own.
"""

from __future__ import annotations

from pathlib import Path

NL = "{{ '\\n' }}"      # a line break right after a tag (trim_blocks would eat a literal one)

TOOL_TEMPLATE = (
    "{% if messages and messages[0].role == 'system' %}{% set sys = messages[0].content %}"
    "{% else %}{% set sys = '' %}{% endif %}"
    "{% if tools %}<|im_start|>system\n{% if sys %}{{ sys }}\n\n{% endif %}"
    "You may call these functions (one JSON signature per line):\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "To call one, answer with:\n<tool_call>\n{\"name\": NAME, \"arguments\": {ARGUMENTS}}\n</tool_call><|im_end|>"
    + NL +
    "{% elif sys %}<|im_start|>system\n{{ sys }}<|im_end|>" + NL + "{% endif %}"
    "{% for m in messages %}{% if not (loop.index0 == 0 and m.role == 'system') %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>" + NL +
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% if m.content %}{{ m.content }}\n{% endif %}"
    "{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% if not loop.last %}" + NL + "{% endif %}{% endfor %}<|im_end|>" + NL +
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>" + NL + "{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_smollm2_with_tools(source: Path, target: Path) -> Path:
    """A copy of the GGUF file ``source`` whose chat template is :data:`TOOL_TEMPLATE`."""
    from edgellm.loading.gguf import read_gguf, write_gguf

    src = read_gguf(source)
    meta = {**src.metadata, "tokenizer.chat_template": TOOL_TEMPLATE}
    tensors = [(name, t.data, t.ggml_type, t.shape) for name, t in src.tensors.items()]
    write_gguf(target, meta, tensors, metadata_types=src.metadata_types)
    return target
