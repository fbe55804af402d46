#!/usr/bin/env python3
"""How long a cut holds a disk's writes after a long stretch of deferred small writes.

A protected VM's disk (DISK_GIB, sparse, local store) takes random 4 KiB writes at QD32 (fio's
nbd engine, no FLUSH) for FILL seconds with replication paused (policy interval 5m), so
nearly every block becomes a deferred write whose bytes the next cut must log. Then the policy
is set to 1s: the delta-replication job cuts the log while the writer keeps going for 20 s
more. Printed per run: the cut's `Disk::cut` time ("barrier", from the gateway's debug log),
the gateway's own account of the cut (unheld passes and bytes, how long writes were held), and
the writer's slowest write completing within [-1 s, +0.3 s] of the barrier's end (the writes
the held part stalled), the slowest earlier in the barrier, and the slowest of the whole run.

Several binaries are measured in one invocation, alternated A B B A (one fresh data
directory and one `standby serve` per run: the scenario needs a fresh protection).

usage: tools/bench/cut_hold.py [--fill SECS] [--disk-gib N] [--rounds N] [--workdir DIR]
                                [--log-config 'NAME=KEY = VALUE' ...]
                                NAME=STANDBY_BIN [NAME=STANDBY_BIN ...]
--log-config adds a line to the `[log]` section of the configuration of NAME's runs, e.g.
`--log-config 'big=checkpoint_bytes = "16G"' default=BIN big=BIN` (one binary, two settings).
Needs: fio with the nbd engine. Takes about 2 minutes per run on 2 cores.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def duration_s(text, tag):
    m = re.search(tag + r"=([\d.]+)(ns|µs|ms|s)\b", text)
    if not m:
        raise RuntimeError(f"no {tag} in {text!r}")
    return float(m.group(1)) * {"ns": 1e-9, "µs": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def one_run(binary, work, fill, disk_gib, log_conf):
    data = os.path.join(work, "data")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    if log_conf:
        with open(os.path.join(data, "standby.toml"), "w") as f:
            f.write("[log]\n" + "".join(line + "\n" for line in log_conf))

    def cli(*args):
        p = subprocess.run([binary, "--data-dir", data, "--log", "warn", *args],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"standby {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    cli("disk", "create", "disk0", "--size", f"{disk_gib}G")
    cli("store", "init")
    cli("policy", "set", "--interval", "5m", "--retention", "24h", "--resync-window", "always",
        "--bandwidth", "0")
    port = free_port()
    serve_log = os.path.join(work, "serve.log")
    env = dict(os.environ,
               RUST_LOG="warn,gateway::replication::passes::cut=debug,gateway::disk::cut=debug")
    with open(serve_log, "w") as err:
        server = subprocess.Popen([binary, "--data-dir", data, "serve", "--listen",
                                   f"127.0.0.1:{port}", "--api-listen", f"127.0.0.1:{free_port()}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 60
        while "connect with" not in open(serve_log).read():
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("standby serve did not start: " + open(serve_log).read()[-2000:])
            time.sleep(0.2)
        time.sleep(1)
        cli("protect", "vm0", "--disks", "disk0")
        deadline = time.time() + 600
        while "Protected" not in cli("status"):
            if time.time() > deadline:
                raise RuntimeError("not protected: " + cli("status"))
            time.sleep(0.5)
        out = os.path.join(work, "fio.json")
        lat = os.path.join(work, "fio")
        for f in os.listdir(work):
            if f.startswith("fio_clat"):
                os.remove(os.path.join(work, f))
        started = time.time() * 1000
        fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd",
                                f"--uri=nbd://127.0.0.1:{port}/disk0", "--rw=randwrite", "--bs=4k",
                                "--iodepth=32", f"--size={disk_gib}g", "--randrepeat=0",
                                "--time_based", f"--runtime={fill + 20}", "--output-format=json",
                                f"--output={out}", f"--write_lat_log={lat}", "--log_avg_msec=0"],
                               stdout=subprocess.DEVNULL)
        time.sleep(fill)
        last = max([int(m) for m in re.findall(r"^\s*(\d+)\s", cli("jobs", "--limit", "1"), re.M)] or [0])
        cli("policy", "set", "--interval", "1s")
        deadline = time.time() + 900
        while True:
            done = [l for l in cli("jobs", "--limit", "5").splitlines()
                    if re.match(r"^\s*(\d+)\s", l) and int(l.split()[0]) > last
                    and "delta-replication" in l and re.search(r"\b(succeeded|failed)\b", l)]
            if done:
                break
            if time.time() > deadline:
                raise RuntimeError("no delta job finished")
            time.sleep(0.2)
        cli("policy", "set", "--interval", "5m")
        if "succeeded" not in done[0]:
            raise RuntimeError("delta job: " + done[0])
        if fio.wait() != 0:
            raise RuntimeError("fio failed")
    finally:
        server.terminate()
        server.wait()
    log = open(serve_log).read().splitlines()
    timing = [l for l in log if "cut timings" in l and "read_log=" in l][-1]
    ts = datetime.datetime.strptime(timing.split()[0][:26], "%Y-%m-%dT%H:%M:%S.%f")
    ts = ts.replace(tzinfo=datetime.timezone.utc).timestamp()
    barrier = duration_s(timing, "barrier")
    barrier_end = (ts - (duration_s(timing, "total") - barrier)) * 1000
    cut = [l for l in log if "gateway::disk::cut" in l and "unheld_passes" in l]
    rows = []
    for f in os.listdir(work):
        if f.startswith("fio_clat"):
            for line in open(os.path.join(work, f)):
                t, v = line.split(",")[:2]
                rows.append((int(v) / 1e6, int(t) + started))
    near = [v for v, t in rows if barrier_end - 1000 <= t <= barrier_end + 300]
    before = [v for v, t in rows if barrier_end - barrier * 1000 <= t < barrier_end - 1000]
    iops = json.load(open(out))["jobs"][0]["write"]["iops"]
    return {
        "barrier_s": barrier,
        "read_log_s": duration_s(timing, "read_log"),
        "gateway": cut[-1][cut[-1].index("gateway::disk::cut") + len("gateway::disk::cut: "):]
        if cut else "(no account: this build predates it)",
        "near_ms": max(near, default=0.0),
        "before_ms": max(before, default=0.0),
        "max_ms": max((v for v, _ in rows), default=0.0),
        "iops": iops,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fill", type=int, default=15)
    ap.add_argument("--disk-gib", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="A B B A sequences")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--log-config", action="append", default=[], help="NAME=LINE")
    ap.add_argument("bins", nargs="+", help="NAME=STANDBY_BIN")
    a = ap.parse_args()
    bins = [b.split("=", 1) for b in a.bins]
    if any(len(b) != 2 or not os.access(b[1], os.X_OK) for b in bins):
        sys.exit("each binary as NAME=PATH to an executable standby")
    conf = {}
    for c in a.log_config:
        name, _, line = c.partition("=")
        if not line or name not in dict(bins):
            sys.exit(f"--log-config {c!r}: expected NAME=LINE with NAME one of the builds")
        conf.setdefault(name, []).append(line)
    if shutil.which("fio") is None:
        sys.exit("fio is required")
    work = a.workdir or tempfile.mkdtemp(prefix="cut-hold-")
    os.makedirs(work, exist_ok=True)
    order = []
    for _ in range(a.rounds):
        order += bins + bins[::-1]
    print(f"| run | build | Disk::cut s | gateway's account | slowest write at the barrier's end ms "
          f"| slowest earlier in the cut ms | slowest of the run ms | writer IOPS |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (name, binary) in enumerate(order, 1):
        subprocess.run(["sync"])
        r = one_run(binary, work, a.fill, a.disk_gib, conf.get(name, []))
        print(f"| {i} | {name} | {r['barrier_s']:.2f} | {r['gateway']} | {r['near_ms']:.1f} "
              f"| {r['before_ms']:.1f} | {r['max_ms']:.1f} | {r['iops']:,.0f} |", flush=True)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
