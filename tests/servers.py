"""Real servers on 127.0.0.1 for the remote tests: nginx over a folder (Range requests, an access log of bytes
sent) and moto's S3 in server mode. No network beyond the loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


@contextlib.contextmanager
def nginx(root, workdir):
    """nginx serving `root` at http://127.0.0.1:PORT/, logging the body bytes of every response."""
    if NGINX is None:
        raise RuntimeError("nginx is not installed: `apt-get install nginx-light` (.ci/run does)")
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
    proc = subprocess.Popen([NGINX, "-c", conf, "-p", str(workdir), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(port, proc)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def bytes_sent(log: str, contains: str = "") -> int:
    """Body bytes nginx sent for requests whose path contains `contains`."""
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
