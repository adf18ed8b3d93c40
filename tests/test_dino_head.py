"""DINOHead: shapes, official init, weight-normalised prototypes, state-dict keys and round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.layers.dino_head import DINOHead, WeightNormLinear


def small_head(**kw) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8, **kw)


def test_shapes_and_state_dict_keys() -> None:
    head = small_head()
    assert head(torch.randn(5, 16)).shape == (5, 10)
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 10)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (32, 16), "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
        "mlp.4.weight": (8, 32), "mlp.4.bias": (8,),
        "last_layer.weight_g": (10, 1), "last_layer.weight_v": (10, 8),
    }
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU)


def test_default_sizes_match_official() -> None:
    head = DINOHead(in_dim=4, out_dim=6)  # hidden 2048, bottleneck 256
    assert head.mlp[0].out_features == 2048 and head.mlp[4].out_features == 256
    assert head.last_layer.weight_v.shape == (6, 256)


def test_bn_and_single_layer_variants() -> None:
    bn = small_head(use_bn=True)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    one = small_head(nlayers=1, mlp_bias=False)
    assert set(one.state_dict()) == {"mlp.weight", "last_layer.weight_g", "last_layer.weight_v"}
    assert one(torch.randn(3, 16)).shape == (3, 10)


def test_official_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=64, hidden_dim=512, bottleneck_dim=256)
    for i in (0, 2, 4):
        w, b = head.mlp[i].weight, head.mlp[i].bias
        assert torch.all(b == 0)
        # trunc_normal_(std=.02) truncates at |x| < 2 (absolute, as timm/official): ~100 sigma, so std ~= .02
        assert abs(w.std().item() - 0.02) < 0.001
        assert w.abs().max() <= 2.0
    assert torch.all(head.last_layer.weight_g == 1)
    bound = 1 / math.sqrt(256)  # nn.Linear default init of the prototypes
    assert head.last_layer.weight_v.abs().max() <= bound


def test_prototypes_are_unit_vectors_and_logits_are_cosines() -> None:
    head = small_head()
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-6)
    x = torch.randn(7, 16)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ w.t(), atol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-6


def test_g_is_fixed_by_default_and_trainable_on_request() -> None:
    fixed = small_head()
    names = {n for n, _ in fixed.named_parameters()}
    assert "last_layer.weight_g" not in names and "last_layer.weight_v" in names
    assert "last_layer.weight_g" in dict(fixed.named_buffers())
    trainable = small_head(trainable_g=True)
    assert "last_layer.weight_g" in {n for n, _ in trainable.named_parameters()}
    # both variants share keys, so their checkpoints are interchangeable
    trainable.load_state_dict(fixed.state_dict(), strict=True)


def test_matches_torch_weight_norm_and_loads_its_state_dict() -> None:
    head = small_head(trainable_g=True)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(8, 10, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(4, 8)
    assert torch.allclose(head.last_layer(x), ref(x), atol=1e-6)
    fresh = WeightNormLinear(8, 10, trainable_g=True)
    fresh.load_state_dict(ref.state_dict(), strict=True)  # parametrizations.weight.original0/1 keys
    assert torch.allclose(fresh(x), ref(x), atol=1e-6)


def test_state_dict_round_trip_and_gradients(tmp_path) -> None:
    head = small_head()
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    other = DINOHead(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    other.load_state_dict(torch.load(path), strict=True)
    x = torch.randn(3, 16)
    assert torch.equal(head(x), other(x))
    other(x).sum().backward()
    assert other.last_layer.weight_v.grad is not None and other.mlp[0].weight.grad is not None
    # the gradient of a weight-normalised row is orthogonal to that row
    v, g = other.last_layer.weight_v, other.last_layer.weight_v.grad
    assert torch.allclose((v * g).sum(dim=1), torch.zeros(10), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_forward(dtype: torch.dtype) -> None:
    head = small_head()
    with torch.autocast("cpu", dtype=dtype):
        out = head(torch.randn(4, 16))
    assert out.shape == (4, 10) and torch.isfinite(out.float()).all()


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for trainable_g in (False, True):
            head = small_head(trainable_g=trainable_g)
            fully_shard(head)
            assert type(head.last_layer.weight_v).__name__ == "DTensor"
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))
            y = head(x)
            y.square().sum().backward()
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            grad_v = head.last_layer.weight_v.grad.full_tensor()
            results[trainable_g] = {"x": x, "y": y.detach(), "grad_v": grad_v, "sd": get_model_state_dict(head, options=opts)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_fsdp2_fully_shard_forward_backward_and_full_state_dict(tmp_path) -> None:
    """Under FSDP2 (2 gloo workers, DTensor params) the head computes what the plain head computes."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for trainable_g in (False, True):
        ref = small_head(trainable_g=trainable_g)
        ref.load_state_dict(per_rank[0][trainable_g]["sd"], strict=True)  # full state dict, official keys
        for name, value in small_head(trainable_g=trainable_g).state_dict().items():
            assert torch.equal(per_rank[0][trainable_g]["sd"][name], value), name
        xs = [per_rank[r][trainable_g]["x"] for r in range(2)]
        for r in range(2):
            assert torch.allclose(per_rank[r][trainable_g]["y"], ref(xs[r]), atol=1e-6)
        # FSDP2 reduce-scatters the mean gradient over workers
        ref(torch.cat(xs)).square().sum().div(2).backward()
        assert torch.allclose(per_rank[0][trainable_g]["grad_v"], ref.last_layer.weight_v.grad, atol=1e-5)
