"""Images are explained as the model sees them: the preprocessing comes from the model (torchvision weights'
transforms, timm's pretrained_cfg, a user's model attributes) or from the input size, is stored in the explainer
file, and the runtime applies exactly what is stored. References: timm's and torchvision's own eval transforms,
and onnxruntime on the stored arrays."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import graphlrp
from graphlrp.preprocessing import Preprocessing, PreprocessingError, default, scale_size

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CIFAR_WEIGHTS = ASSETS / "cifar10-resnet" / "resnet20.pt"
CIFAR_DATA = ASSETS / "cifar10-test-dev.npz"
needs_assets = pytest.mark.skipif(not CIFAR_WEIGHTS.is_file() or not CIFAR_DATA.is_file(),
                                  reason="../shared/assets (CIFAR-10 ResNet weights and dev images) is not present")


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "graphlrp.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def stored(path) -> dict:
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {"preprocessing": json.loads(meta["preprocessing"]), "labels": json.loads(meta.get("labels", "null"))}


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random image (resampling filters differ visibly on smooth content, not only on noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    noisy = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    noisy = noisy + rng.integers(-20, 20, noisy.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def tiny_cnn(classes: int = 4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, classes)).eval()


# ---------------------------------------------------------------- the record

def test_default_uses_the_usual_crop_ratio_at_any_size_never_a_fixed_256():
    assert default((224, 224)).resize == 256
    assert default((32, 32)).resize == scale_size(32, 0.875) == 36
    assert default((299, 299)).resize == 341
    assert default((64, 96)).crop == (64, 96) and default((64, 96)).resize == 73


def test_record_round_trips_and_rejects_nonsense():
    p = Preprocessing(crop=(40, 48), resize=50, crop_pct=0.8, crop_mode="squash", interpolation="bicubic",
                      mean=(0.5,), std=(0.25,), source="test")
    assert Preprocessing.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    old = Preprocessing.from_dict({"resize": 36, "crop": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    assert (old.interpolation, old.crop_mode) == ("bilinear", "center")  # files written before these keys
    with pytest.raises(PreprocessingError, match="interpolation"):
        Preprocessing(interpolation="bicubik")
    with pytest.raises(PreprocessingError, match="one value per channel"):
        Preprocessing(mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(PreprocessingError, match="positive"):
        Preprocessing(std=(0.5, 0.0, 0.5))


def test_a_new_input_size_keeps_the_models_crop_ratio():
    tv = graphlrp.preprocessing.from_torchvision("regnet_y_400mf")
    assert (tv.resize, tv.crop) == (232, (224, 224))
    assert tv.at_size((64, 64)).resize == scale_size(64, 224 / 232)
    assert tv.at_size((224, 224)) is tv


# ---------------------------------------------------------------- the runtime applies what is stored

def runtime_pixels(prep: Preprocessing, image: Image.Image, tmp_path) -> np.ndarray:
    """The runtime's normalised array for `image`, through an explainer file that stores `prep`."""
    path = tmp_path / f"m-{abs(hash(json.dumps(prep.to_dict())))}.onnx"
    c = len(prep.mean)
    graphlrp.compile(tiny_cnn(), torch.randn(1, c, *prep.crop), rules="otsuki2024",
                     preprocessing=prep).export_onnx(path, check=False)
    return graphlrp.load(path).preprocess(image)


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
@pytest.mark.parametrize("size", [(300, 200), (150, 260)])
def test_timm_eval_transform_is_reproduced(mode, size, tmp_path):
    """crop_pct 0.95, bicubic (timm's resnet50 config) in each of timm's crop modes, on wide and tall images."""
    timm_data = pytest.importorskip("timm.data")
    cfg = {"input_size": (3, 96, 96), "crop_pct": 0.95, "crop_mode": mode, "interpolation": "bicubic",
           "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    prep = graphlrp.preprocessing.from_config(cfg, "test")
    assert prep.resize == 101 and prep.interpolation == "bicubic"  # floor(96 / 0.95), as timm computes it
    image = photo(*size)
    reference = timm_data.transforms_factory.transforms_imagenet_eval(
        img_size=96, crop_pct=0.95, crop_mode=mode, interpolation="bicubic", mean=cfg["mean"], std=cfg["std"])
    expected = reference(image).numpy()
    got = runtime_pixels(prep, image, tmp_path)
    assert got.shape == expected.shape == (3, 96, 96)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_torchvision_weights_transforms_are_reproduced(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    prep = graphlrp.preprocessing.from_torchvision("regnet_y_400mf")
    transform = torchvision.models.get_model_weights("regnet_y_400mf").DEFAULT.transforms()
    for size in [(320, 240), (200, 400)]:
        image = photo(*size, seed=1)
        expected = transform(image).numpy()
        np.testing.assert_allclose(runtime_pixels(prep, image, tmp_path), expected, atol=1e-5)


def test_interpolation_is_applied_as_recorded(tmp_path):
    image = photo(100, 80, seed=2)
    base = default((32, 32))
    bilinear = runtime_pixels(base, image, tmp_path)
    bicubic = runtime_pixels(base.with_overrides(interpolation="bicubic"), image, tmp_path)
    assert np.abs(bilinear - bicubic).max() > 1e-2  # a different filter gives different pixels
    manual = image.resize((45, 36), Image.Resampling.BICUBIC).crop((6, 2, 38, 34))  # shorter side 80 -> 36
    expected = ((np.asarray(manual, np.float32) / 255 - np.array(base.mean, np.float32))
                / np.array(base.std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(bicubic, expected, atol=1e-6)


def test_an_image_at_the_input_size_is_used_as_it_is(tmp_path):
    image = photo(32, 32, seed=3)
    got = runtime_pixels(default((32, 32)), image, tmp_path)
    expected = ((np.asarray(image, np.float32) / 255 - np.array([0.485, 0.456, 0.406], np.float32))
                / np.array([0.229, 0.224, 0.225], np.float32)).transpose(2, 0, 1)
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- from the model

def test_model_attributes_and_compile_keywords_are_recorded(tmp_path):
    model = tiny_cnn()
    model.input_size, model.mean, model.std = (3, 40, 40), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    model.interpolation, model.labels = "bicubic", ["a", "b", "c", "d"]
    explainer = graphlrp.compile(model, torch.randn(1, 3, 40, 40))
    prep = explainer.preprocessing
    assert (prep.crop, prep.mean, prep.std, prep.interpolation) == ((40, 40), (0.5,) * 3, (0.2,) * 3, "bicubic")
    assert explainer.labels == ["a", "b", "c", "d"]
    path = tmp_path / "m.onnx"
    explainer.export_onnx(path, check=False, resize=48, std=(0.3, 0.3, 0.3), labels=["w", "x", "y", "z"])
    meta = stored(path)
    assert meta["preprocessing"]["resize"] == 48 and meta["preprocessing"]["std"] == [0.3] * 3
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["labels"] == ["w", "x", "y", "z"]
    again = graphlrp.compile(model, torch.randn(1, 3, 40, 40), crop_pct=1.0, interpolation="nearest",
                             mean=(0.1, 0.2, 0.3))
    assert (again.preprocessing.resize, again.preprocessing.interpolation) == (40, "nearest")
    assert again.preprocessing.mean == (0.1, 0.2, 0.3)


def test_wrong_label_count_and_channel_mismatch_are_clear_errors():
    model = tiny_cnn(classes=4)
    with pytest.raises(graphlrp.GraphLRPError, match="3 labels given for a model with 4 classes"):
        graphlrp.compile(model, torch.randn(1, 3, 16, 16), labels=["a", "b", "c"])
    with pytest.raises(PreprocessingError, match="3 channels"):
        graphlrp.compile(model, torch.randn(1, 3, 16, 16), mean=(0.5,), std=(0.5,))
    model.labels = ["a", "b"]  # an attribute that does not fit is not used to label the wrong classes
    assert graphlrp.compile(model, torch.randn(1, 3, 16, 16)).labels is None


def test_cli_stores_torchvision_and_timm_preprocessing_and_overrides(tmp_path):
    pytest.importorskip("timm")
    tv = tmp_path / "tv.onnx"
    cli("compile", "regnet_y_400mf", "--weights", "none", "--input-size", "64", "-o", tv)
    p = stored(tv)["preprocessing"]
    assert p["crop"] == [64, 64] and p["resize"] == scale_size(64, 224 / 232) and p["interpolation"] == "bilinear"
    import torchvision

    categories = torchvision.models.get_model_weights("regnet_y_400mf").DEFAULT.meta["categories"]
    assert stored(tv)["labels"] == categories and len(categories) == 1000  # also with --weights none
    tm = tmp_path / "timm.onnx"
    out = cli("compile", "timm:resnet18", "--weights", "none", "--input-size", "64", "-o", tm).stdout
    p = stored(tm)["preprocessing"]
    assert (p["crop_pct"], p["interpolation"], p["resize"]) == (0.95, "bicubic", scale_size(64, 0.95))
    assert "bicubic" in out and "1000 labels" in out
    from timm.data import ImageNetInfo

    assert stored(tm)["labels"] == ImageNetInfo("imagenet-1k").label_descriptions()
    assert stored(tm)["labels"][0] == "tench, Tinca tinca"
    labels = tmp_path / "names.txt"
    labels.write_text("\n".join(f"name{i}" for i in range(1000)) + "\n\n")
    ov = tmp_path / "ov.onnx"
    cli("compile", "resnet18", "--weights", "none", "--input-size", "64", "--resize", "80", "--interpolation",
        "lanczos", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--labels", labels, "-o", ov)
    meta = stored(ov)
    assert meta["preprocessing"]["resize"] == 80 and meta["preprocessing"]["interpolation"] == "lanczos"
    assert meta["preprocessing"]["mean"] == [0.5] * 3 and meta["labels"][:2] == ["name0", "name1"]
    bad = cli("compile", "resnet18", "--weights", "none", "--labels", tmp_path / "missing.txt", "-o", ov, check=False)
    assert bad.returncode != 0 and "missing.txt" in bad.stderr and "Traceback" not in bad.stderr


def test_torchvision_labels_come_with_any_weights(tmp_path):
    """The weights' description names the classes whether the weights are pretrained, random or a file's."""
    torchvision = pytest.importorskip("torchvision")
    from graphlrp.models import load_model

    categories = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.meta["categories"]
    model, info = load_model("mobilenet_v3_small", "none")
    assert info.labels == categories
    torch.save(model.state_dict(), tmp_path / "w.pt")
    _, info = load_model("mobilenet_v3_small", str(tmp_path / "w.pt"))
    assert info.labels == categories and info.weights == str(tmp_path / "w.pt")


def test_explain_warns_when_it_enlarges_an_image_more_than_twice(tmp_path):
    path = tmp_path / "m.onnx"
    graphlrp.compile(tiny_cnn(), torch.randn(1, 3, 64, 64)).export_onnx(path, check=False)
    photo(20, 30).save(tmp_path / "small.png")
    photo(70, 90).save(tmp_path / "fine.png")
    p = cli("explain", path, tmp_path / "small.png", tmp_path / "fine.png", "-o", tmp_path / "out")
    assert "small.png is 20x30" in p.stderr and "enlarges it 3.6x" in p.stderr
    assert "fine.png" not in p.stderr


# ---------------------------------------------------------------- end to end: a 32x32 model explains 32x32 images

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The trained CIFAR ResNet-20 compiled from the model file (its `input_size` and `labels` attributes say
    32x32 and the CIFAR-10 class names), 100 dev images as PNGs, and onnxruntime on the stored arrays."""
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("cifar")
    model = tmp / "r20.onnx"
    out = cli("compile", ROOT / "graphlrp" / "zoo" / "cifar.py:resnet20", "--weights", CIFAR_WEIGHTS,
              "-o", model).stdout
    d = np.load(CIFAR_DATA)
    idx = list(range(0, 1000, 10))
    pngs = []
    for i in idx:
        pngs.append(str(tmp / f"img{i:04d}.png"))
        Image.fromarray(d["images"][i]).save(pngs[-1])
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    x = ((d["images"][idx].transpose(0, 3, 1, 2).astype(np.float32) / 255.0) - mean) / std
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, relevance = session.run(None, {"input": x.astype(np.float32), "target": -np.ones(len(idx), np.int64)})
    return {"model": model, "pngs": pngs, "x": x, "predicted": logits.argmax(1), "relevance": relevance,
            "classes": [str(c) for c in d["classes"]], "compile_output": out, "tmp": tmp}


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-30))


@needs_assets
def test_cifar_model_file_says_32_pixels_and_its_labels(cifar):
    meta = stored(cifar["model"])
    assert meta["preprocessing"]["crop"] == [32, 32] and meta["labels"] == cifar["classes"]
    assert "crop 32x32" in cifar["compile_output"]


@needs_assets
def test_cifar_pngs_explain_as_the_stored_arrays(cifar):
    explained = graphlrp.load(cifar["model"]).explain_images(cifar["pngs"])
    assert [e.predicted for e in explained] == cifar["predicted"].tolist()
    assert max(rel(e.relevance, r) for e, r in zip(explained, cifar["relevance"])) <= 1e-5
    out = cifar["tmp"] / "explained"
    p = cli("explain", cifar["model"], *cifar["pngs"][:20], "-o", out)
    assert "enlarges" not in p.stderr
    for k, png in enumerate(cifar["pngs"][:20]):
        assert rel(np.load(out / f"{Path(png).stem}_relevance.npy"), cifar["relevance"][k]) <= 1e-5
        name = cifar["classes"][cifar["predicted"][k]]
        assert f"{png}: predicted {cifar['predicted'][k]} ({name})" in p.stdout


@needs_assets
def test_cifar_serve_explains_the_pngs_with_their_labels(cifar):
    from fastapi.testclient import TestClient

    from graphlrp.server import create_app

    with TestClient(create_app(graphlrp.load(cifar["model"]))) as client:
        for k in range(0, 100, 25):
            with open(cifar["pngs"][k], "rb") as f:
                r = client.post("/v1/explain?relevance=1", files={"image": ("x.png", f, "image/png")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["predicted"] == int(cifar["predicted"][k])
            assert body["topk"][0]["label"] == cifar["classes"][body["predicted"]]
            assert rel(np.array(body["relevance"], np.float32), cifar["relevance"][k].sum(0)) <= 1e-5


def test_a_vit_of_random_weights_is_built_for_the_input_size_asked_and_trained_weights_say_why_not(tmp_path):
    """torchvision's ViT fixes its image size in the builder (position embeddings): with --weights none the CLI
    builds it for --input-size; with a weights file (trained for 224) it refuses in words, before any tracing."""
    pytest.importorskip("torchvision")
    from graphlrp.errors import ModelSpecError
    from graphlrp.models import at_input_size, load_model

    model, info = load_model("vit_b_32", "none")
    resized = at_input_size(model, "vit_b_32", info, 64, 64)
    assert resized is not model and resized.image_size == 64
    assert at_input_size(model, "vit_b_32", info, 224, 224) is model
    torch.save(model.state_dict(), tmp_path / "w.pt")
    model, info = load_model("vit_b_32", str(tmp_path / "w.pt"))
    with pytest.raises(ModelSpecError, match="--input-size 224"):
        at_input_size(model, "vit_b_32", info, 64, 64)
    model, info = load_model("vit_b_32", "none")
    with pytest.raises(ModelSpecError, match="cannot be built for 48x48 inputs: .*patch size"):
        at_input_size(model, "vit_b_32", info, 48, 48)  # 48 px is no multiple of its 32 px patches
    p = cli("compile", "vit_b_32", "--weights", "none", "--input-size", "32", "-o", tmp_path / "v.onnx")
    assert "built for 32x32" in p.stdout and (tmp_path / "v.onnx").exists()


def test_random_weights_are_the_same_on_every_run_and_leave_the_callers_random_state():
    """`--weights none` draws from a fixed seed: the same command compiles the same explainer, and its checks
    give the same verdict, on every run; the caller's random stream goes on as if nothing was drawn."""
    from graphlrp.models import load_model

    torch.manual_seed(5)
    first, _ = load_model("resnet18", "none")
    after_first = torch.rand(3)
    torch.manual_seed(5)
    second, _ = load_model("resnet18", "none")
    assert torch.equal(torch.rand(3), after_first)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_first)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
