"""The device side of ``edgequee flash``: a standard-library program that ``python3`` on the device runs.

flash.py sends this file's source over ssh's stdin, followed by a call to ``serve()``; edgequee need not be
installed on the device, so keep this to the Python 3.7 standard library. One ssh session runs one request, and
holds ``ROOT/.lock`` (flock) throughout, so two flashes to one root never interleave.

Protocol: JSON lines both ways; a file travels as a ``{"path", "size"}`` line followed by exactly ``size`` raw
bytes. Any failure is sent as ``{"error": "..."}`` (one line that names the fix) and ends the session.

Paths: every path the host or a manifest names is relative, without '.', '..' or empty parts (else the bundle is
malformed and the request is refused), and nothing inside a bundle directory is ever followed if it is a symlink:
a file or directory that is a symlink is not trusted when planning, not copied from, removed from staging, and
refused when verifying or writing (lstat on every part, O_NOFOLLOW on the file itself). A bundle's name is
``<model>@<first 12 hex of its manifest.json's sha256>``; the host sends the full sha256 too, and the manifest on
the device must match both before anything is activated (rollback checks the name, and the full sha256 recorded
in history.json when the bundle was activated).

Layout under ROOT::

    bundles/<model>@<hash>/           deployed bundles (verified before they were renamed into place)
    bundles/<model>@<hash>.partial/   staging; never pointed at; resumed by the next flash of the same bundle
    current -> bundles/<model>@<hash> switched with rename(2) over a fresh symlink
    history.json                      activations, newest last (what --rollback walks back through)
    venv/, wheels/                    the runtime from --install-runtime
"""

import base64
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

BUNDLES = "bundles"
CURRENT = "current"
HISTORY = "history.json"
PARTIAL = ".partial"
MANIFEST = "manifest.json"
HEADS = "heads.npz"
STALE_PARTIAL_S = 3600  # partials of *other* bundles older than this are leftovers of interrupted flashes
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+@([0-9a-f]{12})$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class AgentError(Exception):
    """A failure to report to the host as one line."""


class Hangup(Exception):
    """The host went away (interrupted flash): stop quietly, leaving staging as it is."""


# ------------------------------------------------------------------------------------------------ helpers


def _file_fields(manifest):
    """``(path, sha256 or None)`` for every file a manifest names: heads.npz (``heads_sha256``) and, anywhere in it,
    each ``file`` string with the ``sha256`` beside it and each ``<x>_file`` with its ``<x>_sha256`` (the stored
    policy's arrays), so files added to the format later are covered too."""
    out = [(HEADS, manifest["heads_sha256"])] if isinstance(manifest.get("heads_sha256"), str) else []

    def walk(node):
        if isinstance(node, dict):
            for key, rel in node.items():
                if (key == "file" or key.endswith("_file")) and isinstance(rel, str):
                    sha = node.get(key[:-4] + "sha256")
                    out.append((rel, sha if isinstance(sha, str) else None))
                walk(rel)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(manifest)
    return out


def manifest_files(manifest):
    """Every file a manifest vouches for, ``{relative path: sha256}``."""
    return {rel: sha for rel, sha in _file_fields(manifest) if sha is not None}


def manifest_paths(manifest):
    """Every path a manifest names, with a sha256 beside it or not: what must stay inside the bundle."""
    return {rel for rel, _ in _file_fields(manifest)}


def sha256_of(path):
    """sha256 of the file at ``path``; a symlink there is not followed (OSError, ELOOP)."""
    h = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | O_NOFOLLOW), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unsafe(rel):
    """Why ``rel`` is no path inside a bundle ('is absolute', "has '..' in it"...), or None when it is one."""
    if not isinstance(rel, str) or not rel:
        return "is empty or not a string"
    if rel.startswith("/") or os.path.isabs(rel):
        return "is absolute"
    parts = rel.split("/")
    if ".." in parts:
        return "has '..' in it"
    if any(p in ("", ".") for p in parts) or "\0" in rel:
        return "has an empty or '.' part"
    return None


