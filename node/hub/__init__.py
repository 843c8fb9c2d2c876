"""Hugging Face Hub and ModelScope: ``fetch hf://ORG/REPO[@REV]`` into the HF cache or a folder.

The hub client (revision, file list, tokens: ``_api``), the cache layout
(``_cache``) and the fetch through the engine (``_fetch``). Built so a
gateway (an ``HF_ENDPOINT`` served by the node) and ``publish hf://`` can
reuse the same client and plan. Names load on first use, so the CLI's
``fetch`` parser stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "HubAccessError",
    "HubFetchPlan",
    "HubFetchResult",
    "HubFile",
    "HubRef",
    "RepoSnapshot",
    "default_endpoints",
    "fetch_hub",
    "hub_cache_dir",
    "load_token",
    "parse_ref",
    "repo_folder",
    "resolve_snapshot",
    "select_files",
]

_WHERE = {
    "HubAccessError": "_api", "HubFile": "_api", "HubRef": "_api", "RepoSnapshot": "_api",
    "default_endpoints": "_api", "load_token": "_api", "parse_ref": "_api", "resolve_snapshot": "_api",
    "hub_cache_dir": "_cache", "repo_folder": "_cache",
    "HubFetchPlan": "_fetch", "HubFetchResult": "_fetch", "fetch_hub": "_fetch", "select_files": "_fetch",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
