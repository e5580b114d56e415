"""Incremental detokenization and stop conditions of one request.

The engine appends each generated token id; the detokenizer keeps the request's cumulative text
and decides when the request ends. One object per request, living as long as the request.

Decoding a window, not the whole output
    Decoding every generated token again at every step costs O(n^2) over a request. Decoding
    one token alone is wrong: with byte-level BPE a character of several UTF-8 bytes (emoji,
    CJK) may be split across tokens, and with SentencePiece-style decoders a token's leading
    space depends on what precedes it. So, as vLLM does, we decode a short window::

        ids:   ... prompt tail | generated tokens ...
                   ^prefix_offset    ^read_offset    ^end
        prefix_text = decode(ids[prefix_offset:read_offset])   text already emitted
        new_text    = decode(ids[prefix_offset:end])
        delta       = new_text[len(prefix_text):]

    When ``new_text`` ends in U+FFFD the last character is still incomplete (the decoder
    replaced its partial bytes): nothing is emitted and the window grows until the character
    completes; then both offsets move forward. The window starts on the last few prompt tokens
    so the first generated token is decoded in context.

Stop conditions, checked in ``append`` in this order
    1. EOS (unless ``ignore_eos``) or a ``stop_token_ids`` id: finish "stop" (stop_reason None
       for EOS, the id otherwise). The stopping token stays in the token ids, but its text is
       left out unless ``include_stop_str_in_output`` (vLLM's behaviour).
    2. A stop string: searched only where it could end inside the newly decoded text, so a
       stop string spanning several tokens is found once, when it completes. The text is cut
       before it (or after it, with ``include_stop_str_in_output``); stop_reason is the string.
       Several stop strings completing in the same step: the one that starts first wins.
    3. ``max_tokens`` generated tokens, or ``max_model_len`` tokens in all: finish "length".
    The first ``min_tokens`` generated tokens never stop the request; meanwhile ``mask_ids()``
    names EOS and the stop ids for the sampler to mask.

Cumulative text that never retracts
    While stop strings may still match (and are not included in the output),
    ``output_text`` holds back the last ``max(len(stop)) - 1`` characters, which could be the
    start of a stop string that the next token completes; once the request finishes,
    ``output_text`` is all of it. So every snapshot's text is a prefix of the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .outputs import FinishReason
from .sampling import SamplingParams

__all__ = ["IncrementalDetokenizer", "StopCheck", "TokenizerLike", "PROMPT_CONTEXT_TOKENS"]

PROMPT_CONTEXT_TOKENS = 5
"""How many prompt tokens precede the generated ones in the decoding window (vLLM's value)."""

_REPLACEMENT_CHAR = "\ufffd"


class TokenizerLike(Protocol):
    """What the detokenizer needs of a tokenizer (``infinillm``'s tokenizer provides it)."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True, slots=True)
class StopCheck:
    """Why a request finished: ``finish_reason`` and, for stop strings and stop token ids,
    ``stop_reason`` (the string or the id; None for EOS and for the other reasons)."""

    finish_reason: FinishReason
    stop_reason: str | int | None = None


class IncrementalDetokenizer:
    """The cumulative text and stop decision of one request.

    ``append(token_id)`` after each generated token returns a ``StopCheck`` when that token
    ended the request, else None; ``finish("abort" | "error")`` ends it from outside.
    ``output_text`` is the cumulative text to show now; ``mask_ids()`` the ids the sampler
    must not produce next. ``max_model_len`` (prompt + generated tokens), when given, also
    finishes with "length".
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        max_model_len: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._num_prompt_tokens = len(prompt_token_ids)
        self._max_model_len = max_model_len
        eos_ids = frozenset(() if params.ignore_eos else tokenizer.eos_token_ids)
        self._eos_ids = eos_ids
        self._stop_ids = frozenset(params.stop_token_ids)
        self._min_tokens_mask = tuple(sorted(eos_ids | self._stop_ids))
        self._stop_strings: tuple[str, ...] = tuple(params.stop)
        # Characters of a possible stop-string start kept out of `output_text` until decided.
        shown_whole = params.include_stop_str_in_output or not self._stop_strings
        self._hold_back = 0 if shown_whole else max(map(len, self._stop_strings)) - 1

        # The decoding window: the prompt's tail, then every generated token.
        self._window_ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)

        self._output_token_ids: list[int] = []
        self._text = ""  # decoded so far, complete characters only, cut at a stop string
        self._stop_check: StopCheck | None = None

    # ---- reading -----------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """The cumulative text to show now (see "Cumulative text that never retracts")."""
        if self._stop_check is not None or not self._hold_back:
            return self._text
        return self._text[: max(0, len(self._text) - self._hold_back)]

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        return tuple(self._output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    @property
    def finished(self) -> bool:
        return self._stop_check is not None

    @property
    def stop_check(self) -> StopCheck | None:
        """Why the request finished; None while it runs."""
        return self._stop_check

    def mask_ids(self) -> tuple[int, ...]:
        """Token ids the next sampled token must not be: EOS (unless ``ignore_eos``) and the
        stop token ids while fewer than ``min_tokens`` tokens have been generated."""
        if len(self._output_token_ids) < self._params.min_tokens:
            return self._min_tokens_mask
        return ()

    def decode_token(self, token_id: int) -> str:
        """One token's text on its own, special tokens included (``Logprob.decoded_token``)."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- writing -----------------------------------------------------------------------------

    def append(self, token_id: int) -> StopCheck | None:
        """Add one generated token; return why the request finished with it, or None."""
        if self._stop_check is not None:
            raise RuntimeError(f"append({token_id}) after the request finished ({self._stop_check})")
        params = self._params
        self._output_token_ids.append(token_id)
        num_generated = len(self._output_token_ids)
        may_stop = num_generated > params.min_tokens

        stop: StopCheck | None = None
        cut_at_stop_string = False
        if may_stop and token_id in self._eos_ids:
            stop = StopCheck("stop")
        elif may_stop and token_id in self._stop_ids:
            stop = StopCheck("stop", token_id)

        if stop is None or params.include_stop_str_in_output:
            delta = self._decode_next(token_id)
            self._text += delta
            if stop is None and may_stop and delta and self._stop_strings:
                stop = self._find_stop_string(len(delta))
                cut_at_stop_string = stop is not None

        if stop is None:
            at_max_tokens = params.max_tokens is not None and num_generated >= params.max_tokens
            at_max_len = (
                self._max_model_len is not None and self._num_prompt_tokens + num_generated >= self._max_model_len
            )
            if at_max_tokens or at_max_len:
                stop = StopCheck("length")

        if stop is not None:
            if not cut_at_stop_string:
                # Bytes still waiting to complete a character will never complete now: show
                # them as the decoder renders them.
                self._text += self._pending_text()
            self._stop_check = stop
        return stop

    def finish(self, finish_reason: Literal["abort", "error"]) -> StopCheck:
        """End the request from outside (abort, error); the text held back is released.

        Idempotent: a request that already finished keeps its first reason.
        """
        if self._stop_check is None:
            self._text += self._pending_text()
            self._stop_check = StopCheck(finish_reason)
        return self._stop_check

    # ---- internals ---------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._params.skip_special_tokens)

    def _decode_next(self, token_id: int) -> str:
        """Append ``token_id`` to the window; return the newly completed text (maybe empty)."""
        self._window_ids.append(token_id)
        prefix_text = self._decode(self._window_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._window_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete
        # Drop the window's consumed head so the list stays short on long generations.
        del self._window_ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._window_ids)
        return new_text[len(prefix_text) :]

    def _pending_text(self) -> str:
        """The text of the window's tokens not yet emitted, incomplete characters included."""
        prefix_text = self._decode(self._window_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._window_ids[self._prefix_offset :])
        return new_text[len(prefix_text) :]

    def _find_stop_string(self, delta_len: int) -> StopCheck | None:
        """Find a stop string ending in the last ``delta_len`` characters; cut the text there."""
        text = self._text
        found: tuple[int, str] | None = None
        for stop in self._stop_strings:
            # Only where `stop` would end inside the new text: earlier text was searched before.
            at = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
            if at != -1 and (found is None or at < found[0]):
                found = (at, stop)
        if found is None:
            return None
        at, stop = found
        self._text = text[: at + len(stop)] if self._params.include_stop_str_in_output else text[:at]
        return StopCheck("stop", stop)
