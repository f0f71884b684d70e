"""FLOP accounting and matmul peaks for bench/scoring.py.

Useful FLOPs are what any exact PLL scorer must compute for the scored tokens, counted the
usual way (2 FLOPs per multiply-add, matmuls only): every masked copy through the full encoder
without padding, plus the MLM head at its target rows only. Per copy of length L, per layer:
L (8 d^2 + 4 d f) for the projections and feed-forward, 4 L^2 d for attention; per target
2 d^2 + 2 d V for the head. Executed FLOPs are what l3m's packed path actually runs (its last
layer only at the targets, layer 0's Q/K/V once per text), so useful/executed > 1 is the saving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from l3m.scoring import onednn
from l3m.scoring.packed import ROW_CHUNK


@dataclass(frozen=True)
class Dims:
    layers: int
    d: int
    f: int
    vocab: int

    @classmethod
    def of(cls, config: object) -> Dims:
        c = config
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)  # type: ignore[attr-defined]


def layer_flops(dims: Dims, L: int) -> float:
    return L * (8 * dims.d**2 + 4 * dims.d * dims.f) + 4 * L * L * dims.d


def head_flops(dims: Dims) -> float:
    return 2 * dims.d**2 + 2 * dims.d * dims.vocab


def useful_flops(dims: Dims, copies: list[tuple[int, int]]) -> float:
    """``copies``: (length L, targets m) per masked copy."""
    return sum(dims.layers * layer_flops(dims, L) + m * head_flops(dims) for L, m in copies)


def executed_flops_packed(dims: Dims, copies: list[tuple[int, int]], texts: list[int] | None = None) -> float:
    """``texts``: length of each text; layer 0's Q/K/V then runs on 2 L rows per text, not per copy."""
    d, f = dims.d, dims.f
    total = 0.0
    if texts is not None and dims.layers > 1:
        total += sum(2 * L * 6 * d * d for L in texts) - sum(L * 6 * d * d for L, _ in copies)
    for L, m in copies:
        last = L * 4 * d * d + m * (2 * d * d + 4 * L * d + 2 * d * d + 4 * d * f)
        total += (dims.layers - 1) * layer_flops(dims, L) + last + m * head_flops(dims)
    return total


def matmul_peak(
    device: torch.device, dtype: torch.dtype, seconds: float = 3.0, cpu_clock: bool = False
) -> dict[str, float]:
    """Best GFLOP/s over square and model-shaped GEMMs (what torch reaches here, not a spec sheet).

    ``cpu_clock``: time with process CPU time (the benchmark's single-thread mode)."""
    clock = time.process_time if cpu_clock else time.perf_counter
    shapes = [(2048, 2048, 2048), (4096, 4096, 4096)] if device.type == "cpu" else [(8192, 8192, 8192)]
    shapes += [(8192, 384, 1536), (8192, 1536, 384)] if device.type == "cpu" else [(65536, 384, 1536)]
    calls: list[tuple[str, int, Callable[[], object]]] = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        calls.append((f"{m}x{k}x{n}", 2 * m * k * n, lambda a=a, b=b: a @ b))
    if onednn.available(device):
        # The engine's own GEMM path (oneDNN, weight reordered once) at its chunk's shapes: on the
        # AMD EPYC here it reaches 215-219 GFLOP/s where ``a @ b`` (MKL) reaches 135-185, and a peak
        # below what the engine's GEMMs reach would make every "% of peak" flatter than the truth.
        for k, n in ((384, 1536), (1536, 384)):
            x = torch.randn(ROW_CHUNK, k, dtype=dtype)
            w = onednn.prepack(torch.randn(n, k, dtype=dtype), ROW_CHUNK)
            bias = torch.zeros(n, dtype=dtype)
            calls.append((f"onednn {ROW_CHUNK}x{k}x{n}", 2 * ROW_CHUNK * k * n,
                          lambda x=x, w=w, bias=bias: onednn.linear(x, w, bias)))  # fmt: skip
    best = 0.0
    per_shape: dict[str, float] = {}
    for name, flops, call in calls:
        for _ in range(2):
            call()
        _sync(device)
        reps, t_end, rates = 0, time.perf_counter() + seconds / len(calls), []
        while time.perf_counter() < t_end or reps < 3:
            t0 = clock()
            call()
            _sync(device)
            rates.append(flops / max(clock() - t0, 1e-9) / 1e9)
            reps += 1
        per_shape[name] = max(rates)
        best = max(best, max(rates))
    return {"gflops": best, **per_shape}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
