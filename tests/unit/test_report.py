"""The evaluation report: HTML/Markdown rendering, atomic publishing, loss curve and samples."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import tarfile
import uuid
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from stablerep import report, storage
from stablerep.data.shards import iter_caption_groups

XSS = '<script>alert("x")</script> & "quotes"'
PNG_SRC = re.compile(r'<img class="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _result(top1, top5, fs=None, ci=None, knn=None, *, classes=10, way=5) -> dict:
    out = {"num_classes": classes, "train": 1198, "test": 599, "feature_dim": 192,
           "linear_probe": {"top1": top1, "top5": top5, "best_c": 0.1, "val_top1": top1,
                            "seconds": 3.1},
           "corrupt_images": 0}
    if fs is not None:
        out["few_shot"] = {"way": way, "shot": 5, "query": 15, "episodes": 600, "mean": fs,
                           "ci95": ci, "seconds": 9.0}
    if knn is not None:
        out["knn"] = {"k": 20, "top1": knn}
    return out


def _metrics_doc() -> dict:
    return {
        "checkpoint": "gs://bucket/run/train/ckpt-00001000.pt",
        "model": {"timm_model": "vit_tiny_patch16_224", "image_size": 32, "feature_dim": 192},
        "datasets": {
            "sklearn:digits": _result(0.93, 0.99, 0.81, 0.007, 0.9),
            "torchvision:FGVCAircraft": _result(0.212, 0.45, knn=0.15, classes=100),
        },
        "seconds": 12.3,
    }


def _baseline_doc() -> dict:
    return {
        "checkpoint": "random:vit_tiny_patch16_224",
        "model": {"timm_model": "vit_tiny_patch16_224", "image_size": 32, "feature_dim": 192},
        "datasets": {
            "sklearn:digits": _result(0.41, 0.8, 0.45, 0.0104, 0.35),
            "torchvision:FGVCAircraft": _result(0.05, 0.15, knn=0.04, classes=100),
        },
    }


@pytest.fixture
def metrics() -> dict:
    return _metrics_doc()


@pytest.fixture
def baseline() -> dict:
    return _baseline_doc()


def _image(color, fmt="JPEG", size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr class="ds" data-dataset="([^"]*)">', html)


def _plots(html: str) -> list[Image.Image]:
    images = []
    for data in PNG_SRC.findall(html):
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        im.load()
        images.append(im)
    return images


def _assert_self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert not re.search(r'src="(?!data:)', html)
    assert "Content-Security-Policy" in html


class _Text(HTMLParser):
    """What a reader sees, in document order: each element with its attributes (data URIs
    and empty values left out) and the text between them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag == "style"
        shown = sorted(f"{k}={v}" for k, v in attrs
                       if v and not (k == "src" and v.startswith("data:")))
        self.parts.append(f"<{tag} {' '.join(shown)}>".replace(" >", ">"))

    def handle_endtag(self, tag):
        self._skip -= tag == "style"

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(" ".join(data.split()))


def visible_text(html: str) -> list[str]:
    parser = _Text()
    parser.feed(html)
    return parser.parts


def report_text_cases() -> dict[str, dict]:
    """Reports whose text is compared with the text the f-string renderer gave."""
    curve = [(s, 6.0 - s / 100) for s in range(0, 400, 10)]
    samples = [(XSS, [_image((200, 20, 20)), _image((20, 200, 20), "WEBP")]),
               ("a red bus", [_image(0, "PNG"), b"not an image"])]
    odd = {"checkpoint": "<b>ckpt</b>", "model": None, "datasets": {
        "imagefolder:/data/<img src=x onerror=alert(1)>": {"num_classes": 3},
        "only-knn": {"knn": {"k": 5, "top1": 0.5}, "train": 10, "test": 5},
        "nan-probe": {"linear_probe": {"top1": float("nan"), "top5": None}}}}
    return {
        "full": dict(metrics=_metrics_doc(), baseline=_baseline_doc(), loss_curve=curve,
                     samples=samples, title="run <1>"),
        "no_baseline": dict(metrics=_metrics_doc()),
        "baseline_in_metrics": dict(metrics={**_metrics_doc(), "baseline": _baseline_doc()}),
        "odd": dict(metrics=odd),
        "empty": dict(metrics={"checkpoint": "x", "datasets": {}}),
    }


