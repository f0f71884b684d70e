"""Request/response types and limits of the classification service.

The field checks that cost O(1) per character are these pydantic types, which BentoML
validates on the event loop *before* a request joins a batch; the checks that need the
tokenizer run in ``serving.preflight``, off the loop, also before the request is queued. Either
way one bad request is answered 400 on its own instead of failing every request batched with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr

from serving.model_io import SERVING_DTYPES

DEFAULT_DOMAIN = "citation_intent"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


@dataclass(frozen=True)
class Settings:
    """Service knobs, read from the environment once at import (the service is built from them)."""

    model_tag: str | None  # L3M_MODEL_TAG; None: production model of `domain`
    domain: str  # L3M_DOMAIN
    max_texts: int  # L3M_MAX_TEXTS: texts per request
    max_body_bytes: int  # L3M_MAX_BODY_BYTES: request body size limit (413 above it)
    batching: bool  # L3M_BATCHING=off serves every request on its own (no merging)
    max_batch_size: int  # L3M_MAX_BATCH_SIZE: texts per merged batch (whole requests)
    max_queue_texts: int  # L3M_MAX_QUEUE_TEXTS: texts waiting beyond this are refused 503 + Retry-After
    max_text_chars: int  # L3M_MAX_TEXT_CHARS: per-text character limit (0: 32 x the model's max_length)
    body_timeout_s: float  # L3M_BODY_TIMEOUT_S: a body not received within this is answered 408
    workers: int  # L3M_WORKERS: worker processes, each with its own model copy
    torch_threads: int  # L3M_TORCH_THREADS: intra-op threads of the worker (0: torch's default)
    dtype: str  # L3M_DTYPE: float32 (default; equals offline evaluation) or bfloat16/float16 autocast
    # Admission (serving.preflight, serving.connections; issue #24):
    preflight_cpu_s: float  # L3M_PREFLIGHT_CPU_S: tokenizer CPU time per request (413 beyond)
    light_chars: int  # L3M_LIGHT_CHARS: requests bounded by this many characters are never shed (0: 16 x max_length)
    heavy_cpu_share: float  # L3M_HEAVY_CPU_SHARE: CPU-s per second of larger requests' tokenizer work per client
    heavy_queue: int  # L3M_HEAVY_QUEUE: larger requests being prepared at once (429 beyond)
    header_timeout_s: float  # L3M_HEADER_TIMEOUT_S: a request head not complete within this closes the connection
    max_connections: int  # L3M_MAX_CONNECTIONS: open connections per worker (503 and close beyond)
    max_client_connections: int  # L3M_MAX_CLIENT_CONNECTIONS: open connections per client address (429 beyond)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            model_tag=os.environ.get("L3M_MODEL_TAG") or None,
            domain=os.environ.get("L3M_DOMAIN") or DEFAULT_DOMAIN,
            max_texts=_env_int("L3M_MAX_TEXTS", 64),
            max_body_bytes=_env_int("L3M_MAX_BODY_BYTES", 1 << 20),
            batching=os.environ.get("L3M_BATCHING", "on").lower() not in ("0", "off", "false", "no"),
            max_batch_size=_env_int("L3M_MAX_BATCH_SIZE", 64),
            # Far above any legitimate concurrency (32 x 64 texts): a queue this long only builds
            # when arrivals outrun the model for many seconds, which is what 503 should mean.
            max_queue_texts=_env_int("L3M_MAX_QUEUE_TEXTS", 2048),
            max_text_chars=_env_int("L3M_MAX_TEXT_CHARS", 0),
            body_timeout_s=_env_float("L3M_BODY_TIMEOUT_S", 10),
            workers=_env_int("L3M_WORKERS", 1),
            # 1 by default: on a shared 2-core host, 2 OpenMP threads spin-waiting on each other
            # made a single-text forward pass 15-25x slower under co-tenant load (35 ms -> 550-880
            # ms, docs/serving.md). Scale with workers, not threads.
            torch_threads=_env_int("L3M_TORCH_THREADS", 1),
            # bfloat16 uses AMX / AVX512-BF16 matmuls on CPUs that have them: a 32-text batch
            # ran 1.8x faster per text than float32 here (docs/serving.md), batch 1 barely faster.
            dtype=_env_choice("L3M_DTYPE", "float32", SERVING_DTYPES),
            # Far above a legitimate full request, far below 64 texts of long "words" (measured
            # in docs/serving.md, "One client against the others").
            preflight_cpu_s=_env_float("L3M_PREFLIGHT_CPU_S", 0.5),
            light_chars=_env_int("L3M_LIGHT_CHARS", 0),
            heavy_cpu_share=_env_float("L3M_HEAVY_CPU_SHARE", 0.25),
            heavy_queue=_env_int("L3M_HEAVY_QUEUE", 16),
            header_timeout_s=_env_float("L3M_HEADER_TIMEOUT_S", 10),
            max_connections=_env_int("L3M_MAX_CONNECTIONS", 512),
            max_client_connections=_env_int("L3M_MAX_CLIENT_CONNECTIONS", 256),
        )


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text is empty or whitespace only")
    return value


# StrictStr: numbers, null, lists... are rejected instead of being coerced to strings.
Text = Annotated[StrictStr, AfterValidator(_not_blank)]


class TextPair(BaseModel):
    """One input of a sentence-pair domain."""

    model_config = ConfigDict(extra="forbid")
    text: Text
    text_pair: Text


def listify(value: Any) -> Any:
    # "One text or a list": a bare item becomes a one-item list, so the API stays batchable
    # (BentoML batches along the list).
    return [value] if isinstance(value, str | dict) else value


def texts_type(text_pair: bool, max_texts: int) -> Any:
    """The ``texts`` field type for a domain: plain texts, or pairs (object or 2-list).

    Only checks that cost O(1) per character are made here, on the event loop; the tokenizer's
    checks run in ``serving.preflight``, bounded and off the loop (issue #24).
    """
    item: Any = TextPair | tuple[Text, Text] if text_pair else Text
    return Annotated[list[item], BeforeValidator(listify), Field(min_length=1, max_length=max_texts)]


def split_items(items: list[Any]) -> tuple[list[str], list[str] | None]:
    """Validated items -> (texts, text_pairs or None), the tokenizer's two arguments."""
    if not items or isinstance(items[0], str):
        return list(items), None
    texts, pairs = [], []
    for item in items:
        a, b = (item.text, item.text_pair) if isinstance(item, TextPair) else item
        texts.append(a)
        pairs.append(b)
    return texts, pairs


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of the predicted label")
    probabilities: dict[str, float] = Field(description="probability of every label")
    truncated: bool = Field(description="the text was longer than the model's max_length and was cut")


class Metadata(BaseModel):
    model_tag: str
    domain: str
    labels: list[str]
    metric: str
    metrics: dict[str, dict[str, float]] = Field(description="headline (scalar) metrics per split")
    base_model: str
    base_revision: str | None
    strategy: str
    tuner: str
    max_length: int
    text_pair: bool
    code_version: str | None
    max_texts: int
    batching: bool
    dtype: str