def _safe_rel(rel, what="the bundle"):
    """A relative path that stays inside its directory (the host's and the manifest's paths are checked)."""
    why = _unsafe(rel)
    if why:
        raise AgentError("%s is malformed: it names the path %r, which %s (a bundle holds only files inside its "
                         "own directory); refused, not a problem with the device. Re-convert the bundle on the host "
                         "and flash it again" % (what, rel, why))
    return os.path.join(*rel.split("/"))


def _link_in(top, rel):
    """The first of ``top``, ``top/a``, ``top/a/b``... (for rel a/b/...) that is a symlink, or None.

    Parts that do not exist end the search: whatever is created there later is created fresh.
    """
    path = top
    for part in [None] + _safe_rel(rel).split(os.sep):
        if part is not None:
            path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return path
    return None


def _inside(top, rel):
    """``top/rel``, refusing (AgentError) a symlink anywhere on the way: never followed inside a bundle."""
    link = _link_in(top, rel)
    if link:
        raise AgentError("%s is a symlink on the device and edgequee never follows symlinks inside a bundle: "
                         "refused, nothing was activated. Remove it (rm %s) and flash again" % (link, link))
    return os.path.join(top, _safe_rel(rel))


def _matches(top, rel, sha):
    """Whether ``top/rel`` is a regular file with this sha256, reached through no symlink."""
    try:
        if _unsafe(rel) or _link_in(top, rel):
            return False
        return sha256_of(os.path.join(top, _safe_rel(rel))) == sha
    except OSError:
        return False


def _files_under(top):
    """Relative paths ('/'-separated) under ``top``: (regular files, everything else that is no directory).

    The second list holds symlinks (to files or directories; never followed) and special files.
    """
    files, others = [], []
    for d, dirs, names in os.walk(top, followlinks=False):
        dirs.sort()
        for n in sorted(dirs + names):
            p = os.path.join(d, n)
            rel = os.path.relpath(p, top).replace(os.sep, "/")
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                others.append(rel)
    return files, others


def _read_bundle_json(top, rel, default):
    """JSON from ``top/rel`` reached through no symlink, else ``default``."""
    try:
        with os.fdopen(os.open(_inside(top, rel), os.O_RDONLY | O_NOFOLLOW), "rb") as f:
            return json.loads(f.read().decode())
    except (AgentError, OSError, ValueError):
        return default


def _manifest_sha(top):
    try:
        return None if _link_in(top, MANIFEST) else sha256_of(os.path.join(top, MANIFEST))
    except OSError:
        return None


def _check_identity(name, manifest_sha, files):
    """The request's bundle name, full manifest sha256 and file list must agree (a swapped manifest is refused)."""
    m = NAME_RE.match(name) if isinstance(name, str) else None
    if not m:
        raise AgentError("bad bundle name %r (expected <model>@<12 hex of the manifest's sha256>): run the flash "
                         "again with this edgequee" % (name,))
    if not isinstance(manifest_sha, str) or not SHA_RE.match(manifest_sha):
        raise AgentError("the flash request has no manifest sha256 for %s (an older edgequee on the host?): "
                         "upgrade edgequee there and flash again" % name)
    listed = [f.get("sha256") for f in files if f.get("path") == MANIFEST]
    if not manifest_sha.startswith(m.group(1)) or listed != [manifest_sha]:
        raise AgentError("manifest mismatch for bundle %s: its name says the manifest's sha256 starts %s, the request "
                         "says %s and the manifest.json listed is %s; the bundle or its manifest was swapped or "
                         "changed on the way. Nothing was changed on the device: re-convert the bundle, or flash it "
                         "again" % (name, m.group(1), manifest_sha[:12],
                                    " and ".join(str(s)[:12] for s in listed) or "none"))


