"""GPU memory of one training step, computed before any GPU hour is spent (docs/gpu.md).

    python -m tools.memory --dataset cirr --clip ViT-L/14 --batch-size 512 --micro-batch 32
    python -m tools.memory --clip RN50x4 --batch-size 1024 --gpus 8 --grad-checkpoint
    python -m tools.memory --table           # docs/gpu.md's table (~25 minutes on 2 cores)

Takes train.py's own flags (no data is read, no weights are downloaded: a released name is its
architecture, randomly initialised) and runs train.py's own `train_step` twice (the second counts
AdamW's state) on fake tensors: every storage the step allocates is counted until it is freed
(`Allocations`, rounded up to 512 bytes as CUDA's allocator does), nothing is computed, so it runs
on a CPU in seconds. bf16 autocast is traced with the CPU's autocast, which casts the same
matrix products. Not counted: the CUDA context (~0.5 GiB), cuBLAS / cuDNN workspaces and the
allocator's fragmentation; the text runs over all 77 positions (a real batch stops at its last
EOT). --real runs the step on the CPU's real tensors instead: the same accounting, measured.
--stage 2 needs --init, as train.py does (the bank counted at BANK_ROWS rows).
"""

import argparse
import contextlib
import os
import sys
import time
import weakref
from types import SimpleNamespace
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

import model as M
import runtime
import train
from util import error_line

_TEXT = dict(context_length=77, vocab_size=49408, transformer_heads=8, transformer_layers=12)
_RN, _VIT = dict(vision_patch_size=None), dict(image_resolution=224)
ARCHS = {  # OpenAI's released hyper-parameters (test_all.py checks them against OpenAI's code)
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 transformer_width=512, **_RN, **_TEXT),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6),
                   vision_width=80, **_RN, **dict(_TEXT, transformer_width=640,
                                                  transformer_heads=10)),
    "ViT-B/32": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=32,
                     transformer_width=512, **_VIT, **_TEXT),
    "ViT-B/16": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16,
                     transformer_width=512, **_VIT, **_TEXT),
    "ViT-L/14": dict(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     **_VIT, **dict(_TEXT, transformer_width=768, transformer_heads=12)),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3),
                  vision_width=64, transformer_width=512, **_RN, **_TEXT),
    "RN50x16": dict(embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8),
                    vision_width=96, **_RN, **dict(_TEXT, transformer_width=768,
                                                   transformer_heads=12)),
    "RN50x64": dict(embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10),
                    vision_width=128, **_RN, **dict(_TEXT, transformer_width=1024,
                                                    transformer_heads=16)),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24,
                           vision_width=1024, vision_patch_size=14,
                           **dict(_TEXT, transformer_width=768, transformer_heads=12)),
}
OWN_FLAGS = """
its own flags (the rest are train.py's):
  --gpus N   processes sharing --batch-size, as under torchrun --nproc_per_node N (1)
  --real     the step on the CPU's real tensors: measured, not computed (slow for real CLIPs)
  --table    docs/gpu.md's table
"""
BANK_ROWS = 20_000  # SPN stage 2: the bank's rows (CIRR's and FashionIQ's training images: fewer)
GIB = 2 ** 30

def settings(argv, gpus=1):
    """train.py's settings from its flags, checked as train.py checks them (its data folder
    aside), with `gpus` processes sharing --batch-size as under torchrun."""
    p = runtime.parser(__doc__ + OWN_FLAGS)
    a = runtime.resolve(p.parse_args(argv, namespace=runtime.Settings()))
    a.data_root = a.data_root or os.getcwd()       # no data is read: any folder passes the check
    with mock.patch.dict(os.environ, WORLD_SIZE=str(gpus)):       # what the check divides by
        runtime.check(a, p)
    if a.clip not in ARCHS and a.clip not in M.TINY_CONFIGS:
        p.error(f"--clip {a.clip}: tools.memory knows the architectures {', '.join(ARCHS)} and "
                f"the tiny configs")
    return a

