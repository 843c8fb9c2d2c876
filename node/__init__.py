"""autoglm.node: the running node (IO lives here), and its public Python API.

Everyday use (docs/api.md)::

    from autoglm.node import fetch, open_model
    fetch("http://mirror.example/llama/llama.agm", out="models/llama", trust="publisher.pub")
    model = open_model("models/llama", trust="publisher.pub")

Names load on first use, so ``import autoglm.node`` stays light (the CLI and
the engine import their own modules; wasmtime loads with ``open_model``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoglm.node._engine import FetchOptions, FetchResult
    from autoglm.node._gate import ModelHandle, open_model
    from autoglm.node._keys import trust_policy
    from autoglm.node._plan import FetchPlan
    from autoglm.node.api import (
        Node,
        NodeConfig,
        afetch,
        aopen_model,
        fetch,
        load_manifest,
        open_node,
    )
    from autoglm.protocol import TrustPolicy

__all__ = [
    "FetchOptions",
    "FetchPlan",
    "FetchResult",
    "ModelHandle",
    "Node",
    "NodeConfig",
    "TrustPolicy",
    "afetch",
    "aopen_model",
    "fetch",
    "load_manifest",
    "open_model",
    "open_node",
    "trust_policy",
]

_WHERE = {
    "FetchOptions": "autoglm.node._engine",
    "FetchResult": "autoglm.node._engine",
    "FetchPlan": "autoglm.node._plan",
    "ModelHandle": "autoglm.node._gate",
    "open_model": "autoglm.node._gate",
    "trust_policy": "autoglm.node._keys",
    "TrustPolicy": "autoglm.protocol",
    **{n: "autoglm.node.api" for n in ("Node", "NodeConfig", "afetch", "aopen_model", "fetch", "load_manifest", "open_node")},
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'autoglm.node' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
