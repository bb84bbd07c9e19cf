"""`graphlrp explain`: outputs per image, bad files reported and skipped, clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import graphlrp
from graphlrp.cli import main


def explain_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphlrp.cli", "explain", *map(str, args)],
                          capture_output=True, text=True)


def test_good_images_are_explained_and_bad_ones_skipped_by_name(tiny_onnx, images, tmp_path):
    order = ["wide.png", "broken.png", "tall.jpg", "notes.txt", "truncated.png", "grey.png"]
    p = explain_cli(tiny_onnx, *(images[n] for n in order), "-o", tmp_path / "out", "--batch-size", "2")
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    for bad in ("broken.png", "notes.txt", "truncated.png"):
        assert bad in p.stderr
    assert "3 of 6 image(s) skipped" in p.stderr
    session = graphlrp.load(tiny_onnx)
    for stem, name in [("wide", "wide.png"), ("tall", "tall.jpg"), ("grey", "grey.png")]:
        expected = session.explain(session.preprocess(images[name]))
        relevance = np.load(tmp_path / "out" / f"{stem}_relevance.npy")
        np.testing.assert_allclose(relevance, expected.relevance, rtol=1e-5, atol=1e-7)
        for kind in ("heatmap", "overlay"):
            with Image.open(tmp_path / "out" / f"{stem}_{kind}.png") as im:
                assert im.size == (32, 32) and im.mode == "RGB"
        with Image.open(images[name]) as photo:
            size = photo.size
        for kind, mode in (("photo_heatmap", "RGBA"), ("photo_overlay", "RGB")):
            with Image.open(tmp_path / "out" / f"{stem}_{kind}.png") as im:
                assert im.size == size and im.mode == mode
        assert np.load(tmp_path / "out" / f"{stem}_photo_relevance.npz")["relevance"].shape == size[::-1]
        assert f"{name}: predicted {expected.predicted} (class {expected.predicted})" in p.stdout
    kinds = ("heatmap.png", "overlay.png", "relevance.npy", "photo_heatmap.png", "photo_overlay.png",
             "photo_relevance.npz")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(
        f"{s}_{k}" for s in ("wide", "tall", "grey") for k in kinds)


def test_the_photo_map_is_the_input_map_resampled_inside_the_crop_and_blank_outside(tiny_onnx, tmp_path):
    """60x40 and 300x200 photos, resize 36 + centre crop 32 (the tiny explainer's metadata): inside the crop the
    photo map is the relevance map resampled bilinearly (scipy, at each photo pixel centre), outside it NaN, and
    the pictures draw nothing there that depends on the relevance."""
    from scipy.ndimage import map_coordinates

    from graphlrp import heatmap

    rng = np.random.default_rng(5)
    for w, h in ((60, 40), (300, 200)):
        path = tmp_path / f"photo{w}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        outs = []
        for target in ("1", "6"):
            out = tmp_path / f"out{w}-{target}"
            assert main(["explain", tiny_onnx, str(path), "-o", str(out), "--target", target]) == 0
            outs.append(out)
        # by hand: Resize(36) then CenterCrop(32), as torchvision computes them
        rw, rh = (36 * w // h, 36) if w >= h else (36, 36 * h // w)
        left, top = round((rw - 32) / 2), round((rh - 32) / 2)
        fx, fy = rw / w, rh / h  # resized pixels per photo pixel
        j, i = np.mgrid[0:h, 0:w]
        u, v = (i + 0.5) * fx - left - 0.5, (j + 0.5) * fy - top - 0.5  # input pixel index at each photo centre
        inside = (u >= -0.5) & (u < 31.5) & (v >= -0.5) & (v < 31.5)
        assert 0.3 < inside.mean() < 0.95
        pictures = []
        for out in outs:
            r = np.load(out / f"photo{w}_relevance.npy").sum(axis=0).astype(np.float64)
            pmap = np.load(out / f"photo{w}_photo_relevance.npz")["relevance"]
            np.testing.assert_array_equal(np.isfinite(pmap), inside)
            expected = map_coordinates(r, [v[inside], u[inside]], order=1, mode="nearest")
            np.testing.assert_allclose(pmap[inside], expected, rtol=0, atol=1e-4 * np.abs(r).max())
            with Image.open(out / f"photo{w}_photo_overlay.png") as im, \
                    Image.open(out / f"photo{w}_photo_heatmap.png") as hm:
                pictures.append((np.asarray(im), np.asarray(hm)))
        (over_1, heat_1), (over_6, heat_6) = pictures
        with Image.open(path) as photo:
            hatched = heatmap.unexplained(photo).round().astype(np.uint8)
        np.testing.assert_array_equal(over_1[~inside], hatched[~inside])  # the photo under the hatch, nothing else
        np.testing.assert_array_equal(over_1[~inside], over_6[~inside])
        assert (over_1[inside] != over_6[inside]).any()  # another class: other relevance, other colours inside
        assert (heat_1[~inside] == 0).all() and (heat_6[~inside] == 0).all()  # transparent outside
        assert (heat_1[inside][:, 3] == 255).all()


def test_figure_and_cmap(tiny_onnx, images, tmp_path):
    from graphlrp import figure, heatmap
    from graphlrp.explain_files import figure_notes, figure_title

    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path, "--figure", "--target", "4")
    assert p.returncode == 0, p.stderr
    with Image.open(tmp_path / "wide_figure.png") as im:
        assert im.format == "PNG" and im.width > 1000
    session = graphlrp.load(tiny_onnx)
    exp = session.explain(session.preprocess(images["wide.png"]), target=4)
    title = figure_title(session, exp)
    assert title.startswith(f"class 4 (4): p = {exp.probabilities[4]:.3f}") and "preset otsuki2024" in title
    assert "resize 36 (bilinear), center crop 32x32" in figure_notes(session)
    photo = Image.open(images["wide.png"])
    pmap = heatmap.photo_map(exp.relevance, session.preprocessing, photo.size)
    _, parts = figure.build(photo, pmap, heatmap.ColourScale.of(exp.relevance_map), title, figure_notes(session))
    assert parts["title"].get_text() == title
    assert parts["colorbar"].ax.get_xlabel().startswith("relevance: ")
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path / "v", "--cmap", "viridis")
    assert p.returncode == 0, p.stderr
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path / "v", "--cmap", "no-such-map")
    assert p.returncode == 2 and "unknown colour map 'no-such-map'" in p.stderr and "Traceback" not in p.stderr


def test_labels_file_names_the_classes(tiny_onnx, images, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(10)))
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path / "o", "--labels", names, "--target", "2")
    assert p.returncode == 0, p.stderr
    assert "explained target 2 (thing 2)" in p.stdout or "predicted 2 (thing 2)" in p.stdout
    names.write_text("a\nb\n")
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path / "o", "--labels", names)
    assert p.returncode == 2 and "2 labels given for a model with 10 classes" in p.stderr


def test_all_good_exits_zero_and_honours_target(tiny_onnx, images, tmp_path, capsys):
    assert main(["explain", tiny_onnx, images["square.png"], "-o", str(tmp_path), "--target", "7"]) == 0
    session = graphlrp.load(tiny_onnx)
    expected = session.explain(session.preprocess(images["square.png"]), target=7)
    np.testing.assert_allclose(np.load(tmp_path / "square_relevance.npy"), expected.relevance, rtol=1e-5, atol=1e-7)
    out = capsys.readouterr().out
    assert "7 (class 7)" in out


def test_repeated_stems_do_not_overwrite(tiny_onnx, images, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.open(images["tall.jpg"]).save(other / "wide.jpg")
    assert main(["explain", tiny_onnx, images["wide.png"], str(other / "wide.jpg"), "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "wide_relevance.npy").exists() and (tmp_path / "o" / "wide-2_relevance.npy").exists()


def test_user_errors_are_one_line_without_traceback(tiny_onnx, images, tmp_path):
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path, "--target", "10")
    assert p.returncode == 2 and "unknown target class 10" in p.stderr and "Traceback" not in p.stderr
    p = explain_cli(tmp_path / "missing.onnx", images["wide.png"], "-o", tmp_path)
    assert p.returncode == 2 and "missing.onnx" in p.stderr and "Traceback" not in p.stderr
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path, "--batch-size", "0")
    assert p.returncode == 2 and "--batch-size" in p.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_provider_without_cuda_is_a_clear_error(tiny_onnx, images, tmp_path):
    p = explain_cli(tiny_onnx, images["wide.png"], "-o", tmp_path, "--provider", "cuda")
    assert p.returncode == 2 and "CUDA execution provider is not available" in p.stderr
    assert "Traceback" not in p.stderr


def test_folders_and_globs_expand_to_their_files(tmp_path):
    from graphlrp.commands.explain import expand_inputs
    from graphlrp.errors import GraphLRPError

    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.png", ".hidden/d.png", ".e.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([str(tmp_path)]) == [str(tmp_path / n) for n in ("a.jpg", "b.png", "notes.txt", "sub/c.png")]
    assert expand_inputs([str(tmp_path / "**" / "*.png")]) == [str(tmp_path / "b.png"), str(tmp_path / "sub/c.png")]
    assert expand_inputs(["missing.png"]) == ["missing.png"]  # reported as unreadable later, as before
    with pytest.raises(GraphLRPError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.gif")])


def test_an_image_the_explainer_cannot_explain_is_skipped_by_name_and_the_others_written(tmp_path):
    """otsuki2024 keeps a conv bias and adds ε: with the bias −ε, z + ε is exactly 0 where the red channel is 0
    (mean 0, std 1), and that image's relevance would be NaN. It is skipped with the reason; the image of the same
    batch that can be explained is written."""
    import torch

    class RedOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = torch.nn.Conv2d(3, 1, 1), torch.nn.Conv2d(1, 1, 1)
            self.fc = torch.nn.Linear(64, 3)
            with torch.no_grad():
                self.conv1.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
                self.conv1.bias.zero_()
                self.conv2.weight.fill_(1.0)
                self.conv2.bias.fill_(-1e-5)

        def forward(self, x):
            return self.fc(self.conv2(torch.relu(self.conv1(x))).flatten(1))

    torch.manual_seed(0)
    explainer = graphlrp.compile(RedOnly().eval(), 0.5 + torch.rand(1, 3, 8, 8), rules="otsuki2024",
                                 allow_vanishing=True)
    model = tmp_path / "red.onnx"
    explainer.export_onnx(model, check=False, metadata={"preprocessing": {"resize": 8, "crop": [8, 8],
                                                                         "mean": [0, 0, 0], "std": [1, 1, 1]}})
    red, black = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(tmp_path / "red.png")
    Image.fromarray(black).save(tmp_path / "black.png")
    p = explain_cli(model, tmp_path / "black.png", tmp_path / "red.png", "-o", tmp_path / "out")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "skipped" in p.stderr and "black.png" in p.stderr and "not finite" in p.stderr
    assert "1 of 2 image(s) skipped" in p.stderr
    assert np.isfinite(np.load(tmp_path / "out" / "red_relevance.npy")).all()
    assert not (tmp_path / "out" / "black_relevance.npy").exists()
