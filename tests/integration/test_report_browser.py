"""The evaluation report opened in a real browser (headless Chromium, Debian package `chromium`).

Checks that the page renders offline from a file:// URL: a screenshot that is not blank, and
a rendered DOM with one table row per data set and the plots and sample images as inline
``<img>`` elements. Skipped, saying why, where no ``chromium`` binary is on PATH.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from stablerep import report

pytestmark = pytest.mark.integration


def _result(top1, fs, knn, classes):
    return {"num_classes": classes, "train": 1198, "test": 599, "feature_dim": 192,
            "linear_probe": {"top1": top1, "top5": min(1.0, top1 + 0.2)},
            "few_shot": {"way": 5, "shot": 5, "query": 15, "episodes": 600, "mean": fs,
                         "ci95": 0.01},
            "knn": {"k": 20, "top1": knn}, "corrupt_images": 1}


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    metrics = {"checkpoint": "gs://bucket/run/train/ckpt-00001000.pt",
               "model": {"timm_model": "vit_tiny_patch16_224", "image_size": 32,
                         "feature_dim": 192},
               "datasets": {"sklearn:digits": _result(0.93, 0.81, 0.9, 10),
                            "torchvision:DTD": _result(0.31, 0.52, 0.25, 47)},
               "seconds": 42.0}
    baseline = {"checkpoint": "random:vit_tiny_patch16_224", "model": metrics["model"],
                "datasets": {"sklearn:digits": _result(0.41, 0.45, 0.35, 10),
                             "torchvision:DTD": _result(0.08, 0.3, 0.06, 47)}}
    curve = [(s, 1 + 5 * math.exp(-s / 300)) for s in range(0, 1000, 10)]
    samples = [(f"caption {i} <script>document.title='pwned'</script>",
                [_jpeg((40 * i, 60 * j, 120)) for j in range(4)]) for i in range(3)]
    html = report.render_html(metrics, baseline=baseline, loss_curve=curve, samples=samples)
    report.write_report(str(out), html, report.render_markdown(metrics, baseline=baseline))
    return out / "report.html"


def test_report_renders_in_chromium(page: Path, tmp_path: Path, chromium):
    shot = tmp_path / "shot.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert shot.exists(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        stat = ImageStat.Stat(im.convert("L"))
    assert stat.stddev[0] > 10, f"the screenshot looks blank (stddev {stat.stddev[0]:.1f})"
    print(f"screenshot: {shot}")

    proc = chromium("--dump-dom", page.as_uri())
    dom = proc.stdout
    assert proc.returncode == 0 and "<table" in dom, proc.stderr[-3000:]
    rows = re.findall(r'<tr class="ds" data-dataset="([^"]+)">', dom)
    assert rows == ["sklearn:digits", "torchvision:DTD"]
    assert len(re.findall(r'<img class="plot" src="data:image/png;base64,', dom)) == 3
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', dom)) == 12
    assert "+52.0" in dom and "80.1" in dom  # delta vs baseline; DTD's published number
    # The caption's script stayed text: it neither became an element nor ran.
    assert "<title>stablerep evaluation</title>" in dom and "pwned" in dom
    assert "<script" not in dom
