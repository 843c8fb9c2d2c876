"""Fetch-engine benchmark (issue #3): curl, aria2c and `autoglm-node fetch` side by side.

Cases, all in one run against nginx on 127.0.0.1 with its own config:
  (a) unlimited mirror: curl (one stream), curl + sync (curl, then fsync of the file,
      timed together: autoglm's fetch is durable, curl's alone is not), aria2c -x16 -s16,
      autoglm fetch
  (b) nginx `limit_rate 20m` per connection: aria2c -x16 -s16, autoglm fetch
  (c) SIGKILL at 50% of the file served, then the same command again:
      re-fetched bytes = bytes nginx served in both runs - file size (access log)
  (d) --big: peak RSS of autoglm fetching a 10 GiB model

(a) and (b) are repeated --reps times with the tools alternating; medians are reported.
The autoglm rows say "not available: <error>" when the CLI fails instead of aborting.

    .venv/bin/python bench/fetch_bench.py [--reps 3] [--size 1GiB] [--big] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    DEFAULT_WORKDIR,
    Model,
    Nginx,
    Result,
    autoglm_cmd,
    check_tools,
    fmt_bytes,
    fmt_num,
    fmt_rate,
    guarded,
    log,
    make_model,
    measure,
    median,
    on_cleanup,
    parse_json_lines,
    print_table,
    same_bytes,
)

TIMEOUT = 900.0  # seconds, per command


class Runner:
    """Knows how to run one tool once against a mirror, into a fresh output dir."""

    def __init__(self, run_dir: Path, model: Model) -> None:
        self.run_dir = run_dir
        self.model = model
        self.unavailable: dict[str, str] = {}
        self.seq = 0

    def fresh(self, tool: str) -> Path:
        self.seq += 1
        d = self.run_dir / f"{tool}-{self.seq}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def argv(self, tool: str, mirror: Nginx, out: Path, *, resume: bool = False) -> tuple[list[str], Path, int]:
        """(command, file to compare with the source, bytes the tool must get)."""
        m = self.model
        rel = m.big_file.relative_to(m.dir).as_posix()
        if tool == "curl":
            dest = out / m.big_file.name
            cmd = ["curl", "-sS", "--fail", "-o", str(dest), mirror.url(rel)]
            if resume:
                cmd[1:1] = ["-C", "-"]
            return cmd, dest, m.big_size
        if tool == "curl+sync":
            cmd, dest, nbytes = self.argv("curl", mirror, out, resume=resume)
            # `sync FILE` is fsync(2) on the file: the bytes are on the disk when it returns.
            return ["sh", "-c", f"{shlex.join(cmd)} && sync {shlex.quote(str(dest))}"], dest, nbytes
        if tool == "aria2c":
            dest = out / m.big_file.name
            return ["aria2c", "-x16", "-s16", "-c", "-d", str(out), "-o", m.big_file.name,
                    "--allow-overwrite=true", "--auto-file-renaming=false", "--summary-interval=0",
                    "--console-log-level=warn", "--download-result=hide", mirror.url(rel)], dest, m.big_size
        if tool == "autoglm":
            assert m.manifest is not None and m.pub is not None
            dest = out / "files" / rel
            return autoglm_cmd() + ["--data-dir", str(out / "data"), "fetch", str(m.manifest),
                                    "--mirror", mirror.url(), "--out", str(out / "files"),
                                    "--trust", str(m.pub), "--json"], dest, m.total_size
        raise ValueError(tool)

    def available(self, tool: str) -> bool:
        if tool == "autoglm" and tool not in self.unavailable and self.model.error:
            self.unavailable[tool] = self.model.error
        return tool not in self.unavailable

    def run_once(self, tool: str, mirror: Nginx) -> dict[str, Any]:
        out = self.fresh(tool)
        cmd, dest, nbytes = self.argv(tool, mirror, out)
        os.sync()
        mark = mirror.mark()
        conns = {"max": 0, "next": 0.0}

        def sample_connections() -> bool:  # never kills; samples open connections every 0.25 s
            now = time.monotonic()
            if now >= conns["next"]:
                conns["max"] = max(conns["max"], mirror.open_connections())
                conns["next"] = now + 0.25
            return False

        r = measure(cmd, timeout=TIMEOUT, kill_when=sample_connections)
        served = mirror.settle(mark)
        row = summarize(r, nbytes, served)
        row["max_connections"] = conns["max"]
        row["requests"] = len(mirror.requests_since(mark))
        if r.ok:
            row["identical"] = same_bytes(self.model.big_file, dest)
            if tool == "autoglm":
                row.update(autoglm_done(r))
        else:
            if tool == "autoglm":
                self.unavailable[tool] = r.error()
            row["error"] = r.error()
        shutil.rmtree(out, ignore_errors=True)
        return row

    def kill_resume(self, tool: str, mirror: Nginx) -> dict[str, Any]:
        """SIGKILL once nginx has served half the file, then run the same command again."""
        out = self.fresh(tool)
        cmd, dest, nbytes = self.argv(tool, mirror, out)
        resume_cmd = self.argv(tool, mirror, out, resume=True)[0]
        os.sync()
        mark = mirror.mark()
        half = nbytes // 2

        at_kill: dict[str, int] = {}

        def over_half() -> bool:
            if mirror.served_so_far(mark) < half:
                return False
            at_kill["connections"] = mirror.open_connections()
            return True

        r1 = measure(cmd, timeout=TIMEOUT, kill_when=over_half)
        served1 = mirror.settle(mark)
        row: dict[str, Any] = {"first_rc": r1.rc, "killed": r1.killed, "served_first": served1,
                               "connections_at_kill": at_kill.get("connections")}
        if not r1.killed:
            row["error"] = f"finished before the kill ({r1.error() if not r1.ok else 'rc 0'})"
            if tool == "autoglm" and not r1.ok:
                self.unavailable[tool] = r1.error()
            shutil.rmtree(out, ignore_errors=True)
            return row
        mark2 = mirror.mark()
        r2 = measure(resume_cmd, timeout=TIMEOUT)
        served2 = mirror.settle(mark2)
        row.update({"resume_rc": r2.rc, "resume_wall": r2.wall, "served_resume": served2,
                    "served_total": served1 + served2, "size": nbytes,
                    "refetched": served1 + served2 - nbytes,
                    "requests": len(mirror.requests_since(mark))})
        if r2.ok:
            row["identical"] = same_bytes(self.model.big_file, dest)
            if tool == "autoglm":
                row.update(autoglm_done(r2))
        else:
            row["error"] = r2.error()
            if tool == "autoglm":
                self.unavailable[tool] = r2.error()
        shutil.rmtree(out, ignore_errors=True)
        return row


def summarize(r: Result, nbytes: int, served: int) -> dict[str, Any]:
    return {"rc": r.rc, "wall": r.wall, "cpu": r.cpu, "peak_rss": r.peak_rss, "bytes": nbytes,
            "rate": nbytes / r.wall if r.ok and r.wall > 0 else None, "served": served}


def autoglm_done(r: Result) -> dict[str, Any]:
    events = parse_json_lines(r.stdout)
    done = next((e for e in reversed(events) if e.get("event") == "done"), None)
    return {"bytes_by_source": done.get("bytes_by_source") if done else None,
            "received_by_source": done.get("received_by_source") if done else None,
            "done_event": done is not None}


# --------------------------------------------------------------------------- report


def throughput_rows(case: str, results: dict[str, list[dict[str, Any]]], unavailable: dict[str, str]) -> list[list[str]]:
    rows = []
    for tool, runs in results.items():
        good = [x for x in runs if x.get("rate")]
        if not good:
            why = unavailable.get(tool) or next((x.get("error") for x in runs if x.get("error")), "no run")
            rows.append([case, tool, f"not available: {why}", "", "", "", "", "", "", ""])
            continue
        ident = all(x.get("identical") for x in good)
        rows.append([
            case, tool, fmt_rate(statistics.median(x["rate"] for x in good), 1.0),
            " ".join(fmt_rate(x["bytes"], x["wall"]) for x in good),
            fmt_num(median([x["wall"] for x in good]), ".2f", " s"),
            fmt_num(median([x["cpu"] for x in good]), ".2f", " s"),
            fmt_bytes(max(x["peak_rss"] for x in good)),
            str(max(x.get("max_connections", 0) for x in good)),
            str(int(median([x.get("requests", 0) for x in good]) or 0)),
            f"egress {median([x['served'] / x['bytes'] for x in good]):.3f}×" + ("" if ident else ", NOT IDENTICAL"),
        ])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch space (default %(default)s)")
    ap.add_argument("--size", default="1GiB", help="model size for (a)-(c) (default %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of (a) and (b), alternating (default 3)")
    ap.add_argument("--limit-rate", default="20m", help="nginx limit_rate per connection for (b) (default 20m)")
    ap.add_argument("--cases", default="abc", help="which of a, b, c to run (default abc; d needs --big)")
    ap.add_argument("--big", action="store_true", help="also (d): peak RSS of autoglm fetching a 10 GiB model")
    ap.add_argument("--big-size", default="10GiB")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every measurement as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the generated model in WORKDIR/fetch-models and reuse it next time")
    args = ap.parse_args(argv)

    tools = check_tools(["nginx", "curl", "aria2c", "ss", "cmp"])
    missing = [k for k, v in tools.items() if not v]
    if missing:
        print(f"missing tools: {', '.join(missing)} (AUTOGLM_BENCH_DEPS=1 scripts/setup installs them)",
              file=sys.stderr)
        return 2

    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = args.workdir / f"fetch-run-{os.getpid()}"
    # a private model dir unless --keep: a concurrent run's cleanup must never delete our model
    models = args.workdir / "fetch-models" if args.keep else run_dir / "models"
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "argv": sys.argv, "cases": {}}
    with guarded():
        on_cleanup(lambda: shutil.rmtree(run_dir, ignore_errors=True))
        model = make_model(models, args.size)
        log(f"model {model.dir}: {fmt_bytes(model.total_size)}; big file {model.big_file.name} "
            f"{fmt_bytes(model.big_size)}; autoglm: {model.error or 'manifest ok'}")
        runner = Runner(run_dir, model)
        free = Nginx(model.dir, run_dir / "nginx-free").start()
        limited = Nginx(model.dir, run_dir / "nginx-limited", limit_rate=args.limit_rate).start()
        log(f"nginx unlimited {free.url()}  limited ({args.limit_rate}/connection) {limited.url()}")

        table: list[list[str]] = []
        for case, mirror, case_tools in (("a", free, ["curl", "curl+sync", "aria2c", "autoglm"]),
                                         ("b", limited, ["aria2c", "autoglm"])):
            if case not in args.cases:
                continue
            results: dict[str, list[dict[str, Any]]] = {t: [] for t in case_tools}
            for rep in range(args.reps):
                for tool in case_tools if rep % 2 == 0 else list(reversed(case_tools)):
                    if not runner.available(tool):
                        continue
                    log(f"({case}) rep {rep + 1}/{args.reps}: {tool}")
                    row = runner.run_once(tool, mirror)
                    log(f"    {fmt_rate(row['bytes'], row['wall']) if row.get('rate') else row.get('error')}")
                    results[tool].append(row)
            report["cases"][case] = results
            label = "(a) unlimited" if case == "a" else f"(b) limit_rate {args.limit_rate}"
            table += throughput_rows(label, results, runner.unavailable)
        if table:
            print_table(f"Fetch throughput, {fmt_bytes(model.big_size)} file, median of {args.reps}",
                        ["case", "tool", "median", "runs", "wall", "CPU", "peak RSS", "max conns", "requests", "notes"],
                        table,
                        note="egress = bytes nginx sent ÷ bytes needed. CPU = user+sys of the process (wait4). "
                             "curl+sync = curl, then `sync FILE` (fsync), timed together. "
                             "max conns = most open connections to nginx seen (sampled every 0.25 s); "
                             "requests = median count in the access log.")

        if "c" in args.cases:
            resume_rows = []
            results_c: dict[str, Any] = {}
            for tool in ("curl", "aria2c", "autoglm"):
                if not runner.available(tool):
                    resume_rows.append([tool, f"not available: {runner.unavailable[tool]}", "", "", "", "", ""])
                    continue
                log(f"(c) kill at 50% + resume: {tool}")
                row = runner.kill_resume(tool, free)
                results_c[tool] = row
                if "refetched" not in row or row.get("error"):
                    resume_rows.append([tool, f"not available: {row.get('error')}", "", "", "", "", ""])
                    continue
                resume_rows.append([
                    tool, fmt_bytes(row["refetched"]), fmt_bytes(row["served_first"]), fmt_bytes(row["served_resume"]),
                    str(row["requests"]), str(row["connections_at_kill"]),
                    "yes" if row.get("identical") else "NO (corrupt or missing)",
                ])
            report["cases"]["c"] = results_c
            print_table("(c) SIGKILL at 50% served, then the same command again (unlimited mirror)",
                        ["tool", "re-fetched", "served before kill", "served on resume", "requests",
                         "connections at kill", "identical"],
                        resume_rows,
                        note="re-fetched = bytes nginx sent in both runs − bytes needed (access log $bytes_sent; "
                             "bytes already in socket buffers at the kill count as sent).")

        if args.big:
            log(f"(d) writing a {args.big_size} model (needs that much free disk twice)")
            big = make_model(models, args.big_size, name="bench-big")
            runner_big = Runner(run_dir, big)
            big_mirror = Nginx(big.dir, run_dir / "nginx-big").start()
            rows_d = []
            for tool in ("curl", "autoglm"):
                if not runner_big.available(tool):
                    rows_d.append([tool, f"not available: {runner_big.unavailable[tool]}", "", "", ""])
                    continue
                log(f"(d) {tool} {args.big_size}")
                row = runner_big.run_once(tool, big_mirror)
                report["cases"].setdefault("d", {})[tool] = row
                if not row.get("rate"):
                    rows_d.append([tool, f"not available: {row.get('error')}", "", "", ""])
                    continue
                rows_d.append([tool, fmt_bytes(row["peak_rss"]), fmt_rate(row["bytes"], row["wall"]),
                               fmt_num(row["cpu"], ".1f", " s"), "yes" if row.get("identical") else "NO"])
            print_table(f"(d) peak RSS, {fmt_bytes(big.total_size)} fetch (target: autoglm under 200 MB)",
                        ["tool", "peak RSS", "throughput", "CPU", "identical"], rows_d)
            big_mirror.stop()

        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
