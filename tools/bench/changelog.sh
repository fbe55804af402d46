#!/usr/bin/env bash
# Change-log benchmark: one `standby serve` process serving two disks — one with the change
# log OFF, one with it ON (as a real gateway serves mixed work) — and one `nbdkit file`
# process, all rows in those same processes, servers alternated A B C / C B A (ABBA) within
# each row, medians of --reps repetitions. Prints a Markdown table with throughput, p99
# latency, server and client (fio) CPU seconds per GB written, the machine's idle share during
# each run, the ratios log-on/log-off, log-on/nbdkit and
# log-off/nbdkit, the servers' peak resident set, and the physical limit of the machine's
# disk measured in the same run (dd oflag=direct, fio --direct=1).
#
# Usage: tools/bench/changelog.sh [--quick] [--runtime 20] [--long-runtime 60] [--reps 3]
#                                 [--size-mib 2048]
#                                 [--sustained-mib N] [--no-drop-caches] [--workdir DIR]
#                                 [--extent-min SIZE|off] [--log-config 'KEY = VALUE' ...]
#                                 [--only ROW-TEXT] [--warm readahead|4k]
#
# Rows (fio's nbd engine):
#   seq write 1 MiB QD8, rand write 4 KiB QD32          time based (--runtime, +2 s ramp)
#   flush: 4 KiB random write + FLUSH QD1               --iodepth=1 --fsync=1 (fio 3.33 sends
#                                                        exactly one FLUSH per write at QD1);
#                                                        IOPS count writes, p99 = FLUSH latency
#   sustained seq write 1 MiB QD8                       3x the kernel's dirty limit (vm.dirty_bytes,
#                                                        else vm.dirty_ratio of MemAvailable) of
#                                                        sequential writes over the disk, then one
#                                                        FLUSH (--end_fsync=1), all in the figure
#   sustained rand write 4 KiB QD32                     the rand row for --long-runtime s (default
#                                                        60, +2 s ramp): long enough that the
#                                                        page cache's write-back of the image is
#                                                        in the figure of every server (the
#                                                        kernel writes back data dirty for 30 s,
#                                                        `vm.dirty_expire_centisecs`; a tracked
#                                                        disk's checkpoint, once its oldest change
#                                                        is 30 s old), where a shorter row after
#                                                        the page cache was synced holds none
#   4 KiB writes QD32, then one FLUSH                   the rand row, then one FLUSH on a new
#                                                        connection (`qemu-io -c flush`, timed
#                                                        from start to exit); its "p99" is that
#                                                        FLUSH's time (a tracked disk logs its
#                                                        deferred small writes there)
# Physical limit (same run, once per repetition): `dd oflag=direct bs=1M` of one disk's size
# into a new file (so the run never needs more free space than a fourth image), `fio
# --direct=1` (libaio, 1 MiB QD8) of the sustained row's bytes over a file of the disk's size,
# 4 KiB write+fdatasync QD1 on a file (fio psync --fdatasync=1), and the page-cache cost of a
# logged small write: fio psync 4 KiB random pwrites into the image file, dropped and read
# once as before the rows (A, what a log-off write costs the server besides NBD) and 4,136-byte sequential writes into a new
# sparse file (B: a record, 40-byte header + 4 KiB, into new page-cache pages, what logging
# adds); "both" is 1/(1/A + 1/B) per second, the two done one after the other. Flush floor:
# the flush row's file operations alone, one Python loop per design, A B B A, --runtime s each —
# A in place (4 KiB pwrite into the image, its fdatasync), B redo (the same pwrite, a 4,176-byte
# record appended to a log written ahead with zeroes, the log's fdatasync, the image's fdatasync
# every 30 s on another thread, as the default checkpoint interval: none within a run of 30 s or
# less): B/A bounds what log-on can keep of log-off on the flush row.
#
# Before every run: `sync`, drop the page cache (unless --no-drop-caches or not allowed),
# then read the served image once (page cache warm, as in the other benchmarks). The server
# processes are started once per repetition; before each repetition the change log is reset
# (tracking disabled and enabled), after it the log must be healthy, or the run is refused.
# Resident set: VmHWM and RssAnon+RssFile of each server process sampled every 0.2 s.
#
# --extent-min writes `[log] extent_min` into the data directory's standby.toml (default: the
# built-in 64K; "off" logs every write's data, as builds before extents did).
# --log-config 'hot_limit = 4096' (repeatable) adds that line (TOML) to the `[log]` section, e.g.
# 'checkpoint_interval = "60s"'; the table's footnote names every line written. The file is
# removed when the run ends (normally, on an error, Ctrl-C, SIGTERM or SIGHUP), so that nothing
# run later against the work directory's data directory inherits the settings.
# --only TEXT runs only the rows whose name contains TEXT (e.g. --only rand); "A|B" runs the
# rows containing A or B, in the table's order (e.g. --only "seq write|rand write 4 KiB QD32":
# the seq row, then the rand row as in the full sequence, then the sustained row, whose name
# contains "seq write" too; "rand write 4 KiB QD32" likewise selects the sustained rand row).
# --warm: how each image is read once before a run. "readahead" (default): `cat`. On kernels
# that cache files in large folios (ext4 from 6.16 on) read-ahead leaves large folios,
# and every 4 KiB buffered write into one walks all of the folio's block heads
# (`ext4_block_write_begin`): most of a small write's cost, for every server, and more the
# less of them stays in the CPU caches (BENCHMARKS.md, "Where a 4 KiB write's time goes").
# "4k": 1 MiB reads under POSIX_FADV_RANDOM, which leave 4 KiB folios (as a server's own
# random reads would), so the rows show the servers' own costs.
# STANDBY_BIN=PATH runs that binary instead of building this tree (e.g. a before/after pair).
# --quick: --runtime 4 --long-runtime 8 --reps 1 --size-mib 512 --sustained-mib 1536 (for development).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${STANDBY_BIN:-}" ]; then
  cargo build --release --quiet -p standby-tools --bin standby
  STANDBY_BIN="${CARGO_TARGET_DIR:-target}/release/standby"
