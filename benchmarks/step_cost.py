"""Step cost of LQF against fine-tuning, measured side by side in one run.

For each model: median time of one training step (forward, squared loss, backward, SGD-momentum update)
and peak memory of the step, for
  ft          ordinary fine-tuning of every weight (the baseline, ratio 1.00)
  lqf-all     the whole network linearized (lqf-hub: one ordinary backward for Jᵀr)
  naive-all   the same through autograd of torch.func.jvp (the reference lqf-hub avoids)
  lqf-tail    only the last block (and the head) linearized, trunk run every step
  lqf-cached  the same, trunk output cached (what the trainer does when there is no augmentation)
  probe       the head only (a linear probe on frozen features)

    python benchmarks/step_cost.py                       # CPU defaults: resnet50 and vit_small, batch 8
    python benchmarks/step_cost.py --device cuda --batch-size 128 --dtype bfloat16 --out results/h200.md
"""

import argparse
import contextlib
import ctypes
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch.func import functional_call, jvp
from torch.utils._python_dispatch import TorchDispatchMode

from lqf_hub import LQFConfig, LQFModel
from lqf_hub.modeling.linearize import forward_mode_attention

NUM_CLASSES = 10


class _MallocPeak(TorchDispatchMode):
    """Peak bytes malloc'd during a CPU step, sampled after every aten op (glibc's mallinfo2)."""

    def __init__(self) -> None:
        super().__init__()
        self._libc = ctypes.CDLL("libc.so.6")
        fields = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]
        self._info = type("mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
        self._libc.mallinfo2.restype = self._info
        self.base = self._allocated()
        self.peak = 0

    def _allocated(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._allocated() - self.base)
        return out


def _targets(batch: int, device: str) -> torch.Tensor:
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    return 15.0 * torch.nn.functional.one_hot(labels, NUM_CLASSES).float()


def _step_fn(variant: str, name: str, args) -> tuple[callable, list[torch.nn.Parameter]]:
    """A closure running one training step of ``variant`` and the parameters it trains."""
    device, dtype = args.device, getattr(torch, args.dtype)
    network = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = _targets(args.batch_size, device)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    if variant == "ft":
        network = network.to(device).eval()  # eval: same BatchNorm behaviour as the linearized model
        params = list(network.parameters())
        forward = lambda: network(x)  # noqa: E731
    else:
        linearize = {"all": "all", "tail": "last:1", "cached": "last:1", "probe": "head"}[variant.split("-")[-1]]
        model = LQFModel.from_timm(network, NUM_CLASSES, LQFConfig(linearize=linearize, activation="none"))
        model = model.to(device)
        params = list(model.delta.values())
        if variant == "lqf-cached":
            z = model.encode_trunk(x)
            forward = lambda: model(trunk_output=z)  # noqa: E731
        elif variant == "naive-all":
            forward = lambda: _naive(model, x)  # noqa: E731
        else:
            forward = lambda: model(x)  # noqa: E731
    optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = forward()
        loss = 0.5 * (out.float() - y).square().sum(-1).mean()
        loss.backward()
        optimizer.step()

    return step, params


def _naive(model: LQFModel, x: torch.Tensor) -> torch.Tensor:
    """Autograd through torch.func.jvp: the straightforward way to train a linearized network."""
    w0 = dict(model.net.named_parameters())
    deltas = model.linearized_parameters
    with forward_mode_attention():
        out, tangent = jvp(lambda p: functional_call(model.net, p, (x,)), ({n: w0[n] for n in deltas},), (dict(deltas),))
    return out + tangent


def _measure(step, device: str, repeats: int) -> tuple[float, float]:
    """(median seconds per step, peak bytes of one step)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _MallocPeak() as meter:
            step()
        peak = meter.peak
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--variants", nargs="+", default=["ft", "lqf-all", "naive-all", "lqf-tail", "lqf-cached", "probe"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)

    rows = []
    for name in args.models:
        baseline = None
        for variant in args.variants:
            torch.manual_seed(0)
            step, params = _step_fn(variant, name, args)
            seconds, peak = _measure(step, args.device, args.repeats)
            baseline = baseline or (seconds, peak)
            rows.append((name, variant, seconds * 1e3, seconds / baseline[0], peak / 2**20, peak / baseline[1],
                         sum(p.numel() for p in params) / 1e6))
            print(f"{name:24s} {variant:11s} {seconds * 1e3:9.1f} ms  {peak / 2**20:8.0f} MiB", file=sys.stderr)
            del step, params
            if args.device == "cuda":
                torch.cuda.empty_cache()

    header = (
        f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
        f"dtype={args.dtype}, batch={args.batch_size}, {args.image_size}px, median of {args.repeats} steps, "
        f"torch {torch.__version__}, timm {timm.__version__}\n\n"
        "| model | variant | step (ms) | step / ft | peak mem (MiB) | mem / ft | trained params (M) |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
    )
    table = header + "".join(
        f"| {m} | {v} | {ms:.1f} | {r:.2f}x | {mb:.0f} | {mr:.2f}x | {p:.2f} |\n" for m, v, ms, r, mb, mr, p in rows
    )
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
