"""Does a running service reproduce the offline evaluation? (``l3m models verify``)

Training stores the offline evaluation's per-example predictions in the model directory
(``predictions/<split>.jsonl``: input, gold, predicted label, probabilities), and the registry
copies them into the store with the weights. This module sends those inputs to a live
``/classify`` endpoint — several texts per request and several requests in flight, so the
batching mixes them the way production traffic does — and compares label by label.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from l3m.evaluate import PREDICTIONS_DIR, read_predictions


@dataclass
class VerifyReport:
    """Served vs offline predictions of one split."""

    split: str
    n: int
    label_mismatches: list[int] = field(default_factory=list)  # indices into the split
    max_prob_diff: float = 0.0
    served_accuracy: float | None = None  # against the gold labels, when the split has them
    offline_accuracy: float | None = None

    @property
    def ok(self) -> bool:
        return not self.label_mismatches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok, "label_agreement": 1 - len(self.label_mismatches) / max(self.n, 1)}


def predictions_path(model_path: str | Path, split: str) -> Path:
    path = Path(model_path) / PREDICTIONS_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: this model was exported without offline predictions "
            "(trained before they were recorded, or not by l3m.train)"
        )
    return path


def _payload_item(rec: dict[str, Any]) -> Any:
    return {"text": rec["text"], "text_pair": rec["text_pair"]} if rec.get("text_pair") else rec["text"]


async def _classify_all(
    url: str, records: list[dict[str, Any]], texts_per_request: int, concurrency: int, timeout: float,
    domain: str | None = None,
) -> list[dict[str, Any]]:
    import httpx

    base = url.rstrip("/")
    gate = asyncio.Semaphore(max(1, concurrency))

    async def post(client: httpx.AsyncClient, part: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async with gate:
            body: dict[str, Any] = {"texts": [_payload_item(r) for r in part]}
            if domain is not None:  # a multi-domain service (serving.multi_service)
                body["domain"] = domain
            resp = await client.post(f"{base}/classify", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"/classify answered {resp.status_code}: {resp.text[:300]}")
        return list(resp.json())

    async with httpx.AsyncClient(timeout=timeout) as client:
        parts = await asyncio.gather(*(post(client, records[a : a + texts_per_request])
                                       for a in range(0, len(records), texts_per_request)))
    return [pred for part in parts for pred in part]


def compare(split: str, offline: list[dict[str, Any]], served: list[dict[str, Any]]) -> VerifyReport:
    if len(offline) != len(served):
        raise ValueError(f"{len(served)} served predictions for {len(offline)} offline ones")
    report = VerifyReport(split=split, n=len(offline))
    for i, (o, s) in enumerate(zip(offline, served, strict=True)):
        if o["label"] != s["label"]:
            report.label_mismatches.append(i)
        diffs = [abs(p - s["probabilities"].get(name, float("nan"))) for name, p in o["probabilities"].items()]
        report.max_prob_diff = max(report.max_prob_diff, *diffs)
    gold = [o.get("gold") for o in offline]
    if offline and all(g is not None for g in gold):
        report.served_accuracy = sum(g == s["label"] for g, s in zip(gold, served, strict=True)) / len(gold)
        report.offline_accuracy = sum(g == o["label"] for g, o in zip(gold, offline, strict=True)) / len(gold)
    return report


def verify(
    url: str,
    model_path: str | Path,
    split: str = "test",
    *,
    texts_per_request: int = 4,
    concurrency: int = 8,
    timeout: float = 120.0,
    domain: str | None = None,
) -> VerifyReport:
    """Send ``split``'s stored offline inputs to the service at ``url`` (as ``domain``'s, for a
    multi-domain service) and compare predictions."""
    offline = read_predictions(predictions_path(model_path, split))
    served = asyncio.run(_classify_all(url, offline, texts_per_request, concurrency, timeout, domain))
    return compare(split, offline, served)
