#!/usr/bin/env python3
"""Failover benchmark: recovery time and replica read speed, against restic and nbdkit, same run.

Run it through tools/bench/failover.sh (which finds or builds the binary). Two benchmarks, each
printed as a Markdown table of medians and ratios against peers measured in the same run, peers
alternated within each round (A B A B ..., order reversed every other round):

  rto   For each size in SIZES_GIB: a sparse disk (`standby disk create boot --size NG`) holding
        only the 64 MiB boot image of tests/bootimg (written through NBD with `qemu-img convert
        -n`), protected in a local store. Measured:
          (a) `standby failover test vm --no-launch`, then `qemu-io -r -c 'read 0 4k'` on the
              test export: wall time from the command's start to the read's completion;
          (b) `standby failover test vm` launching qemu (TCG) on the export: wall time from the
              command's start to `STANDBY-MARKER` in the serial file;
        each followed by `standby failover cleanup vm`. Peer: `restic restore` of the same
        disk image (repository on the same local disk) into a file, then qemu booted from that
        file: restore + boot to the marker. Floor: qemu booted from the 64 MiB boot image file.
  read  A READ_GIB disk whose first DATA_GIB hold random data (rest zeros), protected in a local
        store and (another data directory) in a single-node Garage S3 server on 127.0.0.1.
        `standby attach vm/disk0@latest` (read-only), `nbdcopy nbd://ADDR/EXPORT null:`, detach
        (every run starts with an empty chunk cache), against the live disk export of the same
        gateway and `nbdkit file` serving the raw image. Also with `nbdcopy --no-extents`
        (zeros read too instead of skipped by block status).

The OS page cache is dropped before every measured run when that is possible (root):
DROP_CACHES=auto|0|1.

Environment: STANDBY_BIN (required), SIZES_GIB=2,20, ROUNDS=3, READ_GIB=2, DATA_GIB=1,
BENCHES=rto,read, NO_EXTENTS=1, DROP_CACHES=auto, RESTIC_HEADROOM_GIB=8 (restic 0.14 has no
sparse restore and writes every byte of the disk: its row is skipped unless the work directory has the
disk size plus this much free), BOOT_TIMEOUT=120, KEEP=0. First argument: work directory
(default: a new temp dir).
"""
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

GIB = 1 << 30
MIB = 1 << 20


def env_int(name, default):
    return int(os.environ.get(name, default))


