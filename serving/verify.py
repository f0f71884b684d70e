"""Does a running service reproduce the offline evaluation? (``l3m models verify``)

Training stores the offline evaluation's per-example predictions in the model directory
(``predictions/<split>.jsonl``: input, gold, predicted label, probabilities), and the registry
copies them into the store with the weights. This module sends those inputs to a live
``/classify`` endpoint — several texts per request and several requests in flight, so adaptive
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
    url: str, records: list[dict[str, Any]], texts_per_request: int, concurrency: int, timeout: float
) -> list[dict[str, Any]]:
    import httpx

    chunks = [list(range(a, min(a + texts_per_request, len(records))))
              for a in range(0, len(records), texts_per_request)]
    served: list[dict[str, Any] | None] = [None] * len(records)
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            idx = queue.get_nowait()
            resp = await client.post(f"{url.rstrip('/')}/classify",
                                     json={"texts": [_payload_item(records[i]) for i in idx]})
            if resp.status_code != 200:
                raise RuntimeError(f"/classify answered {resp.status_code}: {resp.text[:300]}")
            for i, pred in zip(idx, resp.json(), strict=True):
                served[i] = pred

    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(max(1, concurrency))))
    return [s for s in served if s is not None]


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
) -> VerifyReport:
    """Send ``split``'s stored offline inputs to the service at ``url`` and compare predictions."""
    offline = read_predictions(predictions_path(model_path, split))
    served = asyncio.run(_classify_all(url, offline, texts_per_request, concurrency, timeout))
    return compare(split, offline, served)
