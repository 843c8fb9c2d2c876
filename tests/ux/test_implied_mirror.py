"""`fetch URL/m.agm` with no --mirror: the manifest's folder is the mirror, and the output says so."""

from __future__ import annotations

import shutil
from pathlib import Path

from .terminal import CLI, Process, cli


def test_a_manifest_url_alone_implies_its_folder_as_the_mirror(tmp_path: Path) -> None:
    assert cli(tmp_path, "--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")).returncode == 0
    model = tmp_path / "www" / "models"
    assert cli(tmp_path, "sample-model", str(model), "--size", "1MiB").returncode == 0
    r = cli(tmp_path, "--data-dir", str(tmp_path / "pub"), "publish", str(model), "--key", str(tmp_path / "key"),
            "--name", "demo/implied", "--version", "1", "--out", str(tmp_path / "m.agm"))
    assert r.returncode == 0, r.stderr
    shutil.copy(tmp_path / "m.agm", model / "m.agm")  # the usual layout: the manifest beside the files
    mirror = Process([*CLI, "serve-mirror", str(tmp_path / "www")], tmp_path / "mirror.err")
    try:
        url = mirror.readline_until(lambda ln: ln.startswith("http://"), 30)
        r = cli(tmp_path, "--data-dir", str(tmp_path / "d"), "fetch", url + "models/m.agm", "--out",
                str(tmp_path / "out"), "--trust", str(tmp_path / "key.pub"))
    finally:
        mirror.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"using the manifest's folder {url}models/ as the mirror" in r.stderr.replace("\n", "")
    for f in model.iterdir():
        if f.name != "m.agm":
            assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()
