"""Where a node keeps its files. Several nodes on one machine use distinct --data-dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["default_data_dir", "resolve_data_dir", "trust_dir"]

ENV_HOME = "AUTOGLM_NODE_HOME"


def default_data_dir() -> Path:
    """$AUTOGLM_NODE_HOME, else the platform's user data dir (~/.local/share/autoglm-node)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("autoglm-node", appauthor=False))


def resolve_data_dir(value: str | os.PathLike[str] | None) -> Path:
    return Path(value).expanduser().resolve() if value else default_data_dir()


def trust_dir(data_dir: Path) -> Path:
    """Directory of trusted publisher keys (``*.pub``) and root CAs (``roots/*.pem``)."""
    return data_dir / "trust"
