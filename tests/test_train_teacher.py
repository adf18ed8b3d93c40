"""model.train.teacher: the export of a run (files, strict reload) and loading it back as a distillation teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.export import load_timm_backbone, plain_state_dict
from model.layers.vit import build_backbone
from model.ssl.config import SSLConfig
from model.ssl.distill_arch import teacher_modules
from model.ssl.meta_arch import SSLMetaArch
from model.train.job import TrainJob
from model.train.teacher import export_result, load_teacher
from test_meta_arch import G, tiny_cfg

EXPORT_FILES = {"backbone.pth", "backbone_timm.pth", "model.json", "heads.pth", "ssl_config.json"}


def make_job(tmp_path: Path, cfg: SSLConfig) -> TrainJob:
    return TrainJob(kind="pretrain", ssl=cfg.model_dump(mode="json"), files=["a.parquet"], rows=[4],
                    out_dir=str(tmp_path / "run"), export_extra={"dataset_fingerprint": "f00d"})


def randomised_teacher(cfg: SSLConfig) -> torch.nn.ModuleDict:
    """The EMA teacher of a tiny run, with every parameter moved off its initial value."""
    torch.manual_seed(0)
    teacher = SSLMetaArch(cfg).teacher
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher


def test_export_and_reload_as_teacher(tmp_path: Path) -> None:
    cfg = tiny_cfg(ibot={"separate_head": True, "head_n_prototypes": 24})
    job = make_job(tmp_path, cfg)
    teacher = randomised_teacher(cfg)
    paths = export_result(job, {name: m.state_dict() for name, m in teacher.items()})

    out = tmp_path / "run" / "export"
    assert {p.name for p in out.iterdir()} == EXPORT_FILES  # and no temporary files
    assert paths["export_dir"] == str(out) and paths["heads"] == str(out / "heads.pth")
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"] == "vit_test" and meta["embed_dim"] == 32 and meta["patch_size"] == 7
    assert meta["kind"] == "pretrain" and meta["steps"] == job.total_steps == 8 and meta["dataset_fingerprint"] == "f00d"
    assert meta["backbone_kwargs"]["drop_path_rate"] == 0.0
    assert json.loads((out / "ssl_config.json").read_text()) == job.ssl
    heads_file = torch.load(out / "heads.pth", weights_only=True)
    assert set(heads_file) == {"dino_head", "ibot_head"}

    backbone, heads, teacher_cfg = load_teacher(out)
    assert teacher_cfg == cfg
    assert not backbone.training
    x = torch.randn(3, 3, G, G, generator=torch.Generator().manual_seed(1))
    original = teacher["backbone"].eval()
    with torch.no_grad():
        want, got = original.forward_features(x), backbone.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            assert torch.equal(got[key], want[key]), key
        timm_out = load_timm_backbone(out)(x)  # the timm file holds the same network
    torch.testing.assert_close(timm_out, want["x_norm_clstoken"], rtol=1e-4, atol=1e-4)

    rebuilt = teacher_modules(teacher_cfg, backbone, heads)  # strict load of every head
    assert set(rebuilt.keys()) == {"backbone", "dino_head", "ibot_head"}
    for name in ("dino_head", "ibot_head"):
        sd = teacher[name].state_dict()
        assert all(torch.equal(v, rebuilt[name].state_dict()[k]) for k, v in sd.items()), name
        with torch.no_grad():
            assert torch.equal(rebuilt[name](want["x_norm_clstoken"]), teacher[name](want["x_norm_clstoken"]))


def test_load_teacher_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*lvd train"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no teacher"):
        load_teacher(None)


def test_load_teacher_official_layout_file_has_no_heads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    official = build_backbone("vit_test", patch_size=7, img_size=G).eval()  # dim 64 → arch "vit_test"
    path = tmp_path / "dinov2_vitt7_pretrain.pth"
    torch.save(plain_state_dict(official), path)
    backbone, heads, cfg = load_teacher(path)
    assert heads is None and cfg == SSLConfig()
    x = torch.randn(2, 3, G, G, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(backbone.forward_features(x)["x_norm_clstoken"], official.forward_features(x)["x_norm_clstoken"])
    with pytest.raises(ValueError, match="no teacher heads"):
        teacher_modules(cfg, backbone, heads)