def _name_problem(top, name, full_sha=None):
    """Why the manifest in ``top`` is not the one bundle ``name`` was named for, or None."""
    m = NAME_RE.match(name)
    got = _manifest_sha(top)
    if got is None:
        return "%s (missing, unreadable or a symlink)" % MANIFEST
    if m is None or not got.startswith(m.group(1)) or (full_sha and got != full_sha):
        return ("%s (its sha256 %s is not the one the bundle is named for: the manifest was changed or swapped)"
                % (MANIFEST, got[:12]))
    return None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, data):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _oserror_text(e):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full on the device (%s): free space there, or flash with a lower --keep" % e
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "no permission on the device (%s): pick a root the ssh user can write (TARGET user@host:/path)" % e
    return "device-side error: %s" % e


class Channel:
    """JSON lines and raw file bytes over stdin/stdout."""

    def __init__(self):
        self.inp = sys.stdin.buffer
        self.out = sys.stdout

    def recv(self):
        line = self.inp.readline()
        if not line:
            raise Hangup()
        return json.loads(line.decode())

    def send(self, **msg):
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def recv_files(self, top):
        """Receive files into ``top`` until {"end": true}; each is fsynced. Returns the paths written."""
        written = []
        while True:
            head = self.recv()
            if head.get("end"):
                return written
            left = int(head["size"])
            with _create(top, head["path"]) as f:
                while left:
                    chunk = self.inp.read(min(left, 1 << 20))
                    if not chunk:
                        raise Hangup()
                    f.write(chunk)
                    left -= len(chunk)
                f.flush()
                os.fsync(f.fileno())
            written.append(head["path"])


