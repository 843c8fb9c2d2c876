"""`join --seed M --verify`: the sandbox gate runs on the held model and its verdicts
reach the node's metrics registry; checked by scraping a real node and parsing the
text with prometheus_client. One model is sound, one also carries a pickle
that would call ``os.system`` when loaded (the gate refuses it; the hashes
match, so the fetch itself succeeds)."""

from __future__ import annotations

import pickletools
import subprocess
from pathlib import Path

import pytest
from swarm.harness import CLI, processes, start_mirror, start_node

from ops.test_metrics import scrape, value

# pickle.dumps of an object whose __reduce__ is (os.system, ("true",)), written out so nothing runs here.
_BAD_PICKLE = (b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94"
               b"\x8c\x04true\x94\x85\x94R\x94.")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _publish(tmp: Path, *, corrupt: bool) -> dict[str, Path]:
    run = lambda *a: subprocess.run([*CLI, "--data-dir", str(tmp / "pub"), *a], check=True, capture_output=True, timeout=120)  # noqa: E731
    run("keygen", "--out", str(tmp / "key"))
    run("sample-model", str(tmp / "model"), "--size", "1MiB")
    if corrupt:
        # A pickle that calls os.system when loaded: hashes match, the gate refuses it.
        (tmp / "model" / "extra.pkl").write_bytes(_BAD_PICKLE)
    run("publish", str(tmp / "model"), "--key", str(tmp / "key"), "--name", "demo/m", "--version", "1",
        "--out", str(tmp / "m.agm"), "--max-piece", "256KiB")
    return {"model": tmp / "model", "manifest": tmp / "m.agm", "key": tmp / "key.pub"}


@pytest.mark.parametrize("corrupt", [False, True], ids=["sound", "bad-header"])
def test_verdicts_are_counted_in_the_scrape(tmp_path: Path, corrupt: bool) -> None:
    pub = _publish(tmp_path / "published", corrupt=corrupt)
    with processes() as procs:
        mirror = start_mirror(procs, tmp_path, pub["model"])
        node = start_node(procs, tmp_path, "seed", pub, mirrors=[mirror], extra=["--metrics", "127.0.0.1:0", "--verify"])
        url = node.seen[0]["metrics"]
        before = scrape(url)
        assert value(before, "autoglm_sandbox_verdicts_total", kind="safetensors", verdict="refused") == 0
        node.event("complete", 90)
        done = node.event("verified", 60)
        got = scrape(url)
    total = sum(v for (name, _), v in got.items() if name == "autoglm_sandbox_verdicts_total")
    assert total == done["files"] == (4 if corrupt else 3)  # config.json, model.safetensors, tokenizer.json (+ extra.pkl)
    assert value(got, "autoglm_sandbox_verdicts_total", kind="json", verdict="ok") == 2
    assert value(got, "autoglm_sandbox_verdicts_total", kind="safetensors", verdict="ok") == 1
    assert value(got, "autoglm_sandbox_verdicts_total", kind="safetensors", verdict="refused") == 0
    if corrupt:
        assert value(got, "autoglm_sandbox_verdicts_total", kind="pickle", verdict="refused") == 1
    assert [r["file"] for r in done["refused"]] == (["extra.pkl"] if corrupt else [])


def test_the_pickle_is_what_the_test_says() -> None:
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(_BAD_PICKLE)]
    assert ("SHORT_BINUNICODE", "posix") in ops and ("SHORT_BINUNICODE", "system") in ops and ("REDUCE", None) in ops
