#!/usr/bin/env python3
"""Replication benchmark: standby's replication engine against restic and rsync, same run.

Run it through tools/bench/replication.sh (which builds the binary). Four benchmarks, each
printed as a Markdown table of medians and ratios against the peer measured in the same run,
peers alternated within each round (A B A B ...):

  initial  SIZE_GIB image (alternating 4 MiB random / 4 MiB zero extents) imported as a disk:
           `standby protect` until the VM is Protected, vs `restic backup` of the same image.
  delta    DELTA_GIB image of the same layout, protected with interval 5m; 1% of it rewritten
           by random 4 KiB writes (fio nbd engine); one delta cycle (triggered by setting the
           interval to 1s), vs restic's incremental backup of the same image after the same
           writes. Time and bytes added to the store / repository.
  resync   DELTA_GIB disk that differs from its replica in 1% of its 4 KiB blocks: (a) resync
           after a change-log overflow (log + dirty bitmap), (b) `standby resync VM --full`,
           vs `rsync --ignore-times --inplace --no-whole-file` between two files that differ
           in 1% of their 4 KiB blocks.
  rpo      RPO_GIB disk, fio writing each of RPO_RATES (random 64 KiB) for RPO_SECONDS, policy
           each of RPO_INTERVALS, on each of RPO_STORES (local, garage: a single-node Garage
           on 127.0.0.1, S3 packs); `standby status` sampled every RPO_SAMPLE_SECS; p50 / p95 /
           p99 / max. RPO_BINS="before=PATH,after=PATH" runs each row with every binary in turn.
           Per store, one `standby serve` per binary serves all of that binary's rows (rows in
           sequence, binaries alternated A B / B A, each row starting from a drained replica
           and a `sync`); the row's CPU is the process's CPU during the row, its RSS the peak
           sampled during the row (and the process's peak so far). RPO_REPS repeats the rows.
  import-s3  (not in the default set) Garage import vs `restic backup` of the same
           IMPORT_S3_MIB image to the same Garage bucket, in one run: MB/s, PUTs (counted by
           Garage), bytes stored, for the packs layout (format 5), the one-object-per-chunk
           layout (format 4) and restic. Runs tools/bench/store.sh MODE=garage-restic
           (IMPORT_S3_ROUNDS rounds, order A B C C B A) and relays its table; needs garage.

Environment: STANDBY_BIN (required), SIZE_GIB=8, DELTA_GIB=2, RPO_GIB=4, ROUNDS=3,
ROUNDS_INITIAL=2, DELTAS_PER_ROUND=2, RPO_SECONDS=60, RPO_RATES=50m,200m (RPO_RATE: one rate),
RPO_STORES=local, RPO_INTERVALS=continuous,30s, RPO_SAMPLE_SECS=0.2, RPO_BINS, BENCHES=initial,delta,resync,rpo,
RPO_FOLD_VARIANTS=1 (also run the RPO rows with patch folding pushed out of reach), RPO_REPS=1,
RPO_TRACE=DIR (one JSON file per RPO row: the RPO samples with the gateway's and Garage's CPU, the
row's jobs with their steps, fio's bandwidth and latency per 250 ms and the gateway's log lines),
KEEP=0 (keep the work directory). First argument: work directory (default: a new temp dir).
"""
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
EXTENT = 4 << 20


def env_int(name, default):
    return int(os.environ.get(name, default))