class Lock:
    """An exclusive flock on ROOT/.lock for the whole session; a second flash gets a clear error at once."""

    def __init__(self, root):
        import fcntl

        os.makedirs(root.bundles, exist_ok=True)
        self.fd = os.open(os.path.join(root.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise AgentError("another edgequee flash is working on %s right now: wait for it to finish" % root.path)

    def release(self):
        os.close(self.fd)


# ------------------------------------------------------------------------------------------------ the root


class Root:
    def __init__(self, path):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.bundles = os.path.join(self.path, BUNDLES)

    def bundle(self, name):
        if "/" in name or name.startswith("."):
            raise AgentError("bad bundle name %r" % name)
        return os.path.join(self.bundles, name)

    def current(self):
        link = os.path.join(self.path, CURRENT)
        if os.path.isdir(link) and not os.path.islink(link):
            raise AgentError("%s is a directory, not a symlink: move it out of the way first" % link)
        try:
            return os.path.basename(os.readlink(link))
        except OSError:
            return None

    def deployed(self):
        """Names of the deployed bundles (complete directories under bundles/)."""
        try:
            names = os.listdir(self.bundles)
        except OSError:
            return []
        return sorted(n for n in names if not n.endswith(PARTIAL) and not n.startswith(".")
                      and os.path.isdir(os.path.join(self.bundles, n))
                      and not os.path.islink(os.path.join(self.bundles, n)))

    def history(self):
        return [e for e in _read_json(os.path.join(self.path, HISTORY), []) if isinstance(e, dict) and "bundle" in e]

    def write_history(self, entries):
        _write_json(os.path.join(self.path, HISTORY), entries)

    def switch(self, name):
        """Point ``current`` at bundles/NAME atomically (rename over a fresh symlink) and make it durable."""
        self.current()  # refuses a real directory named current
        tmp = os.path.join(self.path, ".current.tmp-%d" % os.getpid())
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join(BUNDLES, name), tmp)
        os.replace(tmp, os.path.join(self.path, CURRENT))
        _fsync_dir(self.path)

    def prune(self, keep):
        """Keep ``current`` and the most recently activated bundles, ``keep`` in all; remove leftovers."""
        current = self.current()
        kept = [current] if current else []
        for e in reversed(self.history()):
            if len(kept) >= keep:
                break
            if e["bundle"] not in kept and os.path.isdir(self.bundle(e["bundle"])):
                kept.append(e["bundle"])
        removed = [n for n in self.deployed() if n not in kept]
        for n in removed:
            shutil.rmtree(self.bundle(n))
        now = time.time()
        for n in os.listdir(self.bundles):
            p = os.path.join(self.bundles, n)
            if n.startswith(".trash-") or (n.endswith(PARTIAL) and now - os.path.getmtime(p) > STALE_PARTIAL_S):
                if os.path.islink(p):
                    os.unlink(p)  # a link in bundles/: removed, what it points at is left alone
                else:
                    shutil.rmtree(p, ignore_errors=True)
        self.write_history([e for e in self.history() if e["bundle"] in kept])
        return kept, removed

    def verify_manifest(self, top, name, full_sha=None):
        """The manifest in ``top`` against the bundle's name, and the sha256 of every file it lists; returns the
        failures as 'path (why)'. Nothing is followed through a symlink."""
        manifest = _read_bundle_json(top, MANIFEST, None)
        if not isinstance(manifest, dict):
            return ["%s (missing, not JSON or a symlink)" % MANIFEST]
        bad = [p for p in [_name_problem(top, name, full_sha)] if p]
        for rel in sorted(manifest_paths(manifest)):
            if _unsafe(rel):
                bad.append("%s (an unsafe path: it %s; the bundle is malformed)" % (rel, _unsafe(rel)))
        for rel, sha in sorted(manifest_files(manifest).items()):
            if _unsafe(rel):
                continue
            if _link_in(top, rel):
                bad.append("%s (a symlink: never followed)" % rel)
            elif not _matches(top, rel, sha):
                bad.append("%s (sha256 mismatch)" % rel)
        return bad


# ------------------------------------------------------------------------------------------------ operations


def _candidates(root, name):
    """Files already on the device, ``{sha256: [paths]}``, from the manifests of the deployed bundles."""
    out = {}
    for other in root.deployed():
        top = root.bundle(other)
        manifest = _read_bundle_json(top, MANIFEST, {})
        if not isinstance(manifest, dict):
            continue
        for rel, sha in manifest_files(manifest).items():
            if not _unsafe(rel):  # a malformed old bundle offers nothing, but does not block this flash
                out.setdefault(sha, []).append((other, top, rel))
    return out


def _plan(root, name, files):
    """For each file: 'on device' (in the deployed bundle), 'staged' (resumed), 'copy' (from another bundle), 'upload'."""
    final = root.bundle(name)
    partial = final + PARTIAL
    in_final = {f["path"]: _matches(final, f["path"], f["sha256"])
                for f in files} if os.path.isdir(final) and not os.path.islink(final) else {}
    final_ok = bool(in_final) and all(in_final.values())
    candidates = None if final_ok else _candidates(root, name)
    plan = []
    for f in files:
        rel, sha = f["path"], f["sha256"]
        entry = {"path": rel, "size": f["size"], "action": "upload"}
        if final_ok:
            entry.update(action="on device", source=name)
        elif in_final.get(rel):  # a damaged or outdated copy of this bundle: keep what still verifies
            entry.update(action="copy", source=name, from_path=os.path.join(final, _safe_rel(rel)))
        elif _matches(partial, rel, sha):
            entry.update(action="staged", source=name + PARTIAL)
        else:
            for other, top, path in candidates.get(sha, []):
                if _matches(top, path, sha):  # never trust a claim: bit rot in an old bundle must not spread
                    entry.update(action="copy", source=other, from_path=os.path.join(top, _safe_rel(path)))
                    break
        plan.append(entry)
    return final_ok, plan


def _create(top, rel):
    """Open ``top/rel`` for writing (truncated), its directories made; a symlink on the way is refused."""
    dest = _inside(top, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _inside(top, rel)  # nothing turned into a symlink meanwhile
    return os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NOFOLLOW, 0o666), "wb")


