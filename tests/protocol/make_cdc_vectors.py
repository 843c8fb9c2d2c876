"""Write tests/vectors/cdc-v1.json (run once; the file must then never change).

Every plan is computed twice, by protocol/_cdc.py and by the byte-at-a-time
reference in cdc_reference.py, and written only if they agree.

    .venv/bin/python tests/protocol/make_cdc_vectors.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdc_reference import SEED, gear, reference_plan, vector_bytes

from autoglm.protocol import CdcParams, plan_cdc
from autoglm.protocol._cdc import DEFAULT_CDC

SMALL = {"min": 64, "bits": 8, "max": 1024}
DEFAULT = {"min": DEFAULT_CDC.min_size, "bits": DEFAULT_CDC.bits, "max": DEFAULT_CDC.max_size}
CASES = [
    ("empty", {"kind": "fill", "byte": 0, "length": 0}, SMALL),
    ("shorter-than-min", {"kind": "blake3-xof", "seed": "autoglm cdc vector tiny", "length": 50}, SMALL),
    ("random-small", {"kind": "blake3-xof", "seed": "autoglm cdc vector 1", "length": 20000}, SMALL),
    ("random-small-insert", {"kind": "blake3-xof", "seed": "autoglm cdc vector 1", "length": 20000,
                             "insert": {"at": 10000, "seed": "autoglm cdc vector insert", "length": 100}}, SMALL),
    ("zeros-max-cuts", {"kind": "fill", "byte": 0, "length": 5000}, SMALL),
    ("random-default", {"kind": "blake3-xof", "seed": "autoglm cdc vector 2", "length": 3 * 1024 * 1024}, DEFAULT),
]


def vector_input(spec: dict) -> bytes:  # type: ignore[type-arg]
    data = vector_bytes(spec["seed"], spec["length"]) if spec["kind"] == "blake3-xof" else bytes([spec["byte"]]) * spec["length"]
    if "insert" in spec:
        ins = spec["insert"]
        data = data[: ins["at"]] + vector_bytes(ins["seed"], ins["length"]) + data[ins["at"] :]
    return data


def main() -> None:
    g = gear()
    out = {
        "gear_seed": SEED.decode(),
        "gear": [f"{w:08x}" for w in g],
        "gear_blake3": blake3.blake3(b"".join(w.to_bytes(4, "little") for w in g)).hexdigest(),
        "cases": [],
    }
    for name, spec, p in CASES:
        data = vector_input(spec)
        plan = plan_cdc(data, CdcParams(p["min"], p["bits"], p["max"]))
        assert plan == reference_plan(data, p["min"], p["bits"], p["max"]), name
        out["cases"].append({"name": name, "input": spec, "params": p, "pieces": [list(x) for x in plan],
                             "piece_blake3": [blake3.blake3(data[o : o + n]).hexdigest() for o, n in plan]})
    path = Path(__file__).resolve().parent.parent / "vectors" / "cdc-v1.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
