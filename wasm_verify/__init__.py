"""autoglm.wasm_verify: structural checks of model files inside a WebAssembly sandbox.

The verifiers are C sources in ``src/`` compiled freestanding to wasm32 (no
imports at all); the built modules ship next to this file with SHA-256 pins
in ``pins.json``. See docs/sandbox.md.
"""

from ._runtime import (
    DEFAULT_LIMITS,
    REASON_NAMES,
    STACK_BYTES,
    SandboxLimits,
    Verdict,
    VerifierModule,
    builtin_module,
    builtin_pins,
    load_module,
    run_bytes,
    run_verifier,
)

__all__ = [
    "DEFAULT_LIMITS",
    "REASON_NAMES",
    "STACK_BYTES",
    "SandboxLimits",
    "Verdict",
    "VerifierModule",
    "builtin_module",
    "builtin_pins",
    "load_module",
    "run_bytes",
    "run_verifier",
]
