"""lightning_gradguard._compat: the private-torch fast paths and their public fallbacks give the same results.

Each check runs a function once with the private torch APIs allowed and once forced onto the public fallback
(``use_private_torch(False)``, what ``GRADGUARD_NO_PRIVATE_TORCH=1`` does), and compares. On the CPU the private
foreach kernels loop over the tensors with the same per-tensor kernels, so the results must be bitwise equal; on a
GPU the fused kernels may reduce in another order, so the comparison allows 16 ulps there (not checked on a GPU yet).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.utils._foreach_utils
from torch import nn

from lightning_gradguard import _compat
from lightning_gradguard._compat import (
    device_has_foreach_support,
    foreach_add_,
    foreach_copy_,
    foreach_mul,
    foreach_mul_,
    foreach_norm,
    foreach_sgn,
    foreach_zero_,
    group_by_device_and_dtype,
    nan_to_num_,
    private_torch_enabled,
    use_private_torch,
)
from lightning_gradguard.regularize import L1, L2
from tests.helpers import destroy_process_group

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _restore_switch() -> Iterator[None]:
    previous = private_torch_enabled()
    yield
    use_private_torch(previous)


def both(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """``fn()`` on the private fast path, then on the public fallback."""
    previous = use_private_torch(True)
    try:
        fast = fn()
        use_private_torch(False)
        slow = fn()
    finally:
        use_private_torch(previous)
    return fast, slow


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b) and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
    if a.device.type == "cpu":
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (a, b)
    else:
        torch.testing.assert_close(a, b, rtol=16 * torch.finfo(a.dtype).eps, atol=0.0, equal_nan=True)


def tensors(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), (), (0,), (2, 3, 4), (1000,)]
    out = [(torch.randn(s, generator=g) * 50).to(dtype=dtype, device=device) for s in shapes]
    out[1][2:4] = 300.0 if dtype != torch.float16 else 60000.0  # a norm that overflows fp16 unless widened
    return out


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls that reach the private torch functions (wrapped where they live, as other tests do)."""
    calls: dict[str, int] = {}
    targets = [(torch, name) for name in ("_foreach_norm", "_foreach_mul_", "_foreach_add_")]
    targets.append((torch.utils._foreach_utils, "_group_tensors_by_device_and_dtype"))
    for owner, name in targets:
        original = getattr(owner, name)

        def wrapper(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return calls


# --------------------------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("ord", [2.0, 1, float("inf"), 0.5, 3.0, 0])
def test_foreach_norm_fast_and_fallback_agree(device: str, dtype: torch.dtype, ord: float) -> None:
    ts = tensors(dtype, device)
    if ord == float("inf"):  # torch's max-norm of an empty tensor raises (no identity); ours is 0 (tested below)
        ts = [t for t in ts if t.numel() > 0]
    accumulations: list[torch.dtype | None] = [None, torch.promote_types(dtype, torch.float32)]
    for acc in accumulations:
        fast, slow = both(functools.partial(foreach_norm, ts, ord, dtype=acc))
        assert isinstance(fast, list) and len(fast) == len(slow) == len(ts)
        for a, b, t in zip(fast, slow, ts):
            assert_same(a, b)
            assert_same(b, torch.linalg.vector_norm(t, ord, dtype=acc))


def test_foreach_norm_of_an_empty_tensor() -> None:
    for a, b in zip(*both(lambda: foreach_norm([torch.zeros(0), torch.zeros(2, 0)], 2.0))):
        assert_same(a, b)
        assert a.item() == 0.0
    # The largest entry of none is 0 too, not torch's error: a sparse gradient of a batch of padding ids alone
    # stores no entries, and a fit measuring it died.
    for path in (True, False):
        use_private_torch(path)
        norms = foreach_norm([torch.full((2,), -3.0), torch.zeros(0), torch.zeros(0, 4)], float("inf"))
        assert [n.item() for n in norms] == [3.0, 0.0, 0.0]


def test_foreach_norm_widens_half_precision() -> None:
    ts = tensors(torch.float16)
    for fast, slow in zip(*both(lambda: foreach_norm(ts, 2.0, dtype=torch.float32))):
        assert fast.dtype == torch.float32 and torch.isfinite(fast) and torch.equal(fast, slow)
    narrow = foreach_norm(ts, 2.0)
    assert narrow[1].dtype == torch.float16 and torch.isinf(narrow[1])  # why the callers widen


def test_foreach_norm_is_differentiable_on_both_paths() -> None:
    def grads() -> list[torch.Tensor]:
        ps = [nn.Parameter(t.clone()) for t in tensors(torch.float32)]
        torch.stack(foreach_norm(ps, 2.0, dtype=torch.float32)).pow(2).sum().backward()
        return [p.grad for p in ps]  # type: ignore[misc]

    for a, b in zip(*both(grads)):
        assert_same(a, b)


def test_empty_inputs() -> None:
    for path in (True, False):
        use_private_torch(path)
        assert foreach_norm([]) == []
        assert group_by_device_and_dtype([[]]) == {}
        assert group_by_device_and_dtype([[], []], with_indices=True) == {}
        assert foreach_mul([], torch.tensor(2.0)) == []
        assert foreach_sgn([]) == []
        foreach_mul_([], torch.tensor(2.0))
        foreach_add_([], [])
        foreach_copy_([], [])
        foreach_zero_([])


def test_fast_path_is_taken_for_plain_tensors_only(counting: dict[str, int]) -> None:
    use_private_torch(True)
    foreach_norm(tensors(torch.float32))
    foreach_norm([nn.Parameter(torch.ones(3))])
    foreach_mul_(tensors(torch.float32), torch.tensor(0.5))
    group_by_device_and_dtype([tensors(torch.float32)])
    assert counting == {"_foreach_norm": 2, "_foreach_mul_": 1, "_group_tensors_by_device_and_dtype": 1}
    use_private_torch(False)
    foreach_norm(tensors(torch.float32))
    foreach_mul_(tensors(torch.float32), torch.tensor(0.5))
    foreach_add_(tensors(torch.float32), tensors(torch.float32))
    group_by_device_and_dtype([tensors(torch.float32)])
    assert counting == {"_foreach_norm": 2, "_foreach_mul_": 1, "_group_tensors_by_device_and_dtype": 1}


def test_a_missing_private_api_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    use_private_torch(True)
    ts = tensors(torch.float32)
    expected = foreach_norm(ts)
    groups = group_by_device_and_dtype([ts], with_indices=True)
    for name in ("_foreach_norm", "_foreach_mul_", "_foreach_add_"):
        monkeypatch.delattr(torch, name)
    for name in ("_group_tensors_by_device_and_dtype", "_device_has_foreach_support"):
        monkeypatch.delattr(torch.utils._foreach_utils, name)
    for a, b in zip(foreach_norm(ts), expected):
        assert_same(a, b)
    assert _as_comparable(group_by_device_and_dtype([ts], with_indices=True)) == _as_comparable(groups)
    assert device_has_foreach_support(torch.device("cpu"))
    foreach_mul_(ts, 2.0)
    foreach_add_(ts, ts)


def test_the_environment_variable_forces_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        for value, enabled in (("1", False), ("true", False), ("0", True), ("", True)):
            monkeypatch.setenv("GRADGUARD_NO_PRIVATE_TORCH", value)
            importlib.reload(_compat)  # the variable is read at import
            assert private_torch_enabled() is enabled, value
    finally:
        monkeypatch.undo()  # the variable as this run had it (a run may set it on purpose)
        importlib.reload(_compat)


# ------------------------------------------------------------------------------------------------------------ grouping
def _as_comparable(groups: dict[Any, Any]) -> dict[Any, Any]:
    # Tensors by identity (the groups must hold the input tensors themselves); None stays None.
    return {
        key: ([[None if t is None else id(t) for t in lst] for lst in lists], list(idx))
        for key, (lists, idx) in groups.items()
    }


def _mixed() -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    first: list[torch.Tensor] = []
    second: list[torch.Tensor | None] = []
    for i in range(24):
        dtype = FLOATS[(i * 7) % len(FLOATS)]
        device = devices[(i * 5) % len(devices)]
        first.append(torch.zeros(i % 3 + 1, dtype=dtype, device=device))
        second.append(None if i % 4 == 1 else torch.ones(1, dtype=dtype, device=device))
    return first, second


@pytest.mark.parametrize("with_indices", [False, True])
def test_grouping_by_device_and_dtype_agrees(with_indices: bool) -> None:
    first, second = _mixed()
    fast, slow = both(lambda: group_by_device_and_dtype([first, second], with_indices=with_indices))
    assert _as_comparable(fast) == _as_comparable(slow)
    assert set(slow) == {(t.device, t.dtype) for t in first}
    # Within a group, the input order; the indices point back into the input.
    for (device, dtype), ((g1, g2), idx) in slow.items():
        expected = [i for i, t in enumerate(first) if (t.device, t.dtype) == (device, dtype)]
        assert [id(t) for t in g1] == [id(first[i]) for i in expected]
        assert [None if t is None else id(t) for t in g2] == [
            None if second[i] is None else id(second[i]) for i in expected
        ]
        assert idx == (expected if with_indices else [])


def test_grouping_rejects_a_missing_first_tensor_on_both_paths() -> None:
    for path in (True, False):
        use_private_torch(path)
        with pytest.raises(RuntimeError, match="supposed to be defined"):
            group_by_device_and_dtype([[torch.zeros(1), None]])


def test_device_has_foreach_support_agrees() -> None:
    for device in ("cpu", "cuda", "meta", "mps"):
        fast, slow = both(functools.partial(device_has_foreach_support, torch.device(device)))
        assert fast == slow
    assert device_has_foreach_support(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- elementwise updates
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_foreach_mul_agrees_and_rounds_once(device: str, dtype: torch.dtype) -> None:
    coef = torch.tensor(0.123456789, dtype=torch.float32, device=device)

    def scaled() -> list[torch.Tensor]:
        ts = tensors(dtype, device)
        foreach_mul_(ts, coef)
        return ts

    fast, slow = both(scaled)
    for a, b, t in zip(fast, slow, tensors(dtype, device)):
        assert_same(a, b)
        if dtype != torch.float64:  # fp32 arithmetic, one rounding into the tensor's dtype
            assert_same(b, (t.float() * coef).to(dtype))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_out_of_place_and_binary_ops_agree(dtype: torch.dtype) -> None:
    def run() -> list[torch.Tensor]:
        a, b = tensors(dtype, seed=1), tensors(dtype, seed=2)
        out = foreach_mul(a, torch.tensor(0.3, dtype=dtype)) + foreach_mul(a, 2.5) + foreach_sgn(b)
        out += foreach_mul(a, b)
        foreach_add_(a, b, alpha=-0.75)
        c = [torch.empty_like(t) for t in b]
        foreach_copy_(c, b)
        z = [t.clone() for t in b]
        foreach_zero_(z)
        assert all(not t.any() for t in z)
        return out + a + c + z

    for x, y in zip(*both(run)):
        assert_same(x, y)
    a, b = tensors(dtype, seed=1), tensors(dtype, seed=2)
    foreach_add_(a, b, alpha=-0.75)
    for got, t, o in zip(a, tensors(dtype, seed=1), b):
        assert_same(got, t.add(o, alpha=-0.75))
    for got, t, o in zip(foreach_mul(a, b), a, b):
        assert_same(got, t * o)
    with pytest.raises(ValueError, match="2 tensors but 1 others"):
        foreach_add_(a[:2], b[:1])
    with pytest.raises(ValueError, match="2 tensors but 1 others"):
        foreach_mul(a[:2], b[:1])


# ------------------------------------------------------------------------------------------------------- nan_to_num_
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_to_num_dense(dtype: torch.dtype) -> None:
    g = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), -2.0], dtype=dtype)
    assert nan_to_num_(g) is g
    assert torch.equal(g, torch.tensor([1.0, 0.0, 0.0, 0.0, -2.0], dtype=dtype))


