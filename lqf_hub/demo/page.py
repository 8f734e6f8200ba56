"""The demo page (Gradio): an image's calibrated prediction, its exact split over the training images, the model
without some of them, and the training set's disputed labels — over a ``DemoSession``."""

from pathlib import Path

import gradio as gr
from PIL import Image

from .session import DemoSession

TOP_K = 8  # training images shown on each side of a split
DISPUTED_SHOWN = 24


def build_page(session: DemoSession, *, title: str = "LQF model") -> gr.Blocks:
    """The page's layout and events (``launch`` it, or mount it in an app)."""
    model, count = session.model, session.training_count
    summary = model.training_summary or {}
    certificate = summary.get("relative_gradient_norm")
    linearized = model.config.linearize
    linearized = ", ".join(linearized) if isinstance(linearized, list) else linearized
    with gr.Blocks(title=f"{title} · lqf-hub") as page:
        gr.Markdown(
            f"# {title}\n{model.config.backbone.architecture}, linearized ({linearized}) and solved on {count} "
            f"training images: prior {summary.get('prior', '?')}, λ = {model.config.ridge:g}"
            + (f", certified (relative gradient {certificate:.1e})" if certificate is not None else "")
            + ". Every prediction is the base network's output plus one exact share per training image."
            + ("" if session.pictures else "\n\n**The training images are not reachable here**: they are shown "
               "by index and score only."))
        with gr.Tab("Explain an image"):
            with gr.Row():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="query",
                                 height=260)
                with gr.Column():
                    probabilities = gr.Label(num_top_classes=5, label="Calibrated probabilities",
                                             elem_id="probabilities")
                    split = gr.Markdown(elem_id="split")
            examples = session.examples(10)
            if examples:
                gr.Examples([[str(path)] for path in examples], inputs=image, label="Test images")
            raising = gr.Gallery(label="Training images that most raise the predicted class", columns=TOP_K,
                                 height=200, elem_id="raising")
            lowering = gr.Gallery(label="Training images that most lower it", columns=TOP_K, height=200,
                                  elem_id="lowering")
            chosen = gr.CheckboxGroup(label="Forget training images (the certified optimum without them, same λ)",
                                      elem_id="chosen")
            forget_button = gr.Button("Forget them", variant="primary", elem_id="forget")
            with gr.Row():
                after = gr.Markdown(elem_id="after")
                after_probabilities = gr.Label(num_top_classes=5, label="Without them", elem_id="after-probabilities")
        with gr.Tab("Disputed labels"):
            gr.Markdown("The training images the rest of the data argues against: leave-one-out, what the optimum "
                        "without each image predicts for it (exact). The lowest margins are the likeliest "
                        f"mislabelled. Computing it takes {count * model.num_classes} passes over the training "
                        "images unless `lqf-hub explain --training-set` kept it in the demo's cache directory.")
            rank_button = gr.Button("Rank the training images", elem_id="rank")
            ranked = gr.Markdown(elem_id="ranked")
            disputed = gr.Gallery(label="Most disputed first", columns=8, elem_id="disputed")
            ranking = gr.Dataframe(headers=["train index", "label", "others predict", "margin"], elem_id="ranking")

        def explain(picture: Image.Image | None):
            if picture is None:
                return None, "", [], [], gr.update(choices=[], value=[]), "", None
            z = session.encode(picture)
            prediction, row = session.predict(z), session.explain(z, TOP_K)
            shares = [item for kind in ("supporting", "opposing") for item in row[kind]]
            choices = [(f"#{item['train_index']} {item['label']} ({item['contribution']:+.2f})", item["train_index"])
                       for item in shares]
            return (prediction.probabilities, _split_text(prediction, row, count), _gallery(session, row["supporting"]),
                    _gallery(session, row["opposing"]), gr.update(choices=choices, value=[]), "", None)

        # a gr.Progress default makes Gradio show the call's tqdm bars on the page (the argument itself is unused)
        def forget_images(picture: Image.Image | None, indices: list[int], progress=gr.Progress(track_tqdm=True)):
            if picture is None or not indices:
                raise gr.Error("Pick an image and at least one training image to forget.")
            z = session.encode(picture)
            before = session.predict(z)
            new, record = session.forget(indices, progress=True)  # its solver's bars show on the page
            now = session.predict(z, new)
            text = (f"**Without {', '.join(f'#{i}' for i in sorted(indices))}**: {now.label} "
                    f"(output {now.output:.3f}; before: {before.label}, {before.output:.3f}). Certified: relative "
                    f"gradient {record['relative_gradient_norm']:.1e} after {record['iterations']} iterations.")
            return text, now.probabilities

        def rank(progress=gr.Progress(track_tqdm=True)):
            kernel, rows = session.disputed_labels(progress=True)
            top = rows[:DISPUTED_SHOWN]
            gallery = [(picture, f"#{row['train_index']} {row['label']} → {row['others_predict']} "
                        f"({row['margin']:+.2f})") for row in top if (picture := session.picture(row["train_index"]))]
            table = [[row["train_index"], row["label"], row["others_predict"], round(row["margin"], 3)] for row in top]
            disputed_count = sum(row["margin"] < 0 for row in rows)
            text = (f"{disputed_count} of {len(rows)} labels disputed (the optimum without the image predicts "
                    f"another class); kernel: {kernel}.")
            return text, gallery, table

        image.change(explain, inputs=image,
                     outputs=[probabilities, split, raising, lowering, chosen, after, after_probabilities])
        forget_button.click(forget_images, inputs=[image, chosen], outputs=[after, after_probabilities])
        rank_button.click(rank, outputs=[ranked, disputed, ranking])
    return page


def _split_text(prediction, row: dict, count: int) -> str:
    """The prediction and its exact split, in words."""
    spread = "" if prediction.std is None else f" ± {prediction.std:.2f} (posterior predictive sd)"
    return (f"**{prediction.label}**: output {row['output']:.3f}{spread} = base network {row['base']:.3f} "
            f"+ the {count} training images' shares {row['output'] - row['base'] - row['unexplained']:+.3f} "
            f"+ unexplained {row['unexplained']:.1e} (the certificate's remainder)")


def _gallery(session: DemoSession, items: list[dict]) -> list[tuple]:
    """Gallery entries ``(image, caption)`` of training images; a blank tile where the images are not reachable."""
    blank = Image.new("RGB", (32, 32), "white")
    return [(session.picture(item["train_index"]) or blank,
             f"#{item['train_index']} {item['label']} {item['contribution']:+.2f}") for item in items]


def launch(session: DemoSession, *, title: str, host: str | None = None, port: int | None = None,
           share: bool = False, block: bool = True) -> gr.Blocks:
    """Build the page and serve it (``block``: until interrupted)."""
    page = build_page(session, title=title)
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                allowed_paths=[str(Path(session.cache_dir).resolve())])
    return page
