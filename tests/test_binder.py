"""Binder's environment, built the way repo2docker builds it, from binder/ alone.

repo2docker (what mybinder.org runs) takes the Python version from binder/runtime.txt, runs
`pip install -r binder/requirements.txt` with the repository as its working directory (a local
requirement such as "." makes it copy the whole repository in first), then runs binder/postBuild.
The slow test does the same in a fresh virtual environment — no system site-packages, no
PYTHONPATH, no user Jupyter or IPython settings — and runs every notebook and JupyterLab's landing
page with it: a dependency missing from the requirements fails it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest
import yaml

from papermill_runs import (
    NOTEBOOKS,
    ROOT,
    SMALL,
    assert_headless,
    assert_summary,
    kill_tree,
    papermill,
    run_command,
    text_of,
    workflow_cell,
)

BINDER = ROOT / "binder"
#: mybinder.org gives a session 1-2 GB; the kernel (~400 MB with Dask and pandas loaded) and
#: the Jupyter server (~150 MB) share it with every step's budget
BINDER_MEMORY = 2 * 1024**3


def test_binder_configuration():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.\d+", runtime), runtime
    lines = [ln.split("#", 1)[0].strip() for ln in (BINDER / "requirements.txt").read_text().splitlines()]
    requirements = [ln for ln in lines if ln]
    # "." is the repository itself (repo2docker's working directory); it pulls in nbflow's dependencies
    assert "." in requirements
    assert any(r.startswith("jupyterlab") for r in requirements)
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "repo2docker runs postBuild only if it is executable"
    assert post_build.read_text().startswith("#!/usr/bin/env bash")
    subprocess.run(["bash", "-n", str(post_build)], check=True)


def _budgets(nb: nbformat.NotebookNode) -> list[str]:
    """Every max_memory a notebook sets: in its parameters cell and in its workflows."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        found += re.findall(r'^max_memory\s*=\s*"([^"]+)"', cell.source, flags=re.M)
        if cell.source.startswith("%%workflow"):
            spec = yaml.safe_load(cell.source.split("\n", 1)[1])
            for where in [spec.get("parameters", {}), spec.get("defaults", {})] + [
                    {**s, **s.get("params", {})} for s in spec["steps"]]:
                value = where.get("max_memory")
                if value is not None and not str(value).startswith("{"):
                    found.append(str(value))
    return found


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_budgets_fit_in_binder(name):
    """A step's budget is memory above the kernel's baseline: keep it well under a quarter of 2 GB."""
    from nbflow.units import parse_size

    budgets = _budgets(nbformat.read(NOTEBOOKS / name, as_version=4))
    assert budgets, f"{name} sets no max_memory: its steps would get half of what is available"
    for budget in budgets:
        assert parse_size(budget) <= BINDER_MEMORY // 4, f"{name}: max_memory {budget} does not fit Binder"


def test_default_budget_under_a_binder_memory_limit(tmp_path):
    """With no max_memory a step gets half of what the cgroup still allows: ~0.8 GB on Binder."""
    from nbflow.engine.limits import default_budget

    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{BINDER_MEMORY}\n")
    (cgroup / "memory.current").write_text(f"{450 * 1024**2}\n")  # server + a fresh kernel
    (cgroup / "memory.stat").write_text("anon 400000000\ninactive_file 0\n")
    budget = default_budget(cgroup_root=cgroup)
    assert 0 < budget <= (BINDER_MEMORY - 450 * 1024**2) // 2


# -- the environment itself --------------------------------------------------------------------

def _index_reachable() -> bool:
    url = urlparse(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=5):
            return True
    except OSError:
        return False


def _python_for(runtime: str) -> str | None:
    version = runtime.removeprefix("python-")
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    return shutil.which(f"python{version}")


def _copy_repository(dest: Path) -> None:
    """What a clone holds: git's tracked files plus new ones not ignored (work not committed yet)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy without the clutter
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".nbflow", "__pycache__", "*.egg-info", "build", "test-artifacts", ".*_cache"))
        return
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)  # keeps postBuild's executable bit


def _clean_env(venv: Path, home: Path, **extra: str) -> dict[str, str]:
    """The venv first on PATH; nothing from the test's own Python, Jupyter or IPython setup."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "JUPYTER", "IPYTHON", "VIRTUAL_ENV", "NBFLOW", "CONDA"))}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), VIRTUAL_ENV=str(venv),
               NB_PYTHON_PREFIX=str(venv), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), IPYTHONDIR=str(home / "ipython"),
               MPLBACKEND="Agg", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def _check(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory):
    """(repository copy, venv, env): requirements installed as repo2docker does, postBuild run."""
    if not _index_reachable():
        pytest.skip("no package index reachable: cannot build the Binder environment")
    runtime = (BINDER / "runtime.txt").read_text().strip()
    python = _python_for(runtime)
    if python is None:
        pytest.skip(f"binder/runtime.txt asks for {runtime}, which is not installed here")
    base = tmp_path_factory.mktemp("binder")
    repo, venv, home = base / "repo", base / "venv", base / "home"
    repo.mkdir()
    home.mkdir()
    _copy_repository(repo)
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    env = _clean_env(venv, home)
    # repo2docker: `${KERNEL_PYTHON_PREFIX}/bin/pip install --no-cache-dir -r "binder/requirements.txt"`
    # in the repository; we keep pip's cache so that a second run needs no download
    _check([str(venv / "bin" / "python"), "-m", "pip", "install", "-r", "binder/requirements.txt"],
           cwd=repo, env=env, timeout=1200)
    _check(["./binder/postBuild"], cwd=repo, env=env)
    return repo, venv, env


@pytest.mark.slow
def test_binder_environment_is_complete(binder_env, tmp_path):
    repo, venv, env = binder_env
    python = str(venv / "bin" / "python")
    where = _check([python, "-c", "import nbflow; print(nbflow.__file__)"], cwd=tmp_path, env=env)
    assert str(venv) in where, f"nbflow did not come from the Binder environment: {where}"
    # the kernel papermill and JupyterLab start is this environment's Python
    specs = json.loads(_check([str(venv / "bin" / "jupyter"), "kernelspec", "list", "--json"],
                              cwd=tmp_path, env=env))["kernelspecs"]
    argv0 = specs["python3"]["spec"]["argv"][0]
    assert Path(shutil.which(argv0, path=env["PATH"]) or argv0).resolve() == Path(python).resolve()
    # the widget manager, so the %%workflow dashboard renders in Binder's JupyterLab
    extensions = _check([str(venv / "bin" / "jupyter"), "labextension", "list"], cwd=tmp_path, env=env)
    assert "@jupyter-widgets/jupyterlab-manager" in extensions
    overrides = venv / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert json.loads(overrides.read_text())["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


@pytest.mark.slow
def test_binder_environment_runs_every_notebook(binder_env, tmp_path):
    repo, venv, env = binder_env
    python = str(venv / "bin" / "python")
    results = {}
    for name in sorted(p.name for p in (repo / "notebooks").glob("*.ipynb")):
        cwd = tmp_path / name.split("-")[0]
        cwd.mkdir()
        run_env = {**env, "NBFLOW_HOME": str(cwd / ".nbflow")}
        if name.startswith("03"):  # the scheduled run, through the CLI the venv installed
            cmd = [str(venv / "bin" / "nbflow"), "run", "--notebook", str(repo / "notebooks" / name),
                   "-o", "out.ipynb"]
            for key, value in SMALL[name].items():
                cmd += ["-p", f"{key}={value}"]
            results[name] = run_command(cmd, cwd=cwd, env=run_env, timeout=240, output=cwd / "out.ipynb")
        else:
            results[name] = papermill(repo / "notebooks" / name, cwd / "out.ipynb", cwd=cwd,
                                      params=SMALL[name], timeout=240, python=python, env=run_env)
    assert sorted(results) == sorted(SMALL)
    for name, run in results.items():
        # 02's failure is the demo (its cell says --no-raise): every notebook exits 0
        assert run.returncode == 0, run.describe()
        nb = run.nb
        assert_headless(nb)
        assert_summary(workflow_cell(nb))
        errors = [o.ename for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert errors == [], run.describe()
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{name}: not every cell ran"
    assert "transform-data: completed" in text_of(
        [c for c in results["02-debugging-out-of-memory.ipynb"].nb.cells if c.cell_type == "code"][-1])


@pytest.mark.slow
def test_binder_landing_page_opens_the_notebooks(binder_env):
    """mybinder.org/v2/gh/OWNER/nbflow/HEAD?urlpath=lab/tree/notebooks opens JupyterLab there."""
    repo, venv, env = binder_env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    log = repo.parent / "jupyterlab.log"
    proc = subprocess.Popen([str(venv / "bin" / "jupyter"), "lab", "--no-browser", "--allow-root",
                             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={repo}"],
                            cwd=repo, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)

    def get(path: str):
        req = urllib.request.Request(url + path, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()

    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                get("/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, f"JupyterLab did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
        status, page = get("/lab/tree/notebooks")
        assert status == 200 and "jupyter-config-data" in page
        status, listing = get("/api/contents/notebooks")
        names = sorted(item["name"] for item in json.loads(listing)["content"])
        assert names == sorted(SMALL), names
        status, settings = get("/lab/api/settings/@jupyterlab/apputils-extension:notification")
        # postBuild's overrides.json becomes the settings' defaults
        assert json.loads(settings)["schema"]["properties"]["fetchNews"]["default"] == "false"
    finally:
        kill_tree(proc.pid)
