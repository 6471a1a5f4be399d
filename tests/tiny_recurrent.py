"""Tiny random recurrent models (Mamba, Mamba-2, RWKV from transformers) as HF folders with a
chat-capable word-level tokenizer, and transformers' own greedy continuation as the reference.

The tokenizer is a real ``tokenizers`` tokenizer.json (whitespace-split words ``w7`` .. plus the
role words of a chat template given in tokenizer_config.json), so sessions render multi-turn
conversations and the generated text re-encodes to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROLE_WORDS = ["<unk>", "<eos>", "system", "user", "assistant", ":", "|"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} | {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def save_chat_folder(model, out: Path, vocab_size: int) -> Path:
    """``model`` saved with a word-level tokenizer of ``vocab_size`` tokens and a chat template;
    id 1 (``<eos>``) ends a reply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    model.save_pretrained(str(out))
    words = ROLE_WORDS + [f"w{i}" for i in range(len(ROLE_WORDS), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<eos>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<eos>"}))
    return out


def words(seed: int, n: int, vocab_size: int) -> str:
    """``n`` random words of the tokenizer (never a role word or <eos>)."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(len(ROLE_WORDS), vocab_size, (n,), generator=gen).tolist())


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int, eos: int | None = 1) -> list[int]:
    """transformers' greedy continuation of ``ids``: a full forward pass per token (no cache);
    it stops after ``eos`` (None: never)."""
    out: list[int] = []
    seq = list(ids)
    for _ in range(n):
        tok = int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
        out.append(tok)
        if tok == eos:
            break
        seq.append(tok)
    return out