def _uncoalesced(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Rows 0 and 3 repeat: nan + 1 is nan; two finite fp16 rows add up to inf; row 2 holds an -inf of its own.
    big = 60000.0 if dtype == torch.float16 else 1.0
    indices = torch.tensor([[3, 0, 2, 0, 3]])
    values = torch.tensor([[big, 1.0], [float("nan"), 2.0], [-float("inf"), 3.0], [1.0, 4.0], [big, 5.0]], dtype=dtype)
    return torch.sparse_coo_tensor(indices, values, (5, 2), check_invariants=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_to_num_sparse_uncoalesced(dtype: torch.dtype) -> None:
    g = _uncoalesced(dtype)
    assert not g.is_coalesced()
    expected = torch.nan_to_num(g.to_dense(), nan=0.0, posinf=0.0, neginf=0.0)  # the gradient the optimizer sees
    assert nan_to_num_(g) is g  # in place: the same object as param.grad
    assert g.is_sparse and g.is_coalesced()
    assert torch.isfinite(g._values()).all()
    assert torch.equal(g.to_dense(), expected)
    with pytest.raises(RuntimeError, match="coalesced"):  # what the helper works around
        torch.nan_to_num_(_uncoalesced(dtype), nan=0.0, posinf=0.0, neginf=0.0)


def test_nan_to_num_sparse_coalesced_and_embedding_grad() -> None:
    g = _uncoalesced().coalesce()
    expected = torch.nan_to_num(g.to_dense(), nan=0.0, posinf=0.0, neginf=0.0)
    values = g._values()
    assert nan_to_num_(g) is g and g._values() is not None
    assert torch.equal(g.to_dense(), expected) and torch.isfinite(values).all()  # in place, values not copied

    emb = nn.Embedding(6, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse
    grad._values()[0, 0] = float("nan")
    nan_to_num_(grad)
    assert emb.weight.grad is grad and torch.isfinite(grad.to_dense()).all()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_nan_to_num_sparse_csr() -> None:
    g = torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]]).to_sparse_csr()
    nan_to_num_(g)
    assert torch.equal(g.to_dense(), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


# ------------------------------------------------------------------------------------------------------ regularizers
@pytest.mark.parametrize("cls", [L1, L2])
@pytest.mark.parametrize("scale", [1.0, "tensor"])
def test_regularizers_agree_on_both_paths(cls: type, scale: Any) -> None:
    def run() -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3).to(torch.bfloat16), nn.Linear(3, 2).double())
        reg = cls(0.1, include_bias=True)
        reg.bind(model)
        penalty = reg.penalty()
        reg.add_grad_(torch.tensor(3.0) if scale == "tensor" else scale)
        return penalty, [p.grad for p in model.parameters()]

    (p_fast, g_fast), (p_slow, g_slow) = both(run)
    assert_same(p_fast.detach(), p_slow.detach())
    for a, b in zip(g_fast, g_slow):
        assert_same(a, b)


