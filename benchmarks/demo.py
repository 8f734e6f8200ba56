"""How interactive ``lqf-hub demo`` is: seconds to open the page's session, to explain an image and to forget
training images, on a solved model (the issue's bar, on the default job's model and 2 cores: first explanation
≤ 10 s, a forget ≤ 30 s). Optionally a screenshot of the page, driven in Chromium, for the docs.

    lqf-hub train --output-dir out                       # the default job
    python benchmarks/demo.py --model out/model --images 5 --forgets 2 \\
        --screenshot docs/demo.png --out benchmarks/results/demo.md

Timed as the page runs them: per image, the trunk's output, the calibrated probabilities with the posterior
predictive sd, and the exact split of the predicted class over the training images (top 8 on each side); per
forget, the certified optimum without the first supporting and the first opposing training image of an image,
warm-started from the model on the kept trunk outputs.
"""

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from PIL import Image

from lqf_hub import LQFModel
from lqf_hub.demo import DemoSession
from lqf_hub.demo.page import TOP_K, launch
from lqf_hub.files import atomic_write_text


def timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def measure(model_dir: Path, images: int, forgets: int) -> dict:
    model = LQFModel.from_pretrained(model_dir)
    cache = Path(tempfile.mkdtemp(prefix="demo-bench-"))
    try:
        _, cold = timed(lambda: DemoSession(model, cache))  # the training trunk outputs computed, then kept
        session, warm = timed(lambda: DemoSession(model, cache))  # read back: what every later start costs
        pictures = [Image.open(path).convert("RGB") for path in session.examples(images)]
        explained = []
        for picture in pictures:
            def page_answer(picture=picture):
                z = session.encode(picture)
                return session.predict(z), session.explain(z, TOP_K)

            (prediction, row), seconds = timed(page_answer)
            explained.append({"seconds": seconds, "row": row, "label": prediction.label})
        forgotten = []
        for item in explained[:forgets]:
            pair = [item["row"]["supporting"][0]["train_index"], item["row"]["opposing"][0]["train_index"]]
            (new, record), seconds = timed(lambda pair=pair: session.forget(pair))
            forgotten.append({"removed": pair, "seconds": seconds, "iterations": record["iterations"],
                              "relative_gradient_norm": record["relative_gradient_norm"]})
        return {"training_images": session.training_count, "open_cold": cold, "open_warm": warm,
                "explain": [e["seconds"] for e in explained], "forget": forgotten,
                "prior": model.training_summary.get("prior"), "ridge": model.config.ridge}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def screenshot(model_dir: Path, path: Path) -> None:
    """The page on the model's first test example, after forgetting its first supporting and opposing image."""
    from playwright.sync_api import sync_playwright

    cache = Path(tempfile.mkdtemp(prefix="demo-shot-"))
    session = DemoSession(LQFModel.from_pretrained(model_dir), cache)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page_app = launch(session, title=str(model_dir), host="127.0.0.1", port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"))
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#query input[type=file]").set_input_files(str(session.examples(1)[0]))
            page.locator("#split").get_by_text("unexplained").wait_for(timeout=120_000)
            choices = page.locator("#chosen label")
            choices.nth(0).click()
            choices.nth(2 * TOP_K - 1).click()
            page.locator("#forget").click()
            page.locator("#after").get_by_text("Certified").wait_for(timeout=600_000)
            page.screenshot(path=path, full_page=True)
            browser.close()
    finally:
        page_app.close()
        shutil.rmtree(cache, ignore_errors=True)


def report(model_dir: Path, result: dict, command: str) -> str:
    explain, forget = result["explain"], result["forget"]
    later = explain[1:] or explain
    lines = [
        f"# `lqf-hub demo`: how interactive it is ({model_dir})", "",
        "```bash", command, "```", "",
        f"{date.today().isoformat()}, {os.cpu_count()}-core CPU, nothing else running. The model: "
        f"{result['training_images']} training images, prior {result['prior']}, λ = {result['ridge']:g}.", "",
        "| step | seconds | target |", "|---|---:|---|",
        f"| open the session, first time (training trunk outputs computed and kept) | {result['open_cold']:.1f} | |",
        f"| open the session again (kept trunk outputs read back) | {result['open_warm']:.1f} | |",
        f"| first image: probabilities, sd and exact split | {explain[0]:.1f} | ≤ 10 s: "
        f"{'met' if explain[0] <= 10 else '**missed**'} |",
        f"| each later image (median of {len(later)}) | {statistics.median(later):.1f} | |",
    ]
    for item in forget:
        lines.append(f"| forget #{item['removed'][0]} and #{item['removed'][1]} ({item['iterations']} CG iterations, "
                     f"relative gradient {item['relative_gradient_norm']:.1e}) | {item['seconds']:.1f} | ≤ 30 s: "
                     f"{'met' if item['seconds'] <= 30 else '**missed**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="A solved LQF checkpoint (lqf-hub train).")
    parser.add_argument("--images", type=int, default=5, help="Test images explained. Default: 5.")
    parser.add_argument("--forgets", type=int, default=2, help="Forgets timed (two images each). Default: 2.")
    parser.add_argument("--screenshot", type=Path, help="Also save a screenshot of the page (PNG) here.")
    parser.add_argument("--out", type=Path, help="Markdown report.")
    args = parser.parse_args()
    result = measure(args.model, args.images, args.forgets)
    command = (f"python benchmarks/demo.py --model {args.model} --images {args.images} --forgets {args.forgets}"
               + (f" --screenshot {args.screenshot}" if args.screenshot else "")
               + (f" --out {args.out}" if args.out else ""))
    text = report(args.model, result, command)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if args.screenshot:
        screenshot(args.model, args.screenshot)


if __name__ == "__main__":
    main()
