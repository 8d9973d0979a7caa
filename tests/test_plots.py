"""unigendet.evaluation.plots: each PNG is a real PNG of a sensible size, and what it draws (the ROC points and AUROC,
the
confusion counts, the per-category bars, the loss series) is checked on the matplotlib figure against hand-computed
values; the captioned grid is checked pixel by pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unigendet.evaluation import plots

# p(fake) and labels of tests/test_evaluation.py's hand-computed summary: AUROC 5/6
P_FAKE = [0.9, 0.4, 0.7, 0.2, 0.6]
LABELS = ["fake", "fake", "fake", "real", "real"]


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the functions save, in order (the PNG is still written)."""
    saved = []
    real_save = plots._save

    def spy(fig, path):
        saved.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return saved


def opened(path, min_px: int = 200, max_px: int = 4000) -> Image.Image:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and all(min_px <= s <= max_px for s in img.size), img.size
    assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
    return img


########################################################################################################################
# the evaluation report
########################################################################################################################
def test_roc_is_the_fake_class_curve_with_its_auroc_in_the_title(tmp_path, figures):
    out = plots.roc_curve_png(P_FAKE, LABELS, tmp_path / "roc.png")
    assert out == tmp_path / "roc.png"
    opened(out)
    ax = figures[0].axes[0]
    curve = ax.lines[0]
    fpr, tpr = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    # thresholds from the top: .9 fake, .7 fake, .6 real, .4 fake, .2 real
    for point in [(0, 0), (0, 1 / 3), (0, 2 / 3), (0.5, 2 / 3), (0.5, 1), (1, 1)]:
        assert np.isclose(fpr, point[0]).__and__(np.isclose(tpr, point[1])).any(), point
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)
    assert "AUROC 0.833" in ax.get_title()
    # integer labels (0 = fake) give the same curve; swapping the classes mirrors it (AUROC 1/6)
    plots.roc_curve_png(P_FAKE, [0, 0, 0, 1, 1], tmp_path / "roc_int.png")
    assert np.array_equal(figures[1].axes[0].lines[0].get_ydata(), tpr)
    plots.roc_curve_png(P_FAKE, [1, 1, 1, 0, 0], tmp_path / "roc_swapped.png")
    assert "AUROC 0.167" in figures[2].axes[0].get_title()


def test_roc_refuses_one_label_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="both labels.*3 fake and 0 real"):
        plots.roc_curve_png([0.1, 0.5, 0.9], ["fake"] * 3, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="scores for"):
        plots.roc_curve_png([0.1], LABELS, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="neither"):
        plots.roc_curve_png([0.1, 0.2], ["fake", "synthetic"], tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()


def test_confusion_matrix_counts_rows_true_columns_predicted(tmp_path, figures):
    pred = ["fake", "real", "fake", "real", "fake"]  # the head of P_FAKE at 0.5
    opened(plots.confusion_matrix_png(pred, LABELS, tmp_path / "cm.png"))
    ax = figures[0].axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    # true fake: 2 judged fake, 1 real; true real: 1 judged fake, 1 real
    assert cells == {(0, 0): "2\n(66.7%)", (0, 1): "1\n(33.3%)", (1, 0): "1\n(50.0%)", (1, 1): "1\n(50.0%)"}
    assert "accuracy 60.0% of 5" in ax.get_title()
    with pytest.raises(ValueError, match="no images"):
        plots.confusion_matrix_png([], [], tmp_path / "empty.png")


def rows(with_text: bool = True) -> list[dict]:
    out = []
    for cate, label, head, text in [("sd", "fake", "fake", "fake"), ("sd", "fake", "real", None),
                                    ("sd", "real", "real", "real"), ("gan", "fake", "fake", "real"),
                                    ("real_photos", "real", "fake", "real"), (None, "real", "real", "real")]:
        r = {"cate": cate, "label": label, "head": head}
        if with_text:
            r["text"] = text
        out.append(r)
    return out


def test_per_category_bars_from_rows_and_from_summary_stats(tmp_path, figures):
    opened(plots.per_category_png(rows(), tmp_path / "cat.png"))
    ax = figures[0].axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == ["gan", "real_photos", "sd"]  # sorted; the row without a category is left out
    heights = [round(p.get_height(), 6) for p in ax.patches]
    # head: gan 1/1, real_photos 0/1, sd 2/3; explanation: gan 0/1, real_photos 1/1, sd 2/3 (None is wrong)
    assert heights == [100.0, 0.0, round(200 / 3, 6), 0.0, 100.0, round(200 / 3, 6)]
    assert sorted(t.get_text() for t in ax.texts) == ["n=1", "n=1", "n=3"]
    from unigendet.evaluation.scores import summarize_detection

    stats = summarize_detection([{**r, "p_fake": 0.5, "rouge_l": 0.0, "css": 0.0} for r in rows()])["per_category"]
    plots.per_category_png(stats, tmp_path / "cat_stats.png")
    assert [p.get_height() for p in figures[1].axes[0].patches] == pytest.approx(heights, abs=1e-4)  # float32
    plots.per_category_png(rows(with_text=False), tmp_path / "head_only.png")
    assert len(figures[2].axes[0].patches) == 3
    with pytest.raises(ValueError, match="no categories"):
        plots.per_category_png([{"cate": None, "label": "fake", "head": "fake"}], tmp_path / "none.png")


########################################################################################################################
# loss curves
########################################################################################################################
def test_loss_curves_one_panel_per_loss_key_last_line_of_a_step_wins(tmp_path, figures):
    lines = [{"step": 1, "train/loss_ce": 7.5, "train/loss_det": 0.70, "train/lr_det": 1e-5},
             {"step": 2, "train/loss_ce": 7.0, "train/loss_det": 0.65, "train/lr_det": 2e-5},
             {"step": 3, "train/loss_ce": 6.9, "train/loss_det": None, "train/loss_fresh": 8.0},
             {"step": 2, "train/loss_ce": 6.0, "train/loss_det": 0.60},  # a resumed run retrained step 2
             {"step": 4, "train/loss_ce": 6.5, "train/loss_det": 0.55}]
    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    opened(plots.loss_curves_png(path, tmp_path / "loss.png"))
    panels = {ax.get_title(): ax for ax in figures[0].axes}
    assert sorted(panels) == ["train/loss_ce", "train/loss_det", "train/loss_fresh"]  # no lr
    ce = panels["train/loss_ce"].lines[0]
    assert list(ce.get_xdata()) == [1, 2, 3, 4] and list(ce.get_ydata()) == [7.5, 6.0, 6.9, 6.5]
    det = panels["train/loss_det"].lines[0]
    assert list(det.get_xdata()) == [1, 2, 4] and list(det.get_ydata()) == [0.70, 0.60, 0.55]  # null: a gap

    plots.loss_curves_png(path, tmp_path / "det.png", keys=["train/loss_det", "train/lr_det"])
    assert [ax.get_title() for ax in figures[1].axes] == ["train/loss_det", "train/lr_det"]
    with pytest.raises(ValueError, match="no values"):
        plots.loss_curves_png(path, tmp_path / "x.png", keys=["train/loss_nothing"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no steps"):
        plots.loss_curves_png(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_long_runs_get_a_moving_average(tmp_path, figures):
    rng = np.random.default_rng(0)
    y = 5 * np.exp(-np.arange(400) / 100) + rng.normal(0, 0.3, 400)
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps({"step": i + 1, "train/loss_mse": v}) + "\n" for i, v in enumerate(y)))
    plots.loss_curves_png(path, tmp_path / "loss.png")
    raw, smooth = figures[0].axes[0].lines
    window = 400 // 20
    assert smooth.get_ydata()[-1] == pytest.approx(y[-window:].mean())
    assert np.std(np.diff(smooth.get_ydata())) < np.std(np.diff(raw.get_ydata())) / 5


########################################################################################################################
# captioned grids
########################################################################################################################
COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 220)]
W, H = 60, 40


