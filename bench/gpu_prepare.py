"""Build what the GPU check carries to the device machine (``bench/gpu_check.sh prepare``).

Runs here, in the project's venv, because the device has no Great Expectations, Prefect,
pydantic or datasets and reaches no package registry. Everything lands in one ignored folder,
``.bench/gpu_carry/`` (the one ``carry`` path):

* ``snapshots/<domain>/``: the validated data snapshot of each paper domain, made by the
  project's own ``l3m validate --no-prefect`` (the device reads it with ``--snapshot``);
* ``models/minilm-l6-mlm/``: the shared model with its float weights stored as float16 (the
  fp32 file is 91 MB, over the 64 MiB that travels). float16, not bfloat16: 10 mantissa bits
  against 7, and no weight of this model is near float16's range limit. The device upcasts it
  back to float32 before use, so the model differs from the shared one by float16 rounding only
  -- but its digest differs, so its scores and runs are keyed apart from the CPU ones;
* ``whl/``: the wheels of the packages the library imports at training time that the device
  lacks (pydantic and its three helpers, datasets with dill and multiprocess, and a recent
  typing-extensions that pydantic-core needs), at the versions installed here, for CPython 3.12
  on manylinux x86-64.

It ends by printing the carry list, the sizes (the whole transfer must stay under 64 MiB) and the
device command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".bench" / "gpu_carry"
PREP = ROOT / ".bench" / "gpu_prep"  # validation reports and the snapshots' first home (not carried)
DOMAINS = ("citation_intent", "chemprot")
MODEL_NAME = "minilm-l6-mlm"
# Imported by l3m at training time and absent on the device (docs/benchmarks.md, "GPU check").
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
          "datasets", "dill", "multiprocess")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_BYTES = 64 * 2**20
DEVICE_TIMEOUT_S = 600
DEVICE_DEADLINE_S = 540  # leaves a minute of the 10-minute call for the wheels, the start and the copy-back


def snapshot(domain: str, out_root: Path) -> Path:
    """Validate the paper profile's domain with ``l3m validate`` and return its snapshot folder."""
    from l3m.config import load_config
    from l3m.data.snapshot import find_snapshot

    config = ROOT / "configs" / "paper" / f"{domain}-minilm.yaml"
    env = os.environ | {"L3M_OUTPUT_ROOT": str(out_root)}
    log = PREP / f"validate-{domain}.log"
    with log.open("w") as fh:
        subprocess.run([str(Path(sys.executable).parent / "l3m"), "validate", str(config), "--no-prefect"],
                       check=True, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    os.environ["L3M_OUTPUT_ROOT"] = str(out_root)
    found = find_snapshot(load_config(config))
    if found is None:
        raise RuntimeError(f"{domain}: validation passed but no snapshot was written (see {log})")
    return found


def half_model(src: Path, dst: Path) -> dict[str, float]:
    """Copy the model with float tensors as float16; returns the largest rounding error."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    err = max(float((v.float() - half[k].float()).abs().max()) for k, v in weights.items() if v.is_floating_point())
    biggest = max(float(v.abs().max()) for v in weights.values() if v.is_floating_point())
    save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copyfile(f, dst / f.name)
    return {"max_abs_rounding": err, "max_abs_weight": biggest}


def download_wheels(dst: Path, python_version: str) -> list[str]:
    """The device README's recipe: binary wheels only, no dependencies, the versions installed here."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dst), *pins]
    for p in PLATFORMS:
        cmd[-len(pins):-len(pins)] = ["--platform", p]
    subprocess.run(cmd, check=True)
    return sorted(f.name for f in dst.glob("*.whl"))


def tree_files() -> dict[str, int]:
    """What travels besides the carry: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    return {n: (ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file()}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / MODEL_NAME))
    ap.add_argument("--python-version", default="3.12", help="the device's Python (wheels are built for it)")
    ap.add_argument("--wheels-dir", default=str(CARRY / "whl"))
    ap.add_argument("--skip-wheels", action="store_true")
    a = ap.parse_args()
    PREP.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {}
    for d in DOMAINS:
        src = snapshot(d, PREP / "runs")
        dst = CARRY / "snapshots" / d
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        report[f"snapshot {d}"] = f"{src.name} -> {dst.relative_to(ROOT)}"
    report["model"] = half_model(Path(a.model), CARRY / "models" / MODEL_NAME)
    if not a.skip_wheels:
        report["wheels"] = download_wheels(Path(a.wheels_dir), a.python_version)
    sizes = {p.name: folder_bytes(p) for p in sorted(CARRY.iterdir()) if p.is_dir()}
    tree = tree_files()
    total = sum(tree.values()) + folder_bytes(CARRY)
    report["sizes_mib"] = {k: round(v / 2**20, 2) for k, v in sizes.items()}
    report["working_tree_mib"] = round(sum(tree.values()) / 2**20, 2)
    report["largest_tree_files"] = sorted(tree, key=tree.__getitem__, reverse=True)[:3]
    report["total_mib"] = round(total / 2**20, 2)
    (CARRY / "prepare.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if total > LIMIT_BYTES:
        sys.exit(f"what would travel is {total / 2**20:.1f} MiB, over the 64 MiB limit")
    print("\ncarry: [\".bench/gpu_carry\"]")
    print(f"timeout_s: {DEVICE_TIMEOUT_S}")
    print(f"command: DEADLINE={DEVICE_DEADLINE_S} bash bench/gpu_check.sh run")


if __name__ == "__main__":
    main()
