"""One bento for many domains: a base and every production domain over it.

``l3m models build --multi`` (and the ``adapt-domain`` flow with ``registry.multi_bento``)
packages the production version of each domain (or of the named ones) into one bento,
``l3m_domains:<versions digest>-<build inputs digest>``, served by
``serving.multi_service:L3MDomains``. A compact (``weight_mask`` / ``lora``) domain brings its
base (``serving.bases``): each base is packaged once, however many domains use it. The bento
records which version of each domain it holds (``L3M_DOMAIN_TAGS``, ``serving.packaged``) and
serves exactly those: a later promotion makes a new bento (a new versions digest), and nothing
changed builds nothing. Not an ``l3m-<domain>`` name: no domain's bento listing sees it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from flows.register import bento_exists, bento_inputs_digest, bentofile_spec, run_bentoml_build
from serving import registry
from serving.bases import read_ref
from serving.ledger import registration_lock
from serving.packaged import DOMAIN_TAGS_ENV, format_domain_tags
from serving.registry import RegistryError

MULTI_NAME = "l3m_domains"
MULTI_SERVICE = "serving.multi_service:L3MDomains"


def production_versions(domains: list[str] | None = None) -> dict[str, str]:
    """{domain: production tag} of ``domains`` (None: every domain with a production version);
    a named domain without one is a RegistryError naming the domains that have one."""
    production = registry.production_tags()
    if domains is None:
        if not production:
            raise RegistryError("no domain has a production version to package (`l3m models list`)")
        return production
    missing = [d for d in domains if d not in production]
    if missing:
        raise RegistryError(f"no production version for {missing}; domains with one: {sorted(production)}")
    return {d: production[d] for d in domains}


def packaged_models(tags: dict[str, str]) -> list[str]:
    """The store entries the bento packages: every domain version, then each base once."""
    bases = {ref.tag for ref in (read_ref(registry.model_path(t)) for t in tags.values()) if ref is not None}
    return [*sorted(tags.values()), *sorted(bases)]


def multi_bento_tag(tags: dict[str, str]) -> str:
    versions = hashlib.sha256(format_domain_tags(tags).encode()).hexdigest()[:10]
    return f"{MULTI_NAME}:{versions}-{bento_inputs_digest()}"


def build_multi_bento(domains: list[str] | None = None) -> tuple[str, bool, dict[str, str]]:
    """(bento tag, built now?, {domain: packaged version}); nothing is built when the bento of
    these versions and this serving code exists."""
    with registration_lock(registry.registry_home()):  # versions read and packaged under one lock
        tags = production_versions(domains)
        tag = multi_bento_tag(tags)
        if bento_exists(tag):
            return tag, False, tags
        env = {DOMAIN_TAGS_ENV: format_domain_tags(tags)}
        spec = bentofile_spec(MULTI_NAME, MULTI_SERVICE, env, packaged_models(tags))
        return run_bentoml_build(spec, tag, env), True, tags


@task(name="build-multi-bento", cache_policy=NONE, retries=1)
def build_multi_bento_task(registered: dict[str, Any]) -> dict[str, Any]:
    """After a registration: the bento of every domain's production version (the one just
    registered included when it was promoted). No domain with one yet (a first model held back
    as a candidate) builds nothing and fails nothing."""
    if not registry.production_tags():
        return {"tag": None, "status": "not built (no domain has a production version)", "domains": {}}
    tag, built, tags = build_multi_bento()
    get_run_logger().info("%s multi-domain bento %s: %s", "built" if built else "reused existing", tag,
                          format_domain_tags(tags))
    return {"tag": tag, "status": "built" if built else "exists (nothing changed)", "domains": tags}
