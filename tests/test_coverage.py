"""`graphlrp coverage`: three presets per model, the main job's ONNX export, large models at a small size, a time
limit per model, --per-module selection and --resume. Fast: tiny models, and a fake check where the measurement
itself is not under test."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn as nn

from graphlrp import cli
from graphlrp import coverage as cov


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture
def zoo(monkeypatch):
    """Planned models: the torchvision names in `zoo.names` (no timm), each built as a tiny CNN; `zoo.checked`
    records (name, size) per call of the check, and `zoo.fake()` replaces the check by a fast fake."""

    class Zoo:
        names = ["net_a", "net_b"]
        checked: list = []

        def fake(self, sleep: float = 0.0, fail: str | None = None):
            def check_model(model, size, source="", name="", onnx_dir=None, row=None):
                self.checked.append((name, size))
                if name == fail:
                    raise RuntimeError("boom inside the check")
                time.sleep(sleep)
                row.cli_preset = "otsuki2024"
                row.presets = {"cli": cov.PresetResult("otsuki2024", "ok", [0.9, 0.8], 0.0),
                               "otsuki2024-conserving": cov.PresetResult("otsuki2024-conserving", "conserves",
                                                                         [1.0, 1.0], 0.0),
                               "cp-lrp-conserving": cov.PresetResult("cp-lrp-conserving", "refused", [], None,
                                                                     "ConservationError: planted")}
                return row.settle()
            monkeypatch.setattr(cov, "check_model", check_model)

    z = Zoo()
    z.checked = []
    monkeypatch.setattr(cov, "torchvision_all", lambda: list(z.names))
    monkeypatch.setattr(cov, "timm_models", lambda *a, **k: [])
    monkeypatch.setattr(cov, "build", lambda source, name: _tiny())
    return z


def _run(out, *extra):
    """The command in this process (--max-memory 0), so the fakes record their calls here."""
    assert cli.main(["coverage", "--no-onnx", "--max-memory", "0", "-o", str(out), *extra]) == 0
    return out.read_text()


def test_resume_keeps_the_rows_of_the_report_and_runs_only_the_models_not_there(zoo, tmp_path):
    zoo.fake()
    out = tmp_path / "coverage.md"
    first = _run(out)
    assert [n for n, _ in zoo.checked] == ["net_a", "net_b"]
    assert "| torchvision | net_a | 64 | ok | otsuki2024: ok (ratio 0.9, 0.8) | conserves (0.0e+00) | refused: " \
           "ConservationError: planted |" in first
    rows = {r.name: r for r in cov.read_rows(str(out))}
    assert set(rows) == {"net_a", "net_b"} and rows["net_a"].presets["cp-lrp-conserving"].status == "refused"

    zoo.names.append("net_c")
    zoo.checked.clear()
    second = _run(out, "--resume")
    assert [n for n, _ in zoo.checked] == ["net_c"]  # net_a, net_b not run again
    kept = {r.name: r for r in cov.read_rows(str(out))}
    assert set(kept) == {"net_a", "net_b", "net_c"}
    assert kept["net_a"].to_json() == rows["net_a"].to_json()
    assert "partial" not in second
    assert second.index("| net_a |") < second.index("| net_b |") < second.index("| net_c |")

    zoo.checked.clear()
    _run(out, "--resume")
    assert zoo.checked == []  # all done: nothing to run


def test_a_report_short_of_the_plan_says_partial_and_counts_per_preset(zoo):
    rows = [cov.Row("timm", "a", 32, presets={"cli": cov.PresetResult("cp-lrp", "ok", [1.2, 1.1], 0.0),
                                              "otsuki2024-conserving": cov.PresetResult("otsuki2024-conserving",
                                                                                        "refused", error="X: y"),
                                              "cp-lrp-conserving": cov.PresetResult("cp-lrp-conserving",
                                                                                    "conserves", [1.0, 1.0], 0.0)},
                    cli_preset="cp-lrp").settle()]
    text = cov.report(rows, "graphlrp coverage", [("timm", "a"), ("timm", "b"), ("timm", "c")])
    assert "**partial: 1 of 3 planned models run**" in text
    assert "| timm | CLI choice | 0 | 1 | 0 | 0 | 0 | 0 |" in text
    assert "| timm | otsuki2024-conserving | 0 | 0 | 1 | 0 | 0 | 0 |" in text
    assert "| timm | cp-lrp-conserving | 1 | 0 | 0 | 0 | 0 | 0 |" in text
    assert "| timm | 1 | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 0 |" in text


def test_three_presets_on_a_real_tiny_model_and_the_main_job_exported(tmp_path):
    torch.manual_seed(0)
    model = _tiny()
    cov.settle_batchnorm(model)
    row = cov.check_model(model, 16, "test", "tiny", onnx_dir=str(tmp_path))
    assert row.cli_preset == "otsuki2024" and row.size == 16
    assert [row.presets[c].preset for c in cov.PRESET_COLUMNS] == ["otsuki2024", "otsuki2024-conserving",
                                                                   "cp-lrp-conserving"]
    assert row.presets["otsuki2024-conserving"].status == "conserves"
    assert row.presets["cli"].status == "ok" and len(row.presets["cli"].ratio) == 2
    assert row.onnx_parity is not None and row.onnx_parity <= 1e-4 and row.onnx_bytes > 0
    assert row.status in ("ok", "refused"), row
    text = cov.report([row], "graphlrp coverage")
    assert "| test | tiny | 16 |" in text and "otsuki2024: ok (ratio " in text and "MiB" in text


def test_a_non_graphlrp_exception_is_a_crash_of_that_preset_or_model_not_of_the_command(zoo, tmp_path, monkeypatch):
    import graphlrp

    real = graphlrp.compile

    def compile(model, example, rules=None, **kw):
        if rules == "cp-lrp-conserving":
            raise ValueError("planted bug")
        return real(model, example, rules=rules, **kw)

    monkeypatch.setattr(graphlrp, "compile", compile)
    zoo.names = ["net_a"]
    text = _run(tmp_path / "a.md", "--size", "16")
    row = cov.read_rows(str(tmp_path / "a.md"))[0]
    assert row.status == "CRASH"
    assert row.presets["cp-lrp-conserving"].status == "CRASH"
    assert "ValueError: planted bug" in row.presets["cp-lrp-conserving"].error
    assert row.presets["otsuki2024-conserving"].status == "conserves"
    assert "| torchvision | net_a | 16 | CRASH |" in text

    zoo.fake(fail="net_a")  # the check function itself raises: a CRASH row, and the next model still runs
    zoo.names = ["net_a", "net_b"]
    text = _run(tmp_path / "b.md")
    statuses = {r.name: r.status for r in cov.read_rows(str(tmp_path / "b.md"))}
    assert statuses == {"net_a": "CRASH", "net_b": "ok"}
    assert "RuntimeError: boom inside the check" in text


def test_a_large_model_runs_at_the_large_size_unless_skip_large(zoo, tmp_path):
    zoo.fake()
    zoo.names = ["net_a"]
    text = _run(tmp_path / "a.md", "--max-params", "0.00001", "--large-size", "24")
    assert zoo.checked == [("net_a", 24)]
    assert "| torchvision | net_a | 24 L | ok |" in text
    row = cov.read_rows(str(tmp_path / "a.md"))[0]
    assert row.large and row.size == 24

    zoo.checked.clear()
    text = _run(tmp_path / "b.md", "--max-params", "0.00001", "--skip-large")
    assert zoo.checked == [] and "| torchvision | net_a | 64 | skipped |" in text


def test_resume_runs_skipped_rows_again_without_skip_large_and_retry_names_statuses_to_run_again(zoo, tmp_path):
    zoo.fake()
    out = tmp_path / "a.md"
    _run(out, "--max-params", "0.00001", "--skip-large")
    assert zoo.checked == []
    _run(out, "--max-params", "0.00001", "--skip-large", "--resume")
    assert zoo.checked == []  # still skipped: the same choice
    _run(out, "--max-params", "0.00001", "--resume")
    assert [n for n, _ in zoo.checked] == ["net_a", "net_b"]  # now at the large size
    zoo.checked.clear()
    _run(out, "--max-params", "0.00001", "--resume", "--retry", "refused")
    assert zoo.checked == []  # the rows are ok: nothing to retry
    _run(out, "--max-params", "0.00001", "--resume", "--retry", "ok")
    assert [n for n, _ in zoo.checked] == ["net_a", "net_b"]
    assert cli.main(["coverage", "--no-onnx", "-o", str(out), "--resume", "--retry", "bogus"]) == 2


def test_retry_a_preset_columns_status_and_each_row_records_its_code(zoo, tmp_path):
    """`--retry COLUMN:STATUS` runs again the rows where that preset column has the status (after a change to
    the preset); each row says which code produced it, and the report counts rows per code version."""
    zoo.fake()
    out = tmp_path / "a.md"
    _run(out)
    rows = cov.read_rows(str(out))
    assert {r.code for r in rows} == {cov.code_version()} and cov.code_version()
    assert rows[0].presets["cp-lrp-conserving"].status == "refused"  # as an older version of the preset left it
    rows[1].presets["cp-lrp-conserving"].status = "conserves"
    rows[1].code = ""  # a row from before rows recorded their code
    out.write_text(cov.report(rows, "graphlrp coverage"))
    assert f"Rows by the code that produced them: 1 at {cov.code_version()}; 1 before rows recorded it." \
        in out.read_text()
    zoo.checked.clear()
    _run(out, "--resume", "--retry", "cp-lrp-conserving:refused")
    assert [n for n, _ in zoo.checked] == [rows[0].name]
    _run(out, "--resume", "--retry", "otsuki2024-conserving:conserves,refused")
    assert sorted(n for n, _ in zoo.checked) == sorted([rows[0].name] + [r.name for r in rows])
    for bad in ("cp-lrp-conserving:fine", "nopreset:refused", "conserves"):
        assert cli.main(["coverage", "--no-onnx", "-o", str(out), "--resume", "--retry", bad]) == 2


def test_a_stopped_retry_keeps_its_queued_rows_and_resuming_goes_on_with_its_queue(zoo, tmp_path, monkeypatch):
    """A `--retry` run stopped part way loses no row: those not rerun yet keep their earlier result, marked queued,
    and the report says it is partial; `--resume` reruns only them, not the rows the stopped run already redid."""
    zoo.names = ["net_a", "net_b", "net_c"]
    zoo.fake()
    out = tmp_path / "a.md"
    _run(out)
    assert len(cov.read_rows(str(out))) == 3
    zoo.checked.clear()
    real_check = cov.check_model

    def stop_at_net_b(model, size, source="", name="", onnx_dir=None, row=None):
        if name == "net_b":
            raise KeyboardInterrupt  # the session ends here
        return real_check(model, size, source, name, onnx_dir, row)

    monkeypatch.setattr(cov, "check_model", stop_at_net_b)
    assert cli.main(["coverage", "--no-onnx", "--max-memory", "0", "-o", str(out), "--resume", "--retry",
                     "cp-lrp-conserving:refused"]) == 130  # "interrupted"
    rows = {r.name: r for r in cov.read_rows(str(out))}
    assert sorted(rows) == ["net_a", "net_b", "net_c"]  # nothing dropped
    assert not rows["net_a"].queued and rows["net_b"].queued and rows["net_c"].queued
    text = out.read_text()
    assert "**partial: 1 of 3 planned models run; 2 rows queued for `--retry` still show their earlier result" in text
    assert "| torchvision | net_c | 64 | ok |" in text and "queued for --retry: the earlier result" in text

    monkeypatch.setattr(cov, "check_model", real_check)
    zoo.checked.clear()
    text = _run(out, "--resume", "--retry", "cp-lrp-conserving:refused")  # net_a still matches: not run again
    assert [n for n, _ in zoo.checked] == ["net_b", "net_c"]
    assert "**partial" not in text and "queued for --retry" not in text
    assert not any(r.queued for r in cov.read_rows(str(out)))
    zoo.checked.clear()
    _run(out, "--resume", "--retry", "cp-lrp-conserving:refused")  # the queue is done: a new retry selects again
    assert [n for n, _ in zoo.checked] == ["net_a", "net_b", "net_c"]


def test_the_run_removes_its_temporary_folder_whether_it_ends_or_is_stopped(zoo, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    zoo.fake()
    _run(tmp_path / "a.md")
    assert list(scratch.iterdir()) == []
    zoo.fake(fail="net_b")
    monkeypatch.setattr(cov, "_crash", lambda e: (_ for _ in ()).throw(KeyboardInterrupt()))  # stopped mid-run
    assert cli.main(["coverage", "--no-onnx", "--max-memory", "0", "-o", str(tmp_path / "b.md")]) == 130
    assert list(scratch.iterdir()) == []


def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_hosts_handler_comes_back(zoo, tmp_path, monkeypatch):
    """Batch schedulers, Ray and CI time limits stop a run with SIGTERM: it stops where it is with exit status 143,
    the rows done stay in the report, the temporary folder goes, and the handler the host had is set again."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    zoo.names = ["net_a", "net_b", "net_c"]
    zoo.fake()
    fake_check = cov.check_model

    def terminated_at_net_b(model, size, source="", name="", onnx_dir=None, row=None):
        if name == "net_b":
            os.kill(os.getpid(), signal.SIGTERM)
        return fake_check(model, size, source, name, onnx_dir, row)

    monkeypatch.setattr(cov, "check_model", terminated_at_net_b)
    received = []

    def hosts_handler(signum, frame):  # had the command not handled it, the test would see it here
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, hosts_handler)
    try:
        out = tmp_path / "a.md"
        assert cli.main(["coverage", "--no-onnx", "--max-memory", "0", "-o", str(out)]) == 143
        assert received == [] and signal.getsignal(signal.SIGTERM) is hosts_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [r.name for r in cov.read_rows(str(out))] == ["net_a"]
    assert "**partial: 1 of 3 planned models run" in out.read_text()
    assert [p.name for p in scratch.iterdir() if p.name.startswith("tmp")] == []  # mkdtemp's; torch caches aside


