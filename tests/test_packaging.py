"""The card template: one copy in the repo (top-level ``model_cards/``), shipped in the wheel as
``lqf_hub/model_cards/lqf.md``, found by the installed package."""

import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_cards" / "lqf.md"


def test_one_copy_of_the_template_in_the_repo():
    tracked = subprocess.run(["git", "ls-files", "*lqf.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tracked.stdout.split() == ["model_cards/lqf.md"]


def test_the_installed_package_reads_the_top_level_template():
    assert importlib.resources.files("lqf_hub.model_cards").joinpath("lqf.md").read_bytes() == TEMPLATE.read_bytes()


def test_the_wheel_ships_the_template(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lqf_hub", "model_cards"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    # the PEP 517 hook itself: offline, and pip 23 + setuptools 84 without `wheel` fails in `pip wheel`
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.split()[-1]) as wheel:
        assert wheel.read("lqf_hub/model_cards/lqf.md") == TEMPLATE.read_bytes()
        assert "lqf_hub/model_cards/__init__.py" in wheel.namelist()
