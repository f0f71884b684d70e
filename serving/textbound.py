"""Bounding the tokenizer's work per text without changing what the model sees.

``tokenizer(text, truncation=True, max_length=L)`` normalises and pre-tokenises the *whole*
text before cutting it to L tokens, and deciding the ``truncated`` flag needed a second pass
without truncation: a 1 MiB text cost seconds of CPU for 128 tokens (issue #17). Here a text is
replaced by a prefix when that provably yields the same first L tokens:

* fast tokenizers normalise character by character and pre-tokenise into words (whitespace /
  punctuation / regex splits) that do not look past their neighbour, so cutting the text can
  only change the last words of the prefix. A prefix whose words *before its last two* already
  give more than L tokens therefore encodes, after truncation, exactly like the full text —
  and the full text is certainly longer than L tokens, so ``truncated`` is known without a
  second pass;
* the prefix grows geometrically (``PROBE_CHARS_PER_TOKEN * L`` characters first) up to
  ``max_chars``. A text that is longer than ``max_chars`` yet holds no such prefix (one giant
  "word", or characters the normaliser drops) is refused with a ``TextRejected`` instead of
  being served a different encoding than the offline evaluation.

Sentence pairs are truncated longest-first, and which side keeps the odd token depends on which
*full* side is longer, so one side of a pair is only cut when the other has at most L tokens; two long sides
are tokenised in full, which ``max_chars`` bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# First probe: 8 characters per token is generous for natural text (English WordPiece averages
# about 4-5 characters per token), so one probe usually decides.
PROBE_CHARS_PER_TOKEN = 8
# Default ceiling on the characters tokenised per text, as a multiple of max_length.
MAX_CHARS_PER_TOKEN = 32
# Words at the end of a prefix that a cut may have changed (a cut word, and a whitespace run
# whose split depends on what follows it in byte-level BPE pre-tokenisers).
UNSURE_TAIL_WORDS = 2


class TextRejected(ValueError):
    """A text the service will not encode; the message is for the client."""


def default_max_chars(max_length: int) -> int:
    return max_length * MAX_CHARS_PER_TOKEN


def content_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` other than special tokens (``[CLS]`` / ``[SEP]`` / ``<s>`` ...)."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _decisive(tokenizer: Any, prefix: str, max_length: int) -> bool:
    """Whether the words of ``prefix`` before its unsure tail already give > max_length tokens."""
    enc = tokenizer(prefix, add_special_tokens=False, verbose=False)
    words = [w for w in enc.word_ids() if w is not None]
    if len(words) <= max_length:
        return False
    unsure = sorted(set(words))[-UNSURE_TAIL_WORDS:]
    return sum(1 for w in words if w not in unsure) > max_length


def bounded_text(tokenizer: Any, text: str, max_length: int, max_chars: int | None) -> tuple[str, bool]:
    """``(text or a prefix of it, cut)``: the prefix encodes like ``text`` under truncation at
    ``max_length``, and ``cut`` means the text is certainly longer than ``max_length`` tokens.
    ``max_chars=None`` (offline scoring) never refuses: an undecided text is used whole."""
    if max_chars is None:
        max_chars = len(text)
    probe = PROBE_CHARS_PER_TOKEN * max_length
    if len(text) <= probe:
        return text, False
    if not getattr(tokenizer, "is_fast", False):
        # Slow tokenizers have no word ids to prove a cut exact: only the character limit holds.
        if len(text) > max_chars:
            raise TextRejected(f"text is {len(text)} characters; the limit is {max_chars}")
        return text, False
    while probe < len(text):
        prefix = text[:probe]
        if _decisive(tokenizer, prefix, max_length):
            return prefix, True
        if probe >= max_chars:
            raise TextRejected(
                f"text is {len(text)} characters and its first {max_chars} do not hold {max_length} "
                "tokens of complete words (one unbroken word, or characters the tokenizer drops); "
                f"texts over {max_chars} characters must reach {max_length} tokens within them"
            )
        probe = min(probe * 4, max_chars)
    return text, False


def bounded_inputs(
    tokenizer: Any, max_length: int, max_chars: int | None, texts: list[str], pairs: list[str] | None
) -> tuple[list[str], list[str] | None, list[bool]]:
    """Per item: the (possibly cut) text and pair, and whether a cut proved truncation."""
    if pairs is None:
        bounded = [bounded_text(tokenizer, t, max_length, max_chars) for t in texts]
        return [b[0] for b in bounded], None, [b[1] for b in bounded]
    out_t, out_p, cut = [], [], []
    for text, pair in zip(texts, pairs, strict=True):
        a, b = _bounded_pair(tokenizer, text, pair, max_length, max_chars)
        out_t.append(a)
        out_p.append(b)
        cut.append(a is not text or b is not pair)
    return out_t, out_p, cut


def _bounded_pair(tokenizer: Any, text: str, pair: str, max_length: int, max_chars: int | None) -> tuple[str, str]:
    a, cut_a = bounded_text(tokenizer, text, max_length, max_chars)
    b, cut_b = bounded_text(tokenizer, pair, max_length, max_chars)
    if not (cut_a or cut_b):
        return text, pair
    # One side cut: its prefix and its full text both have more than max_length tokens, so the
    # longer side stays the same as long as the other side has at most max_length tokens.
    other = pair if cut_a else text
    if not (cut_a and cut_b) and content_tokens(tokenizer, other) <= max_length:
        return a, b
    for side in (text, pair):
        if max_chars is not None and len(side) > max_chars:
            raise TextRejected(f"both texts of the pair are over {max_length} tokens and one is {len(side)} "
                               f"characters; then each must be within {max_chars} characters")
    return text, pair


def check_content(tokenizer: Any, text: str, max_length: int, max_chars: int) -> None:
    """Refuse a text that encodes to no content token (only characters the tokenizer drops:
    zero-width / control / private-use characters, lone combining marks): the model would
    classify the empty input, the same answer for every such text."""
    head, _ = bounded_text(tokenizer, text, max_length, max_chars)
    if content_tokens(tokenizer, head) == 0:
        raise TextRejected("text has no content: nothing is left after tokenization "
                           "(only whitespace, control, zero-width or private-use characters)")


def item_check(tokenizer: Any, max_length: int, max_chars: int) -> Callable[[str, str | None], None]:
    """The service's per-item request check: content on every side, and a bounded encoding."""

    def check(text: str, pair: str | None) -> None:
        for side in (text,) if pair is None else (text, pair):
            check_content(tokenizer, side, max_length, max_chars)
        if pair is not None:
            _bounded_pair(tokenizer, text, pair, max_length, max_chars)

    return check
