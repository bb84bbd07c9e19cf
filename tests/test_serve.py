"""`graphlrp serve`, as a real uvicorn subprocess on loopback (the `server` fixture in conftest.py)."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

import graphlrp


@pytest.fixture(scope="module")
def session(tiny_onnx):
    return graphlrp.load(tiny_onnx)


@pytest.fixture(scope="module")
def png(images) -> bytes:
    with open(images["wide.png"], "rb") as f:
        return f.read()


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text; 0 when the series does not exist yet."""
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def metrics(base) -> str:
    return httpx.get(base + "/metrics").text


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def check_against_local(result: dict, session, x: np.ndarray, target: int | None):
    expected = session.explain(x, target=target)
    assert result["target"] == expected.target and result["predicted"] == expected.predicted
    assert [c["index"] for c in result["topk"]] == [i for i, _ in expected.topk(5)]
    for c, (i, p) in zip(result["topk"], expected.topk(5)):
        assert c["label"] == session.label(i) and c["probability"] == pytest.approx(p, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.array(result["relevance"]), expected.relevance_map, rtol=1e-4, atol=1e-6)
    heat = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
    assert heat.format == "PNG" and heat.size == (32, 32)


def test_explain_matches_the_local_session(server, session, png):
    base, _ = server
    x = session.preprocess(png)
    r = httpx.post(base + "/v1/explain?relevance=1", files={"image": ("wide.png", png)})
    assert r.status_code == 200, r.text
    check_against_local(r.json(), session, x, None)
    r = httpx.post(base + "/v1/explain?relevance=1&target=3", files={"image": ("wide.png", png)})
    check_against_local(r.json(), session, x, 3)
    r = httpx.post(base + "/v1/explain?relevance=1&target=3", files={"image": ("wide.png", png)}, data={"target": "5"})
    check_against_local(r.json(), session, x, 5)  # the body's target wins over the query's
    r = httpx.post(base + "/v1/explain?relevance=1", json={"image_base64": base64.b64encode(png).decode(), "target": 2})
    check_against_local(r.json(), session, x, 2)
    r = httpx.post(base + "/v1/explain?relevance=1", json={"array": x.tolist(), "target": -1})
    check_against_local(r.json(), session, x, None)
    r = httpx.post(base + "/v1/explain?overlay=1", files={"image": ("wide.png", png)})
    assert "relevance" not in r.json()
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["overlay_png"]))).size == (32, 32)


def test_pictures_at_the_photos_resolution_names_and_colour_scale(server, session, png, images):
    """?photo=1: overlay and heatmap on the photo's own pixels, drawn exactly as `graphlrp explain` draws them
    (graphlrp.heatmap on the locally explained map), the colour scale and bar, class names."""
    from graphlrp import heatmap

    base, _ = server
    r = httpx.post(base + "/v1/explain?photo=1&target=3", files={"image": ("wide.png", png)})
    assert r.status_code == 200, r.text
    result = r.json()
    expected = session.explain(session.preprocess(png), target=3)
    photo = Image.open(images["wide.png"]).convert("RGB")
    assert result["photo_size"] == result["photo_shown_size"] == [60, 40]
    scale = heatmap.ColourScale.of(expected.relevance_map)
    assert result["scale"]["kind"] == scale.kind and result["scale"]["cmap"] == scale.cmap
    assert result["scale"]["vmax"] == pytest.approx(scale.vmax, rel=1e-4, abs=1e-9)
    assert result["scale"]["description"].split(" ")[0] in ("diverging", "sequential")
    pmap = heatmap.photo_map(expected.relevance, session.preprocessing, photo.size)
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["photo_overlay_png"]))), np.int16)
    assert overlay.shape == (40, 60, 3)
    assert np.abs(overlay - np.asarray(heatmap.photo_overlay(pmap, photo, scale), np.int16)).max() <= 1
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["photo_heatmap_png"]))))
    assert heat.shape == (40, 60, 4) and (heat[..., 3][np.isnan(pmap)] == 0).all()
    bar = Image.open(io.BytesIO(base64.b64decode(result["colorbar_png"])))
    assert bar.size[0] == 256
    assert result["target_name"] == "class 3" and result["probability"] == pytest.approx(
        float(expected.probabilities[3]), rel=1e-5)
    assert [c["name"] for c in result["topk"]] == [session.label(i) for i, _ in expected.topk(5)]
    r = httpx.post(base + "/v1/explain?photo=1&cmap=viridis", files={"image": ("wide.png", png)})
    assert r.status_code == 200 and r.json()["scale"]["cmap"] == "viridis"
    r = httpx.post(base + "/v1/explain?photo=1&cmap=nonsense", files={"image": ("wide.png", png)})
    assert r.status_code == 422 and "unknown colour map" in r.json()["detail"]
    r = httpx.post(base + "/v1/explain?photo=1", json={"array": session.preprocess(png).tolist()})
    assert r.status_code == 200 and "photo_overlay_png" not in r.json()  # an array has no photo


