"""BentoML service: the registered l3m classifier over HTTP.

    bentoml serve serving.service:L3MClassifier --host 127.0.0.1 --port 3000

Which model: ``L3M_MODEL_TAG`` (e.g. ``l3m-citation_intent:abc``), else (inside a built bento)
the tag the build packaged, else the production version of ``L3M_DOMAIN`` (default
``citation_intent``) from the registry ledger; with none of these the service refuses to start.
The tag is resolved at import, because BentoML needs the ``BentoModel`` at class scope to
package it into a bento. Other knobs: see ``serving.schemas.Settings``.

Endpoints: ``POST /classify`` (micro-batched, ``serving.batcher``), ``GET /metadata``, and
BentoML's ``/livez`` / ``/readyz`` (``__is_ready__`` is False until the model is loaded and
warmed up). Request hygiene (size, content type, JSON, item count, slow uploads, unexpected
errors) is ``serving.guard``; slow or idle connections and their number, ``serving.connections``;
the tokenizer's work per request (bounded, fair, off the event loop), ``serving.preflight``; the
per-text bound and the content check, ``serving.textbound``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import bentoml
from bentoml.models import BentoModel
from fastapi import FastAPI

from serving import connections
from serving.bases import read_ref
from serving.batcher import MicroBatcher
from serving.guard import RequestGuard, answered, install_client_error_log_filter
from serving.model_io import load_classifier, predict, predict_encoded, read_meta, serving_dtype
from serving.packaged import packaged_env
from serving.preflight import Encoder, Limits, Preflight
from serving.registry import production_tag
from serving.schemas import Metadata, Prediction, Settings, split_items, texts_type
from serving.textbound import PROBE_CHARS_PER_TOKEN, Encoded, default_max_chars, encode_inputs
from serving.workers import register_worker, unregister_worker

logger = logging.getLogger("l3m.serving")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = Settings.from_env()


def packaged_model_tag(service_file: Path = Path(__file__)) -> str | None:
    """Inside a built bento: the ``L3M_MODEL_TAG`` the build recorded (``serving.packaged``)."""
    return packaged_env("L3M_MODEL_TAG", service_file)


def resolve_model_tag(settings: Settings, service_file: Path = Path(__file__)) -> str:
    """L3M_MODEL_TAG, else the tag a built bento packaged, else the domain's production version.
    Nothing else: serving "the newest model" would put an unpromoted candidate in front of users."""
    tag = settings.model_tag or packaged_model_tag(service_file) or production_tag(settings.domain)
    if tag is not None:
        return tag
    raise RuntimeError(
        f"no production model for domain {settings.domain!r} in the registry "
        f"(BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')}); promote one "
        "(`l3m models promote TAG`) or set L3M_MODEL_TAG to the version to serve"
    )


MODEL_TAG = resolve_model_tag(SETTINGS)
# The request type depends on the model: pair domains take (text, text_pair) items. Read from
# the active BentoML store (the bento's own store when running from a built bento).
_MODEL_PATH = bentoml.models.get(MODEL_TAG).path
_META = read_meta(_MODEL_PATH)
# A weight_mask / lora domain is rebuilt over its base (serving.bases): packaged beside it.
_BASE = read_ref(_MODEL_PATH)
MAX_TEXT_CHARS = SETTINGS.max_text_chars or default_max_chars(_META.max_length)


def _request_encoder() -> Encoder:
    # Each preflight lane gets its own tokenizer: a fast tokenizer shared between threads can
    # fail ("Already borrowed") when two use it at once.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_MODEL_PATH)

    def encode(text: str, pair: str | None) -> Encoded:
        return encode_inputs(tokenizer, _META.max_length, MAX_TEXT_CHARS, [text], None if pair is None else [pair],
                             require_content=True)[0]

    return encode


Texts = texts_type(_META.text_pair, SETTINGS.max_texts)
LIMITS = Limits(cpu_budget_s=SETTINGS.preflight_cpu_s,
                light_chars=SETTINGS.light_chars or 2 * PROBE_CHARS_PER_TOKEN * _META.max_length,
                heavy_share=SETTINGS.heavy_cpu_share, heavy_queue=SETTINGS.heavy_queue)
connections.install(SETTINGS.header_timeout_s, SETTINGS.max_connections, SETTINGS.max_client_connections)
install_client_error_log_filter()


info_app = FastAPI(title="l3m metadata")


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(name="l3m_classifier", workers=SETTINGS.workers, traffic={"timeout": 120})
class L3MClassifier:
    bento_model = BentoModel(MODEL_TAG)
    if _BASE is not None:
        base_model = BentoModel(_BASE.tag)

    def __init__(self) -> None:
        import torch

        self._ready = False
        install_client_error_log_filter()  # again: BentoML configures logging after import
        register_worker()
        if SETTINGS.torch_threads > 0:
            torch.set_num_threads(SETTINGS.torch_threads)
        self.tag = str(self.bento_model.tag)
        # A compact domain's base from the active store (inside a bento: the bento's own).
        self.model, self.tokenizer, self.meta = load_classifier(self.bento_model.path,
                                                                lambda tag: bentoml.models.get(tag).path)
        self.dtype = serving_dtype(SETTINGS.dtype, self.model.device.type)
        # One forward pass before reporting ready: the first call pays lazy initialisation
        # that should not land on a user's request.
        warm_pair = ["warm up"] if self.meta.text_pair else None
        predict(self.model, self.tokenizer, self.meta, ["warm up"], warm_pair, dtype=self.dtype)
        self.preflight = Preflight(_request_encoder, MAX_TEXT_CHARS, LIMITS)
        self.batcher = MicroBatcher(self._predict, SETTINGS.max_batch_size if SETTINGS.batching else 1,
                                    SETTINGS.max_queue_texts)
        self._ready = True
        logger.info("loaded %s (batching=%s, torch threads=%d, dtype=%s, max text chars=%d)",
                    self.tag, SETTINGS.batching, torch.get_num_threads(), self.dtype, MAX_TEXT_CHARS)

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.batcher.close()
        self.preflight.close()
        unregister_worker()

    def _predict(self, rows: list[Encoded]) -> list[dict[str, object]]:
        return predict_encoded(self.model, self.tokenizer, self.meta, rows, dtype=self.dtype)

    @bentoml.api(route="/classify")
    async def classify(self, texts: Texts, ctx: bentoml.Context) -> list[Prediction]:  # type: ignore[valid-type]  # built from the model's metadata
        """Classify one text or a list (pairs for pair domains): label, score, probabilities."""
        plain, pairs = split_items(texts)
        client = ctx.request.client.host if ctx.request.client else "?"

        async def work() -> list[dict[str, object]]:
            return await self.batcher.submit(await self.preflight.encode(client, plain, pairs))

        return await answered(ctx, client, work())  # predictions, or an error response

    @info_app.get("/metadata")
    def metadata(self) -> Metadata:
        m = self.meta
        return Metadata(
            model_tag=self.tag, domain=m.domain, labels=m.label_names, metric=m.metric,
            metrics=m.headline_metrics(), base_model=m.base_model, base_revision=m.base_revision,
            strategy=m.strategy, tuner=m.tuner, max_length=m.max_length, text_pair=m.text_pair,
            code_version=m.code_version, max_texts=SETTINGS.max_texts, batching=SETTINGS.batching,
            dtype=self.dtype,
        )


# The service decorator adds add_asgi_middleware at runtime; its stubs do not declare it.
L3MClassifier.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_body_bytes,  # type: ignore[attr-defined]
                                  body_timeout_s=SETTINGS.body_timeout_s, max_texts=SETTINGS.max_texts)
