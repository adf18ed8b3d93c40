"""model.train.fsdp: precision policies, and FSDP2 on 2 gloo ranks = data parallel on one process."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from model.ssl.meta_arch import SSLMetaArch
from model.ssl.schedules import Schedules, apply_optim_scheduler
from model.train.fsdp import is_sharded, local_numel, mixed_precision_policy
from test_meta_arch import make_batch, tiny_cfg

STEP = 3  # past the warm-up start (lr > 0) and the last-layer freeze, momentum < 1


def test_mixed_precision_policy() -> None:
    auto_cpu = mixed_precision_policy("auto", "cpu")
    assert auto_cpu.param_dtype is None and auto_cpu.reduce_dtype is None  # fp32: no casting
    auto_cuda = mixed_precision_policy("auto", "cuda")
    assert auto_cuda.param_dtype == torch.bfloat16 and auto_cuda.reduce_dtype == torch.float32
    bf16_cpu = mixed_precision_policy("bf16", "cpu")  # explicit bf16 is honoured on any device
    assert bf16_cpu.param_dtype == torch.bfloat16 and bf16_cpu.reduce_dtype == torch.float32
    fp32_cuda = mixed_precision_policy("fp32", "cuda")
    assert fp32_cuda.param_dtype is None and fp32_cuda.reduce_dtype is None
    with pytest.raises(ValueError, match="unknown mixed precision 'fp16'"):
        mixed_precision_policy("fp16", "cuda")  # type: ignore[arg-type]


def _cfg():
    return tiny_cfg(student={"drop_path_rate": 0.0})  # no per-rank randomness in the step


def _plain(sd: dict) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in sd.items()}


def _fsdp_train_step(rank: int, world_size: int) -> dict:
    from model.train.fsdp import device_mesh, shard_student_teacher

    torch.manual_seed(0)
    arch = SSLMetaArch(_cfg())
    before = {"student": is_sharded(arch.student), "teacher": is_sharded(arch.teacher),
              "numel": local_numel(arch.student)}
    shard_student_teacher(arch.student, arch.teacher, device_mesh(world_size, "cpu"),
                          mixed_precision_policy("auto", "cpu"))
    arch.train()
    opt = arch.make_optimizer()
    losses = arch.train_step(make_batch(seed=rank), opt, Schedules.from_config(arch.cfg).at(STEP))
    return {"before": before, "sharded": {"student": is_sharded(arch.student), "teacher": is_sharded(arch.teacher)},
            "numel": local_numel(arch.student), "teacher_numel": local_numel(arch.teacher), "losses": losses,
            "student": _plain(arch.student.state_dict()), "teacher": _plain(arch.teacher.state_dict())}


def _data_parallel_reference(batches: list[dict]) -> tuple[SSLMetaArch, SSLMetaArch]:
    """One unsharded step whose gradients are the mean of the per-batch gradients (one replica per batch)."""
    torch.manual_seed(0)
    arch = SSLMetaArch(_cfg())
    arch.train()
    init = copy.deepcopy(arch)
    replicas = [arch] + [copy.deepcopy(arch) for _ in batches[1:]]
    opt = arch.make_optimizer()
    values = Schedules.from_config(arch.cfg).at(STEP)
    apply_optim_scheduler(opt, values)
    opt.zero_grad(set_to_none=True)
    for replica, batch in zip(replicas, batches):
        replica.forward_backward(batch, teacher_temp=values.teacher_temp)
    for p, *others in zip(arch.student.parameters(), *(r.student.parameters() for r in replicas[1:])):
        if p.grad is not None:
            p.grad = torch.stack([p.grad] + [o.grad for o in others]).mean(0)
    arch.cancel_last_layer_gradients(values.iteration)
    arch.clip_gradients(arch.cfg.optim.clip_grad)
    opt.step()
    arch.update_teacher(values.momentum)
    return arch, init


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp_two_ranks_equals_data_parallel(tmp_path: Path) -> None:
    r0, r1 = run_distributed(_fsdp_train_step, tmp_path)
    total = r0["before"]["numel"]
    assert r0["before"] == r1["before"] == {"student": False, "teacher": False, "numel": total}
    assert r0["sharded"] == r1["sharded"] == {"student": True, "teacher": True}
    # each rank holds about half of the parameters (dim-0 shards: uneven for odd first dimensions)
    assert r0["numel"] + r1["numel"] == total
    assert all(0.45 * total <= r["numel"] <= 0.55 * total for r in (r0, r1))
    assert r0["teacher_numel"] == r0["numel"] and r1["teacher_numel"] == r1["numel"]  # same layout as the student
    assert r0["losses"] != r1["losses"]  # the ranks did see different batches

    for name in ("student", "teacher"):  # every rank sees the same full weights
        assert _max_diff(r0[name], r1[name]) == 0.0, name

    ref, init = _data_parallel_reference([make_batch(seed=0), make_batch(seed=1)])
    assert _max_diff(r0["student"], ref.student.state_dict()) < 1e-6
    assert _max_diff(r0["teacher"], ref.teacher.state_dict()) < 1e-6
    # the comparison can fail: the step moved the weights, and a one-batch step lands elsewhere
    assert _max_diff(init.student.state_dict(), ref.student.state_dict()) > 1e-4
    one_batch, _ = _data_parallel_reference([make_batch(seed=0)])
    assert _max_diff(r0["student"], one_batch.student.state_dict()) > 1e-4
