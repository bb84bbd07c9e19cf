"""`graphlrp serve MODEL.onnx`: the HTTP explainer service (see graphlrp/server.py). Binds to loopback unless
told otherwise, since the service has no authentication."""
from __future__ import annotations

import json
import os
import socket

from ..errors import GraphLRPError
from ._types import non_negative_float, port, positive_int


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a compiled explainer (.onnx) over HTTP",
                       description="POST /v1/explain, GET /v1/metadata, /healthz, /metrics, and a web page at /.")
    p.add_argument("model", help="explainer ONNX file from `graphlrp compile`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="server processes, each with its own model session and metrics (default 1)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="B",
                   help="most requests combined into one onnxruntime call (default 8)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0, metavar="M",
                   help="how long a batch waits for more requests after its first (default 5)")
    p.add_argument("--max-body-mb", type=non_negative_float, default=16.0, metavar="S",
                   help="largest accepted request body in MiB; larger ones get 413 (default 16)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default=None,
                   help="onnxruntime execution provider (default: CUDA when available, else CPU)")
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line in class order (default: those stored in the explainer)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import uvicorn

        from ..server import ENV_CONFIG, create_app
    except ImportError as e:
        raise GraphLRPError(f"graphlrp serve needs {e.name}: pip install 'graphlrp[serve]'") from None
    from ..runtime import load

    # split the cores between worker processes instead of letting each onnxruntime take all of them
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None
    session = load(args.model, providers=args.provider, threads=threads)  # fail here, clearly, on a bad file
    if args.labels:
        session.set_labels(args.labels)  # likewise a labels file that does not fit
    check_can_listen(args.host, args.port)
    settings = dict(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb)
    print(f"graphlrp serve: {args.model} on http://{args.host}:{args.port} ({', '.join(session.providers)}, "
          f"workers {args.workers}, max batch {args.max_batch})", flush=True)
    if args.workers == 1:
        uvicorn.run(create_app(session, **settings), host=args.host, port=args.port)
    else:
        os.environ[ENV_CONFIG] = json.dumps(dict(settings, model=os.path.abspath(args.model),
                                                 provider=args.provider, threads=threads,
                                                 labels=session.labels if args.labels else None))
        uvicorn.run("graphlrp.server:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers)
    return 0


def check_can_listen(host: str, port: int) -> None:
    """Bind once before the model is served, as uvicorn will (SO_REUSEADDR): a port in use or an address that is
    not this machine's is a one-line error, not uvicorn's log lines after the start banner."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise GraphLRPError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
