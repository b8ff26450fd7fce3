"""Helpers for the deployment test: TLS material, SuperNode keys, free ports and a process
tracker that stops everything the test started, including what Flower spawned itself.

Flower 1.42 starts its helpers (SuperExec, ServerApp, ClientApp processes) in new sessions
(`start_new_session=True`), so killing the process group of a SuperLink or SuperNode leaves
them running. The tracker therefore records the whole process tree from /proc while the
parents are still alive, and stops every member. It reads /proc directly because psutil is
not a dependency of the project; the test runs on Linux only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FLOWER_PROGRAMS = ("flower-", "flwr-")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (the OS picks them; all held until chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port; fails early if proc died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening "
                               f"on port {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# -- TLS and keys ---------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate it signs, valid for 127.0.0.1 and localhost.
    Returns paths: ca (CA certificate), cert (server certificate), key (server key)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("fedinterest test CA")).issuer_name(_name("fedinterest test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], key)
    return paths


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as Flower expects:
    the private key for `flower-supernode --auth-supernode-private-key`, the public key for
    `flwr supernode register`). Returns (private, public)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# -- processes ------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, parent pid, process group, start time, CPU ticks used) of pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return (fields[0], int(fields[1]), int(fields[2]), int(fields[19]),
            int(fields[11]) + int(fields[12]))


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def is_flower_process(cmd: str) -> bool:
    """flower-superlink, flwr-serverapp, ... run directly or as `python .../flower-x`."""
    return any(Path(part.strip("[]")).name.startswith(FLOWER_PROGRAMS)
               for part in cmd.split(" ")[:2])


def flower_processes_with(needles: list[str]) -> list[tuple[int, str]]:
    """Running Flower processes whose command line contains any of the needles."""
    out = []
    for pid in _all_pids():
        cmd = cmdline(pid)
        st = _stat(pid)
        if (st is not None and st[0] not in ("Z", "X") and is_flower_process(cmd)
                and any(n in cmd for n in needles)):
            out.append((pid, cmd))
    return out


class ProcessTracker:
    """Starts processes in their own sessions and stops them and everything they spawned.

    Each pid is remembered with its start time, so a pid the system reuses for someone else's
    process after ours ended is never signalled.
    """

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.seen: dict[int, int] = {}  # pid -> start time, every process of our trees
        self._ticks: dict[int, int] = {}  # pid -> CPU ticks when last seen
        self._program: dict[int, str] = {}  # pid -> program name, for the CPU breakdown

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        self._remember(proc.pid)
        return proc

    def _remember(self, pid: int) -> None:
        st = _stat(pid)
        if st is not None:
            self.seen.setdefault(pid, st[3])
            self._name(pid)

    def _name(self, pid: int) -> None:
        if self._program.get(pid, "?") == "?":  # empty while a process is still starting
            names = [Path(p.strip("[]")).name for p in cmdline(pid).split(" ")[:2]]
            self._program[pid] = next((n for n in names if n.startswith(
                FLOWER_PROGRAMS + ("flwr",))), names[0] or "?")

    def _ours_running(self, pid: int) -> bool:
        st = _stat(pid)
        return (st is not None and st[3] == self.seen.get(pid) and st[0] not in ("Z", "X"))

    def refresh(self) -> None:
        """Record every process below ours; call it while the parents are still alive
        (an orphan is re-parented to init and can no longer be traced)."""
        children: dict[int, list[int]] = {}
        for pid in _all_pids():
            st = _stat(pid)
            if st is not None:
                children.setdefault(st[1], []).append(pid)
        todo = [p for p in self.seen if self._ours_running(p)]
        # Orphans keep their process group: members of a group one of ours leads are ours.
        # (A group id outlives its leader only while members exist, so it cannot be someone
        # else's group unless the pid wraps around within the test.)
        groups = {p for p in self.seen if (st := _stat(p)) is None or st[3] == self.seen[p]}
        for pid in _all_pids():
            st = _stat(pid)
            if st is not None and st[2] in groups and pid not in self.seen:
                self._remember(pid)
                todo.append(pid)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in self.seen:
                    self._remember(child)
                    todo.append(child)
        for pid in self.seen:
            st = _stat(pid)
            if st is not None and st[3] == self.seen[pid]:
                self._ticks[pid] = max(self._ticks.get(pid, 0), st[4])
                self._name(pid)

    def cpu_seconds(self) -> float:
        """CPU time of every tracked process as last observed (a lower bound: work after the
        last refresh is not counted)."""
        return sum(self._ticks.values()) / os.sysconf("SC_CLK_TCK")

    def cpu_by_program(self) -> dict[str, tuple[int, float]]:
        """program -> (processes, CPU seconds), most expensive first."""
        out: dict[str, list] = {}
        for pid, ticks in self._ticks.items():
            entry = out.setdefault(self._program.get(pid, "?"), [0, 0.0])
            entry[0] += 1
            entry[1] += ticks / os.sysconf("SC_CLK_TCK")
        return dict(sorted(((k, (n, c)) for k, (n, c) in out.items()), key=lambda kv: -kv[1][1]))

    def alive(self) -> list[tuple[int, str]]:
        return [(p, cmdline(p)) for p in sorted(self.seen) if self._ours_running(p)]

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM to every tracked process, SIGKILL to what is left after `grace` seconds,
        then reap the processes started here."""
        self.refresh()
        for pid, _ in self.alive():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            self.refresh()  # anything spawned during shutdown
            time.sleep(0.2)
        for pid, _ in self.alive():
            _signal(pid, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