GOLDEN = Path(__file__).parent / "data" / "report_text_f_strings.json"


def test_html_text_is_the_f_string_renderers_text() -> None:
    """The elements, attributes and text of each case, as the renderer before the templates
    wrote them (tests/unit/data/report_text_f_strings.json)."""
    golden = json.loads(GOLDEN.read_text())
    for name, kwargs in report_text_cases().items():
        assert visible_text(report.render_html(**kwargs)) == golden[name], name
    markdown = [report.render_markdown(**{k: v for k, v in kw.items()
                                          if k in ("metrics", "baseline")})
                for kw in report_text_cases().values()]
    assert markdown == golden["markdown"]


# ---------------------------------------------------------------------------- HTML


def test_html_with_baseline(metrics, baseline):
    html = report.render_html(metrics, baseline=baseline)
    _assert_self_contained(html)
    assert html.startswith("<!DOCTYPE html>")
    assert _rows(html) == ["sklearn:digits", "torchvision:FGVCAircraft"]
    assert "gs://bucket/run/train/ckpt-00001000.pt" in html
    assert "vit_tiny_patch16_224" in html and "random:vit_tiny_patch16_224" in html
    digits = html.split('data-dataset="sklearn:digits">', 1)[1].split("</tr>", 1)[0]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", digits)
    # linear top-1, baseline, delta; top-5 x3; few-shot x3; kNN x3; paper; counts
    assert cells[1:4] == ["93.0", "41.0", "+52.0"]
    assert cells[4:7] == ["99.0", "80.0", "+19.0"]
    assert cells[7:10] == ["81.0 \u00b1 0.7", "45.0 \u00b1 1.0", "+36.0"]
    assert cells[10:13] == ["90.0", "35.0", "+55.0"]
    assert cells[13] == report.MISSING  # no published number for digits
    assert cells[14:] == ["10", "1,198", "599", "0"]
    assert 'class="pos">+52.0' in digits
    # Aircraft has no few-shot: dashes, and the paper's 59.2 with the caveat.
    aircraft = html.split('data-dataset="torchvision:FGVCAircraft">', 1)[1].split("</tr>")[0]
    assert "21.2" in aircraft and "+16.2" in aircraft and "59.2" in aircraft
    assert aircraft.count(report.MISSING) == 3
    assert "Published results" in html and "paper scale" in html
    assert "\u0394 pp" in html and "Few-shot 5-way 5-shot" in html
    plots = _plots(html)
    assert len(plots) == 2  # few-shot and linear probe; no loss curve given
    assert all(p.format == "PNG" and p.width > 300 and p.height > 150 for p in plots)
    assert "Training loss" not in html and "Generated samples" not in html


def test_html_without_baseline(metrics):
    html = report.render_html(metrics)
    _assert_self_contained(html)
    assert _rows(html) == ["sklearn:digits", "torchvision:FGVCAircraft"]
    assert "baseline" not in html.lower() and "\u0394" not in html
    digits = html.split('data-dataset="sklearn:digits">', 1)[1].split("</tr>", 1)[0]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", digits)
    assert cells[1:5] == ["93.0", "99.0", "81.0 \u00b1 0.7", "90.0"]
    assert len(_plots(html)) == 2


def test_html_baseline_taken_from_metrics(metrics, baseline):
    html = report.render_html({**metrics, "baseline": baseline})
    assert "+52.0" in html and "random:vit_tiny_patch16_224" in html


