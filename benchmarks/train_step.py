"""Images/s of one full DINOv2 student+teacher training step: ours vs lightly's DINOv2 building blocks.

    .venv/bin/python benchmarks/train_step.py [--batch 8] [--steps 4] [--warmup 2] [--rounds 2]
        [--arch vit_small] [--patch 16] [--dtype bf16|fp32] [--drop-path 0.3] [--no-lightly]

One step = teacher forward on the 2 global crops (no grad) + student forward on 2 global (224 px,
iBOT-masked) and 8 local (96 px) crops + DINO / iBOT / KoLeo losses + backward + gradient
clipping (3.0) + AdamW step + EMA teacher update. Both sides use the same config, which is the
DINOv2 default (``ssl_default_config.yaml``) at ViT-S size:

- backbone ViT-S/16 (dim 384, 12 blocks, 6 heads, MLP ×4, LayerScale 1e-5), student stochastic
  depth 0.3 (uniform), teacher none. /16 rather than /14 because 96 px local crops are not a
  multiple of 14 (timm refuses them) and the official default config is /16 with 224/96 crops.
- DINO head 65,536 prototypes, hidden 2048, bottleneck 256, shared with iBOT (official default);
  iBOT masks on half of the global crops, ratio 0.1-0.5; KoLeo 0.1; teacher temp 0.04.
- bf16 autocast around the forward passes (both sides), fp32 weights and optimizer.

Ours: ``model.ssl.meta_arch.SSLMetaArch.train_step`` (one packed student pass over global+local
crops with block-diagonal attention, subset stochastic depth, one head call, foreach EMA).
Lightly (``lightly==LIGHTLY_VERSION``, installed on first use into ``benchmarks/.venv-lightly``
whose ``site-packages`` sees this project's venv through a ``.pth`` file, so it runs on the very
same torch / torchvision / timm files): ``MaskedVisionTransformerTIMM`` over timm's
``vit_small_patch16_224``, ``DINOv2ProjectionHead``, ``DINOLoss``, ``IBOTPatchLoss``,
``KoLeoLoss``, ``update_momentum`` — the step of lightly's ``examples/pytorch/dinov2.py``.

Inputs are random crops and masks made once before timing (data loading is not measured). Each
implementation runs in its own subprocess, one after the other, ``--rounds`` times alternately;
the best round (median step time within a round) is reported. Prints both figures and the ratio
and writes ``benchmarks/out/train_step.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
OURS_PY = REPO / ".venv" / "bin" / "python"
LIGHTLY_VENV = BENCH_DIR / ".venv-lightly"
LIGHTLY_VERSION = "1.6.0"  # what pip gave on this machine when the benchmark was written
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")

N_GLOBAL, GLOBAL_SIZE, LOCAL_SIZE = 2, 224, 96
DIMS = {"vit_small": (384, 12, 6), "vit_test": (64, 2, 2), "vit_base": (768, 12, 12)}


# ----------------------------------------------------------------------------- shared inputs
def make_inputs(batch: int, n_local: int, patch: int, seed: int = 0):
    """Random crops + DINOv2-style block masks, identical for both implementations."""
    import random

    import torch

    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(N_GLOBAL * batch, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=g)
    local_crops = torch.randn(n_local * batch, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g)
    side = GLOBAL_SIZE // patch
    # the official collate's masking (half of the global crops, ratio 0.1-0.5), written out here so
    # the lightly subprocess does not need this project's code
    rng = random.Random(seed)
    B = N_GLOBAL * batch
    n_masked_imgs = int(B * 0.5)
    probs = torch.linspace(0.1, 0.5, n_masked_imgs + 1)
    masks = []
    for i in range(B):
        m = torch.zeros(side, side, dtype=torch.bool)
        if i < n_masked_imgs:
            target = int(side * side * rng.uniform(float(probs[i]), float(probs[i + 1])))
            while int(m.sum()) < target:  # random rectangles until the target count is reached
                h, w = rng.randint(1, side // 2), rng.randint(1, side // 2)
                top, left = rng.randint(0, side - h), rng.randint(0, side - w)
                m[top : top + h, left : left + w] = True
        masks.append(m)
    rng.shuffle(masks)
    return global_crops, local_crops, torch.stack(masks)


# ----------------------------------------------------------------------------- ours
def build_ours(args):
    import torch

    from model.ssl.config import SSLConfig
    from model.ssl.meta_arch import SSLMetaArch
    from model.ssl.schedules import ScheduleValues

    dim, depth, heads = DIMS[args.arch]
    cfg = SSLConfig().with_updates(
        student={"arch": "vit_small", "patch_size": args.patch, "drop_path_rate": args.drop_path, "drop_path_uniform": True,
                 "layerscale": 1e-5, "backbone_kwargs": {"embed_dim": dim, "depth": depth, "num_heads": heads}},
        crops={"global_crops_size": GLOBAL_SIZE, "local_crops_size": LOCAL_SIZE, "local_crops_number": args.n_local},
        dino={"head_n_prototypes": args.prototypes},
        ibot={"head_n_prototypes": args.prototypes, "separate_head": False},
        train={"batch_size_per_gpu": args.batch},
        compute={"autocast_dtype": args.dtype},
    )
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    arch.train()
    opt = arch.make_optimizer()
    global_crops, local_crops, masks = make_inputs(args.batch, args.n_local, args.patch)
    flat = masks.flatten(1)
    batch = {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": flat,
        "mask_indices_list": flat.flatten().nonzero().flatten(),
        "masks_weight": (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat],
    }
    values = ScheduleValues(iteration=10**9, lr=1e-4, wd=0.04, momentum=0.994, teacher_temp=0.04, last_layer_lr=1e-4)

    def step() -> float:
        return arch.train_step(batch, opt, values)["total"]

    n_params = sum(p.numel() for p in arch.student.parameters())
    return step, n_params


# ----------------------------------------------------------------------------- lightly
def build_lightly(args):
    import copy
    from contextlib import nullcontext

    import torch
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_drop_path_rate, update_momentum
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = DIMS[args.arch]
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=GLOBAL_SIZE, patch_size=args.patch, embed_dim=dim, depth=depth, num_heads=heads,
                            mlp_ratio=4, qkv_bias=True, pos_embed="learn", dynamic_img_size=True, init_values=1e-5,
                            num_classes=0)
    teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
    student_backbone = copy.deepcopy(teacher_backbone)
    update_drop_path_rate(student_backbone.vit, drop_path_rate=args.drop_path, mode="uniform")
    student_head = DINOv2ProjectionHead(input_dim=dim, hidden_dim=2048, bottleneck_dim=256, output_dim=args.prototypes)
    teacher_head = DINOv2ProjectionHead(input_dim=dim, hidden_dim=2048, bottleneck_dim=256, output_dim=args.prototypes)
    teacher_head.load_state_dict(student_head.state_dict())  # weight_norm modules cannot be deep-copied
    for m in (teacher_backbone, teacher_head):
        m.requires_grad_(False)
        m.eval()
    student_backbone.train()
    student_head.train()
    dino_criterion = DINOLoss(output_dim=args.prototypes)
    ibot_criterion = IBOTPatchLoss(output_dim=args.prototypes)
    koleo_criterion = KoLeoLoss()
    params = list(student_backbone.parameters()) + list(student_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)

    global_views, local_views, block_mask = make_inputs(args.batch, args.n_local, args.patch)
    B = len(global_views)
    mask = torch.zeros(B, teacher_backbone.sequence_length, dtype=torch.bool)
    mask[:, 1:] = block_mask.flatten(1)
    n_views = N_GLOBAL + args.n_local
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext

    def step() -> float:
        teacher_temp, momentum = 0.04, 0.994
        with torch.no_grad(), autocast():
            t_features = teacher_backbone.encode(global_views)
            t_cls_out = teacher_head(t_features[:, 0])
            t_masked_out = teacher_head(t_features[mask])
        with autocast():
            s_features = student_backbone.encode(global_views, mask=mask)
            s_global_cls = s_features[:, 0]
            s_global_cls_out = student_head(s_global_cls)
            s_global_masked_out = student_head(s_features[mask])
            s_local_cls_out = student_head(student_backbone.encode(local_views)[:, 0])
        s_cls_out = torch.cat([s_global_cls_out, s_local_cls_out]).float()
        dino_loss = dino_criterion(teacher_out=list(t_cls_out.float().chunk(N_GLOBAL)),
                                   student_out=list(s_cls_out.chunk(n_views)), teacher_temp=teacher_temp)
        ibot_loss = ibot_criterion(teacher_out=t_masked_out.float(), student_out=s_global_masked_out.float(),
                                   mask=block_mask, teacher_temp=teacher_temp)
        koleo_loss = 0.1 * sum(koleo_criterion(t) for t in s_global_cls.float().chunk(N_GLOBAL))
        loss = dino_loss + ibot_loss + koleo_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_backbone.parameters(), 3.0)
        torch.nn.utils.clip_grad_norm_(student_head.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_momentum(student_backbone, teacher_backbone, m=momentum)
        update_momentum(student_head, teacher_head, m=momentum)
        return float(loss.detach())

    n_params = sum(p.numel() for p in params)
    return step, n_params


# ----------------------------------------------------------------------------- worker / driver
def worker(args) -> None:
    import torch

    step, n_params = (build_ours if args.impl == "ours" else build_lightly)(args)
    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print("RESULT " + json.dumps({
        "impl": args.impl, "step_seconds": times, "median_step_seconds": med, "images_per_s": args.batch / med,
        "student_params": n_params, "losses": losses, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }), flush=True)


def ensure_lightly() -> tuple[Path | None, str]:
    """Python of benchmarks/.venv-lightly (created on first use), or (None, reason)."""
    py = LIGHTLY_VENV / "bin" / "python"
    probe = [str(py), "-c", f"import lightly, torch; assert lightly.__version__ == '{LIGHTLY_VERSION}'; print(torch.__file__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py, "ready"
    base = Path(sys.base_prefix) / "bin" / "python3"
    r = subprocess.run([str(base), "-m", "venv", str(LIGHTLY_VENV)], capture_output=True, text=True)
    if r.returncode:
        return None, f"venv creation failed: {r.stderr.strip()[-300:]}"
    # see this project's torch / torchvision / timm (same files, same build) instead of downloading another torch
    site = next((LIGHTLY_VENV / "lib").glob("python3*/site-packages"))
    ours_site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "_lvd_main_venv.pth").write_text(str(ours_site) + "\n")
    constraints = LIGHTLY_VENV / "constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), f"lightly=={LIGHTLY_VERSION}"],
                       capture_output=True, text=True)
    if r.returncode:
        return None, f"pip install lightly=={LIGHTLY_VERSION} failed: {(r.stderr or r.stdout).strip()[-400:]}"
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode:
        return None, f"lightly venv unusable: {r.stderr.strip()[-300:]}"
    if str(ours_site) not in r.stdout:
        return None, f"lightly venv uses another torch ({r.stdout.strip()})"
    return py, "installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_worker(python: Path, impl: str, args) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", impl] + [
        f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--arch={args.arch}",
        f"--patch={args.patch}", f"--dtype={args.dtype}", f"--drop-path={args.drop_path}", f"--n-local={args.n_local}",
        f"--prototypes={args.prototypes}",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{impl} worker failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="images per step (each: 2 global + n_local local crops)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds ours/lightly; best round reported")
    p.add_argument("--arch", default="vit_small", choices=sorted(DIMS))
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--drop-path", type=float, default=0.3)
    p.add_argument("--no-lightly", action="store_true")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "train_step.json")
    p.add_argument("--worker", choices=["ours", "lightly"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl = args.worker
        worker(args)
        return 0

    lightly_py, why = (None, "disabled (--no-lightly)") if args.no_lightly else ensure_lightly()
    results: dict[str, list[dict]] = {"ours": [], "lightly": []}
    for _ in range(args.rounds):
        results["ours"].append(run_worker(OURS_PY, "ours", args))
        if lightly_py is not None:
            try:
                results["lightly"].append(run_worker(lightly_py, "lightly", args))
            except RuntimeError as e:
                lightly_py, why = None, str(e)
    best = {k: min(v, key=lambda r: r["median_step_seconds"]) for k, v in results.items() if v}

    dim, depth, heads = DIMS[args.arch]
    print(f"config: {args.arch}/{args.patch} (dim {dim}, {depth} blocks, {heads} heads), batch {args.batch} images × "
          f"({N_GLOBAL}×{GLOBAL_SIZE}px + {args.n_local}×{LOCAL_SIZE}px), {args.prototypes} prototypes (shared iBOT head), "
          f"drop path {args.drop_path}, autocast {args.dtype}; {args.steps} timed steps after {args.warmup} warm-up, "
          f"best of {args.rounds} rounds")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}")
    for k, r in best.items():
        print(f"{k:8s} {r['images_per_s']:7.2f} images/s   median step {r['median_step_seconds']:.2f} s   "
              f"student params {r['student_params'] / 1e6:.1f} M")
    ratio = None
    if "lightly" in best:
        ratio = best["ours"]["images_per_s"] / best["lightly"]["images_per_s"]
        print(f"ratio ours/lightly: {ratio:.2f}x")
    else:
        print(f"lightly: unavailable — {why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
                                    "machine": {"cpus": os.cpu_count(), "cpu": cpu_model()},
                                    "results": results, "best": best, "ratio": ratio, "lightly": why}, indent=2, default=str))
    from pipeline.plan import record_result

    record_result("train_step", {"arch": args.arch, "patch": args.patch, "batch": args.batch, "dtype": args.dtype,
                                 "images_per_s": best["ours"]["images_per_s"],
                                 "lightly_images_per_s": best.get("lightly", {}).get("images_per_s"), "ratio": ratio},
                  {"nproc": os.cpu_count(), "cpu_model": cpu_model()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