SIZE_GIB = env_int("SIZE_GIB", 8)
DELTA_GIB = env_int("DELTA_GIB", 2)
RPO_GIB = env_int("RPO_GIB", 4)
ROUNDS = env_int("ROUNDS", 3)
ROUNDS_INITIAL = env_int("ROUNDS_INITIAL", 2)
DELTAS_PER_ROUND = env_int("DELTAS_PER_ROUND", 2)
RPO_SECONDS = env_int("RPO_SECONDS", 60)
# RPO_RATE (one rate, as before) or RPO_RATES (a comma list).
RPO_RATES = [x for x in os.environ.get("RPO_RATES", os.environ.get("RPO_RATE", "50m,200m")).split(",") if x]
RPO_RATE = ",".join(RPO_RATES)
RPO_STORES = [x for x in os.environ.get("RPO_STORES", "local").split(",") if x]
RPO_INTERVALS = [x for x in os.environ.get("RPO_INTERVALS", "continuous,30s").split(",") if x]
RPO_SAMPLE_SECS = float(os.environ.get("RPO_SAMPLE_SECS", "0.2"))
RPO_FOLD_VARIANTS = env_int("RPO_FOLD_VARIANTS", 1)
RPO_REPS = env_int("RPO_REPS", 1)
BENCHES = os.environ.get("BENCHES", "initial,delta,resync,rpo").split(",")
KEEP = env_int("KEEP", 0)
RPO_TRACE = os.environ.get("RPO_TRACE", "")
IMPORT_S3_MIB = env_int("IMPORT_S3_MIB", 2048)
IMPORT_S3_ROUNDS = env_int("IMPORT_S3_ROUNDS", 3)
RESTIC_PASSWORD = "bench"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_bytes(path):
    """Sum of file sizes under path (what an object store would hold)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def fmt_int(n):
    return "n/a" if n is None else f"{int(n):,}"


def fmt_s(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def ratio(a, b, nd=1):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{nd}f}x"


def make_image(path, gib):
    """Sparse raw image: alternating 4 MiB random / 4 MiB zero extents."""
    size = gib * GIB
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    log(f"writing {gib} GiB image (half random, half zeros)...")
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size // EXTENT, 2):
            f.seek(i * EXTENT)
            f.write(os.urandom(EXTENT))


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def copy_sparse(src, dst):
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def now_utc_ms_from(stamp):
    """'2026-11-26 08:05:49.123' (UTC) -> epoch seconds."""
    d = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
    return d.replace(tzinfo=datetime.timezone.utc).timestamp()


class Standby:
    """One data directory and, while started, its `standby serve`."""

    def __init__(self, binary, data):
        self.bin, self.data = binary, data
        self.env = dict(os.environ, STANDBY_DATA_DIR=data, STANDBY_LOG="warn")
        self.env.pop("STANDBY_CONFIG", None)
        self.proc = None
        self.port = None
        self.out = data + ".serve.out"
        self.err = data + ".serve.err"

    def run(self, *args, check=True):
        p = subprocess.run([self.bin, *args], env=self.env, capture_output=True, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"standby {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def fresh(self):
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        os.makedirs(self.data)

    def start(self):
        self.port = free_port()
        env = dict(self.env, STANDBY_LOG="info")
        with open(self.out, "w") as o, open(self.err, "a") as e:
            # The API on a free port too: another gateway on this machine may hold the default.
            self.proc = subprocess.Popen([self.bin, "serve", "--listen", f"127.0.0.1:{self.port}",
                                          "--api-listen", f"127.0.0.1:{free_port()}"],
                                         env=env, stdout=o, stderr=e)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"standby serve exited with {self.proc.returncode}: {self.tail()}")
            # Ready once it serves and its API file is there (CLI commands go through the API).
            with open(self.out) as f:
                if "standby: serving" in f.read() and os.path.exists(
                        os.path.join(self.data, "api.local.json")):
                    return
            time.sleep(0.05)
        raise RuntimeError("standby serve did not become ready")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log("standby serve did not stop within 60 s after SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail(self, n=8):
        try:
            with open(self.err) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def uri(self, disk):
        return f"nbd://127.0.0.1:{self.port}/{disk}"

    # -- status and jobs ---------------------------------------------------------------

    def status(self):
        out = self.run("status")
        st = {"raw": out}
        m = re.search(r"^\s+state\s+(.*)$", out, re.M)
        st["state"] = m.group(1).strip() if m else ""
        m = re.search(r"current as of (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)Z", out)
        st["as_of"] = now_utc_ms_from(m.group(1)) if m else None
        m = re.search(r"log backlog ([\d.]+) (B|KiB|MiB|GiB|TiB)", out)
        if m:
            mult = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[m.group(2)]
            st["backlog"] = float(m.group(1)) * mult
        return st

    def wait_state(self, prefix, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.status()
            if s["state"].startswith(prefix):
                return s
            if s["state"].startswith("Critical"):
                raise RuntimeError(f"VM went {s['state']}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for state {prefix}: {self.status()['raw']}")

    def jobs(self, limit=50):
        out = self.run("jobs", "--limit", str(limit))
        jobs = []
        for line in out.splitlines()[1:]:
            m = re.match(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\S+ \S+)\s+([\d.]+) s\s\s(.*)$", line)
            if m:
                jobs.append({"id": int(m.group(1)), "kind": m.group(3), "state": m.group(4),
                             "secs": float(m.group(7)), "detail": m.group(8)})
        return jobs

    def last_job_id(self):
        j = self.jobs(1)
        return j[0]["id"] if j else 0

    def job_ms(self, job_id):
        """Job duration in ms from the state database (the jobs column shows 0.1 s)."""
        try:
            import sqlite3
            c = sqlite3.connect(f"file:{self.data}/replication.db?mode=ro", uri=True, timeout=10)
            row = c.execute("SELECT finished_ms - created_ms FROM jobs WHERE id = ?", (job_id,)).fetchone()
            c.close()
            return row[0] / 1000.0 if row and row[0] is not None else None
        except Exception:
            return None

    def wait_job(self, kind, after_id, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for j in self.jobs(20):
                if j["id"] > after_id and j["kind"] == kind and j["state"] != "running":
                    j["ms_secs"] = self.job_ms(j["id"])
                    j["time"] = j["ms_secs"] if j["ms_secs"] is not None else j["secs"]
                    return j
            time.sleep(0.05)
        raise RuntimeError(f"no finished {kind} job after #{after_id} within {timeout} s")

    def store_bytes(self):
        return file_bytes(os.path.join(self.data, "store"))

    def setup(self, disk, image=None, size=None, interval="5m"):
        self.fresh()
        if image:
            self.run("disk", "import", disk, image)
        else:
            self.run("disk", "create", disk, "--size", size)
        self.run("store", "init")
        self.run("policy", "set", "--interval", interval, "--retention", "24h",
                 "--resync-window", "always", "--bandwidth", "0")

    def protect(self, vm, disk, timeout):
        self.run("protect", vm, "--disks", disk)
        return self.wait_state("Protected", timeout)


def restic(repo, *args):
    env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_REPOSITORY=repo)
    p = subprocess.run(["restic", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"restic {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def restic_backup(repo, path):
    t0 = time.time()
    restic(repo, "backup", "-q", "--compression", "auto", path)
    return time.time() - t0


def fio_writes(uri, n, bs, seed, out):
    subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                    f"--bs={bs}", f"--number_ios={n}", "--norandommap", "--refill_buffers",
                    f"--randseed={seed}", "--iodepth=32", "--output-format=json",
                    f"--output={out}"], check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        w = json.load(f)["jobs"][0]["write"]
    if w["total_ios"] != n:
        raise RuntimeError(f"fio wrote {w['total_ios']} blocks, expected {n}")
    return w["io_bytes"]


def one_percent_writes(gib):
    """1% of a disk's 4 KiB blocks, rounded up (5,243 for 2 GiB)."""
    return -(-gib * GIB // 4096 // 100)


def settle():
    """Flush dirty pages before a timed step, so no peer pays for another's writeback
    (standby's store commit calls syncfs, which flushes the whole file system)."""
    os.sync()


# ------------------------------------------------------------------------------ benchmarks

def bench_initial(bin_, work):
    img = os.path.join(work, "initial.raw")
    make_image(img, SIZE_GIB)
    warm(img)
    size = SIZE_GIB * GIB
    nonzero = size // 2
    sb = Standby(bin_, os.path.join(work, "initial-data"))
    repo = os.path.join(work, "initial-restic")
    res = {"protect": [], "job": [], "restic": [], "sent": None, "stored": None, "rstored": None}
    try:
        for r in range(ROUNDS_INITIAL):
            log(f"initial: round {r + 1}/{ROUNDS_INITIAL}")
            sb.setup("disk0", image=img)
            sb.start()
            last = sb.last_job_id()
            settle()
            t0 = time.time()
            sb.protect("vm0", "disk0", timeout=size / 20e6 + 300)
            t = time.time() - t0
            j = [x for x in sb.jobs(10) if x["kind"] == "initial-replication" and x["id"] > last][0]
            jt = sb.job_ms(j["id"]) or j["secs"]
            m = re.search(r"(\d+) bytes sent for (\d+) bytes of disk", j["detail"])
            res["sent"] = int(m.group(1)) if m else None
            res["stored"] = sb.store_bytes()
            res["protect"].append(t)
            res["job"].append(jt)
            log(f"  standby: protect -> Protected {t:.1f} s (initial-replication job {jt:.1f} s), "
                f"stored {res['stored']:,} bytes")
            sb.stop()
            shutil.rmtree(sb.data, ignore_errors=True)

            shutil.rmtree(repo, ignore_errors=True)
            restic(repo, "init")
            settle()
            t = restic_backup(repo, img)
            res["rstored"] = file_bytes(repo)
            res["restic"].append(t)
            log(f"  restic:  backup {t:.1f} s, repository {res['rstored']:,} bytes")
            shutil.rmtree(repo, ignore_errors=True)
    finally:
        sb.stop()
        shutil.rmtree(sb.data, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
    if not KEEP:
        os.remove(img)

    tp, tj, tr = median(res["protect"]), median(res["job"]), median(res["restic"])
    print(f"### 1. Initial replication ({SIZE_GIB} GiB image, {SIZE_GIB / 2:g} GiB non-zero)\n")
    print(f"| peer | time (s, median of {ROUNDS_INITIAL}) | MB/s of disk size | MB/s of non-zero data "
          "| bytes stored | speed vs restic |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("standby: `protect` → Protected", tp, res["stored"]),
            ("standby: initial-replication job alone", tj, res["stored"]),
            ("restic backup (`--compression auto`)", tr, res["rstored"])]
    for name, t, stored in rows:
        print(f"| {name} | {fmt_s(t, 1)} | {size / t / 1e6:.0f} | {nonzero / t / 1e6:.0f} | "
              f"{fmt_int(stored)} | {ratio(tr, t, 2)} |")
    print()
    print(f"runs (s): protect→Protected {' / '.join(f'{x:.1f}' for x in res['protect'])}; "
          f"initial-replication job {' / '.join(f'{x:.1f}' for x in res['job'])}; "
          f"restic {' / '.join(f'{x:.1f}' for x in res['restic'])}")
    print(f"standby bytes sent (job detail): {fmt_int(res['sent'])}; stored bytes = sum of object "
          "sizes in the store / repository after the run\n")


def bench_delta(bin_, work):
    base = os.path.join(work, "base-delta.raw")
    make_image(base, DELTA_GIB)
    disk_img = os.path.join(work, "delta-disk.raw")
    repo = os.path.join(work, "delta-restic")
    sb = Standby(bin_, os.path.join(work, "delta-data"))
    n = one_percent_writes(DELTA_GIB)
    R = {k: [] for k in ("job", "wall", "sb_bytes", "patch", "r_time", "r_bytes", "r_full", "written")}
    verified = None
    try:
        for r in range(ROUNDS):
            log(f"delta: round {r + 1}/{ROUNDS}")
            copy_sparse(base, disk_img)
            warm(disk_img)
            sb.setup("disk0", image=disk_img, interval="5m")
            sb.start()
            sb.protect("vm0", "disk0", timeout=DELTA_GIB * GIB / 20e6 + 300)
            shutil.rmtree(repo, ignore_errors=True)
            restic(repo, "init")
            R["r_full"].append(restic_backup(repo, disk_img))

            def standby_delta():
                settle()
                s0 = sb.store_bytes()
                last = sb.last_job_id()
                t0 = time.time()
                sb.run("policy", "set", "--interval", "1s")
                j = sb.wait_job("delta-replication", last, timeout=300)
                wall = time.time() - t0
                sb.run("policy", "set", "--interval", "5m")
                if j["state"] != "succeeded":
                    raise RuntimeError(f"delta job {j['id']} {j['state']}: {j['detail']}")
                grown = sb.store_bytes() - s0
                m = re.search(r"patch chain (\d+) bytes", j["detail"])
                R["job"].append(j["time"])
                R["wall"].append(wall)
                R["sb_bytes"].append(grown)
                R["patch"].append(int(m.group(1)) if m else None)
                log(f"  standby: delta job {j['time']:.3f} s (trigger→done {wall:.2f} s), "
                    f"store +{grown:,} bytes")

            def restic_incr():
                settle()
                b0 = file_bytes(repo)
                t = restic_backup(repo, disk_img)
                grown = file_bytes(repo) - b0
                R["r_time"].append(t)
                R["r_bytes"].append(grown)
                log(f"  restic:  incremental {t:.2f} s, repository +{grown:,} bytes")

            for k in range(DELTAS_PER_ROUND):
                written = fio_writes(sb.uri("disk0"), n, "4k", 1000 + 10 * r + k, os.path.join(work, "fio.json"))
                R["written"].append(written)
                time.sleep(0.5)
                order = (standby_delta, restic_incr) if (r + k) % 2 == 0 else (restic_incr, standby_delta)
                for f in order:
                    f()
            if r == ROUNDS - 1:
                verified = verify_latest(sb, "vm0", "disk0", disk_img, work)
            sb.stop()
            shutil.rmtree(sb.data, ignore_errors=True)
            shutil.rmtree(repo, ignore_errors=True)
    finally:
        sb.stop()
        shutil.rmtree(sb.data, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
        if os.path.exists(disk_img):
            os.remove(disk_img)

    job, wall, sbb = median(R["job"]), median(R["wall"]), median(R["sb_bytes"])
    rt, rb, wr = median(R["r_time"]), median(R["r_bytes"]), median(R["written"])
    print(f"### 2. Delta cost ({DELTA_GIB} GiB disk, {n:,} random 4 KiB writes = {wr / 1e6:.1f} MB)\n")
    print(f"| peer | time (s, median of {len(R['job'])}) | bytes added to store / repository | "
          "bytes added / bytes written |")
    print("|---|---:|---:|---:|")
    print(f"| standby delta-replication job | {fmt_s(job, 3)} | {fmt_int(sbb)} | {sbb / wr:.3f} |")
    print(f"| standby, policy change → job done | {fmt_s(wall, 3)} | | |")
    print(f"| restic incremental backup | {fmt_s(rt, 2)} | {fmt_int(rb)} | {rb / wr:.1f} |")
    print()
    print("| ratio | measured | target | |")
    print("|---|---:|---:|---|")
    tr = rt / job
    br = rb / sbb
    ov = sbb / wr
    print(f"| time restic / standby job | {tr:.1f}x | ≥ 50x | {'met' if tr >= 50 else 'missed'} |")
    print(f"| bytes restic / standby | {br:.1f}x | ≥ 20x | {'met' if br >= 20 else 'missed'} |")
    print(f"| standby bytes uploaded / bytes written | {ov:.3f}x | ≤ 1.2x + metadata | "
          f"{'met' if ov <= 1.2 else 'missed'} |")
    print()
    print(f"runs: standby job (s) {' / '.join(f'{x:.3f}' for x in R['job'])}; trigger→done (s) "
          f"{' / '.join(f'{x:.2f}' for x in R['wall'])}; store bytes {' / '.join(fmt_int(x) for x in R['sb_bytes'])}; "
          f"patch bytes (job detail) {' / '.join(fmt_int(x) for x in R['patch'])}")
    print(f"runs: restic incremental (s) {' / '.join(f'{x:.2f}' for x in R['r_time'])}; repository bytes "
          f"{' / '.join(fmt_int(x) for x in R['r_bytes'])}; restic first backup (s) "
          f"{' / '.join(f'{x:.2f}' for x in R['r_full'])}")
    print(f"{ROUNDS} rounds (fresh protection, fresh restic repository) x {DELTAS_PER_ROUND} rounds of writes; "
          f"which peer goes first alternates; `sync` before each timed step; the last newest point "
          f"exported and compared with the disk: {verified}\n")


def verify_latest(sb, vm, disk, image, work):
    out = sb.run("points", "list", vm)
    ids = re.findall(r"^\S+\s+(\d{8}T\S+)", out, re.M)
    if not ids:
        return "no point"
    exp = os.path.join(work, "export.raw")
    try:
        sb.run("store", "export", f"{vm}/{ids[-1]}", exp, "--disk", disk)
        same = subprocess.run(["cmp", "-s", exp, image]).returncode == 0
        return "identical" if same else "DIFFERENT"
    finally:
        if os.path.exists(exp):
            os.remove(exp)


def excluded_window():
    """A one-minute resync window twelve hours away (local time)."""
    t = time.localtime(time.time() + 12 * 3600)
    a = t.tm_hour * 60 + t.tm_min
    b = (a + 1) % (24 * 60)
    return f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}"


OVERFLOW_TOML = '[log]\nsegment_size = "64K"\nmin_free = "1000T"\nmin_free_percent = 100\n'


def rsync_round(src, dst, size, seed):
    """Rewrite 1% of src's 4 KiB blocks, then rsync src onto dst (equal before)."""
    rng = random.Random(seed)
    n = size // 4096 // 100
    with open(src, "r+b") as f:
        for _ in range(n):
            f.seek(rng.randrange(size // 4096) * 4096)
            f.write(os.urandom(4096))
    settle()
    t0 = time.time()
    p = subprocess.run(["rsync", "--ignore-times", "--inplace", "--no-whole-file", "--stats", src, dst],
                       capture_output=True, text=True, check=True)
    t = time.time() - t0
    lit = re.search(r"Literal data: ([\d,]+)", p.stdout)
    sent = re.search(r"Total bytes sent: ([\d,]+)", p.stdout)
    return t, int(lit.group(1).replace(",", "")), int(sent.group(1).replace(",", ""))


def bench_resync(bin_, work):
    base = os.path.join(work, "base-delta.raw")
    make_image(base, DELTA_GIB)
    size = DELTA_GIB * GIB
    disk_img = os.path.join(work, "resync-disk.raw")
    src, dst = os.path.join(work, "rsync-src.raw"), os.path.join(work, "rsync-dst.raw")
    sb = Standby(bin_, os.path.join(work, "resync-data"))
    n = one_percent_writes(DELTA_GIB)
    A, B, RS = [], [], []
    verified = None
    toml = os.path.join(sb.data, "standby.toml")
    try:
        for f in (disk_img, src, dst):
            copy_sparse(base, f)
            warm(f)
        sb.setup("disk0", image=disk_img, interval="5m")
        sb.start()
        sb.protect("vm0", "disk0", timeout=size / 20e6 + 300)
        sb.stop()
        for r in range(ROUNDS):
            log(f"resync: round {r + 1}/{ROUNDS}")
            # (a) log overflow: writes land in the dirty bitmap; the resync waits outside its
            # window until the writes are done, then the window opens and the engine resyncs.
            with open(toml, "w") as f:
                f.write(OVERFLOW_TOML)
            sb.run("policy", "set", "--resync-window", excluded_window())
            sb.start()
            fio_writes(sb.uri("disk0"), n, "4k", 2000 + r, os.path.join(work, "fio.json"))
            time.sleep(0.5)
            st = sb.status()
            if not st["state"].startswith("ResyncRequired"):
                log(f"  note: after the overflow writes the VM is {st['state']!r}")
            A.append(resync_once(sb, lambda: sb.run("policy", "set", "--resync-window", "always"), "(a)"))
            sb.stop()
            os.remove(toml)
            sb.start()

            RS.append(rsync_round(src, dst, size, 3000 + 2 * r))
            log(f"  rsync: {RS[-1][0]:.2f} s, literal data {RS[-1][1]:,} bytes")

            # (b) full resync of a disk whose replica misses 1% of its blocks (normal log).
            fio_writes(sb.uri("disk0"), n, "4k", 4000 + r, os.path.join(work, "fio.json"))
            time.sleep(0.5)
            B.append(resync_once(sb, lambda: sb.run("resync", "vm0", "--full"), "(b)"))

            RS.append(rsync_round(src, dst, size, 3001 + 2 * r))
            log(f"  rsync: {RS[-1][0]:.2f} s, literal data {RS[-1][1]:,} bytes")
            if r == ROUNDS - 1:
                verified = verify_latest(sb, "vm0", "disk0", disk_img, work)
            sb.stop()
    finally:
        sb.stop()
        shutil.rmtree(sb.data, ignore_errors=True)
        for f in (disk_img, src, dst):
            if os.path.exists(f):
                os.remove(f)

    ta, tb, tr = median([x["time"] for x in A]), median([x["time"] for x in B]), median([x[0] for x in RS])
    print(f"### 3. Resync of a {DELTA_GIB} GiB disk differing from its replica in 1% of its 4 KiB blocks\n")
    print(f"| peer | time (s, median) | bytes read | bytes sent | chunks compared | speed vs rsync | target | |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, xs, t, target in (("standby resync after log overflow (log + dirty bitmap)", A, ta, 5),
                                ("standby `resync --full`", B, tb, 2)):
        sp = tr / t
        print(f"| {name} | {fmt_s(t, 2)} | {fmt_int(median([x['read'] for x in xs]))} | "
              f"{fmt_int(median([x['sent'] for x in xs]))} | {xs[-1]['compare']} | {sp:.2f}x | ≥ {target}x | "
              f"{'met' if sp >= target else 'missed'} |")
    print(f"| rsync `--ignore-times --inplace --no-whole-file` | {fmt_s(tr, 2)} | 2 × {fmt_int(size)} | "
          f"{fmt_int(median([x[2] for x in RS]))} (literal data {fmt_int(median([x[1] for x in RS]))}) | | 1.00x | | |")
    print()
    runs = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
    print(f"runs (s): (a) {runs([x['time'] for x in A])}; (b) {runs([x['time'] for x in B])}; "
          f"rsync {runs([x[0] for x in RS])}")
    print(f"standby store growth per resync: (a) {' / '.join(fmt_int(x['grown']) for x in A)}; "
          f"(b) {' / '.join(fmt_int(x['grown']) for x in B)}; replica of the last round exported and "
          f"compared with the disk: {verified}\n")


def resync_once(sb, trigger, label):
    settle()
    s0 = sb.store_bytes()
    last = sb.last_job_id()
    trigger()
    j = sb.wait_job("resync", last, timeout=600)
    if j["state"] != "succeeded":
        raise RuntimeError(f"resync job {j['id']} {j['state']}: {j['detail']}")
    sb.wait_state("Protected", 60)
    m = re.search(r"resync read (\d+) bytes, sent (\d+) bytes", j["detail"])
    show = sb.run("job", "show", str(j["id"]))
    c = re.search(r"compare \S+\s+\S+\s+[\d.]+ s\s+(\d+|all \d+)(?: of (\d+))? chunks", show)
    compare = "?"
    if c:
        compare = f"{c.group(1)} of {c.group(2)}" if c.group(2) else c.group(1)
    res = {"time": j["time"], "read": int(m.group(1)), "sent": int(m.group(2)),
           "grown": sb.store_bytes() - s0, "compare": compare}
    log(f"  standby {label}: resync job {res['time']:.2f} s, read {res['read']:,}, sent {res['sent']:,}, "
        f"compared {compare}")
    return res


def start_garage(work):
    """A single-node Garage on 127.0.0.1 with one bucket `bench`; returns (process, endpoint,
    environment with its keys)."""
    garage = shutil.which("garage") or os.path.expanduser("~/.cargo/bin/garage")
    if not os.path.exists(garage):
        sys.exit("RPO_STORES=garage needs garage (cargo install garage --version 2.5.0 --locked)")
    gdir = os.path.join(work, "garage")
    shutil.rmtree(gdir, ignore_errors=True)
    os.makedirs(gdir)
    rpc, s3, adm = free_port(), free_port(), free_port()
    with open(os.path.join(gdir, "garage.toml"), "w") as f:
        f.write(f"""metadata_dir = "{gdir}/meta"
data_dir = "{gdir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{os.urandom(32).hex()}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{adm}"
""")
    keys = {"AWS_ACCESS_KEY_ID": "GK" + os.urandom(12).hex(), "AWS_SECRET_ACCESS_KEY": os.urandom(32).hex(),
            "AWS_REGION": "garage"}
    env = dict(os.environ, GARAGE_DEFAULT_ACCESS_KEY=keys["AWS_ACCESS_KEY_ID"],
               GARAGE_DEFAULT_SECRET_KEY=keys["AWS_SECRET_ACCESS_KEY"], GARAGE_DEFAULT_BUCKET="bench",
               RUST_LOG="garage=warn")
    with open(os.path.join(gdir, "log"), "w") as lg:
        proc = subprocess.Popen([garage, "-c", os.path.join(gdir, "garage.toml"), "server", "--single-node",
                                 "--default-bucket"], env=env, stdout=lg, stderr=lg)
    import urllib.request
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{adm}/health", timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    time.sleep(1)
    return proc, f"http://127.0.0.1:{s3}", keys


def rpo_list(name, default):
    return [x for x in os.environ.get(name, default).split(",") if x]


def bench_rpo(bin_, work):
    """RPO rows. Per store, one `standby serve` per binary serves every row of that binary (a
    real gateway serves mixed work: each row inherits the disk, store, chains and memory the
    rows before it left); binaries alternate A B / B A from one combination to the next."""
    bins = [("this", bin_)]
    if os.environ.get("RPO_BINS"):
        bins = []
        for i, item in enumerate(rpo_list("RPO_BINS", "")):
            label, _, path = item.rpartition("=")
            copy = os.path.join(work, f"standby-rpo-{i}")
            shutil.copy2(path, copy)
            bins.append((label or f"bin{i}", copy))
    folds = [None] + (["1T"] if RPO_FOLD_VARIANTS else [])
    combos = [(rate, interval, fold) for _ in range(RPO_REPS) for rate in RPO_RATES
              for interval in RPO_INTERVALS for fold in folds]
    rows = []
    for store in RPO_STORES:
        # One Garage per store section, shared by the gateways (each its own prefix).
        garage = start_garage(work) if store == "garage" else None
        gateways = []
        try:
            for i, (label, b) in enumerate(bins):
                gateways.append(RpoGateway(label, b, work, store, garage, i))
            for k, (rate, interval, fold) in enumerate(combos):
                for gw in (gateways if k % 2 == 0 else list(reversed(gateways))):
                    row = gw.row(rate, interval, fold)
                    row["seq"] = k + 1
                    rows.append(row)
        finally:
            for gw in gateways:
                gw.close()
            if garage:
                garage[0].terminate()
                garage[0].wait()
                shutil.rmtree(os.path.join(work, "garage"), ignore_errors=True)

    print(f"### 4. RPO under sustained writes ({RPO_GIB} GiB disk, fio random 64 KiB writes at each "
          f"rate for {RPO_SECONDS} s, `standby status` sampled every {RPO_SAMPLE_SECS} s; one gateway "
          f"process per binary and store serves all of its rows, in the order of the first column)\n")
    print("| # | binary | store | rate | interval | fold patches beyond | RPO p50 (s) | p95 (s) | p99 (s) | max (s) "
          "| samples | delta jobs ok / failed | median delta job (s) | max log backlog | state at end "
          "| fio MB/s | gateway RSS peak in row (process peak) | gateway CPU in row (s) | target (p99) |")
    print("|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        target = ""
        nominal = rate_mbps(r["rate"])
        if r["interval"] == "continuous" and r["fold"].endswith("(default)") and nominal is not None:
            # Issue targets: local p99 ≤ 1 s at 50 MB/s and ≤ 2 s at 200 MB/s; Garage ≤ 2 s at 50 MB/s.
            limit = None
            if r["store"] == "local":
                limit = 1.0 if nominal <= 50 else 2.0 if nominal <= 200 else None
            elif nominal <= 50:
                limit = 2.0
            if limit is not None:
                met = r["p99"] is not None and r["p99"] <= limit
                target = f"≤ {limit:.0f} s: {'met' if met else 'missed'}"
        print(f"| {r['seq']} | {r['bin']} | {r['store']} | {r['rate']} | {r['interval']} | {r['fold']} | {fmt_s(r['med'])} | "
              f"{fmt_s(r['p95'])} | {fmt_s(r['p99'])} | {fmt_s(r['max'])} | {r['n']} | {r['ok']} / {r['failed']} | "
              f"{fmt_s(r['job_med'], 1)} | {r['backlog'] / 1e6:,.0f} MB | {r['state']} | {r['mbps']:.1f} | "
              f"{r['rss'] / 1e6:,.0f} MB ({r['hwm'] / 1e6:,.0f} MB) | {fmt_s(r['cpu'], 1)} | {target} |")
    print()
    for r in rows:
        if r["err"]:
            print(f"- {r['bin']}, {r['store']}, {r['rate']}, {r['interval']}, fold {r['fold']}: first failed "
                  f"delta job: `{r['err']}`; states seen: {' → '.join(r['states'])}")
        if r["folds"] or r["rebases"] or r["consolidations"]:
            print(f"- {r['bin']}, {r['store']}, {r['rate']}, {r['interval']}, fold {r['fold']}: "
                  f"{r['folds']} inline folds, {r['consolidations']} background consolidations, "
                  f"{r['rebases']} rebases onto them")
    print("RPO sample = time right after `standby status` returned − its \"replica current as of\" time. "
          "Targets: continuous, p99 ≤ 1 s at 50 MB/s and ≤ 2 s at 200 MB/s on the local store, "
          "≤ 2 s at 50 MB/s on Garage.\n")


def rate_mbps(rate):
    """fio's --rate ("50m": MiB/s as fio counts) in the issue's MB/s figures, roughly."""
    m = re.fullmatch(r"(\d+)([kmg]?)", rate.lower())
    if not m:
        return None
    return int(m.group(1)) * {"": 1e-6, "k": 1e-3, "m": 1, "g": 1e3}[m.group(2)]


def proc_usage(pid):
    """(resident bytes now, peak resident bytes, user+system CPU seconds) of a live process."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields after the command: state is 3rd overall, utime/stime are the 14th/15th.
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, hwm, cpu


class RpoGateway:
    """One `standby serve` (one binary, one store) protecting one VM with one RPO_GIB disk; it
    serves every RPO row of its binary on that store."""

    def __init__(self, label, bin_, work, store, garage, n):
        self.label, self.store = label, store
        self.garage_pid = garage[0].pid if garage else None
        self.sb = Standby(bin_, os.path.join(work, f"rpo-data-{store}-{n}"))
        sb = self.sb
        if garage:
            sb.env.update(garage[2])
        log(f"rpo: gateway {label} ({os.path.basename(bin_)}), store {store}")
        sb.fresh()
        sb.run("disk", "create", "disk0", "--size", f"{RPO_GIB}G")
        if store == "garage":
            sb.run("store", "init", "--s3-endpoint", garage[1], "--s3-bucket", "bench", "--s3-region", "garage",
                   "--s3-prefix", f"rpo-{n}-{os.urandom(4).hex()}", "--path-style")
        else:
            sb.run("store", "init")
        sb.run("policy", "set", "--interval", "5m", "--retention", "24h",
               "--resync-window", "always", "--bandwidth", "0")
        sb.start()
        sb.protect("vm0", "disk0", timeout=RPO_GIB * GIB / 20e6 + 300)

    def settle(self, timeout=180):
        """Until the replica has caught up (Protected, log backlog under 1 MiB, RPO under 2 s), then
        `sync`: a row starts from a drained gateway, not from the last row's backlog."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.sb.status()
            if (st["state"].startswith("Protected") and st.get("backlog", 0) < (1 << 20)
                    and st["as_of"] is not None and time.time() - st["as_of"] < 2):
                break
            time.sleep(0.5)
        else:
            log(f"  {self.label}: replica not caught up after {timeout} s; the row starts anyway")
        subprocess.run(["sync"], check=False)
        time.sleep(1.0)

    def row(self, rate, interval, fold):
        sb = self.sb
        log(f"rpo: {self.label}, store {self.store}, rate {rate}, interval {interval}, "
            f"fold {'default' if fold is None else fold}")
        sb.run("policy", "set", "--interval", interval, "--fold-patch-bytes", fold or "256M")
        self.settle()
        last = sb.last_job_id()
        log_from = os.path.getsize(sb.err) if os.path.exists(sb.err) else 0
        _, _, cpu0 = proc_usage(sb.proc.pid)
        out = os.path.join(os.path.dirname(sb.data), "fio-rpo.json")
        bw_log = os.path.join(os.path.dirname(sb.data), "fio-rpo")
        fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={sb.uri('disk0')}",
                                "--rw=randwrite", "--bs=64k", "--iodepth=4", f"--rate={rate}",
                                "--time_based", f"--runtime={RPO_SECONDS}", "--norandommap",
                                "--refill_buffers", "--output-format=json", f"--output={out}"]
                               + ([f"--write_bw_log={bw_log}", f"--write_lat_log={bw_log}",
                                   "--log_avg_msec=250"] if RPO_TRACE else []),
                               stdout=subprocess.DEVNULL)
        samples, states, backlog, rss_peak = [], {}, 0.0, 0
        trace, t_start = [], time.time()
        nxt = time.time()
        while fio.poll() is None:
            st = sb.status()
            now = time.time()  # after the call: errs on the high side
            if st["as_of"] is not None:
                samples.append(now - st["as_of"])
            if RPO_TRACE:
                others = {"garage": self.garage_pid} if self.garage_pid else {}
                cpu = {k: round(proc_usage(p)[2], 2) for k, p in others.items()}
                cpu["gateway"] = round(proc_usage(sb.proc.pid)[2], 2)
                trace.append((round(now - t_start, 3), round(now - st["as_of"], 3) if st["as_of"] else None,
                              st.get("backlog", 0), st["state"], cpu, os.getloadavg()[0]))
            key = st["state"].split(" (")[0]
            states.setdefault(key, now)
            backlog = max(backlog, st.get("backlog", 0))
            rss_peak = max(rss_peak, proc_usage(sb.proc.pid)[0])
            nxt += RPO_SAMPLE_SECS
            time.sleep(max(0, nxt - time.time()))
        with open(out) as f:
            w = json.load(f)["jobs"][0]["write"]
        jobs = [j for j in sb.jobs(5000) if j["id"] > last and j["kind"] == "delta-replication"]
        ok = [j for j in jobs if j["state"] == "succeeded"]
        bad = [j for j in jobs if j["state"] == "failed"]
        final = sb.status()
        rss, hwm, cpu1 = proc_usage(sb.proc.pid)
        with open(sb.err, errors="replace") as f:
            f.seek(log_from)
            serve_log = f.read()
        row = {"store": self.store, "rate": rate, "interval": interval, "fold": fold or "256 MiB (default)",
               "n": len(samples), "med": median(samples), "p95": pct(samples, 95), "p99": pct(samples, 99),
               "max": max(samples) if samples else None,
               "ok": len(ok), "failed": len(bad), "job_med": median([j["secs"] for j in ok]),
               "state": final["state"].split(" (")[0], "mbps": w["bw_bytes"] / 1e6,
               "backlog": backlog, "err": bad[0]["detail"] if bad else "",
               "states": sorted(states, key=states.get),
               "folds": serve_log.count("folded inline"),
               "consolidations": serve_log.count("consolidated patches into chunks"),
               "rss": max(rss_peak, rss), "hwm": hwm, "cpu": cpu1 - cpu0, "bin": self.label,
               "rebases": serve_log.count("rebased onto a background consolidation")}
        if RPO_TRACE:
            fio_log = {}
            for kind in ("bw", "clat"):
                path = f"{bw_log}_{kind}.1.log"
                if os.path.exists(path):
                    with open(path) as f:
                        fio_log[kind] = [[int(x) for x in line.split(",")[:2]] for line in f if line.strip()]
                    os.remove(path)
            for extra in ("lat", "slat"):
                path = f"{bw_log}_{extra}.1.log"
                if os.path.exists(path):
                    os.remove(path)
            self.dump_trace(rate, t_start, trace, last, serve_log, fio_log)
        log(f"  RPO p50 {fmt_s(row['med'])} s, p95 {fmt_s(row['p95'])} s, p99 {fmt_s(row['p99'])} s, "
            f"max {fmt_s(row['max'])} s; deltas ok {row['ok']} failed {row['failed']}; state {row['state']}; "
            f"fio {row['mbps']:.1f} MB/s; {row['folds']} inline folds, {row['consolidations']} consolidations, "
            f"{row['rebases']} rebases; gateway RSS peak {row['rss'] / 1e6:,.0f} MB "
            f"(process {hwm / 1e6:,.0f} MB), CPU {row['cpu']:.1f} s")
        if row["err"]:
            log(f"  first failed delta: {row['err']}")
        return row

    def dump_trace(self, rate, t_start, trace, last_job, serve_log, fio_log):
        """RPO_TRACE=DIR: one JSON file per row with the RPO samples (seconds since the row
        started, RPO, log backlog, state, CPU seconds so far of the gateway and of Garage,
        the machine's load average), every job of the row with its steps (times in seconds
        since the row started), fio's bandwidth (KiB/s) and completion latency (ns) per 250 ms
        (first column: ms since fio started) and the gateway's log lines of the row."""
        import sqlite3
        os.makedirs(RPO_TRACE, exist_ok=True)
        c = sqlite3.connect(f"file:{self.sb.data}/replication.db?mode=ro", uri=True, timeout=10)
        rel = lambda ms: None if ms is None else round(ms / 1000.0 - t_start, 3)
        jobs = []
        for (jid, kind, state, created, finished, detail) in c.execute(
                "SELECT id, kind, state, created_ms, finished_ms, detail FROM jobs WHERE id > ? ORDER BY id",
                (last_job,)):
            steps = [{"name": n, "start": rel(a), "end": rel(b), "detail": d} for (n, a, b, d) in c.execute(
                "SELECT name, started_ms, finished_ms, detail FROM job_steps WHERE job = ? ORDER BY seq", (jid,))]
            jobs.append({"id": jid, "kind": kind, "state": state, "start": rel(created), "end": rel(finished),
                         "detail": detail, "steps": steps})
        c.close()
        name = f"{self.store}-{self.label}-{rate}-{int(t_start)}.json"
        with open(os.path.join(RPO_TRACE, name), "w") as f:
            json.dump({"samples": trace, "jobs": jobs, "fio": fio_log, "log": serve_log.splitlines()}, f,
                      indent=1)
        log(f"  trace written to {os.path.join(RPO_TRACE, name)}")

    def close(self):
        sb = self.sb
        sb.stop()
        for f in (sb.err, sb.out):
            if os.path.exists(f):
                os.remove(f)
        shutil.rmtree(sb.data, ignore_errors=True)


def bench_import_s3(_bin, work):
    """Garage import vs restic backup, same image and bucket: tools/bench/store.sh's
    MODE=garage-restic (one implementation of that measurement), its table relayed."""
    print(f"### Garage import vs restic backup ({IMPORT_S3_MIB} MiB image, half random, "
          f"same Garage bucket, one run)\n")
    sys.stdout.flush()
    d = os.path.join(work, "import-s3")
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ, MODE="garage-restic", SIZE_MIB=str(IMPORT_S3_MIB),
               ROUNDS=str(IMPORT_S3_ROUNDS))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "store.sh")
    try:
        out = subprocess.run(["bash", script, d], env=env, stdout=subprocess.PIPE, text=True,
                             check=True).stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(out.strip() + "\n")


def main():
    binary = os.environ.get("STANDBY_BIN")
    if not binary:
        sys.exit("STANDBY_BIN is required (tools/bench/replication.sh sets it)")
    created = len(sys.argv) < 2
    work = tempfile.mkdtemp(prefix="standby-repl-bench-") if created else sys.argv[1]
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free
    # Peaks: the initial image's data plus its replica; for the RPO rows, per store section
    # and binary, its disk plus everything its rows write (kept: retention outlives the run).
    rpo_need = 0
    if "rpo" in BENCHES:
        per_bin = RPO_GIB * GIB + sum((rate_mbps(r) or 0) * 1e6 * RPO_SECONDS for r in RPO_RATES) * RPO_REPS
        rpo_need = per_bin * len(rpo_list("RPO_BINS", "this"))
    need = max((max(SIZE_GIB * 1.25 if "initial" in BENCHES else 0, DELTA_GIB * 3) + 4) * GIB,
               rpo_need + 4 * GIB)
    if free < need:
        sys.exit(f"only {free / GIB:.1f} GiB free in the work directory, about {need / GIB:.0f} GiB "
                 f"needed: lower SIZE_GIB, RPO_GIB, RPO_REPS or the rates")
    # A private copy, so a concurrent rebuild cannot swap the binary in the middle of the run.
    bin_ = os.path.join(work, "standby")
    shutil.copy2(binary, bin_)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    origin = os.environ.get("BENCH_BIN_ORIGIN", "prebuilt")
    source = (f"built from the working tree at {rev}" if origin == "built"
              else f"prebuilt binary (STANDBY_BIN); working tree at {rev}")
    params = (f"SIZE_GIB={SIZE_GIB} DELTA_GIB={DELTA_GIB} RPO_GIB={RPO_GIB} ROUNDS={ROUNDS} "
              f"ROUNDS_INITIAL={ROUNDS_INITIAL} DELTAS_PER_ROUND={DELTAS_PER_ROUND} RPO_SECONDS={RPO_SECONDS} RPO_RATES={RPO_RATE} "
              f"RPO_STORES={','.join(RPO_STORES)} RPO_INTERVALS={','.join(RPO_INTERVALS)} "
              f"RPO_FOLD_VARIANTS={RPO_FOLD_VARIANTS} BENCHES={','.join(BENCHES)}")
    print(f"`{os.environ.get('BENCH_COMMAND', 'tools/bench/replication.sh')}`\n")
    print(f"parameters: {params}; standby: {source}; {os.cpu_count()} cores; "
          f"restic {restic_version()}; {fio_version()}; rsync {rsync_version()}\n")
    sys.stdout.flush()
    t0 = time.time()
    try:
        for b in BENCHES:
            {"initial": bench_initial, "delta": bench_delta, "resync": bench_resync, "rpo": bench_rpo,
             "import-s3": bench_import_s3}[b](bin_, work)
            sys.stdout.flush()
    finally:
        if created and not KEEP:
            shutil.rmtree(work, ignore_errors=True)
        elif not KEEP:
            for f in ("standby", "initial.raw", "base-delta.raw", "fio.json", "fio-rpo.json"):
                if os.path.exists(os.path.join(work, f)):
                    os.remove(os.path.join(work, f))
    print(f"total run time {time.time() - t0:.0f} s; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def restic_version():
    return subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split()[1]


def fio_version():
    return subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()


def rsync_version():
    return subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split()[2]


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