def test_html_with_loss_curve_and_samples(metrics, baseline):
    curve = [(s, 6.0 - s / 100) for s in range(0, 400, 10)]
    jpg, webp, png = _image((200, 20, 20)), _image((20, 200, 20), "WEBP"), _image(0, "PNG")
    samples = [(XSS, [jpg, webp]), ("a red bus", [png, b"not an image"])]
    html = report.render_html(metrics, baseline=baseline, loss_curve=curve, samples=samples,
                              title="run <1>")
    _assert_self_contained(html)
    assert len(_plots(html)) == 3
    assert "Training loss" in html and "step 390" in html
    # Sample images inline, byte for byte (small images are not re-encoded).
    assert f"data:image/jpeg;base64,{base64.b64encode(jpg).decode()}" in html
    assert f"data:image/webp;base64,{base64.b64encode(webp).decode()}" in html
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in html
    assert "undecodable image" in html
    # The caption is user data: escaped, inert, in the label and the alt text.
    assert "<script>" not in html
    figcaption = html.split("<figcaption>", 1)[1].split("</figcaption>", 1)[0]
    assert "<" not in figcaption and '"' not in figcaption and unescape(figcaption) == XSS
    assert f'alt="{figcaption}"' in html  # the alt text: the same escaped caption
    assert "<figcaption>&lt;script&gt;" in html
    assert "<title>run &lt;1&gt;</title>" in html and "<h1>run &lt;1&gt;</h1>" in html


def test_the_model_line_names_the_model_with_its_kwargs(metrics):
    small = {"timm_model": "vit_tiny_patch16_224", "image_size": 32, "feature_dim": 192,
             "model_kwargs": {"patch_size": 4, "depth": 4}}
    want = "vit_tiny_patch16_224(patch_size=4, depth=4), image size 32, feature dim 192"
    html = report.render_html({**metrics, "model": small})
    assert f"<dt>Model</dt><dd>{want}</dd>" in html
    assert f"- model: {want}" in report.render_markdown({**metrics, "model": small})
    assert "<dd>vit_tiny_patch16_224, image size 32, feature dim 192</dd>" in (
        report.render_html(metrics))  # no kwargs: the name alone


@pytest.mark.parametrize("with_baseline", [True, False])
def test_the_probe_legend_covers_no_bar_or_label(with_baseline):
    """The legend (checkpoint, baseline, paper marker) lies outside the plotting area."""
    from stablerep.report_plots import bar_figure

    names = ["sklearn:digits", "torchvision:DTD"]  # DTD: long bars at the bottom right
    series = [("checkpoint", "#2563eb", [0.93, 0.95], None)]
    if with_baseline:
        series.append(("baseline", "#9ca3af", [0.41, 0.90], None))
    fig = bar_figure(names, series, xlabel="top-1", title="Linear probe top-1",
                     paper=[None, 80.1])
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert ("baseline" in labels) == with_baseline and "checkpoint" in labels
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer))
    for text in ax.texts:  # the value labels
        assert not box.overlaps(text.get_window_extent(renderer)), text.get_text()
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)


def test_large_sample_images_are_downscaled():
    big = _image((10, 120, 240), size=(1024, 768))
    uri = report.image_data_uri(big)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(im.size) == report.THUMBNAIL_PX and im.size == (256, 192)
    assert report.image_data_uri(b"\x00garbage") is None


def test_html_escapes_names_and_handles_missing_parts():
    metrics = {
        "checkpoint": "<b>ckpt</b>", "model": None,
        "datasets": {
            "imagefolder:/data/<img src=x onerror=alert(1)>": {"num_classes": 3},
            "only-knn": {"knn": {"k": 5, "top1": 0.5}, "train": 10, "test": 5},
            "nan-probe": {"linear_probe": {"top1": float("nan"), "top5": None}},
        },
    }
    html = report.render_html(metrics, loss_curve=[], samples=[])
    _assert_self_contained(html)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;ckpt&lt;/b&gt;" in html
    assert len(_rows(html)) == 3
    assert "nan" not in html.lower().replace("nan-probe", "")
    assert len(_plots(html)) == 0  # nothing plottable: no probe, no few-shot numbers
    assert "Training loss" not in html


