"""``lqf-hub demo``: the session's answers against the library's own, a Space on the local Hub, and the page
driven in a real browser (Chromium from Debian's packages, through Playwright)."""

import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

from lqf_hub import LQFModel, LQFTrainingArguments
from lqf_hub.analysis import forget, training_images
from lqf_hub.analysis.explain import load_ranking, save_ranking
from lqf_hub.cli import main
from lqf_hub.demo import DemoSession
from lqf_hub.training.cache import TrunkCache

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def session(trained, tmp_path_factory) -> DemoSession:
    return DemoSession(LQFModel.from_pretrained(trained / "model"), tmp_path_factory.mktemp("demo-cache"))


def test_trunk_cache_select_keeps_the_rows_in_the_order_asked(session):
    picked = session.trunk.select([5, 0, 7])
    assert isinstance(picked, TrunkCache) and len(picked) == 3
    for row, i in enumerate([5, 0, 7]):
        assert torch.equal(picked[row][0], session.trunk[i][0]) and picked[row][1] == session.trunk[i][1]
        assert torch.equal(picked.digests[row], session.trunk.digests[i])


def test_the_session_explains_and_predicts_as_the_model(session):
    image = _example(session)
    z = session.encode(image)
    prediction, row = session.predict(z), session.explain(z, 4)
    with torch.no_grad():
        output = session.model(trunk_output=z)[0]
        probabilities = session.model.predict_proba(trunk_output=z)[0]
    assert prediction.label == row["predicted"] == session.model.config.id2label[int(output.argmax())]
    assert prediction.output == pytest.approx(float(output.max()), abs=1e-6) == row["output"]
    assert list(prediction.probabilities.values()) == pytest.approx(probabilities.tolist(), abs=1e-7)
    assert prediction.std == pytest.approx(float(session.model.predict_uncertainty(trunk_output=z)[0, output.argmax()]))
    shares = [item["contribution"] for item in row["supporting"]]
    assert shares == sorted(shares, reverse=True) and len(shares) == 4
    # the base network's share, the training images' and the remainder add up to the output (the optimum's split)
    split = session.explainer.explain(z, only_predicted=True)
    assert row["base"] + float(split.contributions[:, split.predicted].sum()) + row["unexplained"] == pytest.approx(
        row["output"], abs=1e-5)
    assert abs(row["unexplained"]) <= 1e-2 * abs(row["output"] - row["base"])


def test_the_session_forgets_on_kept_trunk_outputs_as_forget_does_on_the_images(session, tmp_path):
    """The demo's forget (warm-started on the kept trunk outputs) and `forget` on the rebuilt training images reach
    the same certified optimum."""
    new, record = session.forget([3, 0])
    _, images = training_images(session.model)
    reference, _ = forget(session.model, images, [0, 3], LQFTrainingArguments(output_dir=str(tmp_path), progress=False))
    assert record["relative_gradient_norm"] <= 1e-4 and new.training_summary["forgotten"]["removed"] == [0, 3]
    z = session.encode(_example(session))
    with torch.no_grad():
        ours, theirs, before = new(trunk_output=z), reference(trunk_output=z), session.model(trunk_output=z)
    assert torch.allclose(ours, theirs, atol=1e-3 * float(before.abs().max()))
    assert not torch.allclose(ours, before, atol=1e-3 * float(before.abs().max()))  # forgetting changed it
    assert session.forget([0, 3])[0] is new  # kept for the session


def test_a_kept_ranking_is_read_only_for_its_own_model(session, tmp_path):
    rows = [{"train_index": i, "label": "x", "others_predict": "y", "margin": float(i), "loss": 0.0} for i in range(3)]
    save_ranking(tmp_path, session.model, "exact", rows)
    assert load_ranking(tmp_path, session.model) == ("exact", rows)
    other = session.forget([3, 0])[0]
    assert load_ranking(tmp_path, other) is None  # another model's ranking is not shown
    (tmp_path / "training_set.json").write_text("{not json")
    assert load_ranking(tmp_path, session.model) is None


def test_without_the_training_images_the_session_scores_by_index(session, monkeypatch):
    image = _example(session)

    def unreachable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("lqf_hub.data.load_image_dataset", unreachable)
    with pytest.warns(UserWarning, match="not reachable: no network. Using their trunk outputs kept in"):
        blind = DemoSession(session.model, session.cache_dir)  # the trunk outputs the session kept there
    assert not blind.pictures and blind.picture(0) is None and session.pictures
    z = session.encode(image)
    assert blind.explain(z, 4) == session.explain(z, 4)  # the same indices and scores, without pictures


