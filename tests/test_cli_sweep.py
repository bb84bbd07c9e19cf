"""tools/cli_sweep.py writes the main job's sweep pages and resumes them; a resumed or partly redone sweep must keep
every row the page had, whichever models it is about (torchvision's list or a list of timm models)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "cli_sweep", Path(__file__).resolve().parents[1] / "tools" / "cli_sweep.py")
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)


def _row(name: str) -> dict:
    return {"model": name, "timeout": False, "memory": False, "traceback": False, "rc": 0, "size_mb": 1.0,
            "wall_s": 1.0, "cpu_s": 1.0, "load": 0.1, "rss_gib": 1.0, "input": 224, "checked": "checked", "error": "",
            "warning": "", "large": False}


def test_redoing_one_model_of_a_timm_sweep_keeps_the_others(tmp_path, monkeypatch):
    page = tmp_path / "sweep.md"
    models = ["timm:a", "timm:b", "timm:c"]
    monkeypatch.setattr(tool, "params_millions", lambda name: 1.0)
    ran = []
    monkeypatch.setattr(tool, "run_one", lambda name, *args: ran.append(name) or _row(name))
    tool.main(["-o", str(page), "--size", "224", "--models", ",".join(models)])
    assert ran == models
    tool.main(["-o", str(page), "--size", "224", "--resume", "--redo", "timm:b", "--models", ",".join(models)])
    assert ran == models + ["timm:b"]
    rows = tool.read_rows(str(page))
    assert list(rows) == models
    text = page.read_text()
    assert "partial" not in text and "--models timm:a,timm:b,timm:c" in text


def test_a_resumed_torchvision_sweep_is_about_every_torchvision_model():
    everything = tool.torchvision_models()
    assert tool.planned_models([], {}) == everything
    assert tool.planned_models([], {everything[0]: {}}) == everything
    assert tool.planned_models(everything[:2], {everything[0]: {}}) == everything
    assert tool.planned_models(everything[:2], {}) == everything[:2]  # a new page about a few of them