SIZES_GIB = [int(x) for x in os.environ.get("SIZES_GIB", "2,20").split(",") if x]
ROUNDS = env_int("ROUNDS", 3)
READ_GIB = env_int("READ_GIB", 2)
DATA_GIB = env_int("DATA_GIB", 1)
BENCHES = os.environ.get("BENCHES", "rto,read").split(",")
NO_EXTENTS = env_int("NO_EXTENTS", 1)
RESTIC_HEADROOM_GIB = env_int("RESTIC_HEADROOM_GIB", 8)
BOOT_TIMEOUT = env_int("BOOT_TIMEOUT", 120)
KEEP = env_int("KEEP", 0)
DROP = os.environ.get("DROP_CACHES", "auto")
RESTIC_PASSWORD = "bench"
MARKER = "standby-bench-failover"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBLEMS = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def problem(msg):
    log(f"  PROBLEM: {msg}")
    PROBLEMS.append(msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_s(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def runs(xs, nd=2):
    return " / ".join("err" if x is None else f"{x:.{nd}f}" for x in xs)


def ratio(a, b, nd=1):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{nd}f}x"


def can_drop():
    if DROP == "0":
        return False
    ok = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    if DROP == "1" and not ok:
        sys.exit("DROP_CACHES=1 needs root (writes /proc/sys/vm/drop_caches)")
    return ok


DROPPING = False


def drop_caches():
    if DROPPING:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def run(*args, env=None, check=True):
    p = subprocess.run(list(args), env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p.stdout


def wait_port(port, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop_proc(proc, timeout=60):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} did not stop within {timeout} s after SIGTERM; killing it")
            proc.kill()
            proc.wait()


def qemu_cmd(drive, serial):
    """The boot test's qemu command line (TCG, serial console to a file)."""
    return ("qemu-system-x86_64 -machine graphics=off -boot reboot-timeout=0 -no-reboot -m 256 "
            f"-display none -nodefaults -serial file:{serial} -drive file={drive},format=raw,if=virtio")


def wait_marker(serial, t0, timeout, alive=None):
    """Seconds from t0 until the serial file holds the marker line."""
    needle = f"STANDBY-MARKER: {MARKER}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(serial, "rb") as f:
                data = f.read()
            if needle in data:
                return time.monotonic() - t0
            if b"STANDBY-ERROR" in data:
                raise RuntimeError(f"guest error: {data.decode(errors='replace')[-300:]}")
        except FileNotFoundError:
            pass
        if alive is not None and not alive():
            break
        time.sleep(0.02)
    try:
        with open(serial, "rb") as f:
            tail = f.read().decode(errors="replace")[-400:]
    except FileNotFoundError:
        tail = "(no serial file)"
    raise RuntimeError(f"no marker within {timeout} s; serial console ends with: {tail!r}")


class Standby:
    """One data directory and, while started, its `standby serve`."""

    def __init__(self, binary, data, extra_env=None):
        self.bin, self.data = binary, data
        self.env = dict(os.environ, STANDBY_DATA_DIR=data, STANDBY_LOG="warn", **(extra_env or {}))
        self.env.pop("STANDBY_CONFIG", None)
        self.proc = None
        self.port = None
        self.out = data + ".serve.out"
        self.err = data + ".serve.err"

    def run(self, *args, check=True):
        p = subprocess.run([self.bin, *args], env=self.env, capture_output=True, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"standby {' '.join(args)} failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()}")
        return p.stdout

    def fresh(self):
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        os.makedirs(self.data)

    def start(self):
        self.port = free_port()
        env = dict(self.env, STANDBY_LOG="info")
        with open(self.out, "w") as o, open(self.err, "a") as e:
            self.proc = subprocess.Popen([self.bin, "serve", "--listen", f"127.0.0.1:{self.port}"],
                                         env=env, stdout=o, stderr=e)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"standby serve exited with {self.proc.returncode}: {self.tail()}")
            with open(self.out) as f:
                if "standby: serving" in f.read():
                    return
            time.sleep(0.05)
        raise RuntimeError("standby serve did not become ready")

    def stop(self):
        stop_proc(self.proc)
        self.proc = None

    def tail(self, n=8):
        try:
            with open(self.err) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def uri(self, export):
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def state(self):
        m = re.search(r"^\s+state\s+(.*)$", self.run("status"), re.M)
        return m.group(1).strip() if m else ""

    def wait_state(self, prefix, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state()
            if s.startswith(prefix):
                return
            if s.startswith("Critical"):
                raise RuntimeError(f"VM went {s}: {self.run('status')}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for state {prefix}: {self.run('status')}")

    def protect(self, vm, disk, timeout):
        t0 = time.monotonic()
        self.run("protect", vm, "--disks", disk)
        self.wait_state("Protected", timeout)
        return time.monotonic() - t0


class Garage:
    """A single-node Garage S3 server on 127.0.0.1 (as tools/bench/store.sh starts it)."""

    def __init__(self, work):
        self.dir = os.path.join(work, "garage")
        self.proc = None
        self.bin = shutil.which("garage") or os.path.expanduser("~/.cargo/bin/garage")
        self.access_key = "GK" + secrets.token_hex(12)
        self.secret_key = secrets.token_hex(32)
        self.bucket = "bench"

    def start(self):
        if not os.access(self.bin, os.X_OK):
            raise RuntimeError("garage is required (cargo install garage --version 2.5.0 --locked)")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        rpc, self.s3, adm = free_port(), free_port(), free_port()
        with open(os.path.join(self.dir, "garage.toml"), "w") as f:
            f.write(f'metadata_dir = "{self.dir}/meta"\ndata_dir = "{self.dir}/data"\n'
                    f'db_engine = "sqlite"\nreplication_factor = 1\n'
                    f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
                    f'rpc_secret = "{secrets.token_hex(32)}"\n[s3_api]\ns3_region = "garage"\n'
                    f'api_bind_addr = "127.0.0.1:{self.s3}"\nroot_domain = ".s3.garage.localhost"\n'
                    f'[admin]\napi_bind_addr = "127.0.0.1:{adm}"\n')
        env = dict(os.environ, GARAGE_DEFAULT_ACCESS_KEY=self.access_key,
                   GARAGE_DEFAULT_SECRET_KEY=self.secret_key, GARAGE_DEFAULT_BUCKET=self.bucket,
                   RUST_LOG="garage=warn")
        with open(os.path.join(self.dir, "log"), "w") as lg:
            self.proc = subprocess.Popen([self.bin, "-c", os.path.join(self.dir, "garage.toml"), "server",
                                          "--single-node", "--default-bucket"],
                                         env=env, stdout=lg, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"garage exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{adm}/health", timeout=1).read()
                break
            except Exception:
                time.sleep(0.1)
        time.sleep(1)

    def env(self):
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "garage"}

    def stop(self):
        stop_proc(self.proc)
        self.proc = None

    def version(self):
        return run(self.bin, "--version", check=False).split("[")[0].strip()


def restic(repo, *args):
    env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_REPOSITORY=repo)
    return run("restic", *args, env=env)


