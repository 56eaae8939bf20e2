"""Small reusable harness for driving QEMU (and other child processes) in tests
and benchmarks.  Python 3 standard library only.

What it provides:

* ``Proc`` / ``start_process``: a child process started by us, tracked by PID,
  killed (SIGKILL) and reaped at interpreter exit (``atexit``) or when the
  parent dies (``PR_SET_PDEATHSIG`` on Linux).  Only processes started here are
  ever signalled, and only by their PID.
* ``QMP``: a QMP client over a unix socket with I/O timeouts (a QEMU
  destination blocked in a multifd sync barrier stops answering QMP; every read
  is bounded).  Handles the greeting and ``qmp_capabilities``; ``execute``
  raises ``QMPError`` on an error reply and skips (records) events.
* ``Qemu``: a QEMU whose guest RAM is one shared file (``-M none`` by default,
  RAM block named ``m0``), started paused with ``-S``, plus migration helpers.
* ``free_tcp_port``, ``temp_dir`` (under /dev/shm, removed at exit),
  ``prefault`` (write zeros over a whole file), ``compare_files``,
  ``parse_size``, ``detect_accel``, ``machine_note``, ``install_signal_handlers``.
* ``make_x509_creds`` / ``make_psk_creds``: a throw-away test PKI (``openssl``
  command) or pre-shared key in QEMU's credential directory layout, and
  ``Qemu.set_tls`` to give a QEMU such credentials.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

QEMU_BINARY = os.environ.get("QEMU", "qemu-system-x86_64")
MiB = 1 << 20
GiB = 1 << 30


class HarnessError(RuntimeError):
    """A step of the harness failed (process died, timeout, bad reply...)."""


class QMPError(HarnessError):
    """QEMU answered a QMP command with an error reply."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.error = error
        super().__init__(f"QMP {command}: {error.get('class', '?')}: {error.get('desc', error)}")


class QMPTimeout(HarnessError):
    """QEMU did not answer on its QMP socket in time."""


# --------------------------------------------------------------------------
# Sizes, ports, temp dirs, files


_SIZE_SUFFIXES = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '512M', '4096', '1.5G' -> bytes (binary units)."""
    s = str(text).strip().lower().replace(" ", "").replace("_", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    num, suf = s[:i], s[i:]
    if suf not in _SIZE_SUFFIXES or not num:
        raise ValueError(f"bad size {text!r} (use e.g. 512MiB, 2GiB)")
    value = float(num) * _SIZE_SUFFIXES[suf]
    if value != int(value) or value <= 0:
        raise ValueError(f"bad size {text!r}")
    return int(value)


def format_size(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB}GiB"
    if n % MiB == 0:
        return f"{n // MiB}MiB"
    return f"{n}B"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_temp_dirs: list[str] = []


def temp_dir(prefix: str = "multifd-", base: str = "/dev/shm") -> str:
    """Create a private temp dir (in /dev/shm when it exists), removed at exit."""
    if not os.path.isdir(base):
        base = tempfile.gettempdir()
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    _temp_dirs.append(path)
    return path


def remove_temp_dirs() -> None:
    while _temp_dirs:
        shutil.rmtree(_temp_dirs.pop(), ignore_errors=True)


def prefault(path: str, size: int, chunk: int = 16 * MiB) -> None:
    """Write zeros over the whole file (creating it), leaving it exactly `size`
    bytes long, so that every page of it is allocated before it is timed."""
    zeros = bytes(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        off = 0
        while off < size:
            n = min(chunk, size - off)
            view = memoryview(zeros)[:n]
            while view:
                w = os.pwrite(fd, view, off)
                off += w
                view = view[w:]
    finally:
        os.close(fd)
    if os.path.getsize(path) != size:
        raise HarnessError(f"prefault: {path} is {os.path.getsize(path)} bytes, wanted {size}")


def compare_files(a: str, b: str, chunk: int = 16 * MiB):
    """Return None when both files have the same size and bytes, else a
    human-readable description of the first difference."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return f"sizes differ: {a} {sa} bytes, {b} {sb} bytes"
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        off = 0
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if ca != cb:
                n = min(len(ca), len(cb))
                i = next((k for k in range(0, n, 4096) if ca[k:k + 4096] != cb[k:k + 4096]), 0)
                while i < n and ca[i] == cb[i]:
                    i += 1
                return f"first difference at byte offset {off + i:#x} (page {(off + i) // 4096})"
            if not ca:
                return None
            off += len(ca)


# --------------------------------------------------------------------------
# TLS credentials (test PKI)