def test_a_large_photo_is_drawn_at_a_capped_size(server, session):
    from graphlrp.server import MAX_PHOTO_SIDE

    big = Image.new("RGB", (2400, 1000), (90, 140, 200))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = httpx.post(server[0] + "/v1/explain?photo=1", files={"image": ("big.png", buf.getvalue())})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["photo_size"] == [2400, 1000] and result["photo_shown_size"] == [MAX_PHOTO_SIDE, 667]
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["photo_heatmap_png"]))))
    assert heat.shape == (667, MAX_PHOTO_SIDE, 4)
    # the crop on the shown copy: the full photo's window, scaled; its pixels opaque, the rest transparent
    x0, y0, x1, y1 = session.preprocessing.crop_window((2400, 1000))
    x0, x1, y0, y1 = x0 * MAX_PHOTO_SIDE / 2400, x1 * MAX_PHOTO_SIDE / 2400, y0 * 667 / 1000, y1 * 667 / 1000
    cols = (np.arange(MAX_PHOTO_SIDE) + 0.5 >= x0) & (np.arange(MAX_PHOTO_SIDE) + 0.5 < x1)
    rows = (np.arange(667) + 0.5 >= y0) & (np.arange(667) + 0.5 < y1)
    inside = rows[:, None] & cols[None, :]
    assert (heat[..., 3][inside] == 255).all() and (heat[..., 3][~inside] == 0).all() and inside.mean() < 0.5


def test_metadata_health_metrics_and_page(server, session):
    base, _ = server
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    meta = httpx.get(base + "/v1/metadata").json()
    assert meta["metadata"]["labels"] == session.labels and meta["input_size"] == [3, 32, 32]
    assert meta["num_classes"] == 10 and meta["max_batch"] == 16
    assert meta["preprocessing"] == "resize 36 (bilinear), center crop 32x32"
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for family in ("graphlrp_requests_total counter", "graphlrp_request_duration_seconds histogram",
                   "graphlrp_batch_size histogram"):
        assert f"# TYPE {family}" in r.text
    page = httpx.get(base + "/")
    assert page.status_code == 200 and '<input type="file"' in page.text


