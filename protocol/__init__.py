"""autoglm.protocol: formats and wire rules, sans-IO.

No networking, clocks or filesystem access happen in this package: callers
pass bytes and the current time in, and get values, events and bytes out.
"""

from ._codec import Limits, decode_canonical, encode_canonical
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

__all__ = [
    "DEFAULT_MAX_PIECE_SIZE",
    "DOMAIN_MANIFEST",
    "FORMAT_VERSION",
    "MAGIC",
    "AutoglmError",
    "ConfigError",
    "FileEntry",
    "IntegrityError",
    "Limits",
    "LocalProtocolError",
    "Manifest",
    "ManifestLimits",
    "Piece",
    "ProtocolError",
    "RemoteProtocolError",
    "Requirements",
    "SignatureError",
    "SignedManifest",
    "TrustError",
    "TrustPolicy",
    "Variant",
    "check_path",
    "check_unique_paths",
    "decode_canonical",
    "decode_manifest",
    "decode_signed_manifest",
    "encode_canonical",
    "encode_public_key",
    "generate_private_key",
    "key_id",
    "parse_private_key",
    "parse_public_key",
    "plan_fixed",
    "plan_safetensors",
    "safetensors_header_length",
    "safetensors_tensor_spans",
    "sign_manifest",
    "verify_manifest",
    "verify_signature",
]
