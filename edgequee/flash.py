"""edgequee flash: put a bundle on a device over SSH, verified on the device, switched atomically, with rollback.

Transport is the system OpenSSH client, so ~/.ssh/config, keys, agents, ProxyJump and known_hosts all apply as
they do for ``ssh``. edgequee runs ssh with ``BatchMode=yes`` (no password or host-key prompts: key-based login
is required, and an unknown host key is refused with a message that says how to add it) and never touches host
key checking; ``--ssh-option``/``-o`` passes anything else through (the user's options come first, so they win).

One ssh session per operation runs ``_flash_agent.py`` with the device's ``python3`` (fed over stdin, so
edgequee need not be installed there). The agent plans (which files are already on the device, in the deployed
copy, a resumable ``.partial`` or another bundle), stages into ``ROOT/bundles/<model>@<hash>.partial``, receives
the rest over the same channel, verifies every file's sha256 on the device against the host's list and against
the manifest there, renames the staging directory into place and only then switches ``ROOT/current`` with a
rename over a fresh symlink. An interrupted transfer leaves ``current`` as it was; the next flash resumes.
``<hash>`` is the first 12 hex digits of manifest.json's sha256: the same conversion is the same bundle, so
flashing it again is a quick switch (after re-verifying the copy on the device).

Nothing outside the bundle is ever sent: before any connection, a symlink or special file anywhere in the bundle,
or a manifest entry that is absolute, has '..' or resolves outside it, is refused here (FlashError naming the file
and the fix), and files are read without following links. The request carries the manifest's full sha256, which
the agent checks against the bundle's name and against what arrived. TARGET's grammar is in ``Target``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from . import __version__, _flash_agent
from .bundle import MANIFEST, NotPlainFile, load_bundle, plain_files, sha256_file, write_profile
from .errors import BundleError, DeviceError
from .schema import check_device_name, check_profile
from .progress import Progress

__all__ = ["Target", "SshOptions", "Runtime", "FlashError", "flash", "rollback", "profile_remote", "run_hosts",
           "read_hosts", "scan_bundle", "flash_text", "rollback_text", "hosts_table", "DEFAULT_ROOT"]

DEFAULT_ROOT = "edgequee"  # relative: under the remote user's home
Event = Callable[[str, dict], None]

# Runs on the device: read the agent's source (its length on the first line) from stdin and run it.
_BOOTSTRAP = "import sys;b=sys.stdin.buffer;exec(compile(b.read(int(b.readline())),'edgequee-flash-agent','exec'))"
_AGENT = (Path(_flash_agent.__file__).read_text() + "\nserve()\n").encode()


class FlashError(DeviceError):
    """A flash, rollback, runtime install or remote profile failed; the message names the host and the fix."""


# --------------------------------------------------------------------------------------------------- targets


_TARGET_FORM = ("expected [user@]host[:port][:path] (port 1-65535, path starting with / or ~), e.g. "
                "pi@raspberrypi.local, pi@10.0.0.7:2222 or pi@10.0.0.7:2222:/opt/edgequee")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a name, an ssh-config alias or an IPv4 address
_ZONE_RE = re.compile(r"[A-Za-z0-9_.-]+")  # the %zone of a link-local IPv6 address


def _bad_target(spec: str, why: str) -> FlashError:
    return FlashError(f"bad target {spec!r}: {why}; {_TARGET_FORM}")


def _target_problem(host: str, user: str | None, port: int | None, root: str) -> str | None:
    """Why these fields make no target (None when they do): what Target.parse and Target(...) both refuse."""
    if not host:
        return "no host"
    if ":" in host:  # IPv6, written [addr] or [addr%zone] in a TARGET
        addr, _, zone = host.partition("%")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
        if "%" in host and not _ZONE_RE.fullmatch(zone):
            return f"{host!r} has a bad zone after %"
    elif not _HOST_RE.fullmatch(host):
        return f"{host!r} is not a host name or address (letters, digits, '.', '_', '-'; IPv6 in brackets)"
    if user is not None and not _USER_RE.fullmatch(user):
        return f"{user!r} is not a user name (letters, digits, '.', '_', '-')"
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        return f"port {port!r} is out of range (1-65535)"
    if not root or any(ord(c) < 32 or c == "\x7f" for c in root):
        return "the path is empty or has control characters in it"
    return None


@dataclass(frozen=True)
class Target:
    """Where to flash: ``[user@]host[:port][:path]``.

    The grammar, strictly (anything else is an error that names this form, never a directory name):

    - ``user``: letters, digits, ``.``, ``_``, ``-`` (not starting with ``-``); absent: ssh's default user;
    - ``host``: a host name, ssh-config alias or IPv4 address (letters, digits, ``.``, ``_``, ``-``, not starting
      with ``-`` or ``.``), or an IPv6 address in brackets (``[fe80::1]``, ``[fe80::1%eth0]``); never empty;
    - ``:port``: decimal digits only, 1-65535;
    - ``:path``: starts with ``/`` (absolute) or ``~`` (``~/models``: under the remote home); empty (``host:``,
      ``host:22:``) or absent means ``~/edgequee``. A field after the host that is neither digits nor starts with
      ``/`` or ``~`` (``host:models``, ``host:22x``) is refused: write ``host:~/models`` for a folder in the home.

    Nothing here reaches a shell: ssh gets user, port and host as separate arguments (``-l``, ``-p``, ``--
    host``; the characters allowed in user and host leave nothing for ssh's ``%h``/``%r`` expansion to inject),
    and the path travels inside the JSON request to the device agent, which never hands it to a shell either.
    """

    host: str
    user: str | None = None
    port: int | None = None
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        why = _target_problem(self.host, self.user, self.port, self.root)
        if why:
            raise _bad_target(f"{self.user + '@' if self.user else ''}{self.host}", why)

    @classmethod
    def parse(cls, spec: str) -> "Target":
        text = spec.strip()
        if not text:
            raise _bad_target(spec, "it is empty")
        at, first_colon = text.find("@"), text.find(":")
        user = None
        if at >= 0 and (first_colon < 0 or at < first_colon):  # an '@' after the first ':' belongs to the path
            user, text = text[:at], text[at + 1:]
            if not user:
                raise _bad_target(spec, "no user before '@' (leave out the '@' for ssh's default user)")
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise _bad_target(spec, "no ']' after the IPv6 address")
            host, rest = text[1:close], text[close + 1:]
            if host and ":" not in host:
                raise _bad_target(spec, f"brackets are for IPv6 addresses, not {host!r}")
            if rest and not rest.startswith(":"):
                raise _bad_target(spec, f"{rest!r} after ']'")
        else:
            host, colon, rest = text.partition(":")
            rest = colon + rest
        if not host:
            raise _bad_target(spec, "no host")
        where = text[:len(text) - len(rest)]  # the host as written, brackets and all
        port, root = None, DEFAULT_ROOT
        if rest:
            field = rest[1:]  # after the host's ':'
            if field.startswith(("/", "~")):
                root = field
            elif field:
                head, sep, tail = field.partition(":")
                if not head:
                    raise _bad_target(spec, "an empty port between the colons (give 1-65535 or leave the port "
                                            "out; an IPv6 address goes in brackets: [fe80::1])")
                if not re.fullmatch(r"[0-9]+", head):
                    raise _bad_target(spec, f"{head!r} is neither a port (1-65535) nor a path starting with / or "
                                            f"~ (write {where}:~/{head} for a folder in the home)")
                port = int(head)
                if not 1 <= port <= 65535:
                    raise _bad_target(spec, f"port {head} is out of range (1-65535)")
                if sep and tail:
                    if not tail.startswith(("/", "~")):
                        raise _bad_target(spec, f"the path {tail!r} must start with / or ~ (write {where}:{head}:~/"
                                                f"{tail} for a folder in the home)")
                    root = tail
        why = _target_problem(host, user, port, root)
        if why:
            raise _bad_target(spec, why)
        return cls(host, user, port, root)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}{':' + str(self.port) if self.port else ''}"

    def __str__(self) -> str:
        root = self.root if self.root.startswith(("/", "~")) else f"~/{self.root}"
        return f"{self.address}:{root}"


@dataclass(frozen=True)
class SshOptions:
    """How to run ssh: a config file (-F), an identity (-i), extra ``-o`` options and the connect timeout."""

    config: str | None = None
    identity: str | None = None
    options: tuple[str, ...] = ()
    connect_timeout: int = 15

    def argv(self, target: Target) -> list[str]:
        cmd = ["ssh"]
        if self.config:
            cmd += ["-F", self.config]
        if self.identity:
            cmd += ["-i", self.identity]
        for o in self.options:
            cmd += ["-o", o]
        cmd += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-T"]
        if target.port:
            cmd += ["-p", str(target.port)]
        if target.user:
            cmd += ["-l", target.user]
        return cmd + ["--", target.host]


def read_hosts(path: str | os.PathLike[str]) -> list[Target]:
    """Targets from a file, one per line; '#' starts a comment."""
    targets = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        spec = line.split("#", 1)[0].strip()
        if spec:
            try:
                targets.append(Target.parse(spec))
            except FlashError as e:
                raise FlashError(f"{path}:{n}: {e}") from None
    if not targets:
        raise FlashError(f"{path}: no targets in it (one user@host[:port][:/path] per line)")
    return targets


# ---------------------------------------------------------------------------------------------- the session


def _ssh_failure(target: Target, rc: int | None, stderr: str) -> FlashError:
    """One line naming the fix, from ssh's exit status and stderr."""
    host = target.address
    machine = f"{target.host}:{target.port}" if target.port else target.host
    hk = f"[{target.host}]:{target.port}" if target.port else target.host
    keyscan = f"ssh-keyscan {'-p ' + str(target.port) + ' ' if target.port else ''}{target.host}"
    login = f"ssh {'-p ' + str(target.port) + ' ' if target.port else ''}{target.user + '@' if target.user else ''}" \
            f"{target.host}"
    text = " ".join(stderr.split())
    rules = [
        ("IDENTIFICATION HAS CHANGED", f"the host key of {machine} has CHANGED since it was recorded in known_hosts "
         f"(a reinstalled device, or someone in between): if you expected it, remove the old key with "
         f"`ssh-keygen -R '{hk}'` and connect once with `{login}` to check and accept the new one"),
        ("Host key verification failed", f"the host key of {machine} is not in known_hosts, and edgequee never accepts "
         f"host keys by itself: check the fingerprint and add it with `{keyscan} >> ~/.ssh/known_hosts`, or "
         f"connect once with `{login}`"),
        ("Permission denied", f"authentication failed for {host}: install your key on the device with "
         f"`ssh-copy-id {login[4:]}` or pass --identity KEY (flash never asks for passwords)"),
        ("Could not resolve hostname", f"cannot resolve {target.host}: check the name, or use the device's IP "
         "address"),
    ]
    for needle, message in rules:
        if needle in text:
            return FlashError(message)
    for needle in ("Connection refused", "timed out", "No route to host", "Network is unreachable"):
        if needle in text:
            return FlashError(f"cannot reach {host} ({needle}): is the device on, on this network, with sshd "
                              "running? check the address and port")
    if rc == 127 or "python3: not found" in text or "python3: command not found" in text:
        return FlashError(f"no python3 on {host}: install it there (sudo apt-get install python3)")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    return FlashError(f"{host}: the connection failed (ssh exit {rc}): {last}")


class _Session:
    """One agent request on the device, over one ssh connection."""

    def __init__(self, target: Target, ssh: SshOptions, request: dict[str, Any], echo: IO[str] | None = None):
        self.target = target
        remote = f"python3 -c {shlex.quote(_BOOTSTRAP)}"
        try:
            self.proc = subprocess.Popen(ssh.argv(target) + [remote], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise FlashError("the OpenSSH client (ssh) is not installed here: sudo apt-get install openssh-client")
        self._stderr: list[str] = []
        self._echo = echo
        self._reader = threading.Thread(target=self._drain, args=(echo,), daemon=True)
        self._reader.start()
        self._write(b"%d\n" % len(_AGENT) + _AGENT)
        self.send(**request)

    def _drain(self, echo: IO[str] | None) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self._stderr.append(line)
            if echo is not None:
                echo.write(line)
                echo.flush()

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            raise self._failure() from None

    def _failure(self) -> FlashError:
        """The agent's last error message if it sent one, else what ssh said."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout.read().splitlines():
            if line.startswith(b'{"error"'):
                return self._agent_error(json.loads(line))
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(timeout=5)
        return _ssh_failure(self.target, rc, "".join(self._stderr))

    def send(self, **msg: Any) -> None:
        self._write(json.dumps(msg).encode() + b"\n")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise self._failure() from None

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise self._failure()
        msg = json.loads(line)
        if "error" in msg:
            raise self._agent_error(msg)
        return msg

    def _agent_error(self, msg: dict[str, Any]) -> FlashError:
        """The agent's one-line error; with the device's last output lines when they were not shown live."""
        text = f"{self.target.address}: {msg['error']}"
        if self._echo is None:
            self.close()
            tail = [line.strip() for line in self._stderr if line.strip()][-3:]
            if tail:
                text += " | device output: " + " / ".join(tail)
        return FlashError(text)

    def send_files(self, top: Path, files: Sequence[dict[str, Any]], progress: Progress | None,
                   follow_links: bool = False) -> int:
        """Stream ``files`` (dicts with path and size, relative to ``top``) to the agent; return the bytes sent.

        A symlink on the way to a file is refused unless ``follow_links`` (the runtime's wheels, which edgequee
        itself links into a temporary folder): a bundle's files are sent only from inside the bundle.
        """
        total, done = sum(f["size"] for f in files), 0
        for f in files:
            self.send(path=f["path"], size=f["size"])
            with (open(top / f["path"], "rb") if follow_links else _open_in_bundle(top, f["path"])) as src:
                left = f["size"]
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise FlashError(f"{top / f['path']} changed while it was being flashed: run the flash again")
                    self._write(chunk)
                    left -= len(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total, f["path"])
        self.send(end=True)
        return done

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)


@contextmanager
def _session(target: Target, ssh: SshOptions, request: dict[str, Any], echo: IO[str] | None = None
             ) -> Iterator[_Session]:
    s = _Session(target, ssh, request, echo)
    try:
        yield s
    except BaseException:
        s.proc.kill()
        raise
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class LocalBundle:
    """A verified local bundle and everything in its directory: path, size and sha256 of each file."""

    path: Path
    name: str  # <model>@<first 12 hex of manifest.json's sha256>
    files: tuple[dict[str, Any], ...]
    manifest_sha256: str = ""  # all of it: the device checks it against the name and against what it received

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files)


_LINK_FIX = "replace the symlink with the file or re-convert the bundle"


def _walk_bundle(top: Path) -> dict[str, int]:
    """``{relative path: size}`` of the files under ``top`` (``bundle.plain_files``: nothing is followed, so a link in
    a bundle can never make flash read, and send to a device, a file from elsewhere on this machine, a private key
    say), a symlink or special file refused in flash's words."""
    try:
        return plain_files(top)
    except NotPlainFile as e:
        if e.link is None:
            raise FlashError(f"{top}: {e.rel} is not a regular file or directory (a fifo, socket or device): "
                             "remove it or re-convert the bundle") from None
        kind = "directory" if os.path.isdir(top / e.rel) else "file"
        raise FlashError(f"{top}: {e.rel} is a symlink ({kind} link to {e.link}) and flash never follows links out "
                         f"of a bundle: {_LINK_FIX}") from None


def _check_manifest_paths(top: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest naming a file outside the bundle: absolute, with '..' (or '.', or an empty part), or
    resolving out of ``top``. Checked here on its own, whatever load_bundle does."""
    real_top = os.path.realpath(top)
    for rel in sorted(_flash_agent.manifest_paths(manifest)):
        parts = rel.split("/")
        why = ("is an absolute path" if rel.startswith("/") or os.path.isabs(rel) else
               "has '..' in it" if ".." in parts else
               "is empty or has an empty or '.' part" if not rel or any(p in ("", ".") for p in parts) or "\0" in rel
               else None)
        if why is None:
            real = os.path.realpath(os.path.join(real_top, *parts))
            if os.path.commonpath([real_top, real]) != real_top:
                why = "resolves outside the bundle"
        if why:
            raise FlashError(f"{top}: the manifest lists the file {rel!r}, which {why}; a bundle holds only files "
                             "inside its own directory and flash sends nothing else: re-convert the bundle")


def _load(top: Path) -> Any:
    """load_bundle, every failure of it reported as one line (a BundleError as it is)."""
    try:
        return load_bundle(top)
    except BundleError:
        raise
    except OSError as e:
        raise FlashError(f"cannot read the bundle {top}: {e.strerror or e}; check the path and its permissions"
                         ) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise FlashError(f"{top / MANIFEST} is malformed ({type(e).__name__}: {e}); re-convert the bundle") from None


def scan_bundle(path: str | os.PathLike[str]) -> LocalBundle:
    """Verify the bundle here (as ``load_bundle`` does) and list every file in it (hidden temp files excepted).

    Before anything is read through them, a symlink or special file anywhere in the bundle and a manifest entry
    that points outside it are refused (FlashError naming the file and the fix).
    """
    top = Path(path)
    if not top.is_dir():
        _load(top)  # says what is wrong (no such bundle, no manifest.json)
        raise FlashError(f"{top} is not a directory: give the bundle's directory (made by edgequee convert)")
    sizes = _walk_bundle(top)
    if MANIFEST not in sizes:
        _load(top)
    with _open_in_bundle(top, MANIFEST) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        data = None  # load_bundle says what is wrong with it
    if isinstance(data, dict):
        _check_manifest_paths(top, data)
    bundle = _load(top)
    vouched = _flash_agent.manifest_files(data) if isinstance(data, dict) else {}
    manifest_sha = hashlib.sha256(raw).hexdigest()
    files = []
    for rel, size in sorted(sizes.items()):
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        sha = manifest_sha if rel == MANIFEST else vouched.get(rel) or _sha256_in_bundle(top, rel)
        files.append({"path": rel, "size": size, "sha256": sha})
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", bundle.manifest.model).strip(".-") or "bundle"
    return LocalBundle(top, f"{model}@{manifest_sha[:12]}", tuple(files), manifest_sha)


def _open_in_bundle(top: Path, rel: str) -> IO[bytes]:
    """``top/rel`` for reading, refusing (FlashError) if any part of it is a symlink now (it was not when scanned)."""
    path = top
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except OSError as e:
            raise FlashError(f"{top}: {rel} changed while it was being flashed ({e.strerror}): run the flash again"
                             ) from None
        if stat.S_ISLNK(st.st_mode):
            raise FlashError(f"{top}: {rel} is a symlink now (it changed while it was being flashed): {_LINK_FIX}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FlashError(f"{top}: {rel} is a symlink now: {_LINK_FIX}") from None
        raise FlashError(f"cannot read {path}: {e.strerror}; check the bundle's permissions") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise FlashError(f"{top}: {rel} changed while it was being flashed: run the flash again")
    return os.fdopen(fd, "rb")


def _sha256_in_bundle(top: Path, rel: str) -> str:
    h = hashlib.sha256()
    with _open_in_bundle(top, rel) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """What ``--install-runtime`` puts in ROOT/venv: edgequee with ``extras``; ``wheels`` makes it offline."""

    extras: tuple[str, ...] = ("device",)
    wheels: Path | None = None  # a folder of wheels for the device's platform: installs with --no-index
    system_site_packages: bool = False  # let the venv see apt's packages (python3-picamera2, python3-numpy)


@dataclass(frozen=True)
class _Payload:
    """The wheels to ship for a runtime install, and which one (if any) is edgequee itself."""

    runtime: Runtime
    top: Path | None
    files: tuple[dict[str, Any], ...]
    wheel: str | None


def _project_root() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "edgequee"' in pyproject.read_text() else None


@contextmanager
def _runtime_payload(runtime: Runtime | None) -> Iterator[_Payload | None]:
    """Build a wheel of this edgequee (a source checkout) next to the --wheels ones; registry install otherwise."""
    if runtime is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="edgequee-wheels-") as tmp:
        top = Path(tmp)
        for w in sorted(runtime.wheels.glob("*.whl")) if runtime.wheels else []:
            os.symlink(w.resolve(), top / w.name)
        ours = sorted(top.glob("edgequee-*.whl"))
        project = _project_root()
        if not ours and project is not None:
            _build_wheel(project, top)
            ours = sorted(top.glob("edgequee-*.whl"))
        if runtime.wheels and not ours:
            raise FlashError(f"{runtime.wheels} has no edgequee wheel and this edgequee is not a source checkout: "
                             "add one (pip download 'edgequee[device]' -d DIR)")
        files = tuple({"path": w.name, "size": w.stat().st_size, "sha256": sha256_file(w)}
                      for w in sorted(top.glob("*.whl")))
        yield _Payload(runtime, top, files, ours[-1].name if ours else None)


def _build_wheel(project: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(project)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")  # no download of the build backend
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FlashError(f"building a wheel of {project} failed: {proc.stderr.strip().splitlines()[-1:]}; "
                         "pass --wheels DIR with an edgequee wheel instead")


def _install_runtime(target: Target, payload: _Payload, ssh: SshOptions, echo: IO[str] | None) -> dict[str, Any]:
    rt = payload.runtime
    request = {"op": "runtime", "root": target.root, "files": list(payload.files), "wheel": payload.wheel,
               "version": __version__, "extras": list(rt.extras), "offline": rt.wheels is not None,
               "system_site_packages": rt.system_site_packages}
    with _session(target, ssh, request, echo) as s:
        need = set(s.recv()["ready"])
        assert payload.top is not None or not need
        sent = s.send_files(payload.top or Path("."), [f for f in payload.files if f["path"] in need], None,
                            follow_links=True)
        done = s.recv()
    return {"python": done["python"], "edgequee": done["edgequee"], "python_version": done["python_version"],
            "uploaded_bytes": sent, "source": "wheels (offline)" if rt.wheels else
            ("wheel of this checkout + registry" if payload.wheel else "registry")}


# ------------------------------------------------------------------------------------------------ operations


def _target(target: Target | str) -> Target:
    return target if isinstance(target, Target) else Target.parse(target)


def flash(bundle: str | os.PathLike[str], target: Target | str, *, keep: int = 3, dry_run: bool = False,
          ssh: SshOptions = SshOptions(), runtime: Runtime | None = None, progress: Progress | None = None,
          on_event: Event | None = None) -> dict[str, Any]:
    """Put ``bundle`` on ``target`` and make it current; see the module docstring. Returns a JSON-able report.

    ``progress(done_bytes, total_bytes, file)`` follows the upload; ``on_event(name, info)`` is called at
    "staged" (every file is on the device, unverified; info["partial"] is the staging directory there).
    """
    with _runtime_payload(None if dry_run else runtime) as payload:
        return _flash(scan_bundle(bundle), _target(target), keep, dry_run, ssh, payload, progress, on_event,
                      sys.stderr)


def _flash(local: LocalBundle, target: Target, keep: int, dry_run: bool, ssh: SshOptions, payload: _Payload | None,
           progress: Progress | None, on_event: Event | None, echo: IO[str] | None) -> dict[str, Any]:
    """``flash`` of a scanned bundle; ``echo`` shows the device's output (pip's, during a runtime install) live."""
    t0 = time.monotonic()
    if keep < 1:
        raise FlashError("--keep must be at least 1 (the current bundle)")
    report: dict[str, Any] = {"target": str(target), "bundle": local.name, "source": str(local.path),
                              "total_bytes": local.size, "runtime": None}
    if payload is not None:
        report["runtime"] = _install_runtime(target, payload, ssh, echo)
    request = {"op": "flash", "root": target.root, "bundle": local.name, "manifest_sha256": local.manifest_sha256,
               "files": list(local.files), "keep": keep, "dry_run": dry_run}
    with _session(target, ssh, request) as s:
        plan = s.recv()
        report.update(root=plan["root"], previous=plan["current"], free_bytes=plan["free_bytes"], files=plan["plan"],
                      device_python=plan["python"])
        if dry_run:
            report.update(action="dry-run", seconds=time.monotonic() - t0)
            return report
        uploads = set(s.recv()["ready"])
        sent = s.send_files(local.path, [f for f in local.files if f["path"] in uploads], progress)
        staged = s.recv()["staged"]
        if on_event:
            on_event("staged", {"partial": staged, "target": str(target)})
        s.send(activate=True)
        done = s.recv()
    action = "activated" if not plan["final_ok"] else "unchanged" if plan["current"] == local.name else "switched"
    report.update(action=action, current=done["current"], uploaded_files=len(uploads), uploaded_bytes=sent,
                  verified_files=done["verified"], kept=done["kept"], removed=done["removed"],
                  seconds=time.monotonic() - t0)
    return report


def rollback(target: Target | str, *, dry_run: bool = False, ssh: SshOptions = SshOptions()) -> dict[str, Any]:
    """Switch ``current`` back to the bundle activated before it (verified on the device first)."""
    t0, target = time.monotonic(), _target(target)
    with _session(target, ssh, {"op": "rollback", "root": target.root, "dry_run": dry_run}) as s:
        done = s.recv()
    return {"target": str(target), "root": done["root"], "action": "dry-run" if dry_run else "rolled back",
            "current": done["current"], "previous": done["previous"], "seconds": time.monotonic() - t0}


def profile_remote(bundle: str | os.PathLike[str], target: Target | str, device: str, args: Sequence[str], *,
                   python: str | None = None, ssh: SshOptions = SshOptions()) -> dict[str, Any]:
    """Run ``edgequee profile`` on the device (``args`` passed through) and copy profiles/DEVICE.json back here.

    The bundle must already be on the device (any deployed copy, current or not); ``python`` is the device's
    interpreter with edgequee installed (default ROOT/venv/bin/python, from ``flash --install-runtime``).
    """
    target = _target(target)
    check_device_name(device)  # it names the file written back here
    local = scan_bundle(bundle)
    request = {"op": "profile", "root": target.root, "bundle": local.name, "device": device, "python": python,
               "args": ["--device", device, *args]}
    with _session(target, ssh, request, echo=sys.stderr) as s:
        done = s.recv()
    data = base64.b64decode(done["profile"])
    if hashlib.sha256(data).hexdigest() != done["sha256"]:
        raise FlashError(f"{target.address}: the profile was damaged on the way back; run the command again")
    try:
        profile = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlashError(f"{target.address}: the device sent back a profile that is not JSON ({e}); re-run it") from e
    b = load_bundle(local.path)
    check_profile(profile, f"{target.address}: profiles/{device}.json", b.manifest.num_exits)
    write_profile(b, device, profile)
    return profile


def run_hosts(fn: Callable[[Target], dict[str, Any]], targets: Sequence[Target], jobs: int = 8
              ) -> list[dict[str, Any]]:
    """``fn(target)`` for every target in parallel threads; each result gets ``ok`` (and ``error`` on failure)."""

    def one(t: Target) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            return {"ok": True, **fn(t)}
        except (FlashError, BundleError, OSError) as e:
            return {"ok": False, "target": str(t), "error": str(e), "seconds": time.monotonic() - t0}

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(targets)))) as pool:
        return list(pool.map(one, targets))


def flash_hosts(bundle: str | os.PathLike[str], targets: Sequence[Target], *, jobs: int = 8, keep: int = 3,
                dry_run: bool = False, ssh: SshOptions = SshOptions(), runtime: Runtime | None = None
                ) -> list[dict[str, Any]]:
    """``flash`` to many targets in parallel: the bundle is verified (and the runtime wheel built) once."""
    local = scan_bundle(bundle)
    with _runtime_payload(None if dry_run else runtime) as payload:
        return run_hosts(lambda t: _flash(local, t, keep, dry_run, ssh, payload, None, None, None),
                         targets, jobs)


# -------------------------------------------------------------------------------------------------- output


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def flash_text(r: dict[str, Any]) -> str:
    """What a flash did (or, for a dry run, would do), for people."""
    files = r["files"]
    by = {a: [f for f in files if f["action"] == a] for a in ("upload", "copy", "staged", "on device")}
    head = f"{r['bundle']} → {r['target']}"
    if r["action"] == "dry-run":
        rows = [(f["path"], _size(f["size"]), f["action"] + (f" from {f['source']}" if f["action"] == "copy" else ""))
                for f in files]
        w0, w1 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
        up = sum(f["size"] for f in by["upload"])
        lines = [f"dry run: {head}  (nothing changed)",
                 f"  root {r['root']}; current: {r['previous'] or 'none'}; {_size(r['free_bytes'])} free"]
        lines += [f"  {a.ljust(w0)}  {b.rjust(w1)}  {c}" for a, b, c in rows]
        lines.append(f"  would upload {len(by['upload'])} of {len(files)} files ({_size(up)} of "
                     f"{_size(r['total_bytes'])}); the rest is already on the device")
        return "\n".join(lines)
    lines = [f"{head}  ({r['action']} in {r['seconds']:.1f} s)"]
    if r.get("runtime"):
        rt = r["runtime"]
        lines.append(f"  runtime: {rt['python']} (edgequee {rt['edgequee']}, Python {rt['python_version']}; "
                     f"{rt['source']})")
    said = {"copy": "copied from another bundle on the device", "staged": "resumed from an interrupted flash",
            "on device": "already in place"}
    reused = [f"{len(by[a])} {said[a]}" for a in said if by[a]]
    lines.append(f"  {len(files)} files, {_size(r['total_bytes'])}: {r['uploaded_files']} uploaded "
                 f"({_size(r['uploaded_bytes'])})" + (f", {', '.join(reused)}" if reused else "")
                 + f"; sha256 verified on the device: {r['verified_files']}/{len(files)}")
    was = "" if r["previous"] in (None, r["current"]) else f" (was {r['previous']})"
    lines.append(f"  current → bundles/{r['current']}{was}; kept {len(r['kept'])}"
                 + (f", removed {', '.join(r['removed'])}" if r["removed"] else ""))
    return "\n".join(lines)


def rollback_text(r: dict[str, Any]) -> str:
    verb = "would switch" if r["action"] == "dry-run" else "rolled back:"
    return f"{r['target']}: {verb} current → bundles/{r['current']} (was {r['previous']})"


def hosts_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per host (the long result last), then the count of failures."""
    rows = [("target", "status", "time", "result")]
    for r in results:
        if r["ok"] and r["action"] == "dry-run" and "files" in r:
            up = [f for f in r["files"] if f["action"] == "upload"]
            result = f"dry run: would send {len(up)} of {len(r['files'])} files ({_size(sum(f['size'] for f in up))})"
        elif r["ok"]:
            sent = f", {_size(r['uploaded_bytes'])} sent" if r.get("uploaded_bytes") else ""
            result = f"{r['action']}: current {r['current']}{sent}" if r.get("current") else f"{r['action']}{sent}"
        else:
            result = r["error"]
        rows.append((r["target"], "ok" if r["ok"] else "FAILED", f"{r['seconds']:.1f} s", result))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[3]]) for row in rows]
    failed = sum(not r["ok"] for r in results)
    return "\n".join(lines + [f"{len(results) - failed} ok, {failed} failed"])