def boot_file(drive, serial):
    """qemu booted from a local raw file; seconds to the marker (the VM is then stopped)."""
    if os.path.exists(serial):
        os.remove(serial)
    t0 = time.monotonic()
    p = subprocess.Popen(["sh", "-c", "exec " + qemu_cmd(drive, serial)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_marker(serial, t0, BOOT_TIMEOUT, alive=lambda: p.poll() is None)
    finally:
        try:
            p.wait(timeout=30)  # the guest powers off by itself after the marker
        except subprocess.TimeoutExpired:
            stop_proc(p, 5)


# ------------------------------------------------------------------------------ benchmarks

def build_boot_image(work):
    img = os.path.join(work, "boot.img")
    if not os.path.exists(img):
        log("building the boot image (tests/bootimg/build.sh)...")
        run(os.path.join(REPO_ROOT, "tests", "bootimg", "build.sh"), img + ".tmp", MARKER)
        os.rename(img + ".tmp", img)
    return img


class StandbyRto:
    """A protected VM `vm` with one sparse disk `boot` of `gib` GiB holding the boot image."""

    def __init__(self, bin_, work, gib, boot_img):
        self.gib = gib
        self.sb = Standby(bin_, os.path.join(work, f"rto-{gib}g"))
        self.serial = os.path.join(work, f"serial-standby-{gib}g.log")
        self.a, self.b, self.served, self.cleanup = [], [], [], []
        sb = self.sb
        sb.fresh()
        sb.run("disk", "create", "boot", "--size", f"{gib}G")
        sb.run("store", "init")
        sb.run("policy", "set", "--interval", "1s", "--resync-window", "always")
        sb.start()
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", boot_img, sb.uri("boot"))
        self.protect_s = sb.protect("vm", "boot", timeout=gib * GIB / 50e6 + 300)
        # Quiet from here on: an idle VM, no more cycles during the measurements.
        sb.run("policy", "set", "--interval", "5m", "--failover-command",
               qemu_cmd("{disk0}", self.serial))
        log(f"  standby {gib} GiB: protect -> Protected {self.protect_s:.1f} s")

    def first_read(self):
        sb = self.sb
        drop_caches()
        t0 = time.monotonic()
        out = sb.run("failover", "test", "vm", "--no-launch")
        t_cmd = time.monotonic() - t0
        try:
            run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", sb.uri("vm.boot.test"))
            t = time.monotonic() - t0
        finally:
            self._cleanup()
        m = re.search(r"disks served in ([\d.]+) s", out)
        self.served.append(float(m.group(1)) if m else None)
        self.a.append(t)
        log(f"  standby {self.gib} GiB --no-launch: command {t_cmd:.2f} s, first 4 KiB read at {t:.2f} s")

    def boot(self):
        sb = self.sb
        if os.path.exists(self.serial):
            os.remove(self.serial)
        drop_caches()
        t0 = time.monotonic()
        out = sb.run("failover", "test", "vm")
        try:
            if "VM launched" not in out:
                raise RuntimeError(f"no 'VM launched' in: {out}")
            t = wait_marker(self.serial, t0, BOOT_TIMEOUT)
            # Let the guest power off by itself (it writes to its overlay after the marker).
            deadline = time.time() + 30
            while time.time() < deadline and "exited" not in sb.run("status"):
                time.sleep(0.2)
        finally:
            self._cleanup()
        self.b.append(t)
        log(f"  standby {self.gib} GiB --test: marker at {t:.2f} s")

    def _cleanup(self):
        t0 = time.monotonic()
        self.sb.run("failover", "cleanup", "vm")
        self.cleanup.append(time.monotonic() - t0)

    def stop(self):
        self.sb.stop()
        if not KEEP:
            shutil.rmtree(self.sb.data, ignore_errors=True)


class ResticRto:
    """The same disk image (boot image at the start, zeros to `gib` GiB) backed up by restic."""

    def __init__(self, work, gib, boot_img):
        self.gib = gib
        self.work = work
        self.img = os.path.join(work, f"restic-src-{gib}g.raw")
        self.repo = os.path.join(work, f"restic-{gib}g")
        self.target = os.path.join(work, f"restic-restore-{gib}g")
        self.serial = os.path.join(work, f"serial-restic-{gib}g.log")
        self.restore, self.total, self.boot_s = [], [], []
        shutil.copyfile(boot_img, self.img)
        os.truncate(self.img, gib * GIB)
        shutil.rmtree(self.repo, ignore_errors=True)
        restic(self.repo, "init")
        t0 = time.monotonic()
        restic(self.repo, "backup", "-q", "--compression", "auto", self.img)
        self.backup_s = time.monotonic() - t0
        self.restored_alloc = None
        log(f"  restic {gib} GiB: backup {self.backup_s:.1f} s")

    def run_once(self):
        shutil.rmtree(self.target, ignore_errors=True)
        drop_caches()
        t0 = time.monotonic()
        restic(self.repo, "restore", "latest", "--target", self.target)
        restored = self.target + self.img
        t_restore = time.monotonic() - t0
        try:
            boot = boot_file(restored, self.serial)
            self.restored_alloc = os.stat(restored).st_blocks * 512
        finally:
            shutil.rmtree(self.target, ignore_errors=True)
        self.restore.append(t_restore)
        self.boot_s.append(boot)
        self.total.append(t_restore + boot)
        log(f"  restic {self.gib} GiB: restore {t_restore:.2f} s + boot {boot:.2f} s = {t_restore + boot:.2f} s "
            f"(restored file allocates {self.restored_alloc / MIB:,.0f} MiB)")

    def stop(self):
        for p in (self.img, self.target, self.repo):
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)


def bench_rto(bin_, work):
    boot_img = build_boot_image(work)
    floor, peers, skipped = [], [], []
    sbs, rcs = {}, {}
    try:
        for gib in SIZES_GIB:
            log(f"rto: setting up {gib} GiB")
            sbs[gib] = StandbyRto(bin_, work, gib, boot_img)
            free = shutil.disk_usage(work).free
            if free >= (gib + RESTIC_HEADROOM_GIB) * GIB:
                rcs[gib] = ResticRto(work, gib, boot_img)
            else:
                skipped.append((gib, free))
                log(f"  restic {gib} GiB skipped: restic {restic_version()} restores every byte of the disk "
                    f"(no sparse restore); {free / GIB:.1f} GiB free, {gib + RESTIC_HEADROOM_GIB} GiB wanted")
        for gib in SIZES_GIB:
            peers.append((f"standby {gib} GiB", lambda s=sbs[gib]: (s.first_read(), s.boot())))
            if gib in rcs:
                peers.append((f"restic {gib} GiB", rcs[gib].run_once))
        floor_serial = os.path.join(work, "serial-floor.log")

        def floor_once():
            drop_caches()
            floor.append(boot_file(boot_img, floor_serial))
            log(f"  qemu from the boot image file: marker at {floor[-1]:.2f} s")

        peers.append(("floor", floor_once))
        for r in range(ROUNDS):
            log(f"rto: round {r + 1}/{ROUNDS}")
            for name, f in (peers if r % 2 == 0 else list(reversed(peers))):
                try:
                    f()
                except Exception as e:  # noqa: BLE001 - recorded, reported, the run goes on
                    problem(f"rto {name}, round {r + 1}: {e}")
    finally:
        for s in sbs.values():
            s.stop()
        for rc in rcs.values():
            rc.stop()

    fl = median(floor)
    print(f"### 1. Recovery time (RTO): sparse disk with the 64 MiB boot image at its start\n")
    print("| peer | disk | first 4 KiB read (s) | boot to `STANDBY-MARKER` (s) | restic / standby, boot "
          "(same disk size) |")
    print("|---|---:|---:|---:|---:|")
    for gib in SIZES_GIB:
        s = sbs[gib]
        rb = median(rcs[gib].total) if gib in rcs else None
        print(f"| standby test failover (local store) | {gib} GiB | {fmt_s(median(s.a))} | {fmt_s(median(s.b))} | "
              f"{ratio(rb, median(s.b)) if rb else 'restic not run'} |")
    for gib in SIZES_GIB:
        if gib in rcs:
            rc = rcs[gib]
            print(f"| restic restore, then qemu from the file | {gib} GiB | {fmt_s(median(rc.restore))} "
                  f"(restore done) | {fmt_s(median(rc.total))} | |")
    for gib, free in skipped:
        print(f"| restic restore, then qemu from the file | {gib} GiB | not run | not run | |")
    print(f"| qemu from the 64 MiB boot image file (no recovery; floor) | 64 MiB | | {fmt_s(fl)} | |")
    print()
    print(f"Medians of {ROUNDS}. First read: `standby failover test vm --no-launch` started → "
          "`qemu-io -r -c 'read 0 4k'` on the test export done. Boot: `standby failover test vm` started "
          "(the failover command is the qemu command) → marker in the serial file. "
          "restic: `restic restore latest` started → file restored (column 3) → marker (column 4).\n")
    if len(SIZES_GIB) >= 2:
        lo, hi = min(SIZES_GIB), max(SIZES_GIB)
        print(f"- standby growth {hi} GiB / {lo} GiB: first read "
              f"{ratio(median(sbs[hi].a), median(sbs[lo].a), 2)}, boot {ratio(median(sbs[hi].b), median(sbs[lo].b), 2)}")
    for gib in SIZES_GIB:
        if gib in rcs:
            rc = rcs[gib]
            print(f"- restic {gib} GiB / standby {gib} GiB (boot): {ratio(median(rc.total), median(sbs[gib].b))}; "
                  f"restore alone {fmt_s(median(rc.restore))} s; boot from the restored file "
                  f"{fmt_s(median(rc.boot_s))} s; restored file allocates "
                  f"{(rc.restored_alloc or 0) / MIB:,.0f} MiB; backup took {rc.backup_s:.1f} s")
    for gib, free in skipped:
        print(f"- restic {gib} GiB not run: restic {restic_version()} has no sparse restore and writes all "
              f"{gib} GiB; only {free / GIB:.1f} GiB were free (wanted {gib + RESTIC_HEADROOM_GIB} GiB)")
    print(f"- standby boot minus the floor (qemu from the local file): "
          + ", ".join(f"{g} GiB {fmt_s(median(sbs[g].b) - fl if median(sbs[g].b) and fl else None)} s"
                      for g in SIZES_GIB))
    for gib in SIZES_GIB:
        s = sbs[gib]
        print(f"- runs standby {gib} GiB (s): first read {runs(s.a)}; boot {runs(s.b)}; \"disks served in\" "
              f"{runs(s.served)}; `failover cleanup` {runs(s.cleanup)}; protect → Protected {s.protect_s:.1f}")
    for gib in rcs:
        rc = rcs[gib]
        print(f"- runs restic {gib} GiB (s): restore {runs(rc.restore)}; restore + boot {runs(rc.total)}")
    print(f"- runs floor (s): {runs(floor)}\n")


def make_read_image(path):
    log(f"writing {READ_GIB} GiB image ({DATA_GIB} GiB random, rest zeros)...")
    with open(path, "wb") as f:
        for _ in range(DATA_GIB * GIB // (16 * MIB)):
            f.write(os.urandom(16 * MIB))
        f.truncate(READ_GIB * GIB)


def nbdcopy(uri, no_extents):
    args = ["nbdcopy"] + (["--no-extents"] if no_extents else []) + [uri, "null:"]
    drop_caches()
    t0 = time.monotonic()
    run(*args)
    return time.monotonic() - t0


def digest_of(uri):
    h = hashlib.sha256()
    p = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE)
    while True:
        b = p.stdout.read(4 * MIB)
        if not b:
            break
        h.update(b)
    if p.wait() != 0:
        raise RuntimeError(f"nbdcopy {uri} - failed")
    return h.hexdigest()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MIB):
            h.update(b)
    return h.hexdigest()