def test_html_without_datasets():
    html = report.render_html({"checkpoint": "x", "datasets": {}})
    _assert_self_contained(html)
    assert "No data set was evaluated" in html and _rows(html) == []
    assert "No data set was evaluated" in report.render_markdown({"datasets": {}})


def test_loss_curve_with_non_finite_points_still_plots(metrics):
    html = report.render_html(metrics, loss_curve=[(0, 2.0), (1, float("nan")), (2, 1.0)])
    assert len(_plots(html)) == 3
    only_nan = report.render_html(metrics, loss_curve=[(0, float("inf"))])
    assert len(_plots(only_nan)) == 2 and "Training loss" not in only_nan


def test_paper_results_lookup():
    assert report.paper_results("torchvision:FGVCAircraft") == {
        "StableRep ViT-B/16 (paper)": 59.2}
    assert list(report.paper_results("imagenet").values()) == [72.8]
    assert list(report.paper_results("torchvision:ImageNet").values()) == [72.8]
    assert list(report.paper_results("torchvision:stanfordcars").values()) == [83.5]
    assert report.paper_results("sklearn:digits") == {}
    expected = {"FGVCAircraft": 59.2, "StanfordCars": 83.5, "DTD": 80.1, "Flowers102": 97.3,
                "OxfordIIITPet": 88.3, "SUN397": 74.3, "Caltech101": 94.7, "Food101": 85.1,
                "VOC2007": 87.9, "ImageNet": 72.8}
    for name, value in expected.items():
        assert list(report.PAPER_RESULTS[f"torchvision:{name}"].values()) == [value]
    assert "ViT-B/16" in report.PAPER_NOTE


# ---------------------------------------------------------------------------- Markdown


def test_markdown(metrics, baseline):
    md = report.render_markdown(metrics, baseline=baseline)
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| Data set"))
    assert "Linear probe top-1" in header and "Few-shot 5-way 5-shot" in header
    assert "Paper top-1*" in header
    digits = next(ln for ln in lines if ln.startswith("| sklearn:digits"))
    assert "93.0 / 41.0 (+52.0)" in digits and "81.0 \u00b1 0.7 / 45.0 \u00b1 1.0 (+36.0)" in digits
    aircraft = next(ln for ln in lines if ln.startswith("| torchvision:FGVCAircraft"))
    assert "| 59.2 |" in aircraft
    n_cols = header.count(" | ") + 1
    assert all(ln.count(" | ") + 1 == n_cols for ln in (digits, aircraft))
    assert "paper scale" in md
    plain = report.render_markdown(metrics)
    assert "| sklearn:digits | 93.0 | 99.0 | 81.0 \u00b1 0.7 | 90.0 |" in plain
    assert "baseline" not in plain


def test_markdown_escapes_pipes():
    md = report.render_markdown({"datasets": {"a|b": {"knn": {"top1": 0.5}}}})
    assert "| a\\|b |" in md


# ---------------------------------------------------------------------------- write_report


def test_write_report_local(tmp_path, metrics):
    out = tmp_path / "eval"
    html = report.render_html(metrics)
    uri = report.write_report(str(out), html, report.render_markdown(metrics))
    assert uri == f"{out}/report.html"
    assert (out / "report.html").read_text() == html
    assert (out / "report.md").read_text().startswith("# stablerep evaluation")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert report.write_report(f"file://{out}", "<p>v2</p>") == f"file://{out}/report.html"
    assert (out / "report.html").read_text() == "<p>v2</p>"


