"""Teacher centring: EMA centre + softmax, Sinkhorn-Knopp; hand-computed cases and a real 2-worker gloo run."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from model.losses.centering import EMACenter, dist_active, sinkhorn_knopp


def test_no_process_group_in_test_process() -> None:
    assert not dist_active()


# ---------------------------------------------------------------- EMA centre


def test_ema_center_hand_computed() -> None:
    c = EMACenter(2, momentum=0.9)
    assert torch.equal(c.center, torch.zeros(1, 2))
    # centre 0: softmax([0, ln 3] / 1) = [1/4, 3/4]
    p = c.softmax_center(torch.tensor([[0.0, math.log(3.0)]]), teacher_temp=1.0)
    assert torch.allclose(p, torch.tensor([[0.25, 0.75]]), atol=1e-7)
    # batch mean of [[1, 3], [3, 5]] is [2, 4]; centre = 0.9 * 0 + 0.1 * [2, 4] = [0.2, 0.4]
    c.update_center(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
    assert torch.allclose(c.center, torch.tensor([[0.2, 0.4]]), atol=1e-7)
    # (x - centre) / T with x = [0.2, 0.4 + T ln 2], T = 0.04: [0, ln 2] -> softmax [1/3, 2/3]
    T = 0.04
    p = c.softmax_center(torch.tensor([[0.2, 0.4 + T * math.log(2.0)]]), teacher_temp=T)
    assert torch.allclose(p, torch.tensor([[1 / 3, 2 / 3]]), atol=1e-5)
    # second update with mean [1.2, 0.4]: 0.9 * [0.2, 0.4] + 0.1 * [1.2, 0.4] = [0.3, 0.4]
    c.update_center(torch.tensor([[1.2, 0.4]]), async_op=False)
    assert torch.allclose(c.center, torch.tensor([[0.3, 0.4]]), atol=1e-7)


def test_ema_center_flattens_leading_dims_and_saves_pending_update() -> None:
    c = EMACenter(3, momentum=0.5)
    x = torch.arange(12.0).reshape(2, 2, 3)  # mean over the 4 rows: [4.5, 5.5, 6.5]
    c.update_center(x)  # no process group: applied at once
    assert torch.allclose(c.center, 0.5 * torch.tensor([[4.5, 5.5, 6.5]]))
    c = EMACenter(3, momentum=0.5)
    c._pending, c._handle = torch.cat([x.reshape(4, 3).sum(0, keepdim=True), torch.tensor([[4.0]])], 1), None
    assert torch.equal(c.center, torch.zeros(1, 3))  # an update still in flight (as with async all-reduce)
    sd = c.state_dict()  # the pending update is folded in before saving
    assert torch.allclose(sd["center"], 0.5 * torch.tensor([[4.5, 5.5, 6.5]]))
    probs = c.softmax_center(torch.randn(2, 5, 3), teacher_temp=0.1)
    assert probs.shape == (2, 5, 3) and torch.allclose(probs.sum(-1), torch.ones(2, 5))


# ---------------------------------------------------------------- Sinkhorn-Knopp


def _logits_for(q: list[list[float]], temp: float) -> torch.Tensor:
    """Logits whose exp(logits / temp) is the matrix q (samples x prototypes)."""
    return temp * torch.tensor(q).log()


def test_sinkhorn_symmetric_2x2_is_a_fixed_point() -> None:
    # exp(L/T) = [[1, 2], [2, 1]]: rows and columns already balanced, so every iteration keeps
    # Q = [[1, 2], [2, 1]] / 6; times B = 2 -> [[1/3, 2/3], [2/3, 1/3]]
    out = sinkhorn_knopp(_logits_for([[1, 2], [2, 1]], 0.07), teacher_temp=0.07)
    assert torch.allclose(out, torch.tensor([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]), atol=1e-6)


@pytest.mark.parametrize(
    "n_iterations, expected",
    [
        # exp(L/T) = [[1,1],[1,1],[1,4]] (3 samples, K = 2). Q = K x B = [[1,1,1],[1,1,4]] / 9.
        # it 1: rows / row sums (3/9, 6/9) / K -> [[1,1,1]/6, [1,1,4]/12]; column sums [1/4, 1/4, 1/2]
        #       -> columns [2/3, 1/3], [2/3, 1/3], [1/3, 2/3] (then / B, and * B at the end)
        (1, [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [1 / 3, 2 / 3]]),
        # it 2: Q = [[2,2,1],[1,1,2]] / 9, row sums 5/9, 4/9 -> [[1/5,1/5,1/10],[1/8,1/8,1/4]];
        #       column sums 13/40, 13/40, 14/40 -> [8/13, 5/13] twice, [2/7, 5/7]
        (2, [[8 / 13, 5 / 13], [8 / 13, 5 / 13], [2 / 7, 5 / 7]]),
        # it 3: Q = [[8/39,8/39,2/21],[5/39,5/39,5/21]], row sums 46/91, 45/91
        #       -> [[14/69,14/69,13/138],[7/54,7/54,13/54]]; column 1: 14/69 : 7/54 = 36 : 23,
        #       column 3: 13/138 : 13/54 = 9 : 23 -> [36/59, 23/59] twice, [9/32, 23/32]
        (3, [[36 / 59, 23 / 59], [36 / 59, 23 / 59], [9 / 32, 23 / 32]]),
    ],
)
def test_sinkhorn_3x2_hand_computed(n_iterations: int, expected: list[list[float]]) -> None:
    T = 0.5
    out = sinkhorn_knopp(_logits_for([[1, 1], [1, 1], [1, 4]], T), teacher_temp=T, n_iterations=n_iterations)
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)


def test_sinkhorn_zero_iterations_is_global_softmax_times_b() -> None:
    # exp values [[1, 3], [2, 2]] sum to 8; times B = 2 -> [[1/4, 3/4], [1/2, 1/2]]
    out = sinkhorn_knopp(_logits_for([[1, 3], [2, 2]], 1.0), teacher_temp=1.0, n_iterations=0)
    assert torch.allclose(out, torch.tensor([[0.25, 0.75], [0.5, 0.5]]), atol=1e-6)


def _reference_official(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The official single-process iteration, in float64 (no max shift)."""
    Q = torch.exp(teacher_output.double() / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_properties_and_official_equivalence() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 16, generator=g)
    out = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    assert torch.allclose(out.sum(dim=1), torch.ones(32), atol=1e-5)  # rows (samples) are distributions
    assert (out >= 0).all()
    assert torch.allclose(out.double(), _reference_official(logits, 0.1), atol=1e-5)
    # after more iterations the prototypes are also used equally: column masses -> B / K
    many = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    assert torch.allclose(many.sum(dim=0), torch.full((16,), 32 / 16), atol=1e-3)
    # logits in [3, 4] at T = 0.04: exp(100) overflows float32 in the official code; the per-prototype
    # max shift (cancelled by the first row normalisation) keeps the exact answer
    large = 3 + torch.rand(32, 16, generator=g)
    assert not torch.isfinite(torch.exp(large / 0.04)).all()
    big = sinkhorn_knopp(large, teacher_temp=0.04)
    assert torch.allclose(big.double(), _reference_official(large, 0.04), atol=1e-5)
    # leading dims are kept; bf16 inputs give float32 targets
    out3 = sinkhorn_knopp(logits.reshape(4, 8, 16).bfloat16(), teacher_temp=0.1)
    assert out3.shape == (4, 8, 16) and out3.dtype == torch.float32


