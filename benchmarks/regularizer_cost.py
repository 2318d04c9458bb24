"""What a regularizer's gradient terms cost per optimizer step, and what batching ``Orthogonal`` by shape saves.

GradGuard adds each regularizer's gradient term to ``.grad`` before every optimizer step (``add_grad_``). ``L1`` and
``L2`` are one fused ``foreach`` call per device and dtype. ``Orthogonal`` needs two matrix products per weight
matrix; it stacks the small blocks (at most 64 x 64 entries) of one shape and runs them as one batched product,
and takes larger ones one by one. This measures, per model and regularizer:

* **time** of one ``add_grad_`` (median over repeats, after a warm-up);
* **top-level torch ops** of one call (``torch.profiler``; views count, although they launch no kernel);
* for ``Orthogonal``, the same terms computed one matrix at a time (the previous implementation, rebuilt here as the
  reference) in the same run, the calls of the two interleaved, their time ratio, and the largest difference between
  the two results.

On the CPU the clock is the process CPU time with one torch thread, as in ``benchmarks/overhead.py``::

    python -m benchmarks.regularizer_cost              # about 30 s on 2 CPU cores; --repeats N --json PATH --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks._common import machine, num, run_main
from lightning_gradguard import L1, L2, Orthogonal
from lightning_gradguard.regularize import Regularizer

MODELS = {
    "deep": "600 x Linear(64, 64) (600 matrices)",
    "wide": "48 x Linear(512, 512) (48 matrices)",
    "lstm": "LSTM(256, 256, num_layers=4) (32 gate blocks)",
    "small": "200 x Linear(32, 32) (200 matrices)",
}


def _net(name: str) -> nn.Module:
    if name == "deep":
        return nn.Sequential(*[nn.Linear(64, 64) for _ in range(600)])
    if name == "wide":
        return nn.Sequential(*[nn.Linear(512, 512) for _ in range(48)])
    if name == "small":
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(200)])
    return nn.LSTM(256, 256, num_layers=4)


def _per_matrix_terms(reg: Orthogonal) -> list[torch.Tensor]:
    """The Orthogonal terms one matrix at a time, as before the batching: the reference."""
    terms = []
    for param, (gates, transposed) in zip(reg._params, reg._layouts):
        matrix = param.detach().float()
        matrix = matrix.transpose(0, 1) if transposed else matrix  # a transposed conv's [in, out, k...]
        w = matrix.reshape(gates, matrix.shape[0] // gates, -1)
        wide = w.shape[-2] < w.shape[-1]
        gram = w @ w.mT if wide else w.mT @ w
        gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        term = (gram @ w if wide else w @ gram).mul_(4.0).reshape(matrix.shape)
        terms.append(term.transpose(0, 1) if transposed else term)
    return terms


def _times(fns: Sequence[Callable[[], Any]], repeats: int, clock: str) -> list[float]:
    """The median time of each function, the calls interleaved so that they share the machine's drift."""
    tick = time.process_time if clock == "cpu" else time.perf_counter
    for fn in fns:
        fn()
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start = tick()
            fn()
            out.append(tick() - start)
    return [statistics.median(out) for out in samples]


# Top-level ops that only reinterpret a tensor's metadata: no kernel runs for them on any device.
_VIEWS = frozenset(
    f"aten::{name}"
    for name in (
        "view",
        "reshape",
        "_reshape_alias",
        "slice",
        "mH",
        "mT",
        "t",
        "transpose",
        "diagonal",
        "alias",
        "as_strided",
        "unsqueeze",
        "detach",
        "promote_types",
    )
)


def _ops(fn: Callable[[], Any]) -> tuple[int, int]:
    """Top-level torch ops of one call, all of them and those that compute (views left out)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [event.name for event in prof.events() if event.cpu_parent is None]
    return len(names), sum(1 for name in names if name not in _VIEWS)


def measure(name: str, make: Callable[[], Regularizer], repeats: int, clock: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _net(name)
    reg = make()
    reg.bind(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def batched() -> None:
        reg.add_grad_()

    def per_matrix() -> None:
        _per_matrix_terms(reg)

    row: dict[str, Any] = {"model": name, "regularizer": type(reg).__name__, "tensors": len(reg.param_names)}
    row["ops"], row["compute_ops"] = _ops(batched)
    if not isinstance(reg, Orthogonal):
        (ms,) = _times([batched], repeats, clock)
        row["ms"] = 1e3 * ms
    else:
        row["ms"], row["per_matrix_ms"] = (1e3 * t for t in _times([batched, per_matrix], repeats, clock))
        row["per_matrix_ops"], row["per_matrix_compute_ops"] = _ops(per_matrix)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        reg.add_grad_()
        reference = _per_matrix_terms(reg)
        row["max_abs_diff"] = max(
            (p.grad - reg.effective_weight * t).abs().max().item() for p, t in zip(reg._params, reference)
        )
    return row


REGULARIZERS: dict[str, Callable[[], Regularizer]] = {
    "L1": lambda: L1(1e-4),
    "L2": lambda: L2(1e-4),
    "Orthogonal": lambda: Orthogonal(1e-4),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1 if args.clock == "cpu" else torch.get_num_threads())
    repeats = 3 if args.quick else args.repeats
    rows = [
        measure(model, REGULARIZERS[reg], repeats, args.clock)
        for model in args.models.split(",")
        for reg in args.regularizers.split(",")
    ]
    return {"command": args.command, "machine": machine(), "clock": args.clock, "repeats": repeats, "rows": rows}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Regularizer gradient terms per optimizer step ({result['clock']} clock, median of {result['repeats']})",
        "ops: top-level torch ops of one call (compute: without views, which launch no kernel)",
        "model  regularizer  tensors  ms/step  ops (compute)  per-matrix ms  per-matrix ops (compute)  time ratio"
        "  max |diff|",
    ]
    for r in result["rows"]:
        ratio = r["per_matrix_ms"] / r["ms"] if "per_matrix_ms" in r and r["ms"] > 0 else None
        ops = f"{r['ops']} ({r['compute_ops']})"
        per_matrix = f"{r['per_matrix_ops']} ({r['per_matrix_compute_ops']})" if "per_matrix_ops" in r else "-"
        lines.append(
            f"{r['model']:<6} {r['regularizer']:<12} {r['tensors']:>7}  {num(r['ms'], '.3g'):>7}  {ops:>13}  "
            f"{num(r.get('per_matrix_ms'), '.3g'):>13}  {per_matrix:>24}  {num(ratio, '.2f'):>10}"
            f"  {num(r.get('max_abs_diff'), '.2g'):>10}"
        )
    lines.append(f"command: {result['command']}")
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--regularizers", default="L1,L2,Orthogonal", help="comma-separated: L1, L2, Orthogonal")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--quick", action="store_true", help="3 timed calls per measurement")
    p.add_argument("--json", default=None, help="write the results here (- prints them instead of the table)")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.regularizers.split(","):
        if name not in REGULARIZERS:
            p.error(f"--regularizers: unknown regularizer {name!r}; choose from {', '.join(REGULARIZERS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the measurement, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "regularizer_cost.py", _parse, run, report)


if __name__ == "__main__":
    main()
