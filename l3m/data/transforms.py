"""Text transforms for the MLM side: what the vanilla scorer and the masking see of a train text.

The classifier always reads the text as shipped. A domain may name a transform
(``domain.mlm_text``) that the MLM side applies first: scoring, L3's selection and the masked
batch then all see the transformed text, so scores and masks stay aligned token for token.

``authors``: the L3Masking authors' preprocessing of a ChemProt text before they score and
mask it (usk-Kimura/L3Masking, ``scripts/run_mlm_auxiliary_PLT-Masking.py``, ``run_batch``):
spaces around ``,``, ``.`` and ``-``, then the entity markers ``<< >>`` and ``[[ ]]`` removed,
each ``str.replace`` in their order. Their last step, ``replace("  ", "")``, deletes a double
space outright (it does not collapse it to one): kept as is, since the point is to train on
the text their scores and masks were computed on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# The authors' chained replacements, in order (run_batch: "text = text.replace(...)" then
# "mlm_model.token_score(text.replace(...))").
_AUTHORS_PUNCT = ((",", " , "), (".", " . "), ("-", " - "), ("  ", " "))
_AUTHORS_MARKERS = ((" <<", ""), (">> ", ""), (" [[", ""), ("]] ", ""), ("<<", ""), (">>", ""), ("[[", ""),
                    ("]]", ""), ("  ", ""))  # fmt: skip
# The entity markers the authors strip (a token made only of these characters is a marker token).
MARKERS = ("<<", ">>", "[[", "]]")


def _replace_all(text: str, steps: Sequence[tuple[str, str]]) -> str:
    for old, new in steps:
        text = text.replace(old, new)
    return text


def authors_text(text: str) -> str:
    """The authors' punctuation spacing, then their marker stripping (module docstring)."""
    return _replace_all(_replace_all(text, _AUTHORS_PUNCT), _AUTHORS_MARKERS)


def _raw(text: str) -> str:
    return text


TRANSFORMS: dict[str, Callable[[str], str]] = {"raw": _raw, "authors": authors_text}


def mlm_text_transform(name: str) -> Callable[[str], str]:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown MLM text transform {name!r}; the transforms are {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


def transform_items(name: str, items: Sequence[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """(text, text_pair) items as the MLM side sees them (a pair's second text transformed too)."""
    fn = mlm_text_transform(name)
    return [(fn(t), None if p is None else fn(p)) for t, p in items]
