"""The docs a newcomer reads: the site builds with ``mkdocs build --strict`` (a broken link, a
missing page or a stale API / config / CLI reference fails it), the README stays short and its
Python example runs as written, and BENCHMARKS.md opens with its summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_the_docs_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stderr[-6000:]}"
    # the generated parts are there: API from the docstrings, config keys from the schema, CLI help
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="castseg.api.load"' in api and 'id="castseg.api.run"' in api
    configs = (site / "configs" / "index.html").read_text(encoding="utf-8")
    assert "train.max_steps" in configs and "loss.lambda_semi" in configs and "teacher.type: grounded_sam" in configs
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "usage: castseg distill" in cli and "usage: castseg convert" in cli
    # the results page carries BENCHMARKS.md's summary, included, not copied
    assert "+1.22 ± 0.91" in (site / "results" / "index.html").read_text(encoding="utf-8")


def test_the_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 150, f"README.md has {n} lines; move detail into docs/ (the README links every page)"


def test_the_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets, "README.md should link the docs pages"
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_benchmarks_opens_with_its_summary():
    first_screen = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()[:50]
    assert "## Summary" in first_screen
    assert "<!-- --8<-- [end:summary] -->" in first_screen  # the whole summary table fits the first screen


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 1, "README.md should hold exactly one ```python block (the one this test runs)"

    import torch

    from castseg.models import StudentConfig, build_student, save_checkpoint

    torch.manual_seed(0)  # a small random student: the example's ONNX export (with its parity check) dominates
    vit = dict(model_type="dinov2", hidden_size=48, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
               patch_size=14, image_size=224, layerscale_value=1.0, layer_norm_eps=1e-6, use_swiglu_ffn=False)
    student = build_student(StudentConfig.from_preset(
        "tiny", encoder_config=vit, num_queries=10, dec_layers=1, hidden_dim=32, mask_dim=32, num_heads=2,
        dim_feedforward=64, embed_hidden=32, embed_dim=16))
    ckpt = tmp_path / "runs" / "demo" / "refine" / "checkpoints" / "last"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(ckpt, student, student.config.to_dict(), ["nucleus"], step=0)
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    sizes = {"gray.png": (40, 56), "rgb.png": (48, 64)}
    Image.fromarray(rng.integers(0, 256, sizes["gray.png"], dtype=np.uint8), "L").save(tmp_path / "images" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (*sizes["rgb.png"], 3), dtype=np.uint8), "RGB").save(
        tmp_path / "images" / "rgb.png")

    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})

    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    for line in lines:  # "<image> <K> (K, H, W)": the masks come back at each image's own size
        name = next(n for n in sizes if n in line)
        k, h, w = map(int, re.search(r"\((\d+), (\d+), (\d+)\)", line).groups())
        assert (h, w) == sizes[name] and line.split()[1] == str(k), line
    assert (tmp_path / "student.onnx").stat().st_size > 0
