"""The GPU run, ready to go: what LQF's products cost against fine-tuning steps, and what the certified solve
costs in passes, at 224 px on ResNet-50 and ViT-B/16 (random weights: the cost depends on the shapes only).

    python benchmarks/gpu.py --out benchmarks/results/gpu            # on a machine with a GPU
    python benchmarks/gpu.py --tiny --out /tmp/gpu-check             # the same code on the CPU at tiny sizes

Three parts, each written to ``--out`` as it finishes (so a run cut short keeps what it measured):

1. ``step_cost.py`` in float32 and bfloat16 (``step_cost_float32.md``, ``step_cost_bfloat16.md``): a training step
   of every variant against fine-tuning's, side by side.
2. **A product with G against a fine-tuning step** (``products.md``), whole network linearized: images per second
   of ``Σ_i J_iᵀJ_i v`` over a batch (one linearized forward, one backward: what every pass of the solver
   costs) and of one fine-tuning step (forward, loss, backward, SGD update), in float32 and under bfloat16
   autocast, measured in one process, and their ratio (target ≤ 1.7).
3. **The certified solve on a synthetic set** (``scale.md``): ``LQFTrainer`` with the defaults (``--linearize``,
   default ``last:1``) on ``--images`` synthetic images (class prototypes plus noise, 224 px): seconds per stage,
   products with the data, passes to the certified model, peak memory.

Sizes: ``--batch-size`` (default 128), ``--images`` (default 10 000); ``--tiny``: ResNet-18 and ViT-Tiny, batch 2,
40 images, CPU.
"""

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_cost  # noqa: E402  (the neighbouring benchmark)

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments  # noqa: E402
from lqf_hub.solver.curvature import gauss_newton_batch  # noqa: E402

NUM_CLASSES = 10


def random_network(name: str) -> torch.nn.Module:
    """``name`` with random weights; ResNets without timm's zero-initialised last BatchNorm of each block, whose
    zero scale would make the Jacobian of the block's other weights, and so their curvature, exactly zero."""
    extra = {"zero_init_last": False} if name.startswith("resnet") else {}
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **extra)


def product_against_step(name: str, dtype: torch.dtype, batch: int, image_size: int, device: str,
                         repeats: int) -> dict:
    """Median seconds of a product with G (whole network linearized) and of a fine-tuning step, one batch each."""
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    targets = step_cost._targets(batch, device)

    network = random_network(name).to(device).eval()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-6, momentum=0.9)

    def fine_tune_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = network(x)
        (0.5 * (out.float() - targets).square().sum(-1).mean()).backward()
        optimizer.step()

    model = LQFModel.from_timm(random_network(name), NUM_CLASSES, LQFConfig(linearize="all")).to(device)
    z = model.encode_trunk(x)
    with torch.no_grad(), autocast:
        base = model.base_forward(trunk_output=z)
    vector = {n: torch.randn_like(d) for n, d in model.linearized_parameters.items()}

    def product() -> None:
        with autocast:
            gauss_newton_batch(model, z, vector, base)

    seconds = {label: step_cost._measure(call, device, repeats)[0]  # median seconds, after two warm-up calls
               for label, call in (("fine_tune_step", fine_tune_step), ("product", product))}
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "fine_tune_images_per_second": batch / seconds["fine_tune_step"],
            "product_images_per_second": batch / seconds["product"],
            "product_over_step": seconds["product"] / seconds["fine_tune_step"]}


def synthetic_images(count: int, image_size: int, seed: int = 0) -> list[dict]:
    """Class prototypes (the same for every seed) plus noise: ``count`` items ``{"pixel_values": [3, H, W],
    "label"}``, learnable."""
    prototypes = torch.randn(NUM_CLASSES, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)  # the noise: another seed, another set of the same classes
    labels = torch.arange(count) % NUM_CLASSES
    return [{"pixel_values": prototypes[c] + 0.7 * torch.randn(3, image_size, image_size, generator=generator),
             "label": int(c)} for c in labels]