def _copy(src, top, rel):
    """A real copy, not a hard link: bit rot in one deployed bundle must not reach the others. ``src`` is never
    followed if it is a symlink (the planner checked every part of it), nor is anything in ``top/rel``."""
    with os.fdopen(os.open(src, os.O_RDONLY | O_NOFOLLOW), "rb") as fin, _create(top, rel) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _stage(root, name, plan):
    """Build bundles/NAME.partial from what is already on the device; the uploads go in afterwards."""
    final = root.bundle(name)
    partial = final + PARTIAL
    keep = {e["path"] for e in plan if e["action"] == "staged"}
    if os.path.islink(partial):
        os.unlink(partial)  # the link, never what it points at
    if os.path.isdir(partial):
        files, others = _files_under(partial)
        for rel in others:  # symlinks (to files or directories) and special files: removed, never followed
            os.unlink(os.path.join(partial, rel))
        for rel in files:
            if rel not in keep:
                os.unlink(os.path.join(partial, rel))
    os.makedirs(partial, exist_ok=True)
    os.utime(partial)
    for e in plan:
        if e["action"] == "copy":
            _copy(e["from_path"], partial, e["path"])
    if os.path.isdir(final) and not os.path.islink(final):  # carry files the device wrote itself over
        ours = {e["path"] for e in plan}  # (e.g. profiles/<device>.json); symlinks there are left behind
        for rel in _files_under(final)[0]:
            if rel not in ours and not _unsafe(rel) and not _link_in(final, rel):
                _copy(os.path.join(final, _safe_rel(rel)), partial, rel)
    return partial


def _verify(top, files, name=None, manifest_sha=None):
    """sha256 of every file against the host's list and against the manifest on the device; raises on mismatch.

    Also refused: a symlink anywhere in ``top`` (removed, so the next flash replaces it), a manifest naming an
    unsafe path or a file the host did not send (a malformed bundle), and, given ``name``/``manifest_sha``, a
    manifest.json that is not the one the bundle is named for.
    """
    links = set(_files_under(top)[1]) | {f["path"] for f in files if _link_in(top, f["path"])}
    if links:
        for rel in links:
            if os.path.islink(os.path.join(top, rel)):
                os.unlink(os.path.join(top, rel))  # the link itself, so the next flash replaces it
        raise AgentError("%s in %s on the device: a symlink or special file, and edgequee never follows symlinks "
                         "inside a bundle; refused, nothing was activated. Run the flash again"
                         % (", ".join(sorted(links)[:3]), top))
    bad = []
    for f in files:
        path = os.path.join(top, _safe_rel(f["path"]))
        try:
            got = sha256_of(path)
        except OSError:
            got = "missing"
        if got != f["sha256"]:
            bad.append((f["path"], f["sha256"], got))
    for rel, _, got in bad:
        if got != "missing":
            os.unlink(os.path.join(top, _safe_rel(rel)))  # so the next flash uploads it again
    if name is not None:
        for rel, want, got in bad:
            if rel == MANIFEST:
                raise AgentError("manifest mismatch on the device for %s: the manifest.json received has sha256 %s, "
                                 "not %s, the manifest the bundle is named for (it was changed or swapped on the "
                                 "way, or on the host during the flash); nothing was activated. Run the flash again"
                                 % (name, got[:12], want[:12]))
    if bad:
        what = ", ".join("%s (expected %s, got %s)" % (rel, want[:12], got[:12]) for rel, want, got in bad[:3])
        raise AgentError("sha256 mismatch on the device for %d file(s): %s%s; nothing was activated. Run the flash "
                         "again; if it fails again the device's storage may be failing"
                         % (len(bad), what, " ..." if len(bad) > 3 else ""))
    manifest = _read_bundle_json(top, MANIFEST, None)
    if isinstance(manifest, dict):
        for rel in sorted(manifest_paths(manifest)):
            _safe_rel(rel)  # a malformed bundle, refused as such (not as a storage failure)
        listed = {f["path"] for f in files}
        unsent = sorted(rel for rel in manifest_files(manifest) if rel not in listed)
        if unsent:
            raise AgentError("the bundle is malformed: its manifest lists %s, which the host did not send (no such "
                             "file in the bundle); nothing was activated. Re-convert the bundle and flash it again"
                             % ", ".join(unsent[:3]))
    if name is not None:
        problem = _name_problem(top, name, manifest_sha)
        if problem:
            raise AgentError("manifest mismatch on the device for %s: %s; nothing was activated. Run the flash "
                             "again" % (name, problem))