def bench_read(bin_, work):
    img = os.path.join(work, "read.raw")
    make_read_image(img)
    garage = Garage(work)
    local = Standby(bin_, os.path.join(work, "read-local"))
    s3 = None
    nbdkit = None
    variants = [False, True] if NO_EXTENTS else [False]
    R = {}
    attach_s = {"local": [], "s3": []}
    verified = {}
    try:
        garage.start()
        s3 = Standby(bin_, os.path.join(work, "read-s3"), extra_env=garage.env())
        for sb, name in ((local, "local"), (s3, "s3")):
            log(f"read: setting up the {name} store")
            sb.fresh()
            disk = os.path.join(work, f"read-{name}-disk0.raw")
            subprocess.run(["cp", "--sparse=always", img, disk], check=True)
            sb.run("disk", "import", "disk0", disk)
            if name == "local":
                sb.run("store", "init")
            else:
                sb.run("store", "init", "--s3-endpoint", f"http://127.0.0.1:{garage.s3}", "--s3-bucket",
                       garage.bucket, "--s3-region", "garage", "--path-style")
            sb.run("policy", "set", "--interval", "1s", "--resync-window", "always")
            sb.start()
            t = sb.protect("vm", "disk0", timeout=READ_GIB * GIB / 20e6 + 300)
            sb.run("policy", "set", "--interval", "5m")
            log(f"  protect -> Protected {t:.1f} s")
        kport = free_port()
        nbdkit = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(kport), "file", img],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(kport, nbdkit, "nbdkit")

        def replica(sb, key, no_ext):
            def f():
                t0 = time.monotonic()
                out = sb.run("attach", "vm/disk0@latest")
                attach_s[key].append(time.monotonic() - t0)
                m = re.search(r"nbd://\S+/(\S+?)(?=[\s,;)]|$)", out)
                if not m:
                    raise RuntimeError(f"no NBD URI in `standby attach` output: {out}")
                export = m.group(1)
                try:
                    return nbdcopy(sb.uri(export), no_ext)
                finally:
                    sb.run("detach", export)
            return f

        peers = []
        for no_ext in variants:
            peers += [(("replica, local store", no_ext), replica(local, "local", no_ext)),
                      (("nbdkit file", no_ext), lambda n=no_ext: nbdcopy(f"nbd://127.0.0.1:{kport}", n)),
                      (("replica, Garage S3 store", no_ext), replica(s3, "s3", no_ext)),
                      (("live disk export, same gateway", no_ext), lambda n=no_ext: nbdcopy(local.uri("disk0"), n))]
        for key, _ in peers:
            R[key] = []
        for r in range(ROUNDS):
            log(f"read: round {r + 1}/{ROUNDS}")
            for key, f in (peers if r % 2 == 0 else list(reversed(peers))):
                try:
                    t = f()
                except Exception as e:  # noqa: BLE001
                    problem(f"read {key[0]}{' --no-extents' if key[1] else ''}, round {r + 1}: {e}")
                    t = None
                R[key].append(t)
                if t is not None:
                    log(f"  {key[0]}{' (--no-extents)' if key[1] else ''}: {t:.2f} s = "
                        f"{READ_GIB * GIB / t / 1e6:,.0f} MB/s of disk")
        # Content check, outside the timing: the replicas read back as the image.
        want = file_digest(img)
        for sb, name in ((local, "local"), (s3, "s3")):
            out = sb.run("attach", "vm/disk0@latest")
            export = re.search(r"nbd://\S+/(\S+?)(?=[\s,;)]|$)", out).group(1)
            try:
                verified[name] = "identical" if digest_of(sb.uri(export)) == want else "DIFFERENT"
            finally:
                sb.run("detach", export)
            if verified[name] != "identical":
                problem(f"the {name} replica read back differs from the image")
    finally:
        stop_proc(nbdkit)
        for sb in (local, s3):
            if sb:
                sb.stop()
                if not KEEP:
                    shutil.rmtree(sb.data, ignore_errors=True)
        garage.stop()
        if not KEEP:
            shutil.rmtree(garage.dir, ignore_errors=True)
            for f in os.listdir(work):
                if f.startswith("read-") and f.endswith(".raw") or f == "read.raw":
                    os.remove(os.path.join(work, f))

    size, data = READ_GIB * GIB, DATA_GIB * GIB
    ref = {v: median(R[("nbdkit file", v)]) for v in variants}
    print(f"### 2. Sequential read of a {READ_GIB} GiB disk ({DATA_GIB} GiB random data, rest zeros), "
          "`nbdcopy URI null:`\n")
    print(f"| source | nbdcopy | time (s) | MB/s of disk size | MB/s of non-zero data | vs nbdkit file |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, v), ts in R.items():
        t = median(ts)
        mbs = "n/a" if t is None else f"{size / t / 1e6:,.0f}"
        mbd = "n/a" if t is None else f"{data / t / 1e6:,.0f}"
        print(f"| {name} | {'`--no-extents`' if v else 'default'} | {fmt_s(t)} | {mbs} | {mbd} | "
              f"{ratio(ref[v], t, 2)} |")
    print()
    print(f"Medians of {ROUNDS}; page cache dropped before every run: {'yes' if DROPPING else 'no'}. "
          "Replicas: `standby attach vm/disk0@latest` (read-only) before and `standby detach` after every "
          "run, so each run starts with an empty chunk cache. Default nbdcopy skips what block status "
          "reports as holes; `--no-extents` reads them too. \"vs nbdkit file\" = nbdkit's time / this time.\n")
    for (name, v), ts in R.items():
        print(f"- runs {name}{' --no-extents' if v else ''} (s): {runs(ts)}")
    print(f"- `standby attach` (s): local {runs(attach_s['local'])}; S3 {runs(attach_s['s3'])}")
    print(f"- replicas read back (sha256 against the image): local {verified.get('local', 'n/a')}, "
          f"S3 {verified.get('s3', 'n/a')}; {garage.version()}\n")


def restic_version():
    return run("restic", "version").split()[1]


def main():
    global DROPPING
    binary = os.environ.get("STANDBY_BIN")
    if not binary:
        sys.exit("STANDBY_BIN is required (tools/bench/failover.sh sets it)")
    created = len(sys.argv) < 2
    work = tempfile.mkdtemp(prefix="standby-failover-bench-") if created else sys.argv[1]
    os.makedirs(work, exist_ok=True)
    work = os.path.abspath(work)
    DROPPING = can_drop()
    # A private copy, so a concurrent rebuild cannot swap the binary in the middle of the run.
    bin_ = os.path.join(work, "standby")
    shutil.copy2(binary, bin_)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=REPO_ROOT).stdout.strip() or "?"
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(binary).st_mtime))
    params = (f"SIZES_GIB={','.join(map(str, SIZES_GIB))} ROUNDS={ROUNDS} READ_GIB={READ_GIB} "
              f"DATA_GIB={DATA_GIB} NO_EXTENTS={NO_EXTENTS} BENCHES={','.join(BENCHES)}")
    qv = run("qemu-system-x86_64", "--version").splitlines()[0].replace("QEMU emulator version ", "")
    print(f"`{os.environ.get('BENCH_COMMAND', 'tools/bench/failover.sh')}`\n")
    print(f"parameters: {params}; standby binary built {built}, work tree at commit {rev}; {os.cpu_count()} cores; "
          f"page cache dropped before each measured run: {'yes' if DROPPING else 'no'}; restic {restic_version()}; "
          f"qemu {qv.split()[0]} (TCG); {run('nbdcopy', '--version').splitlines()[0]}; "
          f"{run('nbdkit', '--version').strip()}\n")
    sys.stdout.flush()
    t0 = time.time()
    try:
        for b in BENCHES:
            {"rto": bench_rto, "read": bench_read}[b](bin_, work)
            sys.stdout.flush()
    finally:
        if created and not KEEP:
            shutil.rmtree(work, ignore_errors=True)
        elif not KEEP:
            for f in ("standby", "boot.img"):
                if os.path.exists(os.path.join(work, f)):
                    os.remove(os.path.join(work, f))
    if PROBLEMS:
        print("Problems during the run:\n")
        for p in PROBLEMS:
            print(f"- {p}")
        print()
    print(f"total run time {time.time() - t0:.0f} s; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