def solid(colour) -> Image.Image:
    return Image.new("RGB", (W, H), colour)


def dark_rows(region: np.ndarray) -> int:
    """Rows of a region holding text-like (non-white) pixels."""
    return int((region.min(axis=(1, 2)) < 200).sum())


def test_caption_grid_puts_each_caption_under_its_image():
    captions = ["a red one", "", "a blue one with a caption long enough to wrap over several lines of sixty px"]
    grid = plots.caption_grid([solid(c) for c in COLOURS], captions, n_cols=2)
    px = np.asarray(grid)
    band = grid.height // 2 - H
    assert grid.mode == "RGB" and grid.width == 2 * W and grid.height == 2 * (H + band) and band > 10
    for i, colour in enumerate(COLOURS):
        x, y = (i % 2) * W, (i // 2) * (H + band)
        assert (px[y: y + H, x: x + W] == colour).all(), i  # the image, untouched by text
        below = px[y + H: y + H + band, x: x + W]
        if captions[i]:
            assert dark_rows(below) > 0 and (below.max(axis=2) < 128).any(), i  # dark glyph pixels
        else:
            assert (below == 255).all()  # an empty caption leaves a blank band
    assert dark_rows(px[2 * H + band:, W:]) == 0  # the fourth cell: nothing
    # the long caption wraps: more text rows under the third image than under the first
    assert dark_rows(px[2 * H + band:, :W]) > 2 * dark_rows(px[H: H + band, :W])


def test_caption_grid_survives_long_words_and_caps_the_lines():
    long = "x" * 500 + " " + "word " * 200
    grid = plots.caption_grid([solid(COLOURS[0]), solid(COLOURS[1])], [long, "short"], n_cols=1, max_lines=3)
    one_line = plots.caption_grid([solid(COLOURS[0])], ["short"], n_cols=1)
    band, band_1 = grid.height // 2 - H, one_line.height - H
    assert band <= 3 * band_1 and band > band_1  # three lines at most, more than one
    px = np.asarray(grid)
    assert (px[:H, :W] == COLOURS[0]).all() and (px[H + band: 2 * H + band, :W] == COLOURS[1]).all()
    many = plots.caption_grid([solid(c) for c in COLOURS], ["", "", ""], n_cols=5)
    assert many.size == (3 * W, H + many.height - H) and (np.asarray(many)[H:] == 255).all()
    wide = plots.caption_grid([solid(COLOURS[0]), Image.new("RGB", (2 * W, 2 * H), COLOURS[2])], ["a", "b"], 2)
    assert (np.asarray(wide)[:H, W: 2 * W] == COLOURS[2]).all() and wide.width == 2 * W  # cropped to its cell


def test_caption_grid_rejects_mismatched_input():
    with pytest.raises(ValueError, match="no images"):
        plots.caption_grid([], [], 2)
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        plots.caption_grid([solid(COLOURS[0])], ["a", "b"], 2)
    with pytest.raises(ValueError, match="n_cols"):
        plots.caption_grid([solid(COLOURS[0])], ["a"], 0)