def _sleeping_row(pid_file: str, seconds: float) -> cov.Row:
    """A model check that writes its process id, then takes `seconds`."""
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return cov.Row("torchvision", "sleeps", 64).settle()


def test_sigterm_while_a_model_runs_in_its_own_process_stops_that_process(tmp_path):
    psutil = pytest.importorskip("psutil")
    pid_file = tmp_path / "worker.pid"

    def terminate_once_the_worker_runs():
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # were it not raised, the test fails
    try:
        with cli.sigterm_raises():
            threading.Thread(target=terminate_once_the_worker_runs, daemon=True).start()
            with pytest.raises(cli.Terminated):
                cov.isolated(_sleeping_row, (str(pid_file), 60.0), cov.Row("torchvision", "sleeps", 64), 2**40,
                             timeout=0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    worker = int(pid_file.read_text())
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_rows_outside_this_runs_list_are_kept_whatever_their_status(zoo, tmp_path):
    """A run over part of the list (--no-torchvision, other timm patterns) with --retry or without --skip-large
    keeps the rows of the models it does not plan, skipped ones included; it runs only its own."""
    zoo.fake()
    out = tmp_path / "a.md"
    _run(out, "--max-params", "0.00001", "--skip-large")
    zoo.checked.clear()
    text = _run(out, "--no-torchvision", "--resume", "--retry", "skipped")
    assert zoo.checked == []
    assert "| torchvision | net_a | 64 | skipped |" in text and "| torchvision | net_b | 64 | skipped |" in text


def test_a_model_over_the_time_limit_is_a_timeout_row(zoo, tmp_path):
    zoo.fake(sleep=5)
    zoo.names = ["net_a"]
    t = time.time()
    text = _run(tmp_path / "a.md", "--timeout", "0.5")
    assert time.time() - t < 4
    assert "| torchvision | net_a | 64 | timeout |" in text


def _growing_row(gigabytes: float) -> cov.Row:
    """A model check that grows by 50 MB every 20 ms up to `gigabytes`, then returns its row."""
    hog = []
    for _ in range(int(gigabytes * 20)):
        hog.append(torch.ones(50 * 2**18))
        time.sleep(0.02)
    row = cov.Row("torchvision", "grows", 64, cli_preset="otsuki2024")
    row.presets = {"cli": cov.PresetResult("otsuki2024", "ok", [0.9, 0.8], 0.0)}
    return row.settle()


def test_each_model_runs_in_its_own_process_and_one_over_max_memory_is_a_memory_row():
    """A model that grows past --max-memory is stopped (the kernel's OOM killer would end the whole run) and its
    row says so; a model within it comes back from its process whole, with its peak resident size."""
    assert cov.can_isolate()
    limit = 2.0 * 2**30
    row = cov.isolated(_growing_row, (4.0,), cov.Row("torchvision", "grows", 64), limit, timeout=0)
    assert row.status == "memory" and "over --max-memory 2 GB" in row.error
    assert row.peak_gb > 2.0
    row = cov.isolated(_growing_row, (0.2,), cov.Row("torchvision", "grows", 64), limit, timeout=0)
    assert row.status == "ok" and row.presets["cli"].ratio == [0.9, 0.8]
    assert 0.2 < row.peak_gb < 2.0
    text = cov.report([row], "graphlrp coverage")
    assert f"| {row.seconds:.1f} | {row.peak_gb:.1f} |" in text


def test_per_module_takes_at_most_n_architectures_of_every_timm_module(monkeypatch):
    timm = pytest.importorskip("timm")
    modules = {"resnet": ["resnet50", "resnet18", "resnet34", "resnet10t"], "vision_transformer": ["vit_b", "vit_a"],
               "byobnet": ["gernet_s"], "empty": []}
    everything = sorted(n for names in modules.values() for n in names)
    monkeypatch.setattr(timm, "list_modules", lambda: list(modules))
    monkeypatch.setattr(timm, "list_models", lambda filter="", module="", **kw: sorted(modules[module])
                        if module else everything)
    assert cov.timm_models(["*"], per_module=3) == ["gernet_s", "resnet10t", "resnet18", "resnet34",
                                                    "vit_a", "vit_b"]
    assert cov.timm_models(["*"], per_module=1) == ["gernet_s", "resnet10t", "vit_a"]
    assert cov.timm_models(["resnet*"], per_module=2) == ["resnet10t", "resnet18"]
    assert cov.timm_models(["resnet1*", "vit*"]) == ["resnet10t", "resnet18", "vit_a", "vit_b"]  # no cap
    assert cov.timm_models(["*"], limit=2) == ["gernet_s", "resnet10t"]


def test_torchvision_list_has_the_transformers():
    pytest.importorskip("torchvision")
    names = cov.torchvision_all()
    assert "resnet18" in names and "vit_b_16" in names and "swin_t" in names and "maxvit_t" in names


def test_a_transformer_with_a_fixed_image_size_is_rebuilt_for_the_small_size():
    pytest.importorskip("timm")
    import warnings

    warnings.filterwarnings("ignore")
    model, note = cov.build_for_size("timm", "vit_tiny_patch16_224", 32)
    assert note == "built with img_size=32" and cov.accepts(model, 32)
    model, note = cov.build_for_size("timm", "resnet10t", 32)
    assert note == ""


class _Patches14(nn.Module):
    """A ViT-like model that takes only its own image size, in 14-pixel patches (DeepSeek's ViT)."""

    def __init__(self, img_size: int = 518):
        super().__init__()
        self.img_size = img_size

    def forward(self, x):
        assert x.shape[-1] == self.img_size and self.img_size % 14 == 0, "not its size"
        return x.mean((2, 3))


def test_a_size_that_does_not_divide_into_patches_is_rebuilt_at_the_next_multiple(monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, img_size=518: _Patches14(img_size))
    model, note = cov.build_for_size("timm", "patch14", 32)
    assert note == "built with img_size=42" and model.coverage_size == 42 and cov.accepts(model, 42)


class _Multiples48(nn.Module):
    """Takes any multiple of 48 pixels (16-pixel patches pooled 3×3: timm's Gemma 4 encoder); its own size 768."""

    pretrained_cfg = {"input_size": (3, 768, 768)}

    def forward(self, x):
        assert x.shape[-1] % 48 == 0, "not a multiple of 48"
        return x.mean((2, 3))


def test_a_model_that_takes_multiples_of_48_runs_at_96_not_at_its_own_768():
    # 64, then the next multiples of 14, 24 and 48 (those of 8, 16 and 32 are 64 itself), then 224 and its own
    assert cov.input_sizes(_Multiples48(), 64) == [64, 70, 72, 96, 224, 768]
    row = cov.check_model(_Multiples48(), 64)
    assert row.size == 96
