"""Streaming detokenization and stop strings for one request.

Decoding each new token on its own gets text wrong: byte-level BPE splits multi-byte characters across tokens,
and SentencePiece drops the leading space of whatever comes first in a decode. So each step decodes a short
window of ids twice, with and without the new tokens, and keeps the difference (the prefix_offset/read_offset
technique of vLLM and TGI): the window's few tokens of context make the new text decode as it would inside the
whole sequence, and text ending in an incomplete character is held until the character completes. A request that
ends there (max_tokens in the middle of an emoji) still gets it, as U+FFFD, so its text is always the decoding of
its tokens, as HF's `decode` gives it.
"""

from typing import Protocol

from workers.engine.sampling_params import SamplingParams

# Prompt tokens kept as context ahead of the first generated token; vLLM uses the same amount.
_PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], **kwargs) -> str: ...


class IncrementalDetokenizer:
    """Owns `output_text`, the generated text so far, already cut at a stop string once one has matched."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._params = params
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._stop_checked = 0  # output_text before this index has been searched for stop strings
        self._sent = 0  # output_text before this index has been handed out by take_delta
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        # Clean-up of tokenization spaces depends on the neighbouring text, so it cannot be applied piecewise.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def append(self, token_id: int) -> None:
        """Adds a generated token; its text reaches `output_text` once it forms complete characters."""
        self._ids.append(token_id)
        self._read(complete_only=True)

    def _read(self, complete_only: bool) -> None:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not (complete_only and full_text.endswith(_INCOMPLETE)):
            self.output_text += full_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def resume(self, token_ids: list[int], sent: str) -> bool:
        """Catches up with output another engine generated, searched for stop strings and handed out up to `sent`.
        False if `sent` is not how that output's text begins (the tokens are not the ones that made it)."""
        for token_id in token_ids:
            self.append(token_id)
        self._stop_checked = len(self.output_text)
        self._sent = len(sent)
        return self.output_text.startswith(sent)

    def check_stop(self, search: bool = True) -> str | None:
        """Returns the stop string that matched, after cutting `output_text` there; call it after every append.

        Only text added since the last call, plus enough before it to catch a stop string straddling the two,
        is searched, so a long generation does not rescan its whole output at every token. With `search` False
        (min_tokens not reached yet) the new text counts as searched and matches nothing.
        """
        if not self._max_stop_len:
            return None
        if not search:
            self._stop_checked = len(self.output_text)
            return None
        start = max(self._stop_checked - self._max_stop_len + 1, 0)
        best: tuple[int, str] | None = None
        for stop in self._params.stop:
            index = self.output_text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            self._stop_checked = len(self.output_text)
            return None
        index, stop = best
        cut = index + len(stop) if self._params.include_stop_str_in_output else index
        self.output_text = self.output_text[:cut]
        self._stop_checked = len(self.output_text)
        return stop

    def _stop_prefix_tail(self) -> int:
        """Length of the longest end of `output_text` that could still grow into a stop string."""
        text = self.output_text
        for length in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._params.stop):
                return length
        return 0

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet. Until the request finishes, a tail that may begin a stop string is held back,
        so no client ever receives text that a later stop match removes; this relies on check_stop having run.
        Finishing also releases an incomplete character's bytes: only max_tokens or an EOS / stop token can end a
        request while they are held (a stop string matches only where text was just added, leaving none held).
        """
        if finished:
            self._read(complete_only=False)
        end = len(self.output_text) if finished else len(self.output_text) - self._stop_prefix_tail()
        if end <= self._sent:
            return ""
        delta = self.output_text[self._sent:end]
        self._sent = end
        return delta
