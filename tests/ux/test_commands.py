"""inspect and verify-manifest of a URL, doctor's mirror and data-dir checks and exit code, publish's key,
--out and skipped files; through the CLI in subprocesses, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from autoglm.node._doctor import check_data_dir, check_mirror

from .terminal import cli

EXIT_USAGE, EXIT_SOURCE, EXIT_MALFORMED, EXIT_DOCTOR = 2, 6, 5, 9


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cmds")
    assert cli(tmp, "--data-dir", str(tmp / "d"), "keygen", "--out", str(tmp / "key")).returncode == 0
    assert cli(tmp, "--data-dir", str(tmp / "d"), "sample-model", str(tmp / "model"), "--size", "1MiB").returncode == 0
    r = cli(tmp, "--data-dir", str(tmp / "d"), "publish", str(tmp / "model"), "--key", str(tmp / "key"),
            "--name", "demo/cmds", "--version", "1", "--out", str(tmp / "m.agm"))
    assert r.returncode == 0, r.stderr
    return {"tmp": tmp, "model": tmp / "model", "manifest": tmp / "m.agm", "key": tmp / "key"}


class _Handler(SimpleHTTPRequestHandler):
    """Static files; /forbidden/ answers 403 (a mirror that refuses us)."""

    def send_head(self) -> Any:
        if self.path.startswith("/forbidden/"):
            self.send_error(403)
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http(pub: dict[str, Path]) -> Iterator[str]:
    root = pub["tmp"] / "www"
    shutil.copytree(pub["model"], root / "models")
    shutil.copy(pub["manifest"], root / "models" / "m.agm")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_inspect_and_verify_a_manifest_url(pub: dict[str, Path], http: str) -> None:
    tmp = pub["tmp"]
    r = cli(tmp, "inspect", http + "models/m.agm")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("demo/cmds 1")
    r = cli(tmp, "--data-dir", str(tmp / "d"), "verify-manifest", http + "models/m.agm", "--trust", str(pub["key"]) + ".pub")
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr
    r = cli(tmp, "--data-dir", str(tmp / "d"), "verify", str(pub["model"]), "--manifest", http + "models/m.agm",
            "--trust", str(pub["key"]) + ".pub", "--no-cache")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    r = cli(tmp, "inspect", http + "models/nope.agm")
    assert r.returncode == EXIT_SOURCE
    assert f"{http}models/nope.agm: HTTP 404" in r.stderr.replace("\n", "")  # the URL as typed, not http:/…
    r = cli(tmp, "inspect", http + "models/config.json")
    assert r.returncode == EXIT_MALFORMED and "is not a valid manifest" in r.stderr


@pytest.mark.parametrize(("path", "status"), [("missing/", 404), ("forbidden/", 403)])
def test_doctor_never_passes_a_mirror_folder_that_answers_404_or_403(http: str, path: str, status: int) -> None:
    c = check_mirror(http + path)  # a folder: a good mirror that does not list folders answers so too
    assert c.status == "warn" and f"HTTP {status}" in c.detail, c


def test_doctor_with_a_manifest_checks_a_model_file_on_the_mirror(pub: dict[str, Path], http: str) -> None:
    r = cli(pub["tmp"], "--data-dir", str(pub["tmp"] / "d"), "doctor", "--json", "--manifest", str(pub["manifest"]),
            "--mirror", http + "models/", "--mirror", http + "missing/")
    out = json.loads(r.stdout)
    good, missing = [c for c in out["checks"] if c["name"] == "mirror"]
    assert good["status"] == "pass" and "HTTP 200" in good["detail"], good
    assert missing["status"] == "fail" and "HTTP 404" in missing["detail"] and "does not have" in missing["hint"]
    assert r.returncode == EXIT_DOCTOR  # a failed check has its own exit code


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_a_data_dir_on_proc_is_not_a_usable_filesystem() -> None:
    c = check_data_dir(Path("/proc/autoglm-data"))
    assert c.status == "fail" and "not a usable filesystem" in c.detail and "proc" in c.detail, c
    assert "free" not in c.detail + c.hint


def test_publish_with_the_public_key_says_so(pub: dict[str, Path]) -> None:
    tmp = pub["tmp"]
    r = cli(tmp, "--data-dir", str(tmp / "d"), "publish", str(pub["model"]), "--key", str(pub["key"]) + ".pub",
            "--name", "demo/cmds", "--version", "2", "--out", str(tmp / "m2.agm"))
    assert r.returncode == EXIT_USAGE
    assert "is a public key" in r.stderr and "chmod" not in r.stderr and str(pub["key"]) in r.stderr
    assert not (tmp / "m2.agm").exists()


def test_publish_refuses_to_overwrite_a_manifest_without_force(pub: dict[str, Path]) -> None:
    tmp = pub["tmp"]
    out = tmp / "existing.agm"
    shutil.copy(pub["manifest"], out)
    before = out.read_bytes()
    args = ["--data-dir", str(tmp / "d"), "publish", str(pub["model"]), "--key", str(pub["key"]),
            "--name", "demo/cmds", "--version", "1b", "--out", str(out)]
    r = cli(tmp, *args)
    assert r.returncode == EXIT_USAGE and "already exists; pass --force" in r.stderr
    assert out.read_bytes() == before
    r = cli(tmp, *args, "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != before


def test_publish_names_the_files_it_skipped(pub: dict[str, Path]) -> None:
    tmp = pub["tmp"]
    model = tmp / "model-hidden"
    shutil.copytree(pub["model"], model)
    (model / ".env").write_text("SECRET=1\n")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    base = ["--data-dir", str(tmp / "d"), "publish", str(model), "--key", str(pub["key"]), "--name", "demo/cmds"]
    r = cli(tmp, *base, "--version", "3", "--out", str(tmp / "m3.agm"))
    assert r.returncode == 0, r.stderr
    assert "skipped 2" in r.stdout and ".env" in r.stdout and ".git/" in r.stdout
    r = cli(tmp, *base, "--version", "4", "--out", str(tmp / "m4.agm"), "--json")
    assert json.loads(r.stdout)["skipped"] == [".git/", ".env"]
