"""`graphlrp evaluate`: the insertion/deletion protocol against hand-computed values, and one whole run on a tiny
model and a handful of images through the command line."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from graphlrp.cli import main
from graphlrp.evaluate import EvaluationError
from graphlrp.evaluate.data import load_image_set
from graphlrp.evaluate.methods import METHODS, last_stage, resolve, with_relu_modules
from graphlrp.evaluate.metrics import (InsertionDeletion, auc, default_step, insertion_masks, mean_se, pixel_maps,
                                       quantize)
from graphlrp.zoo.cifar import CifarResNet


class ShownFraction(nn.Module):
    """Two classes; p(class 0) = fraction of pixels whose first channel is 1 (white), p(class 1) = the rest."""

    def forward(self, x):
        m = x[:, 0].flatten(1).mean(1).clamp(1e-9, 1 - 1e-9)
        return torch.stack([m.log(), (1 - m).log()], 1)


def test_default_step_gives_about_100_points():
    assert default_step(32, 32) == 10
    assert default_step(224, 224) == 502


def test_quantize_floors_to_eight_equal_levels_between_min_and_max():
    values = torch.tensor([[0.0, 0.1, 0.3, 0.5, 0.9, 0.95, 1.1, 1.4]])
    q = quantize(values.view(1, 2, 4)).flatten()
    # levels are -> 0, 0.2, 0.4, ..., 1.4 (step 0.2); each value floored to the level at or below it
    expected = torch.tensor([0.0, 0.0, 0.2, 0.4, 0.8, 0.8, 1.0, 1.4])
    assert torch.allclose(q, expected, atol=1e-6)
    rng_map = torch.randn(3, 16, 16)
    assert all(len(torch.unique(m)) <= 8 for m in quantize(rng_map))
    assert torch.equal(quantize(rng_map).amax((1, 2)), rng_map.amax((1, 2)))


def test_quantize_of_a_constant_map_is_the_map():
    assert torch.equal(quantize(torch.full((1, 4, 4), 2.5)), torch.full((1, 4, 4), 2.5))


def test_insertion_masks_move_tied_pixels_together():
    # step 1 on 4 pixels: 4 points, thresholds at ranks 1, 2, 3, 3 of [3, 1, 1, 0] -> 1, 1, 0, 0
    masks = insertion_masks(torch.tensor([[3.0, 1.0], [1.0, 0.0]]), step=1)
    assert masks.tolist() == [[True, True, True, False]] * 2 + [[True] * 4] * 2


def test_insertion_masks_step_and_last_point():
    masks = insertion_masks(torch.arange(10.0).view(2, 5), step=3)  # ranks 3, 6, 9, 9 (clamped) -> 4, 7, 10, 10 px
    assert masks.sum(1).tolist() == [4, 7, 10, 10]


def test_auc_is_the_trapezoid_on_a_unit_x_axis():
    assert auc(np.array([0.0, 1.0])) == pytest.approx(0.5)
    assert auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert auc(np.array([0.0, 0.5, 1.0, 1.0])) == pytest.approx(2 / 3)
    assert auc(np.array([[0.0, 1.0], [1.0, 1.0]])).tolist() == pytest.approx([0.5, 1.0])


def test_mean_and_standard_error():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)


def test_pixel_maps_sum_channels_and_upsample_coarse_maps():
    attr = torch.ones(2, 3, 4, 4)
    assert torch.equal(pixel_maps(attr, (4, 4)), torch.full((2, 4, 4), 3.0))
    coarse = pixel_maps(torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]), (4, 4))
    assert coarse.shape == (1, 4, 4) and torch.all(coarse[:, :, 0] < coarse[:, :, 3])
    assert torch.equal(pixel_maps(torch.tensor([[[float("nan"), 1.0]]]), (1, 2)), torch.tensor([[[0.0, 1.0]]]))


def test_curves_against_a_model_with_known_output():
    """A white 2×2 image; p(class 0) is the fraction of shown pixels. Map ranks [4, 3, 2, 1], step 1:
    insertion shows 2, 3, 4, 4 pixels -> 0.5, 0.75, 1, 1; deletion hides them -> 0.5, 0.25, 0, 0."""
    images = torch.ones(1, 3, 2, 2)
    evaluator = InsertionDeletion(ShownFraction(), torch.rand(4, 3, 2, 2), mean=(0, 0, 0), std=(1, 1, 1), step=1)
    ranked = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    curves = evaluator.curves(images, torch.tensor([0]), {"a": ranked, "same ranking": ranked * 10})
    ins, dele = curves["a"]
    assert ins[0] == pytest.approx([0.5, 0.75, 1.0, 1.0], abs=1e-6)
    assert dele[0] == pytest.approx([0.5, 0.25, 0.0, 0.0], abs=1e-6)
    assert auc(ins)[0] == pytest.approx(2.5 / 3, abs=1e-6) and auc(dele)[0] == pytest.approx(0.5 / 3, abs=1e-6)
    assert np.array_equal(curves["same ranking"][0], ins)
    # distinct masked images: 2, 3 and 4 pixels shown, and 2, 1 and 0 shown; the second map adds none
    assert evaluator.model_calls == 6


def test_curves_blacken_in_rgb_before_normalising():
    """With mean 0.5 / std 0.5, a removed pixel must reach the model as (0 - 0.5) / 0.5 = -1."""
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    evaluator = InsertionDeletion(Spy(), torch.zeros(1, 3, 1, 3), mean=(0.5,) * 3, std=(0.5,) * 3, step=1)
    seen.clear()
    evaluator.curves(torch.ones(1, 3, 1, 3), torch.tensor([0]), {"m": torch.tensor([[[2.0, 1.0, 0.0]]])})
    # 3 pixels, step 1: insertion shows 2, 3, 3 pixels; deletion hides them
    shown = sorted(torch.cat(seen)[:, 0].flatten(1).tolist())
    assert shown == [[-1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [1.0, 1.0, 1.0]]


def test_method_names_resolve_and_unknown_ones_are_listed():
    assert resolve("all") == list(METHODS)
    assert resolve("ours-iv, gradcam") == ["ours-iv", "gradcam"]
    with pytest.raises(EvaluationError, match="available: all, default, table2, ours-i"):
        resolve("ours-v")
    for name in ("ours-i", "ours-ii", "ours-iii", "ours-iv", "gradcam", "scorecam", "ig", "guided-bp",
                 "lrp-epsilon", "zennit-epsilon-plus-flat"):
        assert name in METHODS
    assert METHODS["ours-iv"].quantize and not METHODS["ours-iv-raw"].quantize
    assert METHODS["ours-iv"].source == METHODS["ours-iv-raw"].source


def test_default_method_set_is_table_1_plus_the_conserving_preset():
    # the paper's Table 1: its method (ours-iv) and its five baselines; plus graphlrp's conserving preset
    assert resolve("default") == ["ours-iv", "gradcam", "scorecam", "ig", "guided-bp", "lrp-epsilon",
                                  "graphlrp-otsuki2024-conserving"]
    assert resolve("table2") == ["ours-i", "ours-ii", "ours-iii", "ours-iv"]
    assert resolve("table2, gradcam, ours-iv") == ["ours-i", "ours-ii", "ours-iii", "ours-iv", "gradcam"]
    from graphlrp.cli import build_parser

    args = build_parser().parse_args(["evaluate", "resnet18", "--data", "x.npz", "-o", "out"])
    assert args.methods == "default" and args.quantize == "ours" and args.ray is None


def test_quantize_modes_treat_methods_alike_or_as_the_paper_does():
    from graphlrp.evaluate.methods import quantized

    assert quantized(METHODS["ours-iv"], "ours") and not quantized(METHODS["gradcam"], "ours")
    assert not quantized(METHODS["ours-iv-raw"], "ours")
    assert all(quantized(m, "all") for m in METHODS.values())
    assert not any(quantized(m, "none") for m in METHODS.values())


def test_like_for_like_run_reports_the_paper_protocol_from_the_same_maps():
    from graphlrp.evaluate.data import ImageSet
    from graphlrp.evaluate.runner import evaluate

    torch.manual_seed(0)
    model = CifarResNet(1).eval()
    data = ImageSet(torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2]), None, "random")
    names = ["ours-iv", "ours-iv-raw", "gradcam"]
    kw = dict(model_name="tiny", mean=(0.5,) * 3, std=(0.25,) * 3, step=16, batch_size=4, heatmap_images=1)
    paper = evaluate(model, data, names, quantize="ours", **kw)
    raw = evaluate(model, data, names, quantize="none", **kw)
    both = evaluate(model, data, names, quantize="all", **kw)
    assert not paper.paper_results  # the paper's protocol is the run's own
    # none: every map raw, so ours-iv is its -raw twin; the paper's quantized ours-iv comes along unchanged
    np.testing.assert_array_equal(raw.results["ours-iv"].insertion, paper.results["ours-iv-raw"].insertion)
    np.testing.assert_array_equal(raw.paper_results["ours-iv"].insertion, paper.results["ours-iv"].insertion)
    np.testing.assert_array_equal(raw.results["gradcam"].deletion, paper.results["gradcam"].deletion)
    assert set(raw.paper_results) == {"ours-iv"} and not raw.results["ours-iv"].quantized
    # all: gradcam gets quantized as well; its paper-protocol (raw) curves are the paper run's
    assert set(both.paper_results) == {"ours-iv-raw", "gradcam"} and both.results["gradcam"].quantized
    np.testing.assert_array_equal(both.paper_results["gradcam"].deletion, paper.results["gradcam"].deletion)
    np.testing.assert_array_equal(both.results["ours-iv-raw"].insertion, paper.results["ours-iv"].insertion)
    from graphlrp.evaluate.report import markdown

    md = markdown(both)
    assert "--quantize all" in md and "| method | paper: Ins |" in md and "engine: local, 1 worker" in md
    assert "`gradcam`: Grad-CAM" in md and "here quantized to 8 heat levels (--quantize all)" in md


def test_cam_layer_is_the_last_residual_stage_and_functional_relus_become_modules():
    model = CifarResNet(1).eval()
    name, _ = last_stage(model, torch.randn(1, 3, 32, 32))
    assert name == "layer3"
    guided, replaced = with_relu_modules(model)
    assert replaced == 1 + 2 * 3
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(guided(x), model(x), atol=1e-6)


def test_image_folder_with_labels_file(tmp_path):
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (32, 32)), ("b.jpg", (48, 40))]:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.txt").write_text("# file label\na.png 3\nb.jpg 7\n")
    data = load_image_set(str(tmp_path), (32, 32))
    assert data.images.shape == (2, 3, 32, 32) and data.labels.tolist() == [3, 7]
    assert 0 <= data.images.min() and data.images.max() <= 1
    (tmp_path / "labels.txt").write_text("a.png three\n")
    with pytest.raises(EvaluationError, match="labels.txt:1"):
        load_image_set(str(tmp_path), (32, 32))


def test_image_folder_gets_the_models_own_preprocessing(tmp_path):
    """Images of a folder are resized and cropped as the model's preprocessing record says (here bicubic to a
    shorter side of 40, centre crop 32): the same pixels as torchvision's Resize + CenterCrop + ToTensor."""
    from torchvision import transforms

    from graphlrp.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    (tmp_path / "labels.txt").write_text("a.png 1\n")
    prep = Preprocessing(crop=(32, 32), resize=40, crop_pct=None, interpolation="bicubic")
    data = load_image_set(str(tmp_path), prep)
    reference = transforms.Compose([transforms.Resize(40, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(32), transforms.ToTensor()])(image)
    assert data.images.shape == (1, 3, 32, 32)
    assert torch.allclose(data.images[0], reference, atol=1e-6)


def test_unreadable_images_in_a_folder_are_reported_and_skipped(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "labels.txt").write_text("corrupt.jpg 1\nmissing.png 2\nnotes.txt 3\ngood.png 4\n")
    data = load_image_set(str(tmp_path), (32, 32))
    assert data.labels.tolist() == [4] and data.images.shape == (1, 3, 32, 32)
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "missing.png" in err and "notes.txt" in err
    (tmp_path / "labels.txt").write_text("corrupt.jpg 1\n")
    with pytest.raises(EvaluationError, match="no images"):
        load_image_set(str(tmp_path), (32, 32))


TINY_MODEL = """
import torch
from graphlrp.zoo.cifar import CifarResNet


def tiny():
    torch.manual_seed(0)
    model = CifarResNet(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    (d / "tiny.py").write_text(TINY_MODEL)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8),
             labels=np.array([0, 1, 2, 3, 4]), classes=np.array([f"c{i}" for i in range(10)]))
    out = d / "out"
    code = main(["evaluate", f"{d / 'tiny.py'}:tiny", "--weights", "none", "--data", str(d / "data.npz"),
                 "--methods", "all", "--limit", "4", "--step", "16", "--heatmap-images", "2", "-o", str(out)])
    return code, out


def test_whole_evaluation_on_a_tiny_model(tiny_run):
    code, out = tiny_run
    assert code == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    info = json.loads((out / "run.json").read_text())
    assert set(rows) | set(info["skipped"]) == set(METHODS)
    assert {"ours-i", "ours-ii", "ours-iii", "ours-iv", "gradcam", "ig"} <= set(rows)
    for r in rows.values():
        ins, dele, idv = float(r["insertion"]), float(r["deletion"]), float(r["id"])
        assert 0 <= ins <= 1 and 0 <= dele <= 1 and idv == pytest.approx(ins - dele, abs=2e-6)
        assert int(r["n"]) == 4 and float(r["id_se"]) >= 0
    assert info["points"] == 16 and info["versions"]["captum"]
    md = (out / "results.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "| (iv) | ratio | included |" in md
    for png in ("curves.png", "conservation.png", "heatmaps.png"):
        assert (out / png).stat().st_size > 1000


def test_unknown_method_is_a_user_error(tmp_path, capsys):
    code = main(["evaluate", "resnet18", "--weights", "none", "--data", str(tmp_path / "x.npz"),
                 "--methods", "nope", "-o", str(tmp_path)])
    assert code == 2 and "unknown method(s) nope" in capsys.readouterr().err
