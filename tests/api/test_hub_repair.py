"""The on-disk check on hub downloads (piece hashes learned on arrival): a re-run
fetches nothing for intact blobs and exactly the damaged blob again."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hub.conftest import REPO, Hub, clean_env, hub, run_cli  # noqa: F401  (hub: the fixture)


async def test_a_rotted_blob_is_fetched_again_whole_and_nothing_else(hub: Hub, tmp_path: Path) -> None:  # noqa: F811
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    cache = tmp_path / "cache"
    args = ["--data-dir", str(tmp_path / "data"), "fetch", f"hf://{REPO}", "--cache-dir", str(cache)]
    await run_cli(args, env)
    served = hub.cdn.stats.body_bytes
    await run_cli(args, env)
    assert hub.cdn.stats.body_bytes == served  # stamped and unchanged: not re-read from the network

    shard = hub.files["model-00001-of-00002.safetensors"]
    blob = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / hashlib.sha256(shard).hexdigest()
    with blob.open("r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    await run_cli(args, env)
    assert hub.cdn.stats.body_bytes - served == len(shard)
    assert blob.read_bytes() == shard
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub.commit
    for p, data in hub.files.items():
        assert (snap / p).read_bytes() == data, p