def _openssl(args, cwd):
    r = subprocess.run(["openssl"] + list(args), cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise HarnessError(f"openssl {' '.join(args)}: {r.stderr.strip()}")


def make_x509_creds(root: str, server_names=("IP:127.0.0.1", "DNS:localhost"),
                    client_dn: str = "/O=multifd/CN=client") -> dict:
    """A throw-away CA, server and client certificate made with the `openssl`
    command, in QEMU's tls-creds-x509 layout.  Returns {"server": DIR with
    ca-cert.pem, server-cert.pem, server-key.pem; "client": DIR with ca-cert.pem,
    client-cert.pem, client-key.pem}.

    ECDSA P-256 keys; the CA has CA:TRUE and keyCertSign; leaves have key usage
    digitalSignature + keyEncipherment (QEMU refuses to load a leaf whose
    critical key usage lacks either) and the matching extended key usage; the
    server certificate names `server_names` as subject alternative names (QEMU
    and rustls check only those, never the CN)."""
    work = os.path.join(root, "pki")
    os.makedirs(work, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(["req", "-x509", "-new"] + ec + [
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30",
        "-subj", "/O=multifd/CN=multifd test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign"], work)
    dirs = {}
    for role, subj, eku, san in (("server", "/O=multifd/CN=server", "serverAuth", server_names),
                                 ("client", client_dn, "clientAuth", ())):
        ext = os.path.join(work, f"{role}.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\n")
            if san:
                f.write(f"subjectAltName={','.join(san)}\n")
        _openssl(["req", "-new"] + ec + ["-keyout", f"{role}-key.pem", "-out", f"{role}.csr",
                                         "-subj", subj], work)
        _openssl(["x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem",
                  "-CAkey", "ca-key.pem", "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                  "-days", "30", "-extfile", ext, "-out", f"{role}-cert.pem"], work)
        d = os.path.join(root, role)
        os.makedirs(d, exist_ok=True)
        for name in ("ca-cert.pem", f"{role}-cert.pem", f"{role}-key.pem"):
            shutil.copyfile(os.path.join(work, name), os.path.join(d, name))
            os.chmod(os.path.join(d, name), 0o600)
        dirs[role] = d
    return dirs


def make_psk_creds(root: str, username: str = "qemu") -> str:
    """A directory with keys.psk holding a random 256-bit key for `username`
    (QEMU's tls-creds-psk layout)."""
    d = os.path.join(root, "psk")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "keys.psk")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{username}:{os.urandom(32).hex()}\n")
    return d


# --------------------------------------------------------------------------
# Processes


_procs: list["Proc"] = []


def _pdeathsig_preexec():  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


class Proc:
    """A child process we started.  stdout/stderr go to files (in `log_dir`)."""

    def __init__(self, argv, name: str, log_dir: str, capture_stdout: bool = True, env=None):
        self.argv = [str(a) for a in argv]
        self.name = name
        self.stdout_path = os.path.join(log_dir, f"{name}.stdout")
        self.stderr_path = os.path.join(log_dir, f"{name}.stderr")
        out = open(self.stdout_path, "wb") if capture_stdout else subprocess.DEVNULL
        err = open(self.stderr_path, "wb")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                preexec_fn=_pdeathsig_preexec if sys.platform.startswith("linux") else None,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
            err.close()
        self.pid = self.popen.pid
        self.started = time.monotonic()
        _procs.append(self)

    def poll(self):
        return self.popen.poll()

    @property
    def returncode(self):
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float):
        """Wait at most `timeout` s; return the exit code or raise HarnessError."""
        try:
            return self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.name} (pid {self.pid}) still running after {timeout:.1f}s") from None

    def kill(self) -> None:
        """SIGKILL (by PID, only if not yet reaped) and reap."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:  # in uninterruptible sleep: give up loudly
                print(f"warning: {self.name} (pid {self.pid}) did not die", file=sys.stderr)
        if self in _procs and self.popen.returncode is not None:
            _procs.remove(self)

    def stdout(self) -> str:
        try:
            with open(self.stdout_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                data = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(data.rstrip("\n").split("\n")[-lines:])

    def json_output(self):
        """The last line of stdout that parses as a JSON object, or None."""
        for line in reversed(self.stdout().strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        text = self.stdout().strip()
        if text.startswith("{"):
            try:
                return json.loads(text)
            except ValueError:
                pass
        return None


def start_process(argv, name: str, log_dir: str, **kw) -> Proc:
    return Proc(argv, name, log_dir, **kw)


def wait_all(procs, deadline: float) -> dict:
    """Wait until every process in `procs` has exited or `deadline` (monotonic)
    passes.  Returns {proc: monotonic time its exit was noticed} for the ones
    that exited (without kill); the caller checks which are missing.  Uses
    pidfds (no sleep-polling) when the platform has them."""
    import select

    done = {}
    pending = []
    for p in procs:
        if p.poll() is not None:
            done[p] = time.monotonic()
        else:
            pending.append(p)
    fds = {}
    try:
        if hasattr(os, "pidfd_open"):
            for p in pending:
                try:
                    fds[os.pidfd_open(p.pid)] = p
                except OSError:
                    pass
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if len(fds) == len(pending):
                ready, _, _ = select.select(list(fds), [], [], remaining)
            else:
                time.sleep(min(0.001, remaining))
                ready = []
            now = time.monotonic()
            for p in list(pending):
                if p.poll() is not None:
                    done[p] = now
                    pending.remove(p)
                    for fd, q in list(fds.items()):
                        if q is p:
                            os.close(fd)
                            del fds[fd]
            del ready
    finally:
        for fd in fds:
            os.close(fd)
    return done


def kill_all() -> None:
    """Kill and reap every process started through this module that is still alive."""
    for p in list(_procs):
        p.kill()
    _procs.clear()


def cleanup() -> None:
    kill_all()
    remove_temp_dirs()


atexit.register(cleanup)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP become SystemExit so try/finally and atexit cleanup run
    (SIGINT already raises KeyboardInterrupt)."""

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):
            pass


