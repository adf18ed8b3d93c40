"""model.train.checkpoint: DCP save/load (one process and 2-rank FSDP2), atomic publish, latest, pruning, partials."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from distributed import run_distributed
from model.ssl.meta_arch import SSLMetaArch
from model.ssl.schedules import Schedules
from model.train import checkpoint as ckpt
from test_meta_arch import make_batch, tiny_cfg

# DCP without a process group says it assumes one process: that is what these tests mean
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def trained_arch(seed: int = 0) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    """A tiny SSLMetaArch after one step: AdamW state, moved weights and a non-zero DINO centre."""
    torch.manual_seed(seed)
    arch = SSLMetaArch(tiny_cfg())
    opt = arch.make_optimizer()
    arch.train_step(make_batch(seed=seed), opt, Schedules.from_config(arch.cfg).at(3))
    return arch, opt


def linear_with_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


# ------------------------------------------------------------------ one process, no process group
def test_save_latest_load_round_trip(tmp_path: Path) -> None:
    arch, opt = trained_arch(seed=0)
    state = {"schedules": {"lr": [0.0, 1.0]}, "data_position": {"seed": 0, "next_step": 4}}
    path = ckpt.save_checkpoint(tmp_path, 4, arch, [opt], state, keep=2)

    assert path == tmp_path / "step-0000004"
    assert (tmp_path / "latest").read_text() == "step-0000004\n"
    assert (path / ".metadata").is_file() and (path / "state.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert ckpt.read_state(path) == {**state, "step": 4}

    fresh, fresh_opt = trained_arch(seed=1)  # different weights, centre and AdamW moments
    before = fresh.state_dict()
    assert not torch.equal(before["student.backbone.cls_token"], arch.state_dict()["student.backbone.cls_token"])
    assert ckpt.load_checkpoint(path, fresh, [fresh_opt]) == {**state, "step": 4}

    want, got = arch.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    assert "dino_loss.centering.center" in want and want["dino_loss.centering.center"].abs().sum() > 0  # buffers are checkpointed
    for k in want:
        assert torch.equal(want[k], got[k]), k
    o_want, o_got = opt.state_dict(), fresh_opt.state_dict()
    assert o_want["state"].keys() == o_got["state"].keys() and len(o_want["state"]) == sum(
        1 for p in arch.student.parameters() if p.requires_grad)
    for i, s in o_want["state"].items():
        assert s.keys() == o_got["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name in s:
            assert torch.equal(s[name], o_got["state"][i][name]), (i, name)
    assert [g["lr"] for g in o_want["param_groups"]] == [g["lr"] for g in o_got["param_groups"]]

    # exact resume: the next step from the loaded state equals the next step of the saved run
    values = Schedules.from_config(arch.cfg).at(4)
    for model, optimizer in ((arch, opt), (fresh, fresh_opt)):
        torch.manual_seed(123)
        model.train_step(make_batch(seed=7), optimizer, values)
    for k, v in arch.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    model, opt = linear_with_optimizer()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, [opt], {}, keep=2)
    assert step_dirs(tmp_path) == ["step-0000003", "step-0000004"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000004"
    ckpt.save_checkpoint(tmp_path, 5, model, [opt], {}, keep=1)
    assert step_dirs(tmp_path) == ["step-0000005"]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    model, opt = linear_with_optimizer()
    ckpt.save_checkpoint(tmp_path, 3, model, [opt], {"run": 1})
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save_checkpoint(tmp_path, 3, model, [opt], {"run": 2})
    assert step_dirs(tmp_path) == ["step-0000003"]
    fresh, fresh_opt = linear_with_optimizer()
    assert ckpt.load_checkpoint(tmp_path / "step-0000003", fresh, [fresh_opt])["run"] == 2
    assert torch.equal(fresh.weight, model.weight)


def test_tmp_dir_ignored_then_removed_by_clean_partial(tmp_path: Path) -> None:
    model, opt = linear_with_optimizer()
    ckpt.save_checkpoint(tmp_path, 2, model, [opt], {})
    # a save killed before its rename: a newer step, even with every file present, but still .tmp-
    partial = tmp_path / ".tmp-step-0000009-deadbeef"
    shutil.copytree(tmp_path / "step-0000002", partial)
    stray = tmp_path / ".tmp-latest-0badc0de"  # a pointer write killed before its rename
    stray.write_text("step-0000009\n")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000002"
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000002"

    assert ckpt.clean_partial(tmp_path) == 2
    assert not partial.exists() and not stray.exists()
    assert step_dirs(tmp_path) == ["step-0000002"]
    assert ckpt.clean_partial(tmp_path) == 0
    assert ckpt.clean_partial(tmp_path / "missing") == 0


def test_lost_latest_falls_back_to_highest_complete_step(tmp_path: Path) -> None:
    model, opt = linear_with_optimizer()
    for step in (5, 20, 100):  # zero-padded names: 100 sorts after 20
        ckpt.save_checkpoint(tmp_path, step, model, [opt], {}, keep=3)
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000100"
    (tmp_path / "latest").write_text("step-0000050\n")  # points at a checkpoint that is gone
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000100"


def test_incomplete_step_dir_never_chosen(tmp_path: Path) -> None:
    model, opt = linear_with_optimizer()
    ckpt.save_checkpoint(tmp_path, 2, model, [opt], {})
    no_state = tmp_path / "step-0000008"
    shutil.copytree(tmp_path / "step-0000002", no_state)
    (no_state / "state.json").unlink()
    no_metadata = tmp_path / "step-0000009"
    shutil.copytree(tmp_path / "step-0000002", no_metadata)
    (no_metadata / ".metadata").unlink()
    (tmp_path / "step-0000010").write_text("not a directory")

    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000002"
    for name in ("step-0000008", "step-0000009", "step-0000010"):
        (tmp_path / "latest").write_text(name + "\n")
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000002"
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-0000002"


def test_no_checkpoint(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


# ------------------------------------------------------------------ 2 ranks, FSDP2
def _sharded_arch(seed: int, world_size: int) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    from model.train.fsdp import device_mesh, mixed_precision_policy, shard_module

    torch.manual_seed(seed)
    arch = SSLMetaArch(tiny_cfg(student={"drop_path_rate": 0.0}))
    mesh = device_mesh(world_size, "cpu")
    for group in (arch.student, arch.teacher):
        for name in list(group.keys()):
            shard_module(group[name], mesh, mixed_precision_policy("fp32", "cpu"))
    arch.train()
    return arch, arch.make_optimizer()


def _full_state(arch: SSLMetaArch, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return get_state_dict(arch, [opt], options=StateDictOptions(full_state_dict=True))  # every rank gets full tensors


def _save_then_load_on_two_ranks(rank: int, world_size: int, root: str) -> dict:
    arch, opt = _sharded_arch(0, world_size)
    arch.train_step(make_batch(seed=rank), opt, Schedules.from_config(arch.cfg).at(3))
    saved = _full_state(arch, opt)
    local = arch.student["backbone"].cls_token.to_local().numel()
    ckpt.save_checkpoint(root, 4, arch, [opt], {"world_size": world_size}, keep=2)
    fresh, fresh_opt = _sharded_arch(1, world_size)
    differs_before = not torch.equal(_full_state(fresh, fresh_opt)[0]["student.backbone.cls_token"],
                                     saved[0]["student.backbone.cls_token"])
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), fresh, [fresh_opt])
    return {"saved": saved, "loaded": _full_state(fresh, fresh_opt), "state": state, "differs_before": differs_before,
            "cls_local": local}


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_fsdp_two_ranks_save_load_and_reshard_to_one_process(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    r0, r1 = run_distributed(_save_then_load_on_two_ranks, tmp_path / "out", str(root))
    path = root / "step-0000004"
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"]
    assert r0["state"] == r1["state"] == {"world_size": 2, "step": 4}
    assert r0["differs_before"] and r1["differs_before"]
    assert r0["cls_local"] + r1["cls_local"] == 32 and r0["cls_local"] > 0  # the tensors really were sharded
    model_sd, optim_sd = r0["saved"]
    assert "dino_loss.centering.center" in model_sd and optim_sd["state"]
    for r in (r0, r1):  # 2 ranks → 2 ranks: identical full tensors
        _assert_same(r["saved"], r0["saved"], "saved")
        _assert_same(r["loaded"], r0["saved"], "loaded")

    # 2 ranks → one unsharded process (no process group): DCP reshards on load
    torch.manual_seed(5)
    single = SSLMetaArch(tiny_cfg(student={"drop_path_rate": 0.0}))
    single_opt = single.make_optimizer()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root), single, [single_opt])["step"] == 4
    got_model, got_optim = get_state_dict(single, [single_opt])
    _assert_same(got_model, model_sd, "model")
    _assert_same(got_optim["state"], optim_sd["state"], "optim")
