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
  being served a different encoding than the offline evaluation; so is any text over
  ``max_chars`` when ``max_chars`` is below the first probe;
* a ``truncation_side='left'`` tokenizer keeps the *last* L tokens, so for it the same argument
  runs mirrored: a suffix whose words *after its first two* give more than L tokens.

Sentence pairs are truncated longest-first, and which side keeps the odd token depends on which
*full* side is longer, so one side of a pair is only cut when the other has at most L tokens; two long sides
are tokenised in full, which ``max_chars`` bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _decisive(tokenizer: Any, piece: str, max_length: int, from_end: bool) -> bool:
    """Whether the words of ``piece`` outside its unsure edge (the last words of a prefix, the
    first of a suffix) already give > max_length tokens."""
    enc = tokenizer(piece, add_special_tokens=False, verbose=False)
    words = [w for w in enc.word_ids() if w is not None]
    if len(words) <= max_length:
        return False
    ordered = sorted(set(words))
    unsure = ordered[:UNSURE_TAIL_WORDS] if from_end else ordered[-UNSURE_TAIL_WORDS:]
    return sum(1 for w in words if w not in unsure) > max_length


def keeps_the_end(tokenizer: Any) -> bool:
    """A ``truncation_side='left'`` tokenizer keeps a long text's *last* tokens."""
    return getattr(tokenizer, "truncation_side", "right") == "left"


def bounded_text(tokenizer: Any, text: str, max_length: int, max_chars: int | None) -> tuple[str, bool]:
    """``(text or a piece of it, cut)``: the piece encodes like ``text`` under truncation at
    ``max_length``, and ``cut`` means the text is certainly longer than ``max_length`` tokens.
    The piece is a prefix, or a suffix for tokenizers that truncate on the left.
    ``max_chars=None`` (offline scoring) never refuses: an undecided text is used whole."""
    limit = len(text) if max_chars is None else max_chars
    probe = min(PROBE_CHARS_PER_TOKEN * max_length, limit)
    if len(text) <= probe:
        return text, False
    if not getattr(tokenizer, "is_fast", False):
        # Slow tokenizers have no word ids to prove a cut exact: only the character limit holds.
        if len(text) > limit:
            raise TextRejected(f"text is {len(text)} characters; the limit is {limit}")
        return text, False
    from_end = keeps_the_end(tokenizer)
    while probe < len(text):
        piece = text[-probe:] if from_end else text[:probe]
        if _decisive(tokenizer, piece, max_length, from_end):
            return piece, True
        if probe >= limit:
            raise TextRejected(
                f"text is {len(text)} characters and its {'last' if from_end else 'first'} {limit} do not hold "
                f"{max_length} tokens of complete words (one unbroken word, or characters the tokenizer drops); "
                f"texts over {limit} characters must reach {max_length} tokens within them"
            )
        probe = min(probe * 4, limit)
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
        raise TextRejected(NO_CONTENT)


NO_CONTENT = ("text has no content: nothing is left after tokenization "
              "(only whitespace, control, zero-width or private-use characters)")


@dataclass(frozen=True)
class Encoded:
    """One input as the model takes it: the tokenizer's features (unpadded) and the flag."""

    features: dict[str, list[int]]
    truncated: bool


def encode_inputs(
    tokenizer: Any, max_length: int, max_chars: int | None, texts: list[str], pairs: list[str] | None,
    require_content: bool = False,
) -> list[Encoded]:
    """The project-wide encoding ``tokenizer(text, text_pair, truncation=True, max_length=L)``
    of bounded inputs, with the truncation flag. ``require_content`` (the service) refuses an
    item with a side that has no content token (``check_content``)."""
    if not texts:
        return []
    texts, pairs, cut = bounded_inputs(tokenizer, max_length, max_chars, texts, pairs)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    if require_content:
        for i in range(len(texts)):
            _require_content(tokenizer, enc, i, texts[i], None if pairs is None else pairs[i])
    flags = _truncated_flags(tokenizer, max_length, texts, pairs, enc["input_ids"], cut)
    return [Encoded({k: list(enc[k][i]) for k in enc}, flags[i]) for i in range(len(texts))]


def _require_content(tokenizer: Any, enc: Any, i: int, text: str, pair: str | None) -> None:
    sides = 1 if pair is None else 2
    if getattr(enc, "encodings", None):
        # Truncation is longest-first: a side with content keeps at least one token of it.
        present = {s for s in enc.sequence_ids(i) if s is not None}
    else:  # slow tokenizers have no sequence ids; their texts are bounded by max_chars
        present = {s for s, side in enumerate((text, pair)[:sides]) if content_tokens(tokenizer, side or "")}
    if len(present) < sides:
        raise TextRejected(NO_CONTENT)


def _truncated_flags(
    tokenizer: Any, max_length: int, texts: list[str], pairs: list[str] | None, ids: list[list[int]],
    cut: list[bool],
) -> list[bool]:
    # A row whose text was cut is known to be truncated. Of the others, only rows that came out
    # at exactly max_length can have been cut; re-encode just those without truncation (their
    # texts are bounded: a long text that was not cut was refused or is within max_chars).
    flags = list(cut)
    full_rows = [i for i, row in enumerate(ids) if len(row) >= max_length and not cut[i]]
    if not full_rows:
        return flags
    sub_pairs = [pairs[i] for i in full_rows] if pairs is not None else None
    # verbose=False: measuring the untruncated length is the point here, not a mistake to warn of.
    full = tokenizer([texts[i] for i in full_rows], sub_pairs, truncation=False, verbose=False)["input_ids"]
    for i, row in zip(full_rows, full, strict=True):
        flags[i] = len(row) > max_length
    return flags
