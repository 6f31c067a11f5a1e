"""Start a real JupyterLab on 127.0.0.1 for the browser tests, and drive Debian's Chromium."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
#: no autosave (a test never rewrites its notebook) and no news pop-up
OVERRIDES = {
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def install_overrides() -> Path:
    """JupyterLab reads overrides.json from the environment's share/jupyter/lab/settings."""
    folder = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "overrides.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    merged = {**current, **{k: {**current.get(k, {}), **v} for k, v in OVERRIDES.items()}}
    if merged != current:
        path.write_text(json.dumps(merged, indent=2))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab:
    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "jupyterlab.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> JupyterLab:
        install_overrides()
        home = self.root / ".jupyter-home"
        home.mkdir(exist_ok=True)
        env = {**self.env, "JUPYTER_CONFIG_DIR": str(home / "config"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-user-settings"),
               "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
               f"--ServerApp.port={self.port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--ServerApp.open_browser=False", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     cwd=self.root)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"JupyterLab did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            req = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(req, timeout=5)
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 — fall back to a kill
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists()