# ---------------------------------------------------------------- 2 gloo workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)


# equal halves (4 + 4 rows) and unequal parts (3 + 5 rows), which needs the all-reduced B
SPLITS = {"equal": (0, 4, 8), "unequal": (0, 3, 8)}


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert dist_active()
        x1, x2 = _batches()
        res = {}
        for name, cuts in SPLITS.items():
            lo, hi = cuts[rank], cuts[rank + 1]
            res[f"sk_{name}"] = sinkhorn_knopp(x1[lo:hi], teacher_temp=0.07)
            c = EMACenter(5, momentum=0.9)
            c.update_center(x1[lo:hi])  # async all-reduce, applied lazily
            probs = c.softmax_center(x2[lo:hi], teacher_temp=0.07)  # waits, then uses the new centre
            c.update_center(x2[lo:hi], async_op=False)
            res[f"center_{name}"] = c.center.clone()
            res[f"probs_{name}"] = probs
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_two_gloo_workers_match_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    x1, x2 = _batches()
    full_sk = sinkhorn_knopp(x1, teacher_temp=0.07)
    ref = EMACenter(5, momentum=0.9)
    ref.update_center(x1)
    ref_probs = ref.softmax_center(x2, teacher_temp=0.07)
    ref.update_center(x2)
    ref.apply_center_update()
    for name, cuts in SPLITS.items():
        # Sinkhorn-Knopp on the parts, concatenated, equals Sinkhorn-Knopp on the whole batch
        joined = torch.cat([r0[f"sk_{name}"], r1[f"sk_{name}"]])
        assert joined.shape == full_sk.shape
        assert torch.allclose(joined, full_sk, atol=1e-6), name
        # the EMA centre is identical on both workers and equals the single-process centre
        assert torch.equal(r0[f"center_{name}"], r1[f"center_{name}"])
        assert torch.allclose(r0[f"center_{name}"], ref.center, atol=1e-6), name
        probs = torch.cat([r0[f"probs_{name}"], r1[f"probs_{name}"]])
        assert torch.allclose(probs, ref_probs, atol=1e-6), name
    # sanity: Sinkhorn-Knopp on one part alone differs from the global answer
    assert not torch.allclose(sinkhorn_knopp(x1[:4], teacher_temp=0.07), full_sk[:4], atol=1e-3)