@pytest.mark.parametrize("kwargs, status, detail", [
    (dict(files={"image": ("x.png", b"definitely not an image")}), 400, "x.png: not a readable image"),
    (dict(files={"image": ("x.png", b"\x89PNG\r\n\x1a\nnot really")}), 400, "cannot read image"),
    (dict(files={"other": ("x.png", b"")}), 422, "'image'"),
    (dict(data={"image": "a string, not a file"}, files={"other": ("x", b"")}), 422, "'image'"),
    (dict(json={"image_base64": "%%%"}), 400, "base64"),
    (dict(json={"image_base64": base64.b64encode(b"GIF89a...").decode()}), 400, "image"),
    (dict(json={"array": np.zeros((3, 16, 16)).tolist()}), 422, "shape"),
    (dict(json={"array": [[1, 2], [3]]}), 422, "numeric"),
    (dict(json={"array": "abc"}), 422, "numeric"),
    (dict(json={"array": np.zeros((3, 32, 32)).tolist(), "target": 10}), 422, "unknown target class 10"),
    (dict(json={"array": np.zeros((3, 32, 32)).tolist(), "target": "two"}), 422, "target"),
    (dict(json={"array": np.zeros((3, 32, 32)).tolist(), "target": True}), 422, "target"),
    (dict(json={"something": 1}), 422, "image_base64"),
    (dict(json=[1, 2]), 422, "object"),
    (dict(content=b'{"array": [', headers={"content-type": "application/json"}), 400, "JSON"),
    (dict(content=b"[" * 100_000, headers={"content-type": "application/json"}), 400, "JSON"),
    (dict(content=b"raw", headers={"content-type": "text/plain"}), 415, "multipart"),
    (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400, "boundary"),
])
def test_bad_input_gets_a_4xx_with_a_message(server, kwargs, status, detail):
    r = httpx.post(server[0] + "/v1/explain", **kwargs)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]