def op_flash(ch, req):
    root = Root(req["root"])
    name, files, dry = req["bundle"], req["files"], bool(req.get("dry_run"))
    for f in files:
        _safe_rel(f["path"])
    _check_identity(name, req.get("manifest_sha256"), files)
    lock = None if dry else Lock(root)
    try:
        final_ok, plan = _plan(root, name, files)
        need = sum(e["size"] for e in plan if e["action"] in ("upload", "copy"))
        free = shutil.disk_usage(_existing_parent(root.path)).free
        current = root.current()
        ch.send(plan=[{k: v for k, v in e.items() if k != "from_path"} for e in plan], root=root.path,
                free_bytes=free, current=current, final_ok=final_ok, python=sys.version.split()[0])
        if dry:
            return
        if need > free:
            raise AgentError("disk full on the device: this flash needs %.1f MB under %s, %.1f MB are free; free "
                             "space there, or flash with a lower --keep" % (need / 1e6, root.path, free / 1e6))
        final = root.bundle(name)
        uploads = [e["path"] for e in plan if e["action"] == "upload"]
        top = final if final_ok else _stage(root, name, plan)
        ch.send(ready=uploads, partial=top)
        ch.recv_files(top)
        ch.send(staged=top)
        if not ch.recv().get("activate"):
            return
        if not final_ok:
            _verify(top, files, name, req["manifest_sha256"])
            for d, _, _ in os.walk(top):
                _fsync_dir(d)
            if os.path.isdir(final):  # replacing a damaged or outdated copy of the same bundle
                os.rename(final, os.path.join(root.bundles, ".trash-%s-%d" % (name, os.getpid())))
            os.rename(top, final)
            _fsync_dir(root.bundles)
        if current != name:
            root.switch(name)
            root.write_history(root.history() + [{"bundle": name, "activated": _now(),
                                                   "manifest_sha256": req["manifest_sha256"]}])
        kept, removed = root.prune(int(req.get("keep", 3)))
        ch.send(done=True, current=name, previous=current, verified=len(files), kept=kept, removed=removed)
    finally:
        if lock:
            lock.release()


def op_rollback(ch, req):
    root = Root(req["root"])
    if not os.path.isdir(root.bundles):
        raise AgentError("nothing was ever flashed to %s" % root.path)
    lock = Lock(root)
    try:
        current = root.current()
        history = [e for e in root.history() if os.path.isdir(root.bundle(e["bundle"]))]
        while history and history[-1]["bundle"] == current:
            history.pop()
        if not history:
            raise AgentError("no previous bundle to roll back to under %s (current: %s)" % (root.path, current))
        prev = history[-1]["bundle"]
        bad = root.verify_manifest(root.bundle(prev), prev, history[-1].get("manifest_sha256"))
        if bad:
            raise AgentError("the previous bundle %s fails verification on the device: %s; not activated, current "
                             "is still %s. Re-flash it from the host to repair it" % (prev, ", ".join(bad), current))
        if not req.get("dry_run"):
            root.switch(prev)
            root.write_history(history)
        ch.send(done=True, current=prev, previous=current, root=root.path)
    finally:
        lock.release()


