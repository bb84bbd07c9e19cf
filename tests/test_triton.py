"""`graphlrp export-triton`: the config.pbtxt parses as Triton's ModelConfig and agrees with the ONNX graph."""
from __future__ import annotations

import filecmp
import importlib.util
import os

import onnx
import onnxruntime as ort
import pytest

from graphlrp.cli import main
from conftest import TINY_CLASSES

text_format = pytest.importorskip("google.protobuf.text_format")


def model_config_pb2():
    """tritonclient's ModelConfig definitions. `tritonclient.grpc` refuses to import without grpcio, but its
    model_config_pb2 module needs only protobuf, so load that file directly when the package import fails."""
    try:
        from tritonclient.grpc import model_config_pb2 as module
        return module
    except (ImportError, RuntimeError):
        spec = importlib.util.find_spec("tritonclient")
        if spec is None:
            pytest.skip("tritonclient is not installed")
        path = os.path.join(spec.submodule_search_locations[0], "grpc", "model_config_pb2.py")
        module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module


def parse(path):
    pb2 = model_config_pb2()
    with open(path) as f:
        return text_format.Parse(f.read(), pb2.ModelConfig()), pb2


def test_repository_layout_and_config(tiny_onnx, tmp_path):
    assert main(["export-triton", tiny_onnx, str(tmp_path / "repo"), "--max-batch", "16"]) == 0
    model_dir = tmp_path / "repo" / "tiny"
    assert filecmp.cmp(model_dir / "1" / "model.onnx", tiny_onnx, shallow=False)
    config, pb2 = parse(model_dir / "config.pbtxt")
    assert config.name == "tiny" and config.max_batch_size == 16
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.HasField("dynamic_batching")
    fp32, int64 = pb2.DataType.Value("TYPE_FP32"), pb2.DataType.Value("TYPE_INT64")
    inputs = {i.name: i for i in config.input}
    outputs = {o.name: o for o in config.output}
    assert set(inputs) == {"input", "target"} and set(outputs) == {"logits", "relevance"}
    assert (inputs["input"].data_type, list(inputs["input"].dims)) == (fp32, [3, 32, 32])
    assert (inputs["target"].data_type, list(inputs["target"].dims)) == (int64, [1])
    assert inputs["target"].HasField("reshape") and list(inputs["target"].reshape.shape) == []
    assert (outputs["logits"].data_type, list(outputs["logits"].dims)) == (fp32, [10])
    assert (outputs["relevance"].data_type, list(outputs["relevance"].dims)) == (fp32, [3, 32, 32])
    assert outputs["logits"].label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == TINY_CLASSES


def test_config_dims_agree_with_onnxruntime(tiny_onnx, tmp_path):
    """Triton checks config dims against the model; compare with what onnxruntime reports, batch dim dropped."""
    assert main(["export-triton", tiny_onnx, str(tmp_path), "--name", "explainer"]) == 0
    config, _ = parse(tmp_path / "explainer" / "config.pbtxt")
    assert config.name == "explainer" and config.max_batch_size == 8
    session = ort.InferenceSession(str(tmp_path / "explainer" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    declared = {t.name: list(t.dims) for t in [*config.input, *config.output]}
    for t in [*session.get_inputs(), *session.get_outputs()]:
        assert isinstance(t.shape[0], str), f"{t.name} needs a dynamic batch dimension"
        assert declared[t.name] == (t.shape[1:] or [1])


def test_errors(tiny_onnx, tmp_path, capsys):
    assert main(["export-triton", str(tmp_path / "missing.onnx"), str(tmp_path)]) == 2
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["export-triton", str(tmp_path / "notes.txt"), str(tmp_path / "repo")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
    fixed = onnx.load(tiny_onnx)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, tmp_path / "fixed.onnx")
    assert main(["export-triton", str(tmp_path / "fixed.onnx"), str(tmp_path / "repo")]) == 2
    assert "dynamic batch dimension" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export-triton", tiny_onnx, str(tmp_path), "--name", "../escape"])
    with pytest.raises(SystemExit):
        main(["export-triton", tiny_onnx, str(tmp_path), "--max-batch", "0"])