def test_demo_serves_a_model_from_the_hub(trained, fake_hub, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    import lqf_hub.demo.page

    token = "hf_alice_token"
    LQFModel.from_pretrained(trained / "model").push_to_hub("alice/served", token=token)
    served = []
    monkeypatch.setattr(lqf_hub.demo.page.gr.Blocks, "launch", lambda page, **kwargs: served.append((page, kwargs)))
    code = main(["demo", "--model", "alice/served", "--token", token, "--cache-dir", str(tmp_path / "cache"),
                 "--port", "7999"])
    assert code == 0, capsys.readouterr().err
    [(page, kwargs)] = served
    assert page.title == "alice/served · lqf-hub" and kwargs["server_port"] == 7999 and not kwargs["share"]
    assert (tmp_path / "cache" / "training_trunk.safetensors").exists()


def test_push_with_space_creates_a_gradio_space_that_serves_the_page(trained, fake_hub, tmp_path, monkeypatch, capsys):
    gradio = pytest.importorskip("gradio")
    monkeypatch.setenv("HF_TOKEN", "hf_alice_token")
    assert main(["push", "--model", str(trained), "alice/tiny", "--space"]) == 0, capsys.readouterr().err
    from huggingface_hub import hf_hub_download

    assert fake_hub.space_sdks == {"alice/tiny-demo": "gradio"}
    readme = Path(hf_hub_download("alice/tiny-demo", "README.md", repo_type="space")).read_text()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and "- alice/tiny" in readme
    requirements = Path(hf_hub_download("alice/tiny-demo", "requirements.txt", repo_type="space")).read_text()
    assert requirements.startswith("lqf-hub[demo]")
    app = Path(hf_hub_download("alice/tiny-demo", "app.py", repo_type="space")).read_text()
    launched = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda page, **kwargs: launched.append(page))
    monkeypatch.chdir(tmp_path)
    exec(compile(app, "app.py", "exec"), {"__name__": "__main__"})  # what the Space runs: the model from the Hub
    [page] = launched
    assert isinstance(page, gradio.Blocks) and page.title == "alice/tiny · lqf-hub"
    assert (tmp_path / "demo-cache" / "training_trunk.safetensors").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium): .ci/run installs it")
def test_the_page_in_a_browser_explains_an_image_and_forgets_two_training_images(session, tmp_path):
    pytest.importorskip("gradio")
    playwright = pytest.importorskip("playwright.sync_api")
    from lqf_hub.demo.page import DISPUTED_SHOWN, TOP_K, launch

    example = session.examples(1)[0]
    z = session.encode(_example(session))
    with torch.no_grad():
        output = session.model(trunk_output=z)[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    names, labels = session.model.config.id2label, session.explainer.data.labels
    ranking = [{"train_index": i, "label": names[int(labels[i])], "others_predict": names[0], "margin": k - 3.0,
                "loss": 0.0} for k, i in enumerate(reversed(range(session.training_count)))]  # as explain keeps one
    save_ranking(session.cache_dir, session.model, "exact", ranking)
    shown_session = DemoSession(session.model, session.cache_dir)  # reads the kept ranking and trunk outputs
    page_app = launch(shown_session, title="tiny", host="127.0.0.1", port=port, block=False)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#query input[type=file]").set_input_files(str(example))
            page.locator("#split").get_by_text("unexplained").wait_for(timeout=60_000)
            text = page.locator("#split").inner_text()
            label = session.model.config.id2label[int(output.argmax())]
            assert text.startswith(f"{label}: output {float(output.max()):.3f}")
            assert page.locator("#raising img").count() == TOP_K and page.locator("#lowering img").count() == TOP_K
            choices = page.locator("#chosen label")
            assert choices.count() == 2 * TOP_K
            picked = [int(re.match(r"#(\d+)", choices.nth(k).inner_text()).group(1)) for k in (0, 2 * TOP_K - 1)]
            choices.nth(0).click()
            choices.nth(2 * TOP_K - 1).click()
            page.locator("#forget").click()
            page.locator("#after").get_by_text("Certified").wait_for(timeout=120_000)
            after = page.locator("#after").inner_text()
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
            page.get_by_role("tab", name="Disputed labels").click()
            page.locator("#rank").click()
            page.locator("#disputed img").nth(DISPUTED_SHOWN - 1).wait_for(timeout=60_000)
            assert page.locator("#disputed img").count() == DISPUTED_SHOWN
            cells = page.locator("#ranking").inner_text().split()
            first = cells[cells.index("margin") + 1:][:4]  # index, label, others predict, margin
            assert first[0] == str(session.training_count - 1) and float(first[3]) == -3.0  # the kept order
            assert page.locator("#ranked").inner_text().startswith(f"3 of {session.training_count} labels disputed")
            browser.close()
    finally:
        page_app.close()
    _, images = training_images(session.model)  # what `forget` says, solved apart from the page
    new, _ = forget(session.model, images, picked, LQFTrainingArguments(output_dir=str(tmp_path / "f"), progress=False))
    with torch.no_grad():
        expected = new(trunk_output=z)[0]
    shown = re.search(rf"Without {', '.join(f'#{i}' for i in sorted(picked))}: (\S+) \(output (\S+); before: (\S+), "
                      r"(\S+)\)", after)
    assert shown is not None, after
    assert shown[1] == new.config.id2label[int(expected.argmax())] and shown[3] == label
    assert float(shown[2]) == pytest.approx(float(expected.max()), abs=2e-3)
    assert float(shown[4]) == pytest.approx(float(output.max()), abs=1e-3)
    assert abs(float(expected.max()) - float(output.max())) > 2e-3  # forgetting the two moved the prediction
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def _example(session: DemoSession):
    from PIL import Image

    with Image.open(session.examples(1)[0]) as image:
        return image.convert("RGB")