fi
exec python3 - "$STANDBY_BIN" "$@" <<'PY'
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile
import threading, time

# name, rw, bs, iodepth, extra fio args, metric, kind ("time" or "bytes")
TESTS = [
    ("seq write 1 MiB QD8", "write", "1M", 8, [], "MB/s", "time"),
    ("rand write 4 KiB QD32", "randwrite", "4k", 32, [], "IOPS", "time"),
    ("flush: 4 KiB write+FLUSH QD1", "randwrite", "4k", 1, ["--fsync=1"], "IOPS", "time"),
    ("sustained seq write 1 MiB QD8", "write", "1M", 8, ["--end_fsync=1"], "MB/s", "bytes"),
    ("sustained rand write 4 KiB QD32", "randwrite", "4k", 32, [], "IOPS", "long"),
    ("4 KiB writes QD32, then one FLUSH", "randwrite", "4k", 32, [], "IOPS", "time+flush"),
]
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def wait_port(port, proc, timeout=120):
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

def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK

def status_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out

class Proc:
    """One server process, its resident set sampled while it runs."""
    def __init__(self, name, argv, port):
        self.name, self.argv, self.port = name, argv, port
        self.proc, self.peak, self.hwm = None, 0, 0
        self.stop_ev = threading.Event()
    def start(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.stop_ev.clear()
        self.sampler = threading.Thread(target=self.sample, daemon=True)
        self.sampler.start()
    def sample(self):
        while not self.stop_ev.wait(0.2):
            try:
                s = status_kib(self.proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.peak = max(self.peak, (s.get("RssAnon", 0) + s.get("RssFile", 0)) * 1024)
            self.hwm = max(self.hwm, s.get("VmHWM", 0) * 1024)
    def cpu(self):
        return cpu_seconds(self.proc.pid)
    def stop(self):
        if not self.proc:
            return
        self.stop_ev.set()
        self.sampler.join()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.proc.kill(); self.proc.wait()
        self.proc = None

class Target:
    def __init__(self, name, proc, export, image):
        self.name, self.proc, self.export, self.image = name, proc, export, image
    def uri(self):
        return f"nbd://127.0.0.1:{self.proc.port}/{self.export}"

def quiet_cache(drop, image=None):
    subprocess.run(["sync"], check=True)
    if drop[0]:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            print(f"cannot drop the page cache ({e}); going on without", file=sys.stderr)
            drop[0] = False
    if image:
        warm(image)

WARM = ["readahead"]

def warm(image):
    """Reads the image once into the page cache: with `cat` (read-ahead: on kernels that cache
    files in large folios, ext4 from 6.16 on, large ones), or with --warm 4k in
    1 MiB reads under POSIX_FADV_RANDOM (no read-ahead: 4 KiB folios)."""
    if WARM[0] == "readahead":
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
        return
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        at = 0
        while True:
            b = os.pread(fd, 1 << 20, at)
            if not b:
                break
            at += len(b)
    finally:
        os.close(fd)

def run_fio(args, out):
    subprocess.run(["fio", "--name=bench", "--output-format=json", f"--output={out}"] + args,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    w, s = job["write"], job.get("sync", {})
    p99 = w["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    if s.get("total_ios", 0) > 0 and "percentile" in s.get("lat_ns", {}):
        p99 = s["lat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    secs = job["job_runtime"] / 1000.0
    # fio's own CPU (user + system, % of one CPU over the job's run) per GB written.
    client = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100 * secs
    return {"MB/s": w["io_bytes"] / 1e6 / max(secs, 1e-9), "IOPS": w["total_ios"] / max(secs, 1e-9),
            "p99_us": p99, "bytes": w["io_bytes"], "flushes": s.get("total_ios", 0),
            "client_cpu_s_per_GB": client / max(w["io_bytes"] / 1e9, 1e-9)}

def cpu_ticks():
    """(idle, total) jiffies of all CPUs (/proc/stat): the machine's idle share of a run."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)

def dirty_limit():
    with open("/proc/sys/vm/dirty_bytes") as f:
        b = int(f.read())
    if b:
        return b
    with open("/proc/sys/vm/dirty_ratio") as f:
        ratio = int(f.read())
    with open("/proc/meminfo") as f:
        mem = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
    return mem["MemAvailable"] * ratio // 100

def redo_floor(image, logpath, size, seconds, interval=30.0):
    """The flush row's designs reduced to their file operations, same Python loop for all,
    alternated A B C C B A, `seconds` each: A, an untracked disk's write+FLUSH (a 4 KiB pwrite
    at a random block of the image, then its fdatasync); B, a redo log's (the same pwrite, a
    record of 40-byte header + 4 KiB + 40-byte barrier appended to a 256 MiB log file written
    with zeroes before the loop and reused round, the log's fdatasync, and the image's
    fdatasync every `interval` seconds on another thread, as checkpoints do); C, B with a log
    that grows as the gateway's does — a new file per run, 1 MiB of zeroes written (in 256 KiB
    pieces) ahead of the records before a sync finds them within 512 KiB of the zeroes' end —
    so its pages are new page-cache pages, as every logged byte's are in the benchmark (which
    ships nothing, so no segment is released and reused). Returns (A, B, C) writes per
    second."""
    import random, threading
    fi = os.open(image, os.O_RDWR)
    fl = os.open(logpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    grown = []
    log_size = 256 << 20
    zeros = bytes(1 << 20)
    for off in range(0, log_size, len(zeros)):
        os.pwrite(fl, zeros, off)
    os.fsync(fl)
    page, rec, blocks = os.urandom(4096), os.urandom(4096 + 80), size // 4096
    def one(kind):
        redo, grow = kind != "A", kind == "C"
        if grow:
            grown.append(f"{logpath}.grow{len(grown)}")
            fg = os.open(grown[-1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            filled, piece = 0, zeros[:256 << 10]
        stop = threading.Event()
        def checkpoints():
            while not stop.wait(interval):
                os.fdatasync(fi)
        th = threading.Thread(target=checkpoints) if redo else None
        if th:
            th.start()
        n, off, t0 = 0, 0, time.time()
        while time.time() - t0 < seconds:
            os.pwrite(fi, page, random.randrange(blocks) * 4096)
            if grow:
                os.pwrite(fg, rec, off)
                off += len(rec)
                if off + (512 << 10) > filled:
                    at = max(off, filled)
                    while at < off + (1 << 20):
                        end = (at // len(piece) + 1) * len(piece)
                        os.pwrite(fg, piece[:end - at], at)
                        at = end
                    filled = at
                os.fdatasync(fg)
            elif redo:
                os.pwrite(fl, rec, off)
                off = off + len(rec) if off + 2 * len(rec) <= log_size else 0
                os.fdatasync(fl)
            else:
                os.fdatasync(fi)
            n += 1
        rate = n / (time.time() - t0)
        stop.set()
        if th:
            th.join()
        os.fdatasync(fi)
        if grow:
            os.close(fg)
        return rate
    rates = {"A": [], "B": [], "C": []}
    try:
        for kind in ("A", "B", "C", "C", "B", "A"):
            subprocess.run(["sync"], check=True)
            rates[kind].append(one(kind))
    finally:
        os.close(fi)
        os.close(fl)
        # Removed only now: pages a run frees would be the next run's new pages.
        for g in grown:
            os.remove(g)
    return tuple(statistics.mean(rates[k]) for k in "ABC")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("standby_bin")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runtime", type=int, default=None)
    ap.add_argument("--long-runtime", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--size-mib", type=int, default=None)
    ap.add_argument("--sustained-mib", type=int, default=None)
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--extent-min", default=None)
    ap.add_argument("--log-config", action="append", default=[])
    ap.add_argument("--only", default=None)
    ap.add_argument("--warm", choices=["readahead", "4k"], default="readahead")
    args = ap.parse_args()
    WARM[0] = args.warm
    only = args.only.split("|") if args.only else None
    tests = [t for t in TESTS if not only or any(o in t[0] for o in only)]
    if not tests:
        raise SystemExit(f"--only {args.only}: no row's name contains it")
    q = args.quick
    runtime = args.runtime or (4 if q else 20)
    long_runtime = args.long_runtime or (8 if q else 60)
    reps = args.reps or (1 if q else 3)
    size_mib = args.size_mib or (512 if q else 2048)
    sustained = (args.sustained_mib << 20) if args.sustained_mib else \
        ((1536 << 20) if q else 3 * dirty_limit() // (1 << 20) * (1 << 20))
    for tool in ["fio", "nbdkit", "dd"] + (["qemu-io"] if any(t[6] == "time+flush" for t in tests) else []):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    drop = [not args.no_drop_caches]
    sb = os.path.abspath(args.standby_bin)
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="standby-bench-log-"))
    os.makedirs(work, exist_ok=True)
    size = size_mib << 20
    imgs = {n: os.path.join(work, f"{n}.img") for n in ("off", "on", "kit")}
    for path in imgs.values():
        if not os.path.exists(path) or os.path.getsize(path) != size:
            with open(path, "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(1 << 20))
    dd = os.path.join(work, "data")
    cli = lambda *a: subprocess.run([sb, "--data-dir", dd, "--log", "warn", *a], check=True,
                                    capture_output=True, text=True).stdout
    os.makedirs(dd, exist_ok=True)
    conf = os.path.join(dd, "standby.toml")
    log_conf = ([f'extent_min = "{args.extent_min}"'] if args.extent_min else []) + args.log_config
    if log_conf:
        with open(conf, "w") as f:
            f.write("[log]\n" + "".join(line + "\n" for line in log_conf))
    elif os.path.exists(conf):
        os.remove(conf)
    for name, img in (("bench-off", imgs["off"]), ("bench-on", imgs["on"])):
        if not os.path.exists(os.path.join(dd, "disks", f"{name}.toml")):
            cli("disk", "import", name, img)
    def reset_log():
        cli("log", "disable", "bench-on")
        cli("log", "enable", "bench-on")
    log_lines = []
    def check_log():
        out = cli("log", "list", "bench-on")
        if "log healthy" not in out:
            raise SystemExit("the change log is not healthy after a repetition:\n" + out)
        log_lines.append(out.strip().splitlines()[0])
    p1, p2 = free_port(), free_port()
    standby = Proc("standby", [sb, "--data-dir", dd, "--log", "warn", "serve", "--listen",
                               f"127.0.0.1:{p1}"], p1)
    nbdkit = Proc("nbdkit", ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p2), "file",
                             imgs["kit"]], p2)
    targets = [Target("log-off", standby, "bench-off", imgs["off"]),
               Target("log-on", standby, "bench-on", imgs["on"]),
               Target("nbdkit", nbdkit, "", imgs["kit"])]
    results = {(t[0], s.name): [] for t in tests for s in targets}
    phys = {"dd oflag=direct 1 MiB": [], "fio --direct=1 1 MiB QD8": [],
            "fio 4 KiB write+fdatasync QD1": [], "fio 4 KiB pwrite (image only) QD1": [],
            "fio 4,136 B appends (log only) QD1": [],
            "both: 4 KiB pwrite + 4,136 B append per write": [],
            "fio 40 B appends (deferred record) QD1": [],
            "both: 4 KiB pwrite + 40 B append per write": [],
            "flush floor A: 4 KiB pwrite + image fdatasync (in place)": [],
            "flush floor B: 4 KiB pwrite + record append + log fdatasync (redo)": [],
            "flush floor C: 4 KiB pwrite + record append + log fdatasync (redo, growing log)": []}
    fio_out = os.path.join(work, "fio.json")
    print(f"sustained row: {sustained / 2**30:.1f} GiB (3x the dirty limit unless --sustained-mib)",
          file=sys.stderr)
    # SIGTERM and SIGHUP end the run as Ctrl-C does: through `finally` (servers stopped, the
    # standby.toml this run wrote removed).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: sys.exit(128 + n))
    try:
        for rep in range(reps):
            reset_log()
            standby.start(); nbdkit.start()
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for (tname, rw, bs, qd, extra, metric, kind) in tests:
                for t in order:
                    quiet_cache(drop, t.image)
                    fargs = ["--ioengine=nbd", f"--uri={t.uri()}", f"--rw={rw}", f"--bs={bs}",
                             f"--iodepth={qd}", f"--size={size}", "--randrepeat=0",
                             "--norandommap"] + extra
                    if kind.startswith("time") or kind == "long":
                        secs = long_runtime if kind == "long" else runtime
                        fargs += ["--time_based", f"--runtime={secs}", "--ramp_time=2"]
                    else:
                        fargs += [f"--io_size={sustained}"]
                    c0, k0 = t.proc.cpu(), cpu_ticks()
                    r = run_fio(fargs, fio_out)
                    r["cpu_s_per_GB"] = (t.proc.cpu() - c0) / max(r["bytes"] / 1e9, 1e-9)
                    k1 = cpu_ticks()
                    r["idle_pct"] = 100 * (k1[0] - k0[0]) / max(k1[1] - k0[1], 1)
                    if kind == "time+flush":
                        t0 = time.time()
                        subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", t.uri()], check=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        r["p99_us"] = (time.time() - t0) * 1e6
                    results[(tname, t.name)].append(r)
                    print(f"rep {rep + 1} {tname:30} {t.name:8} {r[metric]:>10,.0f} {metric}  "
                          f"p99 {r['p99_us']:,.0f} us  cpu {r['cpu_s_per_GB']:.2f} s/GB  "
                          f"fio {r['client_cpu_s_per_GB']:.2f} s/GB  idle {r['idle_pct']:.0f}%",
                          file=sys.stderr, flush=True)
            standby.stop(); nbdkit.stop()
            check_log()
            # The physical limit of the disk under the same bytes.
            scratch = os.path.join(work, "scratch.img")
            quiet_cache(drop)
            t0 = time.time()
            subprocess.run(["dd", "if=/dev/zero", f"of={scratch}", "bs=1M",
                            f"count={size_mib}", "oflag=direct"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            phys["dd oflag=direct 1 MiB"].append({"MB/s": size / 1e6 / (time.time() - t0)})
            os.remove(scratch)
            quiet_cache(drop)
            r = run_fio(["--ioengine=libaio", "--direct=1", f"--filename={imgs['kit']}", "--rw=write",
                         "--bs=1M", "--iodepth=8", f"--size={size}", f"--io_size={sustained}"], fio_out)
            phys["fio --direct=1 1 MiB QD8"].append(r)
            quiet_cache(drop)
            r = run_fio(["--ioengine=psync", f"--filename={imgs['kit']}", "--rw=randwrite", "--bs=4k",
                         f"--size={size}", "--fdatasync=1", "--time_based", f"--runtime={runtime}",
                         "--randrepeat=0", "--norandommap"], fio_out)
            phys["fio 4 KiB write+fdatasync QD1"].append(r)
            # What a logged 4 KiB write inherently costs in the page cache: one pwrite into
            # the image plus one append of header + data to the log (two buffered writes),
            # against the image pwrite alone: what logging adds to the page-cache work per write.
            # In the page-cache state the rows start from (dropped, then the image read
            # once): on kernels whose file systems cache files in large folios, a 4 KiB write
            # into a folio made by read-ahead costs far more than one into a small folio.
            # (`--invalidate=0`: fio would otherwise drop the file's pages first.)
            quiet_cache(drop, imgs["kit"])
            a = run_fio(["--ioengine=psync", f"--filename={imgs['kit']}", "--rw=randwrite",
                         "--bs=4k", f"--size={size}", "--time_based", f"--runtime={runtime}",
                         "--randrepeat=0", "--norandommap", "--invalidate=0"], fio_out)
            phys["fio 4 KiB pwrite (image only) QD1"].append(a)
            quiet_cache(drop)
            # Not time based: a time-based job wraps around at --size and then *overwrites*
            # its own 4,136-byte records, which on ext4 re-reads every partly covered block
            # (tens of µs per write) — a cost the log, which only appends, never pays.
            b = run_fio(["--ioengine=psync", f"--filename={scratch}", "--rw=write", "--bs=4136",
                         "--fallocate=none", f"--size={size}"], fio_out)
            os.remove(scratch)
            phys["fio 4,136 B appends (log only) QD1"].append(b)
            phys["both: 4 KiB pwrite + 4,136 B append per write"].append(
                {"IOPS": 1 / (1 / a["IOPS"] + 1 / b["IOPS"])})
            # A small write logged as a deferred extent appends only its 40-byte record: what
            # a log that appends one record per write adds to the page-cache work (the rand
            # row, where the NBD request and the network take their share, ran above it).
            quiet_cache(drop)
            c = run_fio(["--ioengine=psync", f"--filename={scratch}", "--rw=write", "--bs=40",
                         "--fallocate=none", f"--size={max(size // 100, 40 << 10) // 40 * 40}"],
                        fio_out)
            os.remove(scratch)
            phys["fio 40 B appends (deferred record) QD1"].append(c)
            phys["both: 4 KiB pwrite + 40 B append per write"].append(
                {"IOPS": 1 / (1 / a["IOPS"] + 1 / c["IOPS"])})
            # The redo log's own limit on the flush row (`redo_floor`): what writing every
            # small write twice (log now, image at the checkpoint) costs on this disk.
            quiet_cache(drop)
            fa, fb, fc = redo_floor(imgs["kit"], scratch, size, runtime)
            os.remove(scratch)
            phys["flush floor A: 4 KiB pwrite + image fdatasync (in place)"].append({"IOPS": fa})
            phys["flush floor B: 4 KiB pwrite + record append + log fdatasync (redo)"].append(
                {"IOPS": fb})
            phys["flush floor C: 4 KiB pwrite + record append + log fdatasync (redo, growing log)"].append(
                {"IOPS": fc})
            print(f"rep {rep + 1} physical: " + "; ".join(
                f"{k} {v[-1]['IOPS' if '4 KiB' in k or ' B ' in k else 'MB/s']:,.0f}"
                for k, v in phys.items()),
                file=sys.stderr, flush=True)
    finally:
        standby.stop(); nbdkit.stop()
        if log_conf and os.path.exists(conf):
            os.remove(conf)
    med = {k: {m: statistics.median(r[m] for r in v)
               for m in ("MB/s", "IOPS", "p99_us", "cpu_s_per_GB", "client_cpu_s_per_GB", "idle_pct")}
           for k, v in results.items()}
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
    print("| test | metric | log-off | log-on | nbdkit | log-on/log-off | log-on/nbdkit | log-off/nbdkit |")
    print("|---|---|---|---|---|---|---|---|")
    for (tname, rw, bs, qd, extra, metric, kind) in tests:
        for m, fmt in ((metric, "{:,.0f}"), ("p99_us", "{:,.0f}"), ("cpu_s_per_GB", "{:.2f}"),
                       ("client_cpu_s_per_GB", "{:.2f}"), ("idle_pct", "{:.0f}")):
            off, on, kit = (med[(tname, n)][m] for n in ("log-off", "log-on", "nbdkit"))
            label = {"p99_us": "FLUSH µs" if kind == "time+flush" else "p99 µs",
                     "cpu_s_per_GB": "server CPU s/GB", "client_cpu_s_per_GB": "fio CPU s/GB",
                     "idle_pct": "machine idle %"}.get(m, m)
            ratios = ["-"] * 3 if m == "idle_pct" else [ratio(on, off), ratio(on, kit), ratio(off, kit)]
            print(f"| {tname} | {label} | {fmt.format(off)} | {fmt.format(on)} | {fmt.format(kit)} | "
                  + " | ".join(ratios) + " |")
    for (tname, rw, bs, qd, extra, metric, kind) in tests:
        if tname != "rand write 4 KiB QD32":
            continue
        per = lambda n, m: med[(tname, n)][m] * 4096 / 1e3  # s/GB -> µs per 4 KiB write
        off_s, on_s = per("log-off", "cpu_s_per_GB"), per("log-on", "cpu_s_per_GB")
        off_c, on_c = per("log-off", "client_cpu_s_per_GB"), per("log-on", "client_cpu_s_per_GB")
        print(f"\nCPU per 4 KiB write, rand row (server + fio, medians): log-off {off_s:.1f} + "
              f"{off_c:.1f} µs with the machine {med[(tname, 'log-off')]['idle_pct']:.0f}% idle, "
              f"log-on {on_s:.1f} + {on_c:.1f} µs, {med[(tname, 'log-on')]['idle_pct']:.0f}% idle. "
              "A row whose machine is close to 0% idle is bound by the CPU that server and client "
              f"share; at log-off's total, log-on's extra {on_s - off_s:.1f} µs of server CPU would "
              f"hold it to {(off_s + off_c) / (on_s + off_c):.2f}x of log-off on this machine.")
    print("\n| physical limit (same bytes, same run) | metric | median |")
    print("|---|---|---|")
    for k, v in phys.items():
        m = "IOPS" if "4 KiB" in k or " B " in k else "MB/s"
        print(f"| {k} | {m} | {statistics.median(r[m] for r in v):,.0f} |")
    both = statistics.median(r["IOPS"] for r in phys["both: 4 KiB pwrite + 4,136 B append per write"])
    alone = statistics.median(r["IOPS"] for r in phys["fio 4 KiB pwrite (image only) QD1"])
    app = statistics.median(r["IOPS"] for r in phys["fio 4,136 B appends (log only) QD1"])
    print(f"\nPage-cache cost per write (fio psync QD1, wall time): a 4 KiB pwrite into the warm "
          f"image {1e6 / alone:.1f} µs, a 4,136-byte log append {1e6 / app:.1f} µs; both "
          f"{1e6 / both:.1f} µs, {both / alone:.2f}x the rate of the pwrite alone.")
    both40 = statistics.median(r["IOPS"] for r in phys["both: 4 KiB pwrite + 40 B append per write"])
    app40 = statistics.median(r["IOPS"] for r in phys["fio 40 B appends (deferred record) QD1"])
    print(f"A 40-byte deferred record append {1e6 / app40:.1f} µs; pwrite + record "
          f"{1e6 / both40:.1f} µs, {both40 / alone:.2f}x the rate of the pwrite alone (what the "
          "record adds to the server's page-cache work per small write; not a bound on the row, "
          "where the NBD request, the network and fio take their share of each write's time).")
    fla = statistics.median(r["IOPS"] for r in phys["flush floor A: 4 KiB pwrite + image fdatasync (in place)"])
    flb = statistics.median(r["IOPS"] for r in phys["flush floor B: 4 KiB pwrite + record append + log fdatasync (redo)"])
    flc = statistics.median(r["IOPS"] for r in phys["flush floor C: 4 KiB pwrite + record append + log fdatasync (redo, growing log)"])
    print(f"Flush floor (one Python loop per design, A B C C B A, {runtime} s each, image fdatasync every "
          f"30 s in B and C, the default checkpoint interval): redo/in place {flb / fla:.2f}x — what a redo log's write+FLUSH keeps of "
          "an untracked disk's on this disk with its log's pages reused; "
          f"growing redo/in place {flc / fla:.2f}x — the same with the log growing into new page-cache pages "
          "as the gateway's does here (nothing is shipped, so no segment is released and reused); "
          "the flush row's log-on/log-off compares with the second.")
    print(f"\n| server | peak RSS (RssAnon+RssFile) | VmHWM |")
    print("|---|---|---|")
    for p in (standby, nbdkit):
        print(f"| {p.name} | {p.peak / 2**20:,.0f} MiB | {p.hwm / 2**20:,.0f} MiB |")
    print(f"\nMedians of {reps} repetitions; time-based rows {runtime} s (+2 s ramp), the sustained rand "
          f"row {long_runtime} s (+2 s ramp); sustained seq row "
          f"{sustained / 2**30:.1f} GiB then one FLUSH; {size_mib} MiB random images; log-off and log-on "
          "disks served by one `standby serve` process, nbdkit by one process, both for every row of a "
          "repetition; servers alternated ABBA; `sync`"
          + (", page cache dropped" if drop[0] else "") + " and the image read once before every run ("
          + ("`cat`" if WARM[0] == "readahead" else "1 MiB reads without read-ahead, --warm 4k") + "). "
          + (f"[log] {'; '.join(log_conf)}. " if log_conf else "")
          + "p99 of the flush row is the FLUSH latency; \"FLUSH µs\" of the last row is the time of "
          "one `qemu-io -c flush` (connection included) right after the writes. CPU: the server "
          "process's user+system time "
          "during the run divided by the GB fio wrote; fio CPU likewise for the client (its user+system "
          "share over the job); machine idle: idle share of all CPUs over the run (/proc/stat).")
    print("Change log after each repetition: " + "; ".join(log_lines))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

main()
PY