def test_write_report_memory(metrics):
    out = f"memory://reports-{uuid.uuid4().hex[:8]}/eval"
    html = report.render_html(metrics)
    uri = report.write_report(out, html, "# md\n")
    try:
        assert uri == f"{out}/report.html"
        assert storage.read_text(uri) == html
        assert storage.read_text(f"{out}/report.md") == "# md\n"
        assert [storage.name(u) for u in storage.list_dir(out)] == ["report.html", "report.md"]
    finally:
        storage.remove(out, recursive=True)


def test_write_report_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    report.write_report(str(out), "<p>old</p>")

    def fail(self):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.AtomicWrite, "publish", fail)
    with pytest.raises(OSError, match="disk gone"):
        report.write_report(str(out), "<p>new</p>" * 1000)
    assert (out / "report.html").read_text() == "<p>old</p>"
    assert [p.name for p in out.iterdir()] == ["report.html"]  # no staged file left


# ---------------------------------------------------------------------------- loss curve


def test_read_loss_curve(tmp_path):
    lines = [
        {"step": 10, "loss": 5.0, "lr": 0.1, "epoch": 0},
        {"step": 20, "loss": 4.0},
        {"step": 5, "event": "eval", "top1": 0.3},  # no loss: skipped
        {"step": 20, "loss": 3.5},  # a resumed run rewrote step 20: the last wins
        {"step": 1, "loss": 6},
        {"loss": 1.0},  # no step
        {"step": 30, "loss": "nan?"},
    ]
    text = "\n".join(json.dumps(r) for r in lines[:3]) + "\n\n{truncated\n" + "\n".join(
        json.dumps(r) for r in lines[3:]) + "\n"
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    expected = [(1, 6.0), (10, 5.0), (20, 3.5)]
    assert report.read_loss_curve(str(path)) == expected
    curve = report.read_loss_curve(f"file://{path}")
    assert curve == expected and all(type(s) is int and type(v) is float for s, v in curve)
    mem = f"memory://curves-{uuid.uuid4().hex[:8]}/metrics.jsonl"
    storage.write_text(mem, text)
    try:
        assert report.read_loss_curve(mem) == expected
    finally:
        storage.remove(mem)


