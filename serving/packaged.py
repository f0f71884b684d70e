"""What a built bento recorded about the models it packaged.

Inside a bento there is no registry ledger, and ``bentoml serve <bento>`` does not export the
bento's envs (only a container does), so a service reads them from ``<bento>/bento.yaml``:

* ``L3M_MODEL_TAG``: the one model a single-domain bento serves (``serving.service``);
* ``L3M_DOMAIN_TAGS``: ``domain=tag,domain=tag,...``, the domain versions a multi-domain bento
  serves (``serving.multi_service``), fixed at build time.
"""

from __future__ import annotations

from pathlib import Path

DOMAIN_TAGS_ENV = "L3M_DOMAIN_TAGS"


def packaged_env(name: str, service_file: Path) -> str | None:
    """The value the build recorded for env ``name``, when ``service_file`` runs from a built
    bento (``<bento>/src/serving/<module>.py``); None outside one."""
    root = service_file.resolve().parents[2]
    manifest = root / "bento.yaml"
    if service_file.resolve().parents[1].name != "src" or not manifest.is_file():
        return None
    import yaml

    envs = (yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}).get("envs") or []
    return next((str(e["value"]) for e in envs if e.get("name") == name and e.get("value")), None)


def format_domain_tags(tags: dict[str, str]) -> str:
    return ",".join(f"{domain}={tag}" for domain, tag in sorted(tags.items()))


def parse_domain_tags(raw: str) -> dict[str, str]:
    """``domain=tag,...`` -> {domain: tag}; a malformed entry is a ValueError naming it."""
    tags: dict[str, str] = {}
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        domain, sep, tag = item.partition("=")
        if not sep or not domain.strip() or ":" not in tag:
            raise ValueError(f"{DOMAIN_TAGS_ENV}: {item!r} is not 'domain=name:version'")
        tags[domain.strip()] = tag.strip()
    return tags
