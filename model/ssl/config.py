"""Training hyper-parameters of DINOv2 self-supervised pretraining (pydantic, unknown keys are errors).

Defaults follow the official ``ssl_default_config.yaml`` + the ViT/14 configs (see
DESIGN.md "Model conventions"). Sections mirror the official config: ``student``,
``teacher``, ``dino``, ``ibot``, ``optim``, ``crops``, ``train``, ``compute``.

Gaussian-blur probabilities (``crops.blur_probs``): the documented values
(global 1: 1.0, global 2: 0.1, locals: 0.5). The official code inverts them (global crop 1
is never blurred, global 2 is blurred with p=0.9); we follow the paper/docs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudentConfig(_Strict):
    arch: str = Field("vit_large", description="backbone factory name in model.layers.vit (vit_small/base/large/giant2/...)")
    patch_size: int = 14
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layerscale: float | None = Field(1.0e-5, description="LayerScale init; None = no LayerScale")
    ffn_layer: str = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    backbone_kwargs: dict = Field(default_factory=dict, description="extra keyword arguments for the backbone factory")


class TeacherConfig(_Strict):
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


class DinoConfig(_Strict):
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1
    student_temp: float = 0.1
    center_momentum: float = 0.9


class IbotConfig(_Strict):
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    student_temp: float = 0.1
    center_momentum: float = 0.9


class OptimConfig(_Strict):
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = Field(0.4, description="0.2 for ViT-L/g in the paper's configs")
    base_lr: float = Field(0.004, description="learning rate for a batch size of 1024 (before scaling_rule)")
    lr: float | None = Field(None, description="if set, used as is (no scaling rule)")
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


class CropsConfig(_Strict):
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crops_size: int = 224
    local_crops_size: int = 96
    blur_probs: tuple[float, float, float] = Field(
        (1.0, 0.1, 0.5),
        description="Gaussian-blur probabilities (global 1, global 2, locals): the documented values; "
        "the official code inverts them to (0.0, 0.9, 0.5)",
    )
    solarize_prob: float = Field(0.2, description="solarisation probability, second global crop only")


class TrainConfig(_Strict):
    batch_size_per_gpu: int = 64
    official_epoch_length: int = Field(1250, description="iterations per 'epoch' for every schedule")
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    seed: int = 0
    num_workers: int = 10


class ComputeConfig(_Strict):
    autocast_dtype: Literal["bf16", "fp32"] = Field("bf16", description="autocast dtype of the forward passes (bf16 needs no grad scaler)")
    cpu_student_attention: Literal["math", "default"] = Field(
        "math",
        description="SDPA backend of the student pass on CPU: 'math' (explicit matmul + softmax) or PyTorch's default "
        "(flash kernel). The CPU flash kernel's backward is ~6x slower than the math path for short (local-crop) "
        "sequences in bf16; the teacher (no backward) always uses the default.",
    )
    fused_optimizer: bool = Field(True, description="fused AdamW kernel (CPU and CUDA)")


class SSLConfig(_Strict):
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    dino: DinoConfig = DinoConfig()
    ibot: IbotConfig = IbotConfig()
    optim: OptimConfig = OptimConfig()
    crops: CropsConfig = CropsConfig()
    train: TrainConfig = TrainConfig()
    compute: ComputeConfig = ComputeConfig()

    @model_validator(mode="after")
    def _check(self) -> "SSLConfig":
        if self.optim.warmup_epochs > self.optim.epochs:
            raise ValueError("optim.warmup_epochs must be <= optim.epochs")
        if self.optim.freeze_last_layer_epochs > self.optim.epochs:
            raise ValueError("optim.freeze_last_layer_epochs must be <= optim.epochs")
        lo, hi = self.ibot.mask_ratio_min_max
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("ibot.mask_ratio_min_max must satisfy 0 <= min <= max <= 1")
        return self

    @property
    def freeze_last_layer_iters(self) -> int:
        return self.optim.freeze_last_layer_epochs * self.train.official_epoch_length

    def with_updates(self, **sections: dict) -> "SSLConfig":
        """A copy with some fields of some sections replaced, validated: ``cfg.with_updates(optim={"epochs": 2})``."""
        data = self.model_dump()
        for name, values in sections.items():
            if name not in data:
                raise ValueError(f"unknown config section {name!r}")
            if isinstance(data[name], dict):
                data[name].update(values)
            else:
                data[name] = values
        return SSLConfig.model_validate(data)