def test_truncated_image_and_bad_target_query(server, png):
    base, _ = server
    assert httpx.post(base + "/v1/explain", files={"image": ("x.png", png[: len(png) // 3])}).status_code == 400
    assert httpx.post(base + "/v1/explain?target=99", files={"image": ("x.png", png)}).status_code == 422
    assert httpx.post(base + "/v1/explain?target=abc", files={"image": ("x.png", png)}).status_code == 422


def raw_post_headers(base: str, length: int) -> bytes:
    """Send only the headers of a POST declaring `length` body bytes; return the first reply bytes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/explain HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode())
        return s.recv(4096)


def test_oversized_bodies_are_refused_and_the_server_stays_healthy(server, png):
    base, pid = server
    before_413 = metric(metrics(base), "graphlrp_requests_total", '{path="/v1/explain",status="413"}')
    rss_before = rss_mib(pid)
    # a declared Content-Length over the limit (2 MiB here) is answered before any body byte is sent
    assert raw_post_headers(base, 3 * 2**20).startswith(b"HTTP/1.1 413")

    # a chunked body has no declared length: it is cut off while streaming
    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        for _ in range(48):
            yield b"\0" * 2**16
    try:
        status = httpx.post(base + "/v1/explain", content=chunks(),
                            headers={"content-type": "multipart/form-data; boundary=x"}).status_code
    except httpx.TransportError:
        status = "closed"
    assert status in (413, "closed")

    # 64 MiB, as a careless client would send it: refused (413, or the connection closed early)
    body = os.urandom(64 * 2**20)
    req = urllib.request.Request(base + "/v1/explain", data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (ConnectionError, urllib.error.URLError):
        status = "closed"
    assert status in (413, "closed")
    del body

    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.post(base + "/v1/explain", files={"image": ("x.png", png)}).status_code == 200
    after_413 = metric(metrics(base), "graphlrp_requests_total", '{path="/v1/explain",status="413"}')
    assert after_413 - before_413 == 3
    rss_after = rss_mib(pid)
    print(f"server RSS around oversized uploads: {rss_before:.0f} MiB -> {rss_after:.0f} MiB")
    assert rss_after < rss_before + 32, "the server buffered an oversized body"


def test_concurrent_clients_are_micro_batched(server, png, record_property):
    base, pid = server
    clients, per_client = 50, 20
    text = metrics(base)
    batches_before = metric(text, "graphlrp_batch_size_count")
    singles_before = metric(text, "graphlrp_batch_size_bucket", '{le="1"}')
    rss_before = rss_mib(pid)

    def client(i: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=base, timeout=60) as c:
            for j in range(per_client):
                target = (i + j) % 11 - 1  # -1..9
                r = c.post(f"/v1/explain?target={target}", files={"image": ("x.png", png)})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    expected = target if target >= 0 else r.json()["predicted"]
                    statuses[-1] = 200 if r.json()["target"] == expected else -1
        return statuses

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        statuses = [s for result in pool.map(client, range(clients)) for s in result]
    assert statuses.count(200) == clients * per_client, {s: statuses.count(s) for s in set(statuses)}

    text = metrics(base)
    batches = metric(text, "graphlrp_batch_size_count") - batches_before
    singles = metric(text, "graphlrp_batch_size_bucket", '{le="1"}') - singles_before
    rss_after = rss_mib(pid)
    record_property("rss_mib", json.dumps({"before": round(rss_before), "after": round(rss_after)}))
    print(f"{clients * per_client} requests in {batches:.0f} batches ({batches - singles:.0f} with more than one "
          f"input); server RSS {rss_before:.0f} MiB -> {rss_after:.0f} MiB")
    assert batches - singles > 0, "no batch ever held more than one request"
    assert batches < clients * per_client
    assert rss_after < rss_before * 1.5 + 64, "server memory grew under load"


def test_multi_worker_settings_reach_each_worker_app(tiny_onnx, png, monkeypatch):
    """`--workers N` hands uvicorn an app factory plus settings in the environment; build one worker's app the
    way uvicorn would and use it in-process."""
    import uvicorn
    from fastapi.testclient import TestClient

    from graphlrp.cli import main
    from graphlrp.server import ENV_CONFIG, app_from_env

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setenv(ENV_CONFIG, "")  # so that monkeypatch removes what `serve` puts there
    assert main(["serve", tiny_onnx, "--workers", "2", "--max-batch", "4", "--port", "0"]) == 0
    (app, kwargs), = calls
    assert app == "graphlrp.server:app_from_env" and kwargs["factory"] and kwargs["workers"] == 2
    assert kwargs["host"] == "127.0.0.1"
    with TestClient(app_from_env()) as client:
        assert client.get("/v1/metadata").json()["max_batch"] == 4
        r = client.post("/v1/explain", files={"image": ("x.png", png)})
        assert r.status_code == 200 and len(r.json()["topk"]) == 5


def test_a_labels_file_names_the_classes_in_every_worker(tiny_onnx, png, monkeypatch, tmp_path):
    import uvicorn
    from fastapi.testclient import TestClient

    from graphlrp.cli import main
    from graphlrp.server import ENV_CONFIG, app_from_env

    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(10)))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.setenv(ENV_CONFIG, "")
    assert main(["serve", tiny_onnx, "--workers", "2", "--port", "0", "--labels", str(names)]) == 0
    with TestClient(app_from_env()) as client:
        r = client.post("/v1/explain", files={"image": ("x.png", png)}).json()
        assert r["predicted_name"] == f"thing {r['predicted']}"
        assert all(c["name"] == f"thing {c['index']}" for c in r["topk"])
    names.write_text("just one\n")
    p = subprocess.run([sys.executable, "-m", "graphlrp.cli", "serve", tiny_onnx, "--labels", str(names)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "1 labels given for a model with 10 classes" in p.stderr


def test_a_port_in_use_or_out_of_range_is_a_one_line_error_before_serving(tiny_onnx):
    """uvicorn would log a bind error after the start banner (and a port over 65535 was an OverflowError
    traceback); serve says so in one line and exits 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = taken.getsockname()[1]
        for port, said in [(in_use, f"cannot listen on 127.0.0.1:{in_use}: Address already in use"),
                           (70000, "must be a TCP port, 0..65535")]:
            p = subprocess.run([sys.executable, "-m", "graphlrp.cli", "serve", tiny_onnx, "--port", str(port)],
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 2 and said in p.stderr and "Traceback" not in p.stderr, p.stderr
            assert "graphlrp serve: " not in p.stdout  # no start banner for a server that never started