def test_read_loss_curve_missing_file(tmp_path):
    with pytest.raises(storage.StorageNotFound):
        report.read_loss_curve(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------- sample grid


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(captions: int, per_caption: int, *, fmt: str = "jpg", start: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for c in range(start, start + captions):
            for j in range(per_caption):
                key = f"{c:012d}_{j:03d}"
                pil = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
                _add(tar, f"{key}.{fmt}", _image((c * 40 % 256, j * 50, 100), pil))
                _add(tar, f"{key}.txt", f"caption {c} <b>".encode())
                _add(tar, f"{key}.json", json.dumps({"caption_id": c, "j": j}).encode())
    return buf.getvalue()


def test_read_sample_grid(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    data = _shard(8, 5, start=3)
    (images / "shard-000000.tar").write_bytes(data)
    (images / "shard-000001.tar").write_bytes(b"never read")
    grid = report.read_sample_grid(str(images), captions=3, per_caption=4)
    assert [c for c, _ in grid] == ["caption 3 <b>", "caption 4 <b>", "caption 5 <b>"]
    assert all(len(imgs) == 4 for _, imgs in grid)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        first = tar.extractfile("000000000004_002.jpg").read()
    assert grid[1][1][2] == first  # grouped by caption id, ordered by j
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for _, imgs in grid for b in imgs)
    # Defaults: 6 captions x 4; fewer captions than asked: all of them.
    assert [len(i) for _, i in report.read_sample_grid(str(images))] == [4] * 6
    small = tmp_path / "small"
    small.mkdir()
    (small / "shard-000000.tar").write_bytes(_shard(2, 2, fmt="png"))
    assert [len(i) for _, i in report.read_sample_grid(str(small), captions=6)] == [2, 2]
    assert report.read_sample_grid(str(small), captions=0) == []


def test_read_sample_grid_memory_webp_orders_by_j_and_skips_what_training_skips(caplog):
    """The grid is read by the training data reader: a sample without a txt member (the
    caption) is skipped and logged there, so the report does not show it either."""
    root = f"memory://images-{uuid.uuid4().hex[:8]}/images"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "000000000007_001.webp", _image((1, 2, 3), "WEBP"))
        _add(tar, "000000000007_001.txt", b"caption seven")
        _add(tar, "000000000007_000.webp", _image((9, 9, 9), "WEBP"))
        _add(tar, "000000000007_000.txt", b"caption seven")
        _add(tar, "000000000008_000.webp", _image((4, 5, 6), "WEBP"))
        _add(tar, "000000000008_000.json", b'{"caption": "no txt member"}')
        _add(tar, "000000000009_000.webp", _image((7, 7, 7), "WEBP"))
        _add(tar, "000000000009_000.txt", b" caption nine\n")
    storage.write_bytes(f"{root}/shard-000000.tar", buf.getvalue())
    try:
        grid = report.read_sample_grid(root)
        groups = list(iter_caption_groups(f"{root}/shard-000000.tar", log_skips=False))
    finally:
        storage.remove(root, recursive=True)
    assert [c for c, _ in grid] == ["caption seven", "caption nine"]
    assert [g.caption_id for g in groups] == [7, 9]  # what training reads
    assert [len(i) for _, i in grid] == [2, 1]
    assert Image.open(io.BytesIO(grid[0][1][0])).getpixel((0, 0)) == pytest.approx(
        (9, 9, 9), abs=3)  # j=0 first although stored second
    assert "'000000000008_000': no txt member" in caplog.text


class _NonSeekable(io.RawIOBase):
    """A stream that can only be read forward, like an object-store download."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._buf.readinto(b)
        self.consumed += n
        return n

    def seekable(self) -> bool:
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation("not seekable")

    def tell(self):
        raise io.UnsupportedOperation("not seekable")


def test_read_sample_grid_streams_and_stops_early(tmp_path, monkeypatch):
    data = _shard(200, 4)
    streams: list[_NonSeekable] = []

    @contextlib.contextmanager
    def open_read(uri, **_):
        assert uri == "gs://b/images/shard-000000.tar"
        streams.append(_NonSeekable(data))
        yield streams[-1]

    monkeypatch.setattr(storage, "open_read", open_read)
    grid = report.read_sample_grid("gs://b/images", captions=2, per_caption=3)
    assert [(c, len(i)) for c, i in grid] == [("caption 0 <b>", 3), ("caption 1 <b>", 3)]
    assert streams[0].consumed < len(data) // 10  # stopped after the captions it needed


def test_read_sample_grid_truncated_shard(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    data = _shard(4, 2)
    (images / "shard-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    grid = report.read_sample_grid(str(images))
    assert 1 <= len(grid) <= 3 and grid[0][0] == "caption 0 <b>"


def test_read_sample_grid_missing_shard(tmp_path):
    with pytest.raises(storage.StorageNotFound):
        report.read_sample_grid(str(tmp_path))


def test_stage_style_roundtrip(tmp_path, metrics, baseline):
    """The calls the eval stage makes, end to end on local files."""
    run = Path(tmp_path)
    (run / "images").mkdir()
    (run / "images" / "shard-000000.tar").write_bytes(_shard(3, 4))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 4 - s / 50}) + "\n" for s in range(100)))
    html = report.render_html(
        metrics, baseline=baseline,
        loss_curve=report.read_loss_curve(str(run / "metrics.jsonl")),
        samples=report.read_sample_grid(str(run / "images")))
    uri = report.write_report(str(run / "eval"), html, report.render_markdown(metrics))
    text = storage.read_text(uri)
    _assert_self_contained(text)
    assert len(_plots(text)) == 3 and text.count("<figure") == 3
    assert text.count('src="data:image/jpeg;base64,') == 12
