"""BentoML service: the registered l3m classifier over HTTP.

    bentoml serve serving.service:L3MClassifier --host 127.0.0.1 --port 3000

Which model: ``L3M_MODEL_TAG`` (e.g. ``l3m-citation_intent:abc``), else (inside a built bento)
the tag the build packaged, else the production version of ``L3M_DOMAIN`` (default
``citation_intent``) from the registry ledger; with none of these the service refuses to start.
The tag is resolved at import, because BentoML needs the ``BentoModel`` at class scope to
package it into a bento. Other knobs: see ``serving.schemas.Settings``.

Endpoints: ``POST /classify`` (adaptive batching), ``GET /metadata``, and BentoML's
``/livez`` / ``/readyz`` (``__is_ready__`` is False until the model is loaded and warmed up).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import bentoml
from bentoml.models import BentoModel
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.model_io import load_classifier, predict, read_meta, serving_dtype
from serving.registry import production_tag
from serving.schemas import Metadata, Prediction, Settings, split_items, texts_type

logger = logging.getLogger("l3m.serving")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = Settings.from_env()


def packaged_model_tag(service_file: Path = Path(__file__)) -> str | None:
    """Inside a built bento (``<bento>/src/serving/service.py``): the ``L3M_MODEL_TAG`` the build
    recorded in ``<bento>/bento.yaml``'s envs. ``bentoml serve <bento>`` does not export a
    bento's envs (only a container does), and there is no ledger inside a bento."""
    root = service_file.resolve().parents[2]
    manifest = root / "bento.yaml"
    if service_file.resolve().parents[1].name != "src" or not manifest.is_file():
        return None
    import yaml

    envs = (yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}).get("envs") or []
    return next((str(e["value"]) for e in envs if e.get("name") == "L3M_MODEL_TAG" and e.get("value")), None)


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
_META = read_meta(bentoml.models.get(MODEL_TAG).path)
Texts = texts_type(_META.text_pair, SETTINGS.max_texts)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, whether announced by Content-Length or streamed.

    The body is buffered here (bounded) and replayed to the app: raising from inside BentoML's
    endpoint would be turned into a 500 by its generic error handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect like a real stream

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        payload = json.dumps({"error": f"request body larger than {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


info_app = FastAPI(title="l3m metadata")


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(name="l3m_classifier", workers=1, traffic={"timeout": 120})
class L3MClassifier:
    bento_model = BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import torch

        self._ready = False
        if SETTINGS.torch_threads > 0:
            torch.set_num_threads(SETTINGS.torch_threads)
        self.tag = str(self.bento_model.tag)
        self.model, self.tokenizer, self.meta = load_classifier(self.bento_model.path)
        self.dtype = serving_dtype(SETTINGS.dtype, self.model.device.type)
        # One forward pass before reporting ready: the first call pays lazy initialisation
        # that should not land on a user's request.
        warm_pair = ["warm up"] if self.meta.text_pair else None
        predict(self.model, self.tokenizer, self.meta, ["warm up"], warm_pair, dtype=self.dtype)
        self._ready = True
        logger.info("loaded %s (batching=%s, torch threads=%d, dtype=%s)",
                    self.tag, SETTINGS.batching, torch.get_num_threads(), self.dtype)

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.api(
        route="/classify",
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def classify(self, texts: Texts) -> list[Prediction]:  # type: ignore[valid-type]  # built from the model's metadata
        """Classify one text or a list (pairs for pair domains): label, score, probabilities."""
        plain, pairs = split_items(texts)
        preds = predict(self.model, self.tokenizer, self.meta, plain, pairs, dtype=self.dtype)
        return [Prediction(**p) for p in preds]

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
L3MClassifier.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes)  # type: ignore[attr-defined]
