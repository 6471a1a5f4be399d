"""Output: sampled tokens become text, stop decisions, log-probabilities and results.

The engine core hands each sampled token of a sequence to :func:`append_token`, which records it,
detokenises it incrementally and applies the stop rules (EOS, stop tokens, stop strings,
``max_tokens``); :func:`build_result` turns a finished sequence into its :class:`TurnResult`.
Nothing here touches the KV cache or the scheduler.
"""

from __future__ import annotations

from edgellm.runtime.types import FINISH_CANCELLED, FINISH_ERROR, Sequence, TurnResult
from edgellm.sampling import FINISH_LENGTH, SamplingParams, StopChecker, StopUpdate


def stop_checker(params: SamplingParams, eog_ids, max_tokens: int) -> StopChecker:
    return StopChecker(params.stop, params.stop_token_ids, eog_ids, params.ignore_eos, max_tokens)


def append_token(seq: Sequence, token: int, logprob: float | None = None, top_logprobs: list | None = None,
                 now: float | None = None) -> StopUpdate:
    """Record one generated token of ``seq`` and say what text it releases and whether it ends it."""
    seq.history.append(token)
    seq.out_ids.append(token)
    if seq.t_first_token is None:
        seq.t_first_token = now
    if logprob is not None:
        seq.logprobs.append(logprob)
        seq.top_logprobs.append(top_logprobs or [])
    stop = seq.stop
    if int(token) in stop.stop_token_ids and not stop.finished:
        # A stop token ends the text (its own text is never shown): what the decoder still holds,
        # a partial character, is released first, as decoding the tokens before it would.
        head = stop.feed_text(seq.decoder.flush())
        update = head if head.finished else stop.step(token, "")
        if not head.finished and head.text:
            update = StopUpdate(head.text + update.text, update.finish_reason, update.stop_reason)
    else:
        update = stop.step(token, seq.decoder.add(token))
        if update.finish_reason == FINISH_LENGTH:     # cut off: keep a trailing partial character
            tail = seq.decoder.flush()
            if tail:
                update = StopUpdate(update.text + tail, update.finish_reason, update.stop_reason)
    if update.text:
        seq.pieces.append(update.text)
    return update


def build_result(seq: Sequence, reason: str, now: float, session_id: int | None) -> TurnResult:
    """The result of a finished sequence. A cancelled or failed one keeps the text it held back
    (a possible stop string's prefix, a partial character), since nothing can complete it any more."""
    if reason in (FINISH_CANCELLED, FINISH_ERROR):
        tail = seq.stop.flush() + seq.decoder.flush()
        if tail:
            seq.pieces.append(tail)
    first = seq.t_first_token
    return TurnResult(
        text="".join(seq.pieces), token_ids=list(seq.out_ids), prompt_tokens=len(seq.prompt_ids),
        finish_reason=reason, ttft_s=(first - seq.t_submit) if first else 0.0,
        prefill_s=(first - seq.t_scheduled) if first and seq.t_scheduled else 0.0,
        decode_s=(now - first) if first else 0.0, logprobs=seq.logprobs, top_logprobs=seq.top_logprobs,
        cached_tokens=seq.cached_tokens or 0, computed_prompt_tokens=seq.computed_prompt,
        preemptions=seq.preemptions,
        queue_s=(seq.t_scheduled - seq.t_submit) if seq.t_scheduled else now - seq.t_submit,
        session_id=session_id, speculative=seq.spec.summary() if seq.spec is not None else None)
