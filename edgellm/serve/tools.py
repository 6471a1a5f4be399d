"""Tool calling in OpenAI's shape over a model that writes Qwen2.5's (Hermes-style) format.

A model is told about the tools by its own chat template, which must read ``tools`` (Qwen2.5's
does: it lists them in the system turn and asks for
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``). A model whose template does not
(SmolLM2's, Gemma 3 270M base's) was not trained to call functions: ``tools`` are refused for it
(:func:`check_tools_supported`), except with ``tool_choice: "none"``, where they are dropped and the
conversation (tool turns in its history written as text in Qwen2.5's format) is answered as text.

``tool_choice``:

* ``"auto"`` (the default with tools): the model decides; its output is parsed for ``<tool_call>``
  blocks (:class:`ToolCallParser`), which become ``tool_calls`` with finish reason ``tool_calls``;
  text outside them is the message's ``content``.
* ``"none"``: the tools are shown to the model (by a template that renders them) but its output
  is returned as text, unparsed.
* ``"required"`` / ``{"type": "function", "function": {"name": N}}``: decoding is constrained
  (:func:`tool_grammar`) to one or more (required) or exactly one (named) ``<tool_call>`` block
  whose JSON names a given function and whose ``arguments`` validate against that function's
  ``parameters`` schema.

No I/O here: validation raises :class:`~edgellm.serve.openai_api.ApiError`-shaped errors through
the ``invalid`` callable the caller passes in.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from edgellm.grammar import Grammar

MAX_TOOLS = 128
# The registry's models whose chat template renders tools (tests/test_serve_structured.py checks this
# against their templates): named in the refusal a model without tool support gives.
TOOL_MODELS = ("qwen2.5-coder-0.5b",)
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolSpec:
    """The validated ``tools`` and ``tool_choice`` of a chat request."""

    tools: list[dict]                   # OpenAI's {"type": "function", "function": {...}}, as given
    choice: str = "auto"                # "auto", "none", "required" or "function"
    forced_name: str | None = None      # with choice "function"
    parallel: bool = True               # parallel_tool_calls: more than one call allowed ("required")

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def parse_output(self) -> bool:
        return self.choice != "none"

    def grammar(self) -> Grammar | None:
        if self.choice == "required":
            return tool_grammar(self.tools, many=self.parallel)
        if self.choice == "function":
            return tool_grammar([t for t in self.tools if t["function"]["name"] == self.forced_name], many=False)
        return None

    def template_tools(self) -> list[dict]:
        """The tools as chat templates read them (transformers' convention: OpenAI's objects)."""
        return [{"type": "function", "function": dict(t["function"])} for t in self.tools]


def parse_tools(body: dict, invalid) -> ToolSpec | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat body; None without tools
    (a ``tool_choice`` other than ``"none"`` then is an error: there is nothing to call)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "'tool_choice' needs 'tools': give the functions the model may call")
        return None
    if not isinstance(tools, list):
        raise invalid("tools", f"'tools' must be an array of function tools, got {type(tools).__name__}",
                      "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools per request, got {len(tools)}")
    seen = set()
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise invalid(where, 'each tool must be {"type": "function", "function": {"name": ..., "parameters": '
                                 '{...}}}: only function tools are supported')
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise invalid(f"{where}.function.name", "a function name must be 1-64 letters, digits, '_' or '-', "
                                                    f"got {name!r}")
        if name in seen:
            raise invalid(f"{where}.function.name", f"two tools are named {name!r}; names must be unique")
        seen.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise invalid(f"{where}.function.parameters", "'parameters' must be a JSON schema object", "invalid_type")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise invalid(f"{where}.function.description", "'description' must be a string", "invalid_type")
        clean = {"name": name, "parameters": params}
        if desc:
            clean["description"] = desc
        out.append({"type": "function", "function": clean})
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "'parallel_tool_calls' must be true or false", "invalid_type")
    spec = ToolSpec(out, parallel=parallel)
    if choice is None or choice in ("auto", "none", "required"):
        spec.choice = choice or "auto"
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
        if name not in seen:
            raise invalid("tool_choice", f"'tool_choice' names the function {name!r}, which is not among the tools "
                                         f"({', '.join(sorted(seen))})")
        spec.choice, spec.forced_name = "function", name
    else:
        raise invalid("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                     '{"type": "function", "function": {"name": NAME}}')
    return spec


def call_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call: ``{"name": one of the functions, "arguments": its parameters}``."""
    alts = [{"type": "object",
             "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    # no free whitespace inside the JSON (see edgellm.grammar.JSON_OPTIONS)
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def tool_grammar(tools: list[dict], many: bool) -> Grammar:
    """A Lark grammar (llguidance's dialect, whose ``%json`` embeds a JSON schema) of one call
    block, or of one or more, in the format the model's template taught it."""
    call = 'call: "<tool_call>\\n" args "\\n</tool_call>"\n'
    start = 'start: call ("\\n" call)*\n' if many else "start: call\n"
    return Grammar.lark(start + call + "args: %json " + json.dumps(call_schema(tools), ensure_ascii=False) + "\n")


def template_reads_tools(template: str) -> bool:
    """Whether a chat template's code uses a variable named ``tools`` (its text saying "tools"
    does not count): a template that renders the tools it is given."""
    import jinja2

    try:
        return any(kind == "name" and value == "tools" for _, kind, value in jinja2.Environment().lex(template))
    except jinja2.TemplateSyntaxError:
        return False


def check_tools_supported(spec: ToolSpec | None, template_has_tools: bool, model: str, invalid) -> None:
    """Refuse (through ``invalid``) tools the model cannot be told about: its chat template does
    not render them. ``tool_choice: "none"`` asks for no call, so it is served (tools dropped)."""
    if spec is None or spec.choice == "none" or template_has_tools:
        return
    raise invalid("tools", f"the model {model} cannot call tools: its chat template does not render them (it was "
                           "not trained for function calling). Serve a model whose template does -- of edgellm's "
                           f"registry: {', '.join(TOOL_MODELS)} -- or send tool_choice \"none\" to get a text answer",
                  "unsupported_parameter")


def render_messages(messages: list[dict], spec: ToolSpec | None, template_has_tools: bool) -> tuple[list[dict], dict]:
    """The messages (and extra template variables) to render. With a tool-aware template the
    tools go to it as ``tools`` and tool messages pass through; otherwise (only with
    ``tool_choice: "none"``, see :func:`check_tools_supported`) the tools are dropped, assistant
    tool calls become ``<tool_call>`` text and tool results ``<tool_response>`` user turns, as
    Qwen2.5's template writes them."""
    if template_has_tools:
        return messages, ({"tools": spec.template_tools()} if spec is not None else {})
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join(f'{OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)}\n{CLOSE}'
                             for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out, {}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def to_call(block: str) -> dict | None:
    """One ``<tool_call>`` block's JSON as an OpenAI tool call, or None if it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


@dataclass
class ToolCallParser:
    """Splits a model's streamed output into content and tool calls.

    Text is released as content until ``<tool_call>`` begins (a suffix that could be its start is
    held back, as stop strings are); a block is released as one call once ``</tool_call>`` closes
    it. A block that does not parse as a call is given back as content. :meth:`finish` releases
    what is held (an unclosed block: the output was cut off; it is content).

    With ``names`` (the tools of the request), an output that *begins* with ``{`` is held whole
    until the end: Qwen2.5-Coder-0.5B, asked as its template asks, often writes the call's JSON
    without the tags. If the whole output then is such a JSON object (or one per line), naming a
    given tool, those are the calls; otherwise it is released as text, tags parsed as usual."""

    names: frozenset[str] = frozenset()
    calls: list[dict] = field(default_factory=list)
    buf: str = ""
    in_call: bool = False
    bare: bool | None = None        # None: undecided (only whitespace so far); True: holding a bare JSON

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if self.names and self.bare is not False:
            self.buf += text
            head = self.buf.lstrip()
            if not head:
                return "", []
            if self.bare is None:
                self.bare = head.startswith("{")
            if self.bare:
                return "", []
            text, self.buf = self.buf, ""
        self.buf += text
        content, new = "", []
        while True:
            if not self.in_call:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = held_prefix(self.buf, OPEN)
                    content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content += self.buf[:at]
                self.buf = self.buf[at + len(OPEN):]
                self.in_call = True
            end = self.buf.find(CLOSE)
            if end < 0:
                break
            block, self.buf = self.buf[:end], self.buf[end + len(CLOSE):]
            self.in_call = False
            call = to_call(block.strip())
            if call is None:
                content += OPEN + block + CLOSE
            else:
                new.append(call)
        self.calls.extend(new)
        if self.calls and not content.strip():
            content = ""            # the line breaks between and after calls are not content
        return content, new

    def finish(self) -> tuple[str, list[dict]]:
        """What is still held, as (content, new calls), at the end of the output."""
        if self.bare:
            self.bare = False
            calls = bare_calls(self.buf, self.names)
            if calls:
                self.buf = ""
                self.calls.extend(calls)
                return "", calls
            text, self.buf = self.buf, ""
            content, calls = self.feed(text)
            rest, more = self.finish()
            return content + rest, calls + more
        rest = (OPEN if self.in_call else "") + self.buf
        self.buf, self.in_call = "", False
        return rest, []


def bare_calls(text: str, names) -> list[dict]:
    """Tool calls written as bare JSON -- the whole text one call object, or one per line -- each
    naming one of ``names``; [] if the text is anything else."""
    blocks = [text.strip()]
    if "\n" in blocks[0]:
        try:
            json.loads(blocks[0])
        except ValueError:
            blocks = [line.strip() for line in blocks[0].splitlines() if line.strip()]
    calls = [to_call(b) for b in blocks]
    if not calls or any(c is None or c["function"]["name"] not in names for c in calls):
        return []
    return calls


def held_prefix(text: str, token: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``token``."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


def split_output(text: str, names=frozenset()) -> tuple[str, list[dict]]:
    """A whole output as (content, tool calls); content stripped of the blank lines around calls."""
    p = ToolCallParser(frozenset(names))
    content, calls = p.feed(text)
    rest, more = p.finish()
    content, calls = content + rest, calls + more
    return (content.strip() if calls else content), calls