def op_runtime(ch, req):
    """Create or refresh ROOT/venv and install edgequee (with extras) from shipped wheels or the registry."""
    root = Root(req["root"])
    lock = Lock(root)
    try:
        wheels = os.path.join(root.path, "wheels")
        staging = wheels + PARTIAL
        files = req["files"]
        need = [f["path"] for f in files if not _matches(wheels, f["path"], f["sha256"])]
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        ch.send(ready=need, partial=staging)
        ch.recv_files(staging)
        _verify(staging, [f for f in files if f["path"] in need])
        os.makedirs(wheels, exist_ok=True)
        for rel in need:
            os.replace(os.path.join(staging, _safe_rel(rel)), os.path.join(wheels, _safe_rel(rel)))
        shutil.rmtree(staging)
        venv = os.path.join(root.path, "venv")
        python = os.path.join(venv, "bin", "python")
        if not (os.path.exists(python) and subprocess.call([python, "-c", ""], stderr=subprocess.DEVNULL) == 0):
            shutil.rmtree(venv, ignore_errors=True)
            args = [sys.executable, "-m", "venv"] + (["--system-site-packages"] if req.get("system_site_packages") else [])
            _run(args + [venv], "install python3-venv on the device (sudo apt-get install python3-venv)")
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        if req.get("offline"):
            pip += ["--no-index", "--find-links", wheels]
        extras = "[%s]" % ",".join(req["extras"]) if req.get("extras") else ""
        if req.get("wheel"):
            wheel = os.path.join(wheels, _safe_rel(req["wheel"]))
            _run(pip + ["--force-reinstall", "--no-deps", wheel], "see pip's output above")
            spec = wheel + extras
        else:
            spec = "edgequee%s==%s" % (extras, req["version"])
        _run(pip + [spec], "see pip's output above" + ("" if req.get("offline") else
                                                      "; for an offline device pass --wheels DIR"))
        probe = "import edgequee, sys; print(edgequee.__version__, sys.version.split()[0])"
        version, py = subprocess.check_output([python, "-c", probe]).decode().split()
        ch.send(done=True, python=python, edgequee=version, python_version=py)
    finally:
        lock.release()


def op_profile(ch, req):
    """Run ``edgequee profile`` on a deployed bundle with the device's Python; send the profile back."""
    root = Root(req["root"])
    top = root.bundle(req["bundle"])
    if not os.path.isdir(top):
        raise AgentError("bundle %s is not on the device under %s: flash it first (edgequee flash BUNDLE TARGET)"
                         % (req["bundle"], root.path))
    python = os.path.expanduser(req.get("python") or os.path.join(root.path, "venv", "bin", "python"))
    if not os.path.exists(python):
        raise AgentError("no edgequee runtime at %s: install one with edgequee flash --install-runtime BUNDLE TARGET, "
                         "or pass --remote-python" % python)
    _run([python, "-m", "edgequee.cli", "profile", top] + req["args"], "its output is above")
    path = _inside(top, "profiles/" + req["device"] + ".json")
    with os.fdopen(os.open(path, os.O_RDONLY | O_NOFOLLOW), "rb") as f:
        data = f.read()
    ch.send(done=True, profile=base64.b64encode(data).decode(), sha256=hashlib.sha256(data).hexdigest(), path=path)


def _run(args, fix):
    """Run a device-side command with its output on stderr (relayed by ssh); raise naming ``fix`` on failure."""
    try:
        rc = subprocess.call(args, stdout=sys.stderr.fileno())
    except OSError as e:
        sys.stderr.write("%s: %s\n" % (args[0], e))
        rc = 127
    if rc != 0:
        raise AgentError("%s failed on the device (exit %s): %s" % (" ".join(args[:4]), rc, fix))


def _existing_parent(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


OPS = {"flash": op_flash, "rollback": op_rollback, "runtime": op_runtime, "profile": op_profile}


def serve():
    """Run one request from stdin; report errors as one JSON line."""
    ch = Channel()
    try:
        req = ch.recv()
        OPS[req["op"]](ch, req)
    except (Hangup, BrokenPipeError):
        sys.exit(3)
    except AgentError as e:
        ch.send(error=str(e))
    except OSError as e:
        ch.send(error=_oserror_text(e))
