"""docs/deploy: the systemd unit passes `systemd-analyze verify`, the Containerfile and the
DaemonSet agree with the CLI, the settings and each other (no container runtime or
cluster here: their files are parsed and cross-checked, not run)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm.node._settings import read_config
from autoglm.node.cli._main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
UNIT = DEPLOY / "autoglm-node.service"
INSTALLED = "/opt/autoglm-node/bin/autoglm-node"


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _installed_cli() -> str:
    cli = Path(sys.executable).parent / "autoglm-node"
    assert cli.is_file(), "the autoglm-node console script is not installed in this venv"
    return str(cli)


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's autoglm-node (verify checks it is executable)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text()
    assert INSTALLED in text
    path = tmp_path / "autoglm-node.service"
    path.write_text(text.replace(INSTALLED, _installed_cli()))
    return path


def test_systemd_analyze_verify(unit_here: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(unit_here)], capture_output=True, text=True, timeout=60,
                       check=False)
    # verify exits 0 on unknown keys but prints them: any output about the unit is a defect.
    assert r.returncode == 0 and unit_here.name not in r.stderr + r.stdout, r.stderr


def test_systemd_analyze_security(unit_here: Path) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=25", str(unit_here)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert exposure and float(exposure.group(1)) <= 2.5, r.stdout[-300:]


def test_unit_hardening_and_command() -> None:
    s = _unit_settings()
    for key, value in {"Type": "notify", "NotifyAccess": "main", "DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "StateDirectory": "autoglm-node", "ProtectHome": "yes", "PrivateTmp": "yes"}.items():
        assert s.get(key) == [value], key
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "MemoryDenyWriteExecute" not in s  # wasmtime needs W+X pages
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == INSTALLED
    args = build_parser("join").parse_args(argv[1:])
    # The config file reaches the service as a credential (root-only on disk).
    assert args.command == "join" and args.config == "%d/config.toml"
    assert "config.toml:/etc/autoglm-node/config.toml" in s["LoadCredential"]
    # StateDirectory= is what config.toml's data_dir names.
    assert read_config(DEPLOY / "config.toml").values["data_dir"][0] == Path("/var/lib/autoglm-node")


def _containerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Containerfile").read_text())
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_containerfile() -> None:
    ins = _containerfile()
    get = lambda k: [v for i, v in ins if i == k]  # noqa: E731
    (base,) = get("FROM")
    assert re.fullmatch(r"\S*python:3\.11-slim-(bookworm|trixie)", base), base  # Debian slim
    (user,) = get("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert any("useradd" in r and f"--uid {uid}" in r for r in get("RUN"))
    (volume,) = get("VOLUME")
    assert "/var/lib/autoglm-node" in volume
    assert any("AUTOGLM_DATA_DIR=/var/lib/autoglm-node" in e for e in get("ENV"))
    (copy,) = get("COPY")
    assert copy.split()[0] == "dist/autoglm_node-*.whl"  # what `python -m build --wheel` writes
    assert get("ENTRYPOINT") == ['["autoglm-node"]'] and get("CMD") == ['["join"]']
    (health,) = get("HEALTHCHECK")
    cmd = health.split("CMD", 1)[1].strip().strip("[]").replace('"', "").split(", ")
    assert cmd[0] == "autoglm-node" and build_parser(cmd[1]).parse_args(cmd[1:]).command == "status"


def _k8s() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "DaemonSet"}
    return kinds["ConfigMap"], kinds["DaemonSet"]


def test_daemonset(tmp_path: Path) -> None:
    cm, ds = _k8s()
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"] + spec.get("initContainers", []):
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, m
    (node,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(dict(_containerfile())["USER"].split(":")[0])
    assert node["securityContext"]["allowPrivilegeEscalation"] is False
    # The HF cache and the node's state are hostPaths, mounted where the config says.
    hf = volumes[mounts["/var/lib/hf-cache"]["name"]]
    assert hf["hostPath"]["path"] == "/var/lib/hf-cache"
    assert "hostPath" in volumes[mounts["/var/lib/autoglm-node"]["name"]]
    # The ConfigMap's config.toml is a valid settings file that the container's args name.
    conf = tmp_path / "config.toml"
    conf.write_text(cm["data"]["config.toml"])
    cfg = read_config(conf)
    assert cfg.values["data_dir"][0] == Path("/var/lib/autoglm-node")
    assert str(cfg.values["join.out"][0]).startswith("/var/lib/hf-cache/")
    (key_path,) = cfg.values["trust.keys"][0]
    assert str(key_path) in mounts and mounts[str(key_path)]["subPath"] in cm["data"]
    args = build_parser("join").parse_args(node["args"])
    assert args.command == "join" and args.config in mounts and mounts[args.config]["subPath"] == "config.toml"
    host, port = cfg.values["network.metrics"][0].rsplit(":", 1)
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
        get = node[probe]["httpGet"]
        assert (get["host"], str(get["port"]), get["path"]) == (host, port, path)
