"""graphlrp.load / ExplainerSession / heatmaps: onnxruntime-only use of an exported explainer."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import graphlrp
from graphlrp import heatmap
from graphlrp.errors import ExplainerLoadError, GraphLRPError, ImageError, InputError
from conftest import TINY_CLASSES, TINY_PREPROCESSING


@pytest.fixture(scope="module")
def session(tiny_onnx):
    return graphlrp.load(tiny_onnx, providers="cpu", threads=1)


def test_metadata_is_parsed(session):
    assert session.input_size == (3, 32, 32)
    assert session.labels == TINY_CLASSES and session.label(3) == "class 3" and session.label(99) is None
    assert session.num_classes == 10
    meta = session.metadata
    assert meta["preset"] == "otsuki2024" and meta["preprocessing"] == TINY_PREPROCESSING
    assert meta["include_identity"] in (True, False) and meta["input_size"] == [3, 32, 32]
    assert meta["output_relevance"] in ("probability", "logit")


def test_runtime_and_serving_never_import_torch(tiny_onnx, images):
    code = ("import sys, graphlrp, graphlrp.runtime, graphlrp.heatmap, graphlrp.server, graphlrp.triton\n"
            "import graphlrp.commands.explain, graphlrp.commands.serve, graphlrp.commands.export_triton\n"
            f"s = graphlrp.load({tiny_onnx!r})\n"
            f"e = s.explain_images([{images['wide.png']!r}])[0]\n"
            "graphlrp.heatmap.overlay(e.relevance, s.to_rgb(e.input))\n"
            "import graphlrp.explain_files, graphlrp.figure, pathlib, tempfile\n"
            f"x, _, photo = graphlrp.explain_files.load_image(s, {images['wide.png']!r}, 'wide.png')\n"
            "graphlrp.explain_files.write_outputs(pathlib.Path(tempfile.mkdtemp()), 'w', s.explain(x), s, photo, True)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explain_is_the_onnx_model_plus_softmax(session, tiny_onnx):
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    target = np.array([-1, 4, -1], np.int64)
    logits, relevance = ort.InferenceSession(tiny_onnx, providers=["CPUExecutionProvider"]).run(
        ["logits", "relevance"], {"input": x, "target": target})
    explanations = session.explain(x, target=[-1, 4, -1])
    assert len(explanations) == 3
    for i, e in enumerate(explanations):
        np.testing.assert_allclose(e.relevance, relevance[i], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e.logits, logits[i], rtol=1e-5, atol=1e-6)
        assert e.predicted == int(logits[i].argmax())
        assert e.target == (4 if i == 1 else e.predicted)
        assert abs(e.probabilities.sum() - 1) < 1e-5 and e.probabilities.argmax() == e.predicted
        assert e.relevance_map.shape == (32, 32)
        assert [k for k, _ in e.topk(3)] == list(np.argsort(-logits[i])[:3])


def test_single_sample_and_scalar_target(session):
    x = np.random.default_rng(2).standard_normal((3, 32, 32)).astype(np.float32)
    e = session.explain(x, target=7)
    assert e.target == 7 and e.relevance.shape == (3, 32, 32)
    np.testing.assert_allclose(session.explain(x[None].astype(np.float64), target=np.int64(7))[0].relevance,
                               e.relevance, rtol=1e-6)


def test_preprocess_matches_torchvision(session, images):
    tv = pytest.importorskip("torchvision.transforms")
    transform = tv.Compose([tv.Resize(36), tv.CenterCrop(32), tv.ToTensor(),
                            tv.Normalize(TINY_PREPROCESSING["mean"], TINY_PREPROCESSING["std"])])
    for name in ("wide.png", "tall.jpg", "grey.png"):
        expected = transform(Image.open(images[name]).convert("RGB")).numpy()
        got = session.preprocess(images[name])
        assert got.shape == (3, 32, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


def test_preprocess_accepts_images_paths_and_bytes(session, images):
    with open(images["wide.png"], "rb") as f:
        data = f.read()
    from_path = session.preprocess(images["wide.png"])
    np.testing.assert_array_equal(session.preprocess(data), from_path)
    np.testing.assert_array_equal(session.preprocess(Image.open(images["wide.png"]).convert("RGBA")), from_path)
    pixels = session.to_rgb(from_path)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    np.testing.assert_allclose(session.normalise(Image.fromarray(pixels)), from_path, atol=0.01)


def test_explain_images_batches_like_explain(session, images):
    names = ["wide.png", "tall.jpg", "square.png", "grey.png", "wide.png"]
    batched = session.explain_images([images[n] for n in names], target=2, batch_size=2)
    stacked = session.explain(np.stack([session.preprocess(images[n]) for n in names]), target=2)
    assert len(batched) == 5
    for a, b in zip(batched, stacked):
        assert a.target == b.target == 2
        np.testing.assert_allclose(a.relevance, b.relevance, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["broken.png", "truncated.png", "notes.txt", "missing.png"])
def test_unreadable_image_is_an_image_error_naming_the_file(session, images, name, tmp_path):
    path = images.get(name, str(tmp_path / name))
    with pytest.raises(ImageError, match=name):
        session.preprocess(path)
    with pytest.raises(ImageError, match=name):
        session.explain_images([images["wide.png"], path])
    assert issubclass(ImageError, GraphLRPError)


@pytest.mark.parametrize("side, said", [(10_000, "10000x10000 pixels is too large to explain"),  # over PIL's limit
                                        (15_000, "too large to explain (Image size (225000000 pixels)")])  # over 2x
def test_an_image_too_large_to_decode_is_refused_without_a_warning(session, side, said, tmp_path):
    """A 1-bit PNG of 10⁸ pixels is 12 kB on disk and 300 MB decoded as RGB: refused before decoding, with
    PIL's DecompressionBombWarning kept off the user's terminal."""
    path = tmp_path / "large.png"
    Image.new("1", (side, side)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=re.escape(said)):
            session.preprocess(str(path))


@pytest.mark.parametrize("x, target, message", [
    (np.zeros((3, 16, 16)), None, "shape"),
    (np.zeros((2, 1, 32, 32)), None, "shape"),
    (np.full((3, 32, 32), np.nan), None, "NaN"),
    ([[1.0, 2.0], [3.0]], None, "numeric"),
    (np.zeros((3, 32, 32)), 10, "unknown target class 10"),
    (np.zeros((3, 32, 32)), -2, "unknown target class -2"),
    (np.zeros((2, 3, 32, 32)), [1, 2, 3], "target"),
    (np.zeros((3, 32, 32)), 1.5, "target"),
])
def test_bad_input_is_an_input_error(session, x, target, message):
    with pytest.raises(InputError, match=message):
        session.explain(x, target=target)


def test_load_errors(tmp_path, tiny_onnx):
    with pytest.raises(ExplainerLoadError, match="no such file"):
        graphlrp.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ExplainerLoadError, match="junk.onnx"):
        graphlrp.load(tmp_path / "junk.onnx")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ExplainerLoadError, match="not a graphlrp explainer"):
        graphlrp.load(tmp_path / "plain.onnx")
    with pytest.raises(ExplainerLoadError, match="unknown provider"):
        graphlrp.load(tiny_onnx, providers="tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_provider_missing_is_a_clear_error(tiny_onnx):
    with pytest.raises(ExplainerLoadError, match="CUDA execution provider is not available"):
        graphlrp.load(tiny_onnx, providers="cuda")


# heatmap colours, overlays and pictures at the photo's resolution: tests/test_pictures.py


def test_resnet18_explains_imagenet_sized_images(resnet18_onnx, images):
    session = graphlrp.load(resnet18_onnx)
    assert session.input_size == (3, 224, 224) and session.num_classes == 1000
    explanations = session.explain_images([images["wide.png"], images["tall.jpg"]], target=[-1, 123])
    assert explanations[1].target == 123
    for e in explanations:
        assert e.relevance.shape == (3, 224, 224) and np.isfinite(e.relevance).all()
        assert heatmap.heatmap(e.relevance).size == (224, 224)


def test_an_explainer_of_arrays_that_are_not_images_loads_and_explains(tmp_path):
    """A model of [C, L] signals (not [C, H, W] images) exports and explains arrays in onnxruntime as in PyTorch;
    an image given to it is an InputError."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 6, 3)).eval()
    x = torch.rand(2, 4, 6)
    explainer = graphlrp.compile(model, x[:1], rules="otsuki2024-conserving")
    logits, relevance = explainer(x)
    assert explainer.export_onnx(tmp_path / "signal.onnx").max_rel_diff <= 1e-4
    session = graphlrp.load(tmp_path / "signal.onnx", providers="cpu", threads=1)
    assert session.input_size == (4, 6) and not session.takes_images
    explanations = session.explain(x.numpy())
    for i, e in enumerate(explanations):
        np.testing.assert_allclose(e.relevance, relevance[i].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(e.logits, logits[i].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"\[4, 6\]"):
        session.explain(np.zeros((2, 3, 6), np.float32))
    with pytest.raises(InputError, match="not images"):
        session.preprocess(Image.new("RGB", (6, 4)))
