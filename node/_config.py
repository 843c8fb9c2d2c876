"""Where a node keeps its files. Several nodes on one machine use distinct --data-dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["configured_bootstrap", "default_data_dir", "resolve_data_dir", "trust_dir"]

ENV_DATA_DIR = "AUTOGLM_DATA_DIR"
ENV_HOME = "AUTOGLM_NODE_HOME"  # the older name, still honoured


def default_data_dir() -> Path:
    """$AUTOGLM_DATA_DIR (or $AUTOGLM_NODE_HOME), else the platform's user data dir
    (~/.local/share/autoglm-node). The CLI also reads ``data_dir`` from the config
    file (node/_settings.py); the Python API does not."""
    env = os.environ.get(ENV_DATA_DIR) or os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("autoglm-node", appauthor=False))


def resolve_data_dir(value: str | os.PathLike[str] | None) -> Path:
    return Path(value).expanduser().resolve() if value else default_data_dir()


def trust_dir(data_dir: Path) -> Path:
    """Directory of trusted publisher keys (``*.pub``) and root CAs (``roots/*.pem``)."""
    return data_dir / "trust"


def configured_bootstrap(data_dir: Path) -> list[str]:
    """Bootstrap multiaddrs from DATA_DIR/bootstrap: one per line, ``#`` comments."""
    path = data_dir / "bootstrap"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
