"""The runtime without the compile extra: explain, serve, export-triton, graphlrp.load and the adapters run, in a
fresh interpreter where torch, torchvision, networkx and onnx cannot be imported, and never import them; the
compile side says which extra it needs. (`.ci/run` also checks a real install of `graphlrp[serve]` in a venv
without torch.)"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

COMPILE_SIDE = ("torch", "torchvision", "networkx", "onnx")

# a meta-path finder that makes the compile extra's packages unimportable, as in an install without it
BLOCK = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {COMPILE_SIDE!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_runtime_commands_run_without_the_compile_extra(tiny_onnx, images, tmp_path):
    out, repo = tmp_path / "out", tmp_path / "repo"
    code = f"""
        import io, json, sys
        import numpy as np
        import graphlrp
        import graphlrp.runtime, graphlrp.heatmap, graphlrp.explain_files, graphlrp.server, graphlrp.triton
        from graphlrp import cli
        from graphlrp.adapters import LRPAttribution, explain_func
        from graphlrp.errors import MissingExtraError
        report = {{}}

        s = graphlrp.load({tiny_onnx!r}, providers="cpu", threads=1)
        e = s.explain_images([{images['wide.png']!r}])[0]
        x = s.preprocess({images['wide.png']!r})[None]
        report["attribute"] = bool(np.allclose(LRPAttribution(s).attribute(x, target=e.target)[0], e.relevance))
        report["explain_func"] = list(explain_func(s, x, np.array([e.target])).shape)
        report["explain"] = cli.main(["explain", {tiny_onnx!r}, {images['wide.png']!r}, {images['tall.jpg']!r},
                                      "-o", {str(out)!r}])
        report["export_triton"] = cli.main(["export-triton", {tiny_onnx!r}, {str(repo)!r}])

        from starlette.testclient import TestClient
        with TestClient(graphlrp.server.create_app(s)) as client:
            good = client.post("/v1/explain", files={{"image": ("wide.png", open({images['wide.png']!r}, "rb"))}})
            bad = client.post("/v1/explain", files={{"image": ("x.png", b"definitely not an image")}})
        report["serve"] = [good.status_code, sorted(good.json()), bad.status_code]

        report["compile_rc"] = cli.main(["compile", "resnet18", "--weights", "none", "-o", "x.onnx"])
        try:
            graphlrp.compile
        except MissingExtraError as err:
            report["compile_attr"] = str(err)
        report["help"] = cli.build_parser().format_help()
        report["imported"] = sorted({{m.split(".")[0] for m in sys.modules}} & set({COMPILE_SIDE!r}))
        print("REPORT" + json.dumps(report))
    """
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert report["imported"] == [], report["imported"]
    assert report["attribute"] is True and report["explain_func"] == [1, 3, 32, 32]
    assert report["explain"] == 0 and report["export_triton"] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{kind}" for stem in ("wide", "tall") for kind in ("heatmap.png", "overlay.png", "relevance.npy",
                                                                  "photo_heatmap.png", "photo_overlay.png",
                                                                  "photo_relevance.npz"))
    assert (repo / "tiny" / "config.pbtxt").is_file() and (repo / "tiny" / "1" / "model.onnx").is_file()
    status, keys, bad_status = report["serve"]
    assert status == 200 and "predicted" in keys and 400 <= bad_status < 500
    assert report["compile_rc"] == 2
    assert "graphlrp compile needs the compile extra: pip install 'graphlrp[compile]'" in done.stderr
    assert "graphlrp.compile needs the compile extra: pip install 'graphlrp[compile]'" in report["compile_attr"]
    for command in ("compile", "explain", "serve", "export-triton", "transformers"):
        assert command in report["help"]


def test_a_broken_import_that_is_not_the_compile_extra_is_not_hidden():
    # only the compile extra's packages are turned into the install hint; anything else still raises as itself
    done = _run("""
        import sys
        from graphlrp.errors import missing_compile_extra
        assert missing_compile_extra(ModuleNotFoundError("x", name="torch.fx"), "w") is not None
        assert missing_compile_extra(ModuleNotFoundError("x", name="timm"), "w") is None
        assert missing_compile_extra(ModuleNotFoundError("x", name="onnxruntime"), "w") is None
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
