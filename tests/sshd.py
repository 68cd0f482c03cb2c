"""A real OpenSSH server on 127.0.0.1 for the flash tests, with keys generated at test time.

``SshServer(tmp).start()`` runs ``sshd -D`` as the current user on a free port, with a fresh host key, a fresh
client key in authorized_keys and a client config (``-F``) whose known_hosts holds exactly that host key; the
user's own ~/.ssh is never read or written. Run as a script, this file is a rate-limited TCP relay for
``ProxyCommand`` (a slow link, so a test can kill a flash in the middle of its upload).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def find_sshd() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)),
                                        None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgequee-test", "-f", str(path)],
                   check=True)


class SshServer:
    """sshd on 127.0.0.1:port for the current user; ``config`` is the matching client config for ``ssh -F``."""

    def __init__(self, tmp: Path):
        self.dir = Path(tmp)
        self.user = getpass.getuser()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.config = self.dir / "ssh_config"
        self.known_hosts = self.dir / "known_hosts"

    def target(self, root: Path | str) -> str:
        return f"{self.user}@127.0.0.1:{self.port}:{root}"

    def start(self) -> "SshServer":
        sshd = find_sshd()
        assert sshd, "sshd is not installed"
        self.dir.mkdir(parents=True, exist_ok=True)
        _keygen(self.host_key)
        _keygen(self.client_key)
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        for _ in range(3):  # the free port may be taken between the probe and sshd's bind
            self.port = _free_port()
            (self.dir / "sshd_config").write_text(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
                "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\nUseDNS no\nMaxStartups 50\nMaxSessions 50\n")
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                         stdout=subprocess.DEVNULL, stderr=open(self.dir / "sshd.log", "wb"))
            if self._wait_listening():
                break
            self.stop()
        else:
            raise RuntimeError(f"sshd did not start: {(self.dir / 'sshd.log').read_text()[-2000:]}")
        pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.write_config(self.config)
        return self

    def write_config(self, path: Path, known_hosts: Path | None = None, identity: Path | None = None,
                     proxy: str | None = None) -> Path:
        """A client config for this server (another known_hosts, key or ProxyCommand for the failure tests)."""
        lines = ["Host *", f"  IdentityFile {identity or self.client_key}", "  IdentitiesOnly yes",
                 f"  UserKnownHostsFile {known_hosts or self.known_hosts}", "  GlobalKnownHostsFile /dev/null",
                 "  LogLevel ERROR"]
        if proxy:
            lines.append(f"  ProxyCommand {proxy}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def throttled_config(self, path: Path, bytes_per_s: int) -> Path:
        """A client config whose connection goes through the rate-limited relay below."""
        proxy = f"{sys.executable} {Path(__file__).resolve()} relay 127.0.0.1 {self.port} {bytes_per_s}"
        return self.write_config(path, proxy=proxy)

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def relay(host: str, port: int, bytes_per_s: int) -> None:
    """stdin/stdout ⇄ host:port, the client-to-server direction limited to ``bytes_per_s`` (a slow uplink)."""
    sock = socket.create_connection((host, port))

    def down() -> None:
        while data := sock.recv(65536):
            os.write(1, data)
        os._exit(0)

    threading.Thread(target=down, daemon=True).start()
    chunk = max(1, bytes_per_s // 20)
    while data := os.read(0, chunk):
        sock.sendall(data)
        time.sleep(len(data) / bytes_per_s)
    sock.shutdown(socket.SHUT_WR)
    threading.Event().wait(5)


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    relay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
