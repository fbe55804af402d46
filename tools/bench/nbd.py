#!/usr/bin/env python3
"""NBD data-path benchmark: standby serve vs nbdkit file vs qemu-nbd, same image, same run.

Runs fio's nbd engine against each server, alternating servers within each repetition
(A B C A B C ...), and prints medians and ratios as a Markdown table.

Usage: tools/bench/nbd.sh [--runtime 20] [--reps 3] [--size-mib 2048] [--servers standby,nbdkit,qemu-nbd]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

TESTS = [
    # name, rw, bs, iodepth, metric
    ("seq write 1 MiB QD8", "write", "1M", 8, "MB/s"),
    ("seq read 1 MiB QD8", "read", "1M", 8, "MB/s"),
    ("rand write 4 KiB QD32", "randwrite", "4k", 32, "IOPS"),
    ("rand read 4 KiB QD32", "randread", "4k", 32, "IOPS"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


class Server:
    def __init__(self, name, argv, port, export, env=None):
        self.name, self.argv, self.port, self.export, self.env = name, argv, port, export, env
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=self.env)
        wait_port(self.port, self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/{self.export}"


def make_servers(which, work, img, standby_bin):
    servers = []
    for name in which:
        port = free_port()
        if name == "standby":
            data = os.path.join(work, "standby-data")
            if not os.path.exists(os.path.join(data, "disks", "bench.toml")):
                subprocess.run([standby_bin, "--data-dir", data, "disk", "import", "bench", img],
                               check=True, stdout=subprocess.DEVNULL)
            argv = [standby_bin, "--data-dir", data, "--log", "warn", "serve", "--listen",
                    f"127.0.0.1:{port}"]
            servers.append(Server("standby", argv, port, "bench"))
        elif name == "nbdkit":
            argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", img]
            servers.append(Server("nbdkit", argv, port, "bench"))
        elif name == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", "--cache=writeback", "-t", "-b", "127.0.0.1", "-p", str(port),
                    "-x", "bench", img]
            servers.append(Server("qemu-nbd", argv, port, "bench"))
        else:
            raise SystemExit(f"unknown server {name}")
    return servers


def run_fio(uri, rw, bs, iodepth, runtime, size, out):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", "--time_based", f"--runtime={runtime}", f"--size={size}",
           "--ramp_time=2", "--randrepeat=0", "--norandommap", "--output-format=json", f"--output={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        j = json.load(f)
    job = j["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"], "p99_us": p99}


def fmt(v, metric):
    return f"{v:,.0f}" if metric == "IOPS" else f"{v:,.0f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--servers", default="standby,nbdkit,qemu-nbd")
    ap.add_argument("--standby-bin", default=os.path.join(ROOT, "target", "release", "standby"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    for tool in ["fio", "nbdkit", "qemu-nbd"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    which = args.servers.split(",")
    work = args.workdir or tempfile.mkdtemp(prefix="standby-bench-")
    img = os.path.join(work, "disk.img")
    size = args.size_mib << 20
    if not os.path.exists(img) or os.path.getsize(img) != size:
        # Random content so no server can skip zero blocks.
        with open(img, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
    servers = make_servers(which, work, img, args.standby_bin)
    results = {(t[0], s.name): [] for t in TESTS for s in servers}
    try:
        for rep in range(args.reps):
            for (tname, rw, bs, qd, metric) in TESTS:
                for s in servers:
                    subprocess.run(["cat", img], stdout=subprocess.DEVNULL, check=True)  # warm cache
                    s.start()
                    try:
                        r = run_fio(s.uri(), rw, bs, qd, args.runtime, size, os.path.join(work, "fio.json"))
                    finally:
                        s.stop()
                    results[(tname, s.name)].append(r)
                    print(f"rep {rep + 1} {tname:24} {s.name:9} {r[metric]:>12,.0f} {metric}  p99 {r['p99_us']:,.0f} us",
                          file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("MB/s", "IOPS", "p99_us")}
           for k, v in results.items()}
    names = [s.name for s in servers]
    peers = [n for n in names if n != "standby"]
    head = "| test | metric | " + " | ".join(names) + " | " + " | ".join(f"standby/{p}" for p in peers) + " |"
    print(head)
    print("|" + "---|" * (2 + len(names) + len(peers)))
    for (tname, rw, bs, qd, metric) in TESTS:
        vals = [med[(tname, n)][metric] for n in names]
        ratios = [med[(tname, "standby")][metric] / med[(tname, p)][metric] for p in peers] if "standby" in names else []
        print(f"| {tname} | {metric} | " + " | ".join(fmt(v, metric) for v in vals) + " | "
              + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
        lat = [med[(tname, n)]["p99_us"] for n in names]
        # Lower latency is better: ratio peer/standby so that > 1 means standby is better.
        lratios = [med[(tname, p)]["p99_us"] / max(med[(tname, "standby")]["p99_us"], 1e-9) for p in peers] if "standby" in names else []
        print(f"| {tname} | p99 µs | " + " | ".join(f"{v:,.0f}" for v in lat) + " | "
              + " | ".join(f"{r:.2f}x" for r in lratios) + " |")
    print(f"\nMedians of {args.reps} runs, {args.runtime} s each (+2 s ramp), {args.size_mib} MiB random image, "
          f"page cache warm; servers alternated within each repetition. p99 ratios are peer/standby "
          f"(> 1 means standby's tail latency is lower).")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
