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
        assert f"{name}: predicted {expected.predicted} (class {expected.predicted})" in p.stdout
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(
        f"{s}_{k}" for s in ("wide", "tall", "grey") for k in ("heatmap.png", "overlay.png", "relevance.npy"))


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
