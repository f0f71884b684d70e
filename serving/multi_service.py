"""BentoML service: many domains in one process, following the registry's promotions.

    L3M_DOMAINS=citation_intent,chemprot bentoml serve serving.multi_service:L3MDomains

``L3M_DOMAINS``: the domains to serve (comma-separated), or ``*`` (default) for every domain
with a production version in the registry, including ones added while it runs. Each domain is
its production version; the base of compact domains is resident once (``serving.domains``).
``L3M_RELOAD_S`` (default 5): how often the registry's ledger is checked; a promotion or
rollback is loaded beside the running version and swapped in without a restart, a request
already holding the old version finishes on it, and every swap is logged.

A multi-domain bento (``l3m models build --multi``: a base and every production domain over it)
serves the versions it packaged, recorded as ``L3M_DOMAIN_TAGS`` (``serving.packaged``), and
follows no registry: ``bentoml serve l3m_domains:latest``.

Endpoints: ``POST /classify`` ``{"texts": ..., "domain": "..."}`` (``domain`` may be left out
when one domain is served; an unknown one is a 404 naming the served ones), ``GET /metadata``
(every domain: version, labels, tuner), ``/livez``, ``/readyz``. Batches hold one domain and
the domains take turns (``serving.batcher``). Request hygiene, connection limits and the other
knobs are the single-domain service's (``serving.service``, ``serving.schemas.Settings``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, Field

from serving import connections
from serving.batcher import MicroBatcher
from serving.domains import DomainSet, Served, UnknownDomain, encoder_key
from serving.guard import RequestGuard, answered, error_response, install_client_error_log_filter
from serving.model_io import predict, predict_encoded, serving_dtype
from serving.packaged import DOMAIN_TAGS_ENV, packaged_env, parse_domain_tags
from serving.preflight import Limits, Preflight, Refused
from serving.schemas import Prediction, Settings, Text, TextPair, listify, split_items
from serving.textbound import PROBE_CHARS_PER_TOKEN, Encoded, default_max_chars, encode_inputs
from serving.workers import register_worker, unregister_worker

logger = logging.getLogger("l3m.serving")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = Settings.from_env()
# A preflight no served version uses any more is closed this long after: longer than any request
# may take (the traffic timeout), so no request still holding its version is cut off.
RETIRE_AFTER_S = 150


def wanted_domains(raw: str | None) -> list[str] | None:
    """``L3M_DOMAINS`` -> the domain names, or None for every domain in the registry."""
    names = [d.strip() for d in (raw or "*").split(",") if d.strip()]
    return None if names in ([], ["*"]) else names


WANTED = wanted_domains(os.environ.get("L3M_DOMAINS"))
# Inside a multi-domain bento (`l3m models build --multi`): the domain versions it packaged,
# served as they are (there is no registry to follow inside a bento). L3M_DOMAIN_TAGS set by
# hand does the same outside one.
_PACKAGED_RAW = os.environ.get(DOMAIN_TAGS_ENV) or packaged_env(DOMAIN_TAGS_ENV, Path(__file__))
PACKAGED = parse_domain_tags(_PACKAGED_RAW) if _PACKAGED_RAW else None
RELOAD_S = float(os.environ.get("L3M_RELOAD_S") or 5)
# Plain and pair items: which one a domain takes is checked once its domain is known.
Texts = Annotated[list[Text | TextPair | tuple[Text, Text]], BeforeValidator(listify),
                  Field(min_length=1, max_length=SETTINGS.max_texts)]

connections.install(SETTINGS.header_timeout_s, SETTINGS.max_connections, SETTINGS.max_client_connections)
install_client_error_log_filter()


class DomainInfo(BaseModel):
    domain: str
    model_tag: str
    version: str
    labels: list[str]
    tuner: str
    strategy: str
    metric: str
    base_model: str
    text_pair: bool
    max_length: int


class MultiMetadata(BaseModel):
    domains: list[DomainInfo]
    max_texts: int
    batching: bool
    dtype: str


def _store_path(tag: str) -> str:
    return str(bentoml.models.get(tag).path)


def _max_chars(served: Served) -> int:
    return SETTINGS.max_text_chars or default_max_chars(served.meta.max_length)


def _preflight(served: Served) -> Preflight:
    """The tokenizer lanes for ``served``'s encoder key (``serving.preflight``), one tokenizer per lane."""
    max_chars = _max_chars(served)

    def make_encoder() -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(served.path))
        return lambda text, pair: encode_inputs(tokenizer, served.meta.max_length, max_chars, [text],
                                                None if pair is None else [pair], require_content=True)[0]

    limits = Limits(cpu_budget_s=SETTINGS.preflight_cpu_s,
                    light_chars=SETTINGS.light_chars or 2 * PROBE_CHARS_PER_TOKEN * served.meta.max_length,
                    heavy_share=SETTINGS.heavy_cpu_share, heavy_queue=SETTINGS.heavy_queue)
    return Preflight(make_encoder, max_chars, limits)


def _items(served: Served, texts: list[Any]) -> tuple[list[str], list[str] | None]:
    """The request's texts (and pairs) for its domain; a ``Refused`` 400 when of the wrong kind."""
    plain = [isinstance(t, str) for t in texts]
    if served.meta.text_pair and any(plain) or not served.meta.text_pair and not all(plain):
        want = "pairs ({text, text_pair} or [text, text_pair])" if served.meta.text_pair else "plain texts"
        raise Refused(400, f"domain {served.meta.domain!r} takes {want}")
    return split_items(texts)