# ---------------------------------------------------------------------------------------------------------- DTensor
@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    """A one-process gloo group (in-memory store, no port) and a one-device CPU mesh; torn down afterwards."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor  # noqa: F401  (public since torch 2.5)
    except ImportError as err:
        pytest.skip(f"no public DTensor API in this torch: {err}")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        destroy_process_group()


def _sharded(mesh: Any, t: torch.Tensor) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(t, mesh, [Shard(0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtensor_norms_stay_dtensors_of_the_whole_norm(mesh: Any, dtype: torch.dtype, counting: dict[str, int]) -> None:
    from torch.distributed.tensor import DTensor

    full = [t for t in tensors(dtype) if t.ndim > 0]
    dts = [_sharded(mesh, t) for t in full]
    acc = torch.float32
    fast, slow = both(lambda: foreach_norm(dts, 2.0, dtype=acc))  # torch 2.15: _foreach_norm(DTensor, dtype=) fails
    assert "_foreach_norm" not in counting  # DTensors never reach the private kernel
    for a, b, t in zip(fast, slow, full):
        assert isinstance(a, DTensor) and isinstance(b, DTensor)
        assert torch.equal(a.full_tensor(), b.full_tensor())
        assert torch.equal(a.full_tensor(), torch.linalg.vector_norm(t, 2.0, dtype=acc))


@pytest.mark.parametrize("private", [True, False])
def test_dtensor_in_place_updates_and_grouping(mesh: Any, private: bool) -> None:
    from torch.distributed.tensor import DTensor

    use_private_torch(private)
    full = tensors(torch.float16)[:2] + tensors(torch.float32)[:2]
    dts = [_sharded(mesh, t.clone()) for t in full]
    groups = group_by_device_and_dtype([dts], with_indices=True)
    assert sorted(str(k[1]) for k in groups) == ["torch.float16", "torch.float32"]
    assert sorted(i for _, (_, idx) in groups.items() for i in idx) == [0, 1, 2, 3]
    coef = torch.tensor(0.37)
    for (_, _), ([group], _) in groups.items():
        foreach_mul_(group, coef)
    others = [_sharded(mesh, torch.ones_like(t)) for t in full]
    foreach_add_(dts, others, alpha=0.5)
    for d, t in zip(dts, full):
        assert isinstance(d, DTensor)
        assert torch.equal(d.full_tensor(), (t.float() * coef).to(t.dtype).add(torch.ones_like(t), alpha=0.5))
    bad = full[2].clone()
    bad.view(-1)[0] = float("nan")
    bad_dt = _sharded(mesh, bad)
    assert nan_to_num_(bad_dt) is bad_dt
    assert isinstance(bad_dt, DTensor) and torch.isfinite(bad_dt.full_tensor()).all()
    foreach_zero_(others)
    assert all(isinstance(o, DTensor) and not o.full_tensor().any() for o in others)


@pytest.mark.parametrize("cls", [L1, L2])
def test_regularizer_on_dtensor_parameters(mesh: Any, cls: type) -> None:
    """The call that failed on torch 2.15: Regularizer.penalty -> foreach_norm(DTensors, dtype=fp32)."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    sharded = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    for p, q in zip(plain.parameters(), sharded.parameters()):
        q.data = p.detach().clone()
    for layer in sharded:
        assert isinstance(layer, nn.Linear)
        layer.weight = nn.Parameter(_sharded(mesh, layer.weight.detach()))
        layer.bias = nn.Parameter(_sharded(mesh, layer.bias.detach()))
    for private in (True, False):
        use_private_torch(private)
        ref, reg = cls(0.1, include_bias=True), cls(0.1, include_bias=True)
        ref.bind(plain)
        reg.bind(sharded)
        penalty = reg.penalty()
        assert isinstance(penalty, DTensor)
        torch.testing.assert_close(penalty.full_tensor(), ref.penalty(), rtol=1e-6, atol=0.0)
        for m in (plain, sharded):
            m.zero_grad(set_to_none=True)
        ref.add_grad_(2.0)
        reg.add_grad_(torch.tensor(2.0))
        for p, q in zip(plain.parameters(), sharded.parameters()):
            assert isinstance(q.grad, DTensor)
            torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-6, atol=0.0)
