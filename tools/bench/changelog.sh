#!/usr/bin/env bash
# Change-log benchmark: the same image served by standby with the change log OFF, standby
# with the change log ON, and nbdkit file, in one run (servers alternated A B C A B C ...,
# medians of --reps runs). Prints a Markdown table with throughput, p99 latency and the ratios
# log-on/log-off and standby/nbdkit.
#
# Usage: tools/bench/changelog.sh [--runtime 20] [--reps 3] [--size-mib 2048] [--workdir DIR]
#
# Rows:
#   seq write 1 MiB QD8, rand write 4 KiB QD32   (fio nbd engine, time based)
#   flush: 4 KiB random write + FLUSH, QD1       (fio --iodepth=1 --fsync=1: every write is
#                                                 followed by a flush; IOPS = write+flush pairs
#                                                 per second; p99 = flush (sync) latency)
# Before every log-ON run the log is reset (tracking disabled and re-enabled), so each run
# starts with an empty log; after it the log must still be healthy, or the run is refused.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p standby-tools --bin standby
STANDBY_BIN="${CARGO_TARGET_DIR:-target}/release/standby"
exec python3 - "$STANDBY_BIN" "$@" <<'PY'
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

TESTS = [
    # name, rw, bs, iodepth, extra fio args, metric
    ("seq write 1 MiB QD8", "write", "1M", 8, [], "MB/s"),
    ("rand write 4 KiB QD32", "randwrite", "4k", 32, [], "IOPS"),
    ("flush: 4 KiB write+FLUSH QD1", "randwrite", "4k", 1, ["--fsync=1"], "IOPS"),
]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def wait_port(port, proc, timeout=60):
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
    def __init__(self, name, argv, port, before=None, after=None):
        self.name, self.argv, self.port, self.before, self.after = name, argv, port, before, after
        self.proc = None
    def start(self):
        if self.before:
            self.before()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        time.sleep(0.2)
    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill(); self.proc.wait()
        self.proc = None
        if self.after:
            self.after()
    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/bench"

def run_fio(uri, rw, bs, qd, extra, runtime, size, out):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", "--time_based", f"--runtime={runtime}", f"--size={size}",
           "--ramp_time=2", "--randrepeat=0", "--norandommap", "--output-format=json",
           f"--output={out}"] + extra
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    w = job["write"]
    p99 = w["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    if "--fsync=1" in extra:
        sync = job.get("sync", {}).get("lat_ns", {}).get("percentile", {})
        p99 = sync.get("99.000000", 0) / 1000.0
    return {"MB/s": w["bw_bytes"] / 1e6, "IOPS": w["iops"], "p99_us": p99}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("standby_bin")
    ap.add_argument("--runtime", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    for tool in ["fio", "nbdkit"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    sb = os.path.abspath(args.standby_bin)
    work = args.workdir or tempfile.mkdtemp(prefix="standby-bench-log-")
    img = os.path.join(work, "disk.img")
    size = args.size_mib << 20
    if not os.path.exists(img) or os.path.getsize(img) != size:
        with open(img, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
    off_dd, on_dd = os.path.join(work, "data-off"), os.path.join(work, "data-on")
    for dd in (off_dd, on_dd):
        if not os.path.exists(os.path.join(dd, "disks", "bench.toml")):
            subprocess.run([sb, "--data-dir", dd, "disk", "import", "bench", img], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli = lambda dd, *a: subprocess.run([sb, "--data-dir", dd, "--log", "warn", *a], check=True,
                                        capture_output=True, text=True).stdout
    log_bytes = []
    def reset_log():
        cli(on_dd, "log", "disable", "bench")
        cli(on_dd, "log", "enable", "bench")
    def check_log():
        out = cli(on_dd, "log", "list", "bench")
        if "log healthy" not in out:
            raise SystemExit("the change log is not healthy after a run:\n" + out)
        log_bytes.append(out.strip().splitlines()[-1])
    serve = lambda dd, port: [sb, "--data-dir", dd, "--log", "warn", "serve", "--listen", f"127.0.0.1:{port}"]
    p1, p2, p3 = free_port(), free_port(), free_port()
    servers = [
        Server("log-off", serve(off_dd, p1), p1),
        Server("log-on", serve(on_dd, p2), p2, before=reset_log, after=check_log),
        Server("nbdkit", ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p3), "file", img], p3),
    ]
    results = {(t[0], s.name): [] for t in TESTS for s in servers}
    try:
        for rep in range(args.reps):
            for (tname, rw, bs, qd, extra, metric) in TESTS:
                for s in servers:
                    subprocess.run(["cat", img], stdout=subprocess.DEVNULL, check=True)
                    s.start()
                    try:
                        r = run_fio(s.uri(), rw, bs, qd, extra, args.runtime, size,
                                    os.path.join(work, "fio.json"))
                    finally:
                        s.stop()
                    results[(tname, s.name)].append(r)
                    print(f"rep {rep + 1} {tname:30} {s.name:8} {r[metric]:>10,.0f} {metric}  p99 {r['p99_us']:,.0f} us",
                          file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop() if s.proc else None
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("MB/s", "IOPS", "p99_us")}
           for k, v in results.items()}
    print("| test | metric | log-off | log-on | nbdkit | log-on/log-off | log-off/nbdkit | log-on/nbdkit |")
    print("|---|---|---|---|---|---|---|---|")
    for (tname, rw, bs, qd, extra, metric) in TESTS:
        off, on, kit = (med[(tname, n)][metric] for n in ("log-off", "log-on", "nbdkit"))
        print(f"| {tname} | {metric} | {off:,.0f} | {on:,.0f} | {kit:,.0f} | {on/off:.2f}x | {off/kit:.2f}x | {on/kit:.2f}x |")
        off, on, kit = (med[(tname, n)]["p99_us"] for n in ("log-off", "log-on", "nbdkit"))
        print(f"| {tname} | p99 µs | {off:,.0f} | {on:,.0f} | {kit:,.0f} | {on/max(off,1e-9):.2f}x | {off/max(kit,1e-9):.2f}x | {on/max(kit,1e-9):.2f}x |")
    print(f"\nMedians of {args.reps} runs, {args.runtime} s each (+2 s ramp), {args.size_mib} MiB random image, "
          "page cache warm, servers alternated within each repetition. Throughput ratios > 1 favour the "
          "numerator; p99 ratios are numerator/denominator latency (< 1 means the numerator's tail is lower). "
          "Flush row: fio --iodepth=1 --fsync=1 (each 4 KiB write followed by a FLUSH); its IOPS count "
          "writes, its p99 is the FLUSH latency.")
    print("Log size at the end of each log-on run: " + "; ".join(log_bytes))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

main()
PY
