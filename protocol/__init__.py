"""autoglm.protocol: formats and wire rules, sans-IO.

No networking, clocks or filesystem access happen in this package: callers
pass bytes and the current time in, and get values, events and bytes out.

Only the error tree loads with the package; every other name loads its
module on first use (PEP 562), so a command that needs an error class and
nothing else (``fetch`` handed to a running node) does not pay for msgpack,
cryptography and blake3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._errors import (
    AutoglmError,
    ConfigError,
    IntegrityError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SignatureError,
    TrustError,
)

if TYPE_CHECKING:
    from ._cdc import CdcParams, cdc_candidates, cdc_cut, cdc_params_for, plan_cdc, plan_cdc_reader
    from ._codec import Limits, decode_canonical, encode_canonical
    from ._gguf import NeedMoreData, gguf_tensor_spans
    from ._manifest import (
        DEFAULT_MAX_PIECE_SIZE,
        FORMAT_VERSION,
        FileEntry,
        Manifest,
        ManifestLimits,
        Piece,
        Requirements,
        Variant,
        decode_manifest,
    )
    from ._paths import check_path, check_unique_paths
    from ._pieces import (
        plan_fixed,
        plan_runs,
        plan_safetensors,
        safetensors_header_length,
        safetensors_tensor_spans,
    )
    from ._signing import (
        DOMAIN_MANIFEST,
        MAGIC,
        SignedManifest,
        TrustPolicy,
        decode_signed_manifest,
        encode_public_key,
        generate_private_key,
        key_id,
        parse_private_key,
        parse_public_key,
        sign_manifest,
        verify_manifest,
        verify_signature,
    )
    from ._zipmembers import zip_member_spans

_LAZY = {
    "DEFAULT_MAX_PIECE_SIZE": "._manifest",
    "DOMAIN_MANIFEST": "._signing",
    "FORMAT_VERSION": "._manifest",
    "CdcParams": "._cdc",
    "FileEntry": "._manifest",
    "Limits": "._codec",
    "MAGIC": "._signing",
    "Manifest": "._manifest",
    "NeedMoreData": "._gguf",
    "ManifestLimits": "._manifest",
    "Piece": "._manifest",
    "Requirements": "._manifest",
    "SignedManifest": "._signing",
    "TrustPolicy": "._signing",
    "Variant": "._manifest",
    "cdc_candidates": "._cdc",
    "cdc_cut": "._cdc",
    "cdc_params_for": "._cdc",
    "check_path": "._paths",
    "check_unique_paths": "._paths",
    "decode_canonical": "._codec",
    "decode_manifest": "._manifest",
    "decode_signed_manifest": "._signing",
    "encode_canonical": "._codec",
    "encode_public_key": "._signing",
    "generate_private_key": "._signing",
    "gguf_tensor_spans": "._gguf",
    "key_id": "._signing",
    "parse_private_key": "._signing",
    "parse_public_key": "._signing",
    "plan_cdc": "._cdc",
    "plan_cdc_reader": "._cdc",
    "plan_fixed": "._pieces",
    "plan_runs": "._pieces",
    "plan_safetensors": "._pieces",
    "safetensors_header_length": "._pieces",
    "safetensors_tensor_spans": "._pieces",
    "sign_manifest": "._signing",
    "verify_manifest": "._signing",
    "verify_signature": "._signing",
    "zip_member_spans": "._zipmembers",
}

__all__ = [
    "DEFAULT_MAX_PIECE_SIZE",
    "DOMAIN_MANIFEST",
    "FORMAT_VERSION",
    "MAGIC",
    "AutoglmError",
    "CdcParams",
    "ConfigError",
    "FileEntry",
    "IntegrityError",
    "Limits",
    "LocalProtocolError",
    "Manifest",
    "ManifestLimits",
    "NeedMoreData",
    "Piece",
    "ProtocolError",
    "RemoteProtocolError",
    "Requirements",
    "SignatureError",
    "SignedManifest",
    "TrustError",
    "TrustPolicy",
    "Variant",
    "cdc_candidates",
    "cdc_cut",
    "cdc_params_for",
    "check_path",
    "check_unique_paths",
    "decode_canonical",
    "decode_manifest",
    "decode_signed_manifest",
    "encode_canonical",
    "encode_public_key",
    "generate_private_key",
    "gguf_tensor_spans",
    "key_id",
    "parse_private_key",
    "parse_public_key",
    "plan_cdc",
    "plan_cdc_reader",
    "plan_fixed",
    "plan_runs",
    "plan_safetensors",
    "safetensors_header_length",
    "safetensors_tensor_spans",
    "sign_manifest",
    "verify_manifest",
    "verify_signature",
    "zip_member_spans",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