def step_inputs(a, cfg, B):
    """A batch as train_step takes it, for the settings a: tokens (B, 77) with EOT last, and the
    image inputs (pixels; --encoder text: the cached tokens, fp16; stage 2: f_ref and bank rows)."""
    tokens = torch.randint(1, 49407, (B, 77))
    tokens[:, -1] = 49407
    res, D = cfg["image_resolution"], cfg["embed_dim"]
    if a.stage == 2:
        return tokens, M.Features(torch.randn(B, D)), torch.randint(0, BANK_ROWS, (B,))
    if a.encoder == "text":
        m = (res // (cfg["vision_patch_size"] or 32)) ** 2                 # patches or positions
        return (tokens, *(M.Tokens(torch.randn(B, 1 + m, D).half()) for _ in range(2)))
    return tokens, torch.randn(B, 3, res, res), torch.randn(B, 3, res, res)

@contextlib.contextmanager
def every_image_distinct():
    """Every image of a batch through the tower, as if none repeated: finding repeats reads the
    pixels (fake tensors have none; gpu_check's placeholder images are all one)."""
    distinct, M.distinct = M.distinct, lambda x: (x, None)
    try:
        yield
    finally:
        M.distinct = distinct

@contextlib.contextmanager
def traceable():
    """What fake tensors cannot do (no data): the text runs over all positions (its last EOT is
    data), every image of a batch counts as distinct."""
    trunk = M.CLIP._text_trunk
    def all_positions(self, text):
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        return self.transformer(x), text.argmax(dim=-1)
    M.CLIP._text_trunk = all_positions
    try:
        with every_image_distinct():
            yield
    finally:
        M.CLIP._text_trunk = trunk

class Allocations(TorchDispatchMode):
    """Every tensor storage the ops create, counted until it is freed, each rounded up to 512 bytes
    as CUDA's caching allocator does: the live bytes and their peak. Storages that become a
    parameter's gradient are counted apart, so that what is left of the step's own allocations is
    its activations (what the graph keeps for the backward) and temporaries."""

    def __init__(self):
        super().__init__()
        self.seen, self.now, self.peak = WeakIdKeyDictionary(), 0, 0
        self.grads, self.start, self.act, self.counted = 0, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                n = self.seen[t.untyped_storage()] = -(-t.untyped_storage().nbytes() // 512) * 512
                weakref.finalize(t.untyped_storage(), self.free, n)
                self.now += n
                self.peak = max(self.peak, self.now)
                self.act = max(self.act, self.now - self.grads - self.start)
        return out

    def free(self, n):
        self.now -= n

    def gradient(self, p):                        # a post-accumulate-grad hook: p.grad is made
        st = p.grad.untyped_storage()
        if st in self.seen and id(p) not in self.counted:
            self.grads += self.seen[st]
            self.counted.add(id(p))

def measure(a, gpus=1, fake=True):
    """Peak memory of train.train_step under settings a on one of `gpus` processes: the second of
    two steps (AdamW's state exists). -> bytes: peak, and at rest (weights, buffers, AdamW's state,
    the batch), gradients, activations (and temporaries; the largest during the step)."""
    cfg = ARCHS.get(a.clip) or M.TINY_CONFIGS[a.clip]
    # a shape environment lets loss.item() be a symbol: fake tensors hold no values
    mode = FakeTensorMode(shape_env=ShapeEnv()) if fake else contextlib.nullcontext()
    with mode, traceable():
        model = M.CIRModel(M.CLIP(**cfg), wcb=not a.no_wcb, n_maps=a.wcb_maps).train()
        train.freeze(model, a)
        M.set_grad_checkpoint(model, a.grad_checkpoint)
        opt = torch.optim.AdamW(train.param_groups(model, a), fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.amp != "none")
        bank = torch.randn(BANK_ROWS, cfg["embed_dim"]) if a.stage == 2 else None
        run = train.Run(a, model, model, opt, sched, scaler, amp, None, None,
                        SimpleNamespace(bank=bank), [], None, None)
        batch = (*step_inputs(a, cfg, a.batch_size // gpus), None)
        held = [*model.parameters(), *model.buffers(), *batch[:3], bank]
        rest = sum(_bytes(x) for x in held)
        alloc = Allocations()
        for x in held:                           # counted in `rest`: a view of one adds nothing
            if x is not None:
                alloc.seen[(x if isinstance(x, torch.Tensor) else x.f).untyped_storage()] = 0
        trained = [p for p in model.parameters() if p.requires_grad]
        hooks = [p.register_post_accumulate_grad_hook(alloc.gradient) for p in trained]
        with alloc:
            # the first step makes AdamW's state and counts the FLOPs (the counter's module hooks
            # hold tensors: the second step, counted alone, gives the peak)
            with FlopCounterMode(display=False) as flops:
                train.train_step(run, batch, None)
            opt.zero_grad(set_to_none=True)
            alloc.grads, alloc.start, alloc.act, alloc.peak = 0, alloc.now, 0, alloc.now
            alloc.counted.clear()
            train.train_step(run, batch, None)
        for h in hooks:
            h.remove()
    grads = sum(_bytes(p) for p in trained)
    return dict(peak=rest + alloc.peak, rest=rest + alloc.start, gradients=grads,
                activations=alloc.act, flops=flops.get_total_flops())

def _bytes(x):
    """Bytes of a tensor (or the tensor in Tokens / Features) as the allocator counts them."""
    if x is None:
        return 0
    x = x if isinstance(x, torch.Tensor) else x.f
    return -(-x.untyped_storage().nbytes() // 512) * 512

def estimate(argv, gpus=1):
    """Computed peak memory of one step of `python train.py *argv` on each of `gpus` GPUs."""
    return measure(settings(argv, gpus), gpus)

def report(a, gpus, mem, how="computed (fake tensors)"):
    """What a user reads: the peak, its parts, the compute, and the cards it fits."""
    print(f"{a.clip}, batch {a.batch_size // gpus} per GPU (--batch-size {a.batch_size} over "
          f"{gpus}), --micro-batch {a.micro_batch or '-'}, --grad-checkpoint "
          f"{'on' if a.grad_checkpoint else 'off'}, --encoder {a.encoder}, --stage {a.stage}, "
          f"{'bf16 autocast' if a.amp != 'none' else 'fp32'}")
    print(f"  peak {mem['peak'] / GIB:.2f} GiB per GPU, {how}: weights, AdamW state and the batch "
          f"{mem['rest'] / GIB:.2f}, gradients {mem['gradients'] / GIB:.2f}, activations "
          f"{mem['activations'] / GIB:.2f}; {mem['flops'] / 1e12:.1f} TFLOP per step")
    need = mem["peak"] / GIB + 1.0   # CUDA's context and workspaces: ~1 GiB; a "24 GB" card: GiB
    print("  fits (~1 GiB more for CUDA's context and workspaces): " + ", ".join(
        f"{g} GB {'yes' if need <= g else 'no'}" for g in (24, 40, 80)))
    per = a.batch_size // gpus
    smaller = runtime.divisor_up_to(per, min(32, (a.micro_batch or per + 1) - 1))
    less = [*([] if a.grad_checkpoint or a.encoder == "text" or a.stage == 2 else
              ["--grad-checkpoint"]), *([f"--micro-batch {smaller}"] if smaller else [])]
    if need > 24 and less:
        print(f"  for less: {' or '.join(less)} (the same gradients, but for ModifiedResNet's "
              "BatchNorm under --micro-batch; docs/gpu.md)")

def table(models, batches):
    """docs/gpu.md's table: each model x batch x (plain, --micro-batch 32, --grad-checkpoint,
    both), bf16 autocast on one GPU."""
    variants = [("plain", []), ("--micro-batch 32", ["--micro-batch", "32"]),
                ("--grad-checkpoint", ["--grad-checkpoint"]),
                ("both", ["--micro-batch", "32", "--grad-checkpoint"])]
    print("| CLIP | batch | " + " | ".join(v for v, _ in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name in models:
        for batch in batches:
            cells = []
            for _, flags in variants:
                t = time.perf_counter()
                mem = estimate(["--dataset", "cirr", "--clip", name, "--batch-size", str(batch),
                                *flags])
                cells.append(f"{mem['peak'] / GIB:.1f}")
                print(f"  {name} {batch} {flags}: {time.perf_counter() - t:.0f} s",
                      file=sys.stderr)
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1, help="processes sharing --batch-size")
    p.add_argument("--real", action="store_true", help="run the step on real CPU tensors")
    p.add_argument("--table", action="store_true", help="docs/gpu.md's table")
    ours, rest = p.parse_known_args(argv)
    if ours.table:
        return table(["ViT-B/32", "RN50x4", "ViT-L/14"], [128, 512, 1024])
    a = settings(rest, ours.gpus)
    report(a, ours.gpus, measure(a, ours.gpus, fake=not ours.real),
           "measured (the CPU's tensors)" if ours.real else "computed (fake tensors)")

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        sys.exit(f"error: {error_line(e)}")