info_app = FastAPI(title="l3m metadata (many domains)")


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(name="l3m_domains", workers=SETTINGS.workers, traffic={"timeout": 120})
class L3MDomains:
    def __init__(self) -> None:
        import torch

        self._ready = False
        install_client_error_log_filter()
        logger.setLevel(logging.INFO)  # every version swap is logged: an operator's record of what served when
        register_worker()
        if SETTINGS.torch_threads > 0:
            torch.set_num_threads(SETTINGS.torch_threads)
        self.dtype = serving_dtype(SETTINGS.dtype, "cpu")  # load_classifier loads on the CPU
        # Preflights by encoder key (shared by the versions with that key), the key of each
        # version loaded, and when a key stopped being used by any served version.
        self._preflights: dict[str, Preflight] = {}
        self._key_of: dict[str, str] = {}
        self._unused_since: dict[str, float] = {}
        self.domains = DomainSet(WANTED, _store_path, lambda tag: Path(bentoml.models.get(tag).path), PACKAGED)
        self.domains.refresh(force=True, prepare=self._warm)
        if not self.domains.served:
            where = (f"the packaged versions {PACKAGED}" if PACKAGED is not None else
                     f"the registry (BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')})")
            raise RuntimeError(f"no version of {WANTED or 'any domain'} could be loaded from {where}")
        self.batcher = MicroBatcher(self._predict, SETTINGS.max_batch_size if SETTINGS.batching else 1,
                                    SETTINGS.max_queue_texts)
        self._stop = threading.Event()
        if PACKAGED is None:  # a bento's versions are fixed: nothing to follow
            threading.Thread(target=self._follow, name="l3m-follow-registry", daemon=True).start()
        self._ready = True
        logger.info("serving %s (base bytes resident %d, %s)", self.domains.names(), self.domains.pool.bytes(),
                    "packaged versions" if PACKAGED is not None else f"registry checked every {RELOAD_S:g} s")

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()
        self.batcher.close()
        for pre in self._preflights.values():
            pre.close()
        unregister_worker()

    def _warm(self, served: Served) -> None:
        # Before the version takes requests: its tokenizer lanes, and one forward pass (lazy
        # initialisation is not a user's wait).
        pair = ["warm up"] if served.meta.text_pair else None
        predict(served.model, served.tokenizer, served.meta, ["warm up"], pair, dtype=self.dtype)
        key = encoder_key(served, _max_chars(served))
        if key not in self._preflights:
            self._preflights[key] = _preflight(served)
            logger.info("tokenizer lanes for %s (shared with later versions of the same tokenizer files, "
                        "max_length and text bound)", served.tag)
        self._key_of[served.tag] = key

    def _follow(self) -> None:
        """The registry follower: swaps in new production versions, retires old tokenizer lanes."""
        while not self._stop.wait(RELOAD_S):
            try:
                self.domains.refresh(prepare=self._warm)  # each swap is logged there
                self._retire_unused(time.monotonic())
            except Exception:  # noqa: BLE001 - the follower must outlive a bad registry read
                logger.exception("following the registry failed; serving the versions loaded so far")

    def _retire_unused(self, now: float) -> None:
        """Close the preflights no served version has used for RETIRE_AFTER_S."""
        live = {self._key_of[s.tag] for s in self.domains.served.values()}
        for key in list(self._preflights):
            if key in live:
                self._unused_since.pop(key, None)
            elif now - self._unused_since.setdefault(key, now) > RETIRE_AFTER_S:
                self._preflights.pop(key).close()
                del self._unused_since[key]
                self._key_of = {t: k for t, k in self._key_of.items() if k != key}

    def _predict(self, items: list[tuple[Served, Encoded]]) -> list[dict[str, object]]:
        served = items[0][0]  # a batch holds one key: one domain version
        return predict_encoded(served.model, served.tokenizer, served.meta, [r for _, r in items], dtype=self.dtype)

    @bentoml.api(route="/classify")
    async def classify(self, texts: Texts, ctx: bentoml.Context, domain: str | None = None) -> list[Prediction]:
        """Classify texts (pairs for pair domains) with ``domain``'s production version."""
        client = ctx.request.client.host if ctx.request.client else "?"
        try:
            served = self.domains.get(domain)
        except UnknownDomain as e:
            return error_response(ctx, 404 if domain is not None else 400, e.message, None, domains=e.served)

        async def work() -> list[dict[str, object]]:
            plain, pairs = _items(served, texts)
            rows = await self._preflights[self._key_of[served.tag]].encode(client, plain, pairs)
            return await self.batcher.submit([(served, r) for r in rows], key=served.meta.domain)

        return await answered(ctx, client, work())  # predictions, or an error response

    @info_app.get("/metadata")
    def metadata(self) -> MultiMetadata:
        infos = [DomainInfo(domain=d, model_tag=s.tag, version=s.tag.rpartition(":")[2], labels=s.meta.label_names,
                            tuner=s.meta.tuner, strategy=s.meta.strategy, metric=s.meta.metric,
                            base_model=s.meta.base_model, text_pair=s.meta.text_pair, max_length=s.meta.max_length)
                 for d, s in sorted(self.domains.served.items())]
        return MultiMetadata(domains=infos, max_texts=SETTINGS.max_texts, batching=SETTINGS.batching, dtype=self.dtype)


# The service decorator adds add_asgi_middleware at runtime; its stubs do not declare it.
L3MDomains.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_body_bytes,  # type: ignore[attr-defined]
                               body_timeout_s=SETTINGS.body_timeout_s, max_texts=SETTINGS.max_texts)