# --------------------------------------------------------------------------
# QMP


class QMP:
    """QMP client over a unix socket.  Every read is bounded by a timeout."""

    def __init__(self, path: str, connect_timeout: float = 30.0, io_timeout: float = 10.0,
                 proc: Proc | None = None):
        self.path = path
        self.io_timeout = io_timeout
        self.events: list[dict] = []
        self._buf = b""
        self.sock = None
        deadline = time.monotonic() + connect_timeout
        while True:
            if proc is not None and not proc.alive():
                raise HarnessError(f"{proc.name} exited with {proc.returncode} before its QMP "
                                   f"socket came up:\n{proc.stderr_tail()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(io_timeout)
                s.connect(path)
                self.sock = s
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise HarnessError(f"cannot connect to QMP socket {path} "
                                       f"within {connect_timeout}s") from None
                time.sleep(0.02)
        try:
            self.greeting = self._read_message(time.monotonic() + io_timeout)
            if "QMP" not in self.greeting:
                raise HarnessError(f"unexpected QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read_message(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout(f"no QMP reply on {self.path} in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout(f"no QMP reply on {self.path} in time") from None
            except OSError as e:
                raise HarnessError(f"QMP socket {self.path}: {e}") from None
            if not data:
                raise HarnessError(f"QMP connection {self.path} closed by QEMU")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise HarnessError(f"bad QMP message: {line[:200]!r}") from None

    def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None):
        """Run one command; return its 'return' value; raise QMPError / QMPTimeout."""
        if self.sock is None:
            raise HarnessError("QMP connection is closed")
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        try:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except socket.timeout:
            raise QMPTimeout(f"QMP {command}: send timed out") from None
        except OSError as e:
            raise HarnessError(f"QMP {command}: {e}") from None
        while True:
            try:
                r = self._read_message(deadline)
            except QMPTimeout:
                # The stream is now out of sync: make the connection unusable.
                self.close()
                raise QMPTimeout(f"QMP {command}: no reply within "
                                 f"{self.io_timeout if timeout is None else timeout}s") from None
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QMPError(command, r["error"])
            if "return" in r:
                return r["return"]
            # anything else (should not happen): skip

    def hmp(self, line: str, timeout: float | None = None) -> str:
        return self.execute("human-monitor-command", {"command-line": line}, timeout)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


# --------------------------------------------------------------------------
# QEMU


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_accel(pref: str = "auto") -> str:
    if pref == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return pref


def qemu_version(binary: str = QEMU_BINARY) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    first = out.strip().splitlines()[0] if out.strip() else "?"
    return first.replace("QEMU emulator version ", "")


def machine_note(accel: str) -> str:
    cpus = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cpus
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "?"
    return (f"{usable} usable cores ({cpus} online, {model}), accel {accel}, "
            f"QEMU {qemu_version()}, kernel {platform.release()}, load {load}")


def busy_warning(settle: float = 1.0):
    """A sentence when other work is using the CPUs right now (runnable tasks
    beyond ourselves, sampled for `settle` s from /proc/stat), else None."""
    def sample():
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu "):
                    v = [int(x) for x in line.split()[1:]]
                    idle = v[3] + (v[4] if len(v) > 4 else 0)
                    return sum(v), idle
        raise OSError("no cpu line")

    try:
        t0, i0 = sample()
        time.sleep(settle)
        t1, i1 = sample()
    except (OSError, ValueError):
        return None
    if t1 <= t0:
        return None
    busy = 1.0 - (i1 - i0) / (t1 - t0)
    if busy > 0.25:
        cores = os.cpu_count() or 1
        return (f"CPUs {busy:.0%} busy while none of our processes ran "
                f"(~{busy * cores:.1f} of {cores} cores in use by others)")
    return None


class Qemu:
    """A paused QEMU whose guest RAM is the shared file `ram_path` (block 'm0')."""

    def __init__(self, name: str, workdir: str, ram_path: str, size: int, accel: str,
                 incoming: bool = False, machine: str = "none", extra_args=(),
                 io_timeout: float = 10.0, connect_timeout: float = 30.0):
        if size % MiB:
            raise HarnessError("guest RAM size must be a multiple of 1 MiB")
        self.name = name
        self.incoming = incoming
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        mem = f"{size // MiB}M"
        argv = [
            QEMU_BINARY, "-accel", accel,
            "-M", f"{machine},memory-backend=m0", "-m", mem,
            "-object", f"memory-backend-file,id=m0,size={mem},mem-path={ram_path},share=on",
            "-display", "none", "-nodefaults", "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        argv += list(extra_args)
        self.proc = start_process(argv, name, workdir)
        self.qmp = None
        try:
            self.qmp = QMP(self.qmp_path, connect_timeout=connect_timeout,
                           io_timeout=io_timeout, proc=self.proc)
        except BaseException:
            self.proc.kill()
            raise

    def execute(self, command, arguments=None, timeout=None):
        if not self.proc.alive():
            raise HarnessError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{self.proc.stderr_tail()}")
        try:
            return self.qmp.execute(command, arguments, timeout)
        except QMPError:
            raise
        except HarnessError as e:
            # A closed/reset monitor usually means QEMU died: say so.
            try:
                self.proc.wait(0.5)
            except HarnessError:
                raise e from None
            raise HarnessError(f"{self.name} exited with status {self.proc.returncode} "
                               f"during {command}:\n{self.proc.stderr_tail()}") from None

    def setup_multifd(self, channels: int, compression: str = "none", level: int | None = None,
                      max_bandwidth: int = 1 << 40, extra_params: dict | None = None) -> None:
        self.execute("migrate-set-capabilities",
                     {"capabilities": [{"capability": "multifd", "state": True}]})
        params = {"multifd-channels": channels, "multifd-compression": compression,
                  "max-bandwidth": max_bandwidth}
        if level is not None and compression in ("zlib", "zstd"):
            params[f"multifd-{compression}-level"] = level
        if extra_params:
            params.update(extra_params)
        self.execute("migrate-set-parameters", params)

    def set_tls(self, kind: str, creds_dir: str, hostname: str | None = None,
                verify_peer: bool = True, username: str = "qemu",
                authz: str | None = None) -> None:
        """Migrate over TLS: `kind` x509 (tls-creds-x509) or psk (tls-creds-psk)
        from `creds_dir`; the endpoint follows the role (destination: server).
        `hostname` is the source's tls-hostname, `authz` the destination's
        accepted client DN (authz-simple identity, GnuTLS format)."""
        endpoint = "server" if self.incoming else "client"
        props = {"qom-type": f"tls-creds-{kind}", "id": "tls0", "dir": creds_dir,
                 "endpoint": endpoint}
        if kind == "x509":
            props["verify-peer"] = verify_peer
        elif endpoint == "client":
            props["username"] = username
        self.execute("object-add", props)
        params = {"tls-creds": "tls0"}
        if hostname is not None:
            params["tls-hostname"] = hostname
        if authz is not None:
            self.execute("object-add", {"qom-type": "authz-simple", "id": "authz0",
                                        "identity": authz})
            params["tls-authz"] = "authz0"
        self.execute("migrate-set-parameters", params)

    def migrate_incoming(self, uri: str) -> None:
        self.execute("migrate-incoming", {"uri": uri})

    def migrate(self, uri: str) -> None:
        self.execute("migrate", {"uri": uri})

    def migration_status(self, timeout: float | None = None) -> dict:
        return self.execute("query-migrate", None, timeout)

    def wait_migration(self, deadline: float, poll: float = 0.005) -> dict:
        """Poll query-migrate until 'completed' (returns the reply); raise on
        'failed'/'cancelled', on QEMU exit, or when `deadline` (monotonic) passes."""
        last = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(f"{self.name}: migration not completed in time "
                                   f"(last status {last and last.get('status')})")
            last = self.migration_status(timeout=min(remaining, self.qmp.io_timeout))
            status = last.get("status")
            if status == "completed":
                return last
            if status in ("failed", "cancelled"):
                raise HarnessError(f"{self.name}: migration {status}: "
                                   f"{last.get('error-desc', '')}\n{self.proc.stderr_tail()}")
            time.sleep(poll)

    def stop(self) -> None:
        """SIGKILL and reap (fine for a paused test VM)."""
        if self.qmp is not None:
            self.qmp.close()
        self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False
