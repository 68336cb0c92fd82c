"""Real servers on 127.0.0.1 for the remote tests, no network beyond the loopback: a static web server over a
folder (Range requests, ETags, no folder listing, an access log of body bytes sent) and moto's S3 in server mode.

The web server is aiohttp's (`web.FileResponse`: a dependency already, so `pip install -e ".[test]"` is all the
set-up), run in its own process as a user would run one; nginx serves the same folder the same way where it is
installed (`http_server("nginx", ...)`), so the tests also run against the server labs most often publish with.
Both write one access-log line per request in the same format: METHOD PATH STATUS BODY_BYTES "RANGE".

Run by hand: `python tests/servers.py ROOT PORT LOG`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.path.exists(p)), None)
KINDS = ("aiohttp", "nginx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


def _stop(proc, sig) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _serve_with(cmd: list, port: int, log: str, stop_signal):
    """Starts a server process, yields (base URL, access log) once it answers, stops it with `stop_signal`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(port, proc)
        yield f"http://127.0.0.1:{port}", log
    finally:
        _stop(proc, stop_signal)


@contextlib.contextmanager
def http_server(kind: str, root, workdir):
    """`kind` ("aiohttp" or "nginx") serving `root` at http://127.0.0.1:PORT/; yields (base URL, access log)."""
    server = {"aiohttp": aiohttp_server, "nginx": nginx}[kind]
    with server(root, workdir) as served:
        yield served


@contextlib.contextmanager
def aiohttp_server(root, workdir):
    """aiohttp's static files (this file run as a script) serving `root`, logging the body bytes of every
    response."""
    port = free_port()
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "access.log")
    open(log, "w").close()
    yield from _serve_with([sys.executable, os.path.abspath(__file__), str(root), str(port), log], port, log,
                           signal.SIGTERM)


@contextlib.contextmanager
def nginx(root, workdir):
    """nginx serving `root` at http://127.0.0.1:PORT/, logging the body bytes of every response."""
    if NGINX is None:
        raise RuntimeError("nginx is not installed (the nginx variants of the tests are skipped without it)")
    port = free_port()
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "access.log")
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(("user root;\n" if os.geteuid() == 0 else "") + f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    log_format bytes '$request_method $uri $status $body_bytes_sent "$http_range"';
    client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy; fastcgi_temp_path {workdir}/fcgi;
    uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        access_log {log} bytes;
        location / {{ autoindex off; }}
    }}
}}
""")
    yield from _serve_with([NGINX, "-c", conf, "-p", str(workdir), "-g", "daemon off;"], port, log,
                           signal.SIGQUIT)  # nginx's graceful stop


def bytes_sent(log: str, contains: str = "") -> int:
    """Body bytes the server sent for requests whose path contains `contains`."""
    total = 0
    with open(log) as f:
        for line in f:
            method, uri, status, sent = line.split(" ", 4)[:4]
            if contains in uri:
                total += int(sent)
    return total


@contextlib.contextmanager
def s3(monkeypatch):
    """moto's S3 in server mode on 127.0.0.1, with the environment variables a user would set for a real
    S3-compatible store (credentials, endpoint)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield env
    finally:
        server.stop()


def _serve(root: str, port: int, log: str) -> None:
    """A static web server as labs run one: files only (a folder is 404: no listing), Range requests, ETags and
    HEAD (aiohttp's FileResponse), one access-log line per request."""
    from aiohttp import web
    from aiohttp.abc import AbstractAccessLogger

    root = os.path.realpath(root)

    class BodyBytes(AbstractAccessLogger):
        # the body's length as sent (Content-Length of a 200 or 206; sendfile bypasses aiohttp's byte counters)
        def log(self, request, response, time):
            ok = request.method == "GET" and response.status in (200, 206)
            sent = (response.content_length or 0) if ok else 0
            with open(log, "a") as f:
                f.write(f'{request.method} {request.path} {response.status} {sent} '
                        f'"{request.headers.get("Range", "-")}"\n')

    async def files(request):
        path = os.path.realpath(os.path.join(root, request.match_info["path"]))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/{path:.*}", files)  # HEAD too
    web.run_app(app, host="127.0.0.1", port=port, access_log_class=BodyBytes, print=None, handle_signals=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