def certified_solve(name: str, images: int, image_size: int, linearize: str, directory: Path) -> dict:
    """The trainer's default solve on synthetic images: stage seconds, products, passes, peak memory."""
    model = LQFModel.from_timm(random_network(name), NUM_CLASSES, LQFConfig(linearize=linearize))
    train, test = synthetic_images(images, image_size), synthetic_images(max(images // 5, 10), image_size, seed=1)
    args = LQFTrainingArguments(output_dir=str(directory / name), progress=False, cache_dtype="float16")
    record = LQFTrainer(model, train, test, args).train()[-1]
    return {"model": name, "images": images, "linearize": linearize, **{k: record[k] for k in (
        "prior", "ridge", "path_iterations", "iterations", "selection_passes", "passes", "stage_seconds",
        "relative_gradient_norm", "eval_accuracy", "peak_rss_gb")},
        "peak_accelerator_memory_gb": record.get("peak_accelerator_memory_gb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Directory for the tables.")
    parser.add_argument("--tiny", action="store_true", help="ResNet-18 and ViT-Tiny, batch 2, 40 images, CPU.")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--linearize", default="last:1", help="What the certified solve linearizes (part 3).")
    parser.add_argument("--parts", nargs="+", default=["step_cost", "products", "scale"])
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No GPU here: run with --tiny to check the script on the CPU.")
    models = ["resnet18", "vit_tiny_patch16_224"] if args.tiny else ["resnet50", "vit_base_patch16_224"]
    batch, images, repeats = (2, 40, 1) if args.tiny else (args.batch_size, args.images, 10)
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"

    if "step_cost" in args.parts:
        for dtype in ("float32", "bfloat16"):
            # CPU autocast does not reach torch.func.jvp's functional_call: the naive reference is GPU-only in bf16
            variants = ["ft", "lqf-all", "lqf-tail", "lqf-cached", "probe"] if (device, dtype) == ("cpu", "bfloat16") \
                else ["ft", "lqf-all", "naive-all", "lqf-tail", "lqf-cached", "probe"]
            step_cost.main(["--models", *models, "--variants", *variants, "--batch-size", str(batch), "--device", device,
                            "--dtype", dtype, "--repeats", str(repeats), "--out", str(args.out / f"step_cost_{dtype}.md")])
    if "products" in args.parts:
        rows = [product_against_step(m, dtype, batch, 224, device, repeats)
                for m in models for dtype in (torch.float32, torch.bfloat16)]
        lines = [f"{device_name}, 224 px, batch {batch}, whole network linearized, median of {repeats}", "",
                 "| model | dtype | fine-tuning step (img/s) | product with G (img/s) | product / step |",
                 "|---|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['dtype']} | {r['fine_tune_images_per_second']:.0f} | "
                  f"{r['product_images_per_second']:.0f} | {r['product_over_step']:.2f}× |" for r in rows]
        (args.out / "products.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    if "scale" in args.parts:
        rows = [certified_solve(m, images, 224, args.linearize, args.out / "runs") for m in models]
        lines = [f"{device_name}, {images} synthetic images at 224 px, linearize {args.linearize}, trunk outputs "
                 "in float16", "", "| model | stage seconds | products: paths / refit | passes (choice + refit) | "
                 "prior, λ | peak RSS | peak GPU memory |", "|---|---|---:|---:|---|---:|---:|"]
        for r in rows:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
            gpu = "–" if r["peak_accelerator_memory_gb"] is None else f"{r['peak_accelerator_memory_gb']:.1f} GB"
            lines.append(f"| {r['model']} | {stages} | {r['path_iterations']} / {r['iterations']} | "
                         f"{r['passes']:.1f} ({r['selection_passes']:.1f} + {r['iterations']}) | "
                         f"{r['prior']}, {r['ridge']:g} | {r['peak_rss_gb']:.1f} GB | {gpu} |")
        (args.out / "scale.md").write_text("\n".join(lines) + "\n")
        (args.out / "scale.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
