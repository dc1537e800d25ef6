"""A real load balancer for webhook replicas: Debian's nginx, started on a free port.

Used by the webhook tests (tests/test_webhook.py) and the webhook throughput bench
(bench/webhook_throughput.py). nginx runs in the foreground (``daemon off``) in its own session,
with its config, pid file and logs in a directory of the caller's; :meth:`Nginx.stop` kills its
process group. ``proxy_next_upstream`` sends a delivery that a dead or refusing (502/503) replica
did not take to the next one: storing a delivery is idempotent (the inbox de-duplicates), so even
a POST may be retried.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from testbed.waiting import free_port, listening

#: How long nginx may take to listen.
LISTEN_TIMEOUT = 10.0

NGINX_CONF = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream solobot {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 2m;
        location {path} {{
            proxy_pass http://solobot;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Real-IP $remote_addr;
            # Storing a delivery is idempotent (de-duplicated), so a POST may go to the next replica.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx in front of the replicas' ports (``HEALTH_PORT``), routing *path*."""

    def __init__(self, work: Path, upstream_ports: list[int], path: str, *, access_log: bool = True) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        self.path = path
        self.dir = work / f"nginx-{self.port}"
        self.dir.mkdir(parents=True)
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            tmp=self.dir, servers=servers, port=self.port, path=path,
            access_log=f"{self.dir}/nginx-access.log" if access_log else "off",
        ))
        command = [binary, "-c", str(conf), "-p", str(self.dir), "-e", str(self.dir / "nginx-error.log")]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not self._listening():
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nginx did not listen within {LISTEN_TIMEOUT} s: {self.error_log()}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:  # failed to start (bad config, port taken)
            raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.error_log()}")
        return listening(self.port)

    def error_log(self) -> str:
        path = self.dir / "nginx-error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def stop(self) -> None:
        """Kill nginx's process group. Not conftest's kill_group: nginx overwrites its environment
        (the process title), so the owner mark cannot be read; the group is ours by construction
        (its leader is our unreaped child, or its workers keep the group alive)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
