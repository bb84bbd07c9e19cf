"""tools/timm_all_resumable.py runs the timm acceptance one module per process: it reads each module's verdict and
leaves no files behind (the acceptance script keeps every explainer it writes in a fresh temporary folder)."""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "timm_all_resumable", Path(__file__).resolve().parents[1] / "tools" / "timm_all_resumable.py")
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)

FAKE_ACCEPTANCE = '''
import os, sys, tempfile
module = sys.argv[sys.argv.index("--modules") + 1]
folder = tempfile.mkdtemp()  # as timm_all.py does for each export, never removed
open(os.path.join(folder, "e.onnx"), "wb").write(b"0" * 1000)
open(os.environ["WHERE_FILE"], "w").write(folder)
print(f"ok    {module}/model_a: no silent wrong result (otsuki2024-conserving: conserves)")
print("ok    1 of 1 timm modules compile, conserve and export")
'''


def test_a_modules_verdict_is_read_and_its_temporary_files_removed(tmp_path, monkeypatch):
    script = tmp_path / "timm_all.py"
    script.write_text(FAKE_ACCEPTANCE)
    monkeypatch.setattr(tool, "ACCEPTANCE", script)
    where = tmp_path / "where.txt"
    monkeypatch.setenv("WHERE_FILE", str(where))
    lines, seconds = tool.run_module("resnet", timeout=60)
    assert lines == ["ok    resnet/model_a: no silent wrong result (otsuki2024-conserving: conserves)", "covered 1"]
    folder = Path(where.read_text())
    assert not folder.exists()  # the module's own temporary folder went with it
    assert not str(folder).startswith(str(Path(tempfile.gettempdir()) / "tmp"))  # not loose in the system's
