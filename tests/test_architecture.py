"""The library stays free of the orchestrator and the server (architecture rule)."""

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "l3m"
FORBIDDEN = {"prefect", "bentoml", "prefect_dask"}


def test_l3m_never_imports_prefect_or_bentoml():
    offenders = []
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(LIB)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
