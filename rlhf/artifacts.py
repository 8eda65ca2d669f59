"""The versioned artifact store that links the stages.

Every dataset, checkpoint and report is an immutable directory
`<workspace>/<kind>s/<name>/vNNNN/` holding its files and a `manifest.json` that records
where it came from (inputs and their content hashes), the resolved config, metrics, a
sha256 per file and the environment.

A version is written whole or not at all: it is built in a hidden temporary sibling
directory, the manifest is written last, and the directory is renamed into place while
holding a per-name lock, so two concurrent writers get distinct versions and a crash leaves
nothing visible behind. The temporary's name records its writer (host, pid namespace, boot, pid,
start time); the next writer of that name removes the temporaries of writers that are gone.

The manifest carries `manifest_hash`, the sha256 of its own canonical JSON, so an edit made
after publishing (a metric, an input ref) is refused on every load, as a changed file is by
`verify`. Every load also checks that each listed file is present at its recorded size.

Refs: `name`, `name:latest`, `name:vN`, `name@<content-hash prefix>`, each optionally
prefixed by the kind directory (`datasets/sft:v2`) when a name exists under two kinds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhf import faults
from rlhf.errors import RlhfError

KIND_DIRS = {"dataset": "datasets", "checkpoint": "checkpoints", "report": "reports"}
MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REF_RE = re.compile(
    r"^(?:(?P<kind>datasets|checkpoints|reports)/)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?::(?P<tag>latest|v\d+)|@(?P<sha>[0-9a-fA-F]*))?$"  # the prefix's length is checked in resolve()
)
MIN_HASH_PREFIX = 4  # a shorter prefix would too often match several versions
VERSION_RE = re.compile(r"^v(\d{4,})$")
# .tmp-<uuid>.<pid>.<process start time>.<boot id>.<host>.<pid namespace>
TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}\.(\d+)\.(\d+)\.([0-9a-f]+)\.(.+)$")
REQUIRED = ("name", "version", "kind", "stage", "created_at", "inputs", "files", "file_sizes", "content_hash",
            "manifest_hash")


def check_name(name: str) -> str:
    """`name` if it can name an artifact (a directory under datasets/, checkpoints/, reports/), else a one-line error."""
    if not NAME_RE.match(name):
        raise RlhfError(
            f"artifact name {name!r} is not valid; use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, keyed by POSIX relative path (manifest excluded)."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = sha256_file(p)
    return files


def content_hash(files: dict[str, str]) -> str:
    """One hash for a version's content: the hash of its sorted (path, sha256) list."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_hash` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


@functools.cache
def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")


def _host() -> str:
    """This host and pid namespace: a pid means the same process only within both (two containers
    sharing a workspace and a host name still differ here)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
    try:
        return f"{host}.{re.sub(r'[^0-9]', '', os.readlink('/proc/self/ns/pid'))}"
    except OSError:
        return host


def _owner() -> str | None:
    """This process as its temporaries name it, or None where /proc cannot tell a live writer from a dead one."""
    try:
        return f"{os.getpid()}.{_start_time(os.getpid())}.{_boot_id()}.{_host()}"
    except (OSError, IndexError):
        return None


def _writer_is_gone(tmp: Path) -> bool:
    """True only for a temporary whose writer, on this host, has exited (a reused pid has a new start time).

    A temporary of another host, or with no owner in its name, is never judged gone.
    """
    m = TMP_RE.match(tmp.name)
    if not m or m[4] != _host() or _owner() is None:
        return False
    pid, start, boot = m[1], m[2], m[3]
    return boot != _boot_id() or _start_time(int(pid)) != start


@functools.cache
def environment() -> dict[str, Any]:
    """Package versions, device and the project's git commit, recorded in every manifest."""
    from importlib import metadata

    packages = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "rlhf-suite"):
        try:
            packages[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": _device_name(),
    }
    commit = _git_commit()
    if commit:
        env["git_commit"] = commit
    return env


def _device_name() -> str:
    if "torch" not in sys.modules:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {os.cpu_count()} cores"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass(frozen=True)
class Artifact:
    """One resolved, immutable version."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def ref(self) -> str:
        """The exact, kind-qualified ref of this version, e.g. `checkpoints/sft:v3`."""
        return f"{KIND_DIRS[self.kind]}/{self.name}:v{self.version}"

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def input(self, role: str) -> dict[str, Any] | None:
        return next((i for i in self.manifest.get("inputs", []) if i.get("role") == role), None)


@dataclass
class ArtifactWriter:
    """What a stage fills in while a version is being built in its temporary directory."""

    path: Path
    kind: str
    name: str
    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    result: Artifact | None = None  # the published version, set when the `with` block exits cleanly

    def add_input(self, role: str, artifact: Artifact, **extra: Any) -> None:
        """Record an artifact this version was made from; `extra` says how it was used (e.g. `loaded_as`)."""
        self.inputs.append({
            "role": role,
            "ref": artifact.ref,
            "path": artifact.path.relative_to(artifact.path.parents[2]).as_posix(),
            "content_hash": artifact.content_hash,
            **extra,
        })

    def add_file_input(self, role: str, file: Path, **extra: Any) -> None:
        """Record a raw file or directory outside the store (imported data, a GGUF) by path and hash."""
        file = Path(file).resolve()
        digest = content_hash(hash_tree(file)) if file.is_dir() else sha256_file(file)
        self.inputs.append({"role": role, "file": str(file), "sha256": digest, **extra})


class ArtifactStore:
    """A workspace directory holding `datasets/`, `checkpoints/`, `reports/` and `.scratch/`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        # Checked here, so that reading commands fail too rather than report an empty workspace.
        blocker = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "is a file" if blocker == self.root else f"is under {blocker}, which is a file"
            raise RlhfError(f"workspace {self.root} {where}, not a directory; "
                            "pass --workspace DIR or set RLHF_WORKSPACE to a directory")

    @classmethod
    def from_env(cls, workspace: str | None = None) -> ArtifactStore:
        return cls(workspace or os.environ.get("RLHF_WORKSPACE") or "workspace")

    # -- writing ---------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail early, before any work, when the workspace cannot hold new artifacts."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RlhfError(
                f"workspace {self.root} is not writable ({e.strerror or e}); "
                "pass --workspace DIR or set RLHF_WORKSPACE to a writable directory"
            ) from None

    @contextlib.contextmanager
    def create(self, kind: str, name: str, stage: str, config: dict[str, Any] | None = None
               ) -> Iterator[ArtifactWriter]:
        """Build a new version of `name` in a temporary directory; publish it on clean exit.

        On an exception the temporary directory is removed and no version appears. A process
        killed mid-build leaves only a hidden `.tmp-*` directory, which listing ignores and the next
        writer of `name` removes.
        """
        if kind not in KIND_DIRS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        check_name(name)
        self.check_writable()
        name_dir = self.root / KIND_DIRS[kind] / name
        name_dir.mkdir(parents=True, exist_ok=True)
        owner = _owner()
        tmp = name_dir / f".tmp-{uuid.uuid4().hex}{'.' + owner if owner else ''}"
        tmp.mkdir()
        writer = ArtifactWriter(path=tmp, kind=kind, name=name, stage=stage, config=config or {})
        try:
            yield writer
            writer.result = self._publish(writer, name_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, w: ArtifactWriter, name_dir: Path) -> Artifact:
        files = hash_tree(w.path)
        with _locked(name_dir / ".lock"):
            for tmp in name_dir.glob(".tmp-*"):
                if _writer_is_gone(tmp):  # killed mid-build: nothing else would ever remove it
                    shutil.rmtree(tmp, ignore_errors=True)
            version = max(self.versions(w.kind, w.name), default=0) + 1
            manifest = {
                "name": w.name,
                "version": version,
                "kind": w.kind,
                "stage": w.stage,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "inputs": w.inputs,
                "config": w.config,
                "metrics": w.metrics,
                "files": files,
                "file_sizes": {rel: (w.path / rel).stat().st_size for rel in files},
                "content_hash": content_hash(files),
                "environment": environment(),
            }
            # Hashed as it reads back, so values JSON cannot hold (a Path) hash as the strings stored.
            manifest = json.loads(json.dumps(manifest, default=str))
            manifest["manifest_hash"] = manifest_hash(manifest)
            _write_json_durably(w.path / MANIFEST, manifest)
            final = name_dir / f"v{version:04d}"
            faults.point(f"publish:{w.name}")
            os.rename(w.path, final)  # atomic: the version appears whole or not at all
            _fsync_dir(name_dir)
            faults.point(f"published:{w.name}")
        return Artifact(final, manifest)

    def scratch_dir(self, stage: str, run_id: str) -> Path:
        """Where a training run keeps its resumable trainer checkpoints until it succeeds."""
        return self.root / ".scratch" / f"{stage}-{run_id}"

    # -- reading ---------------------------------------------------------------

    def versions(self, kind: str, name: str) -> list[int]:
        d = self.root / KIND_DIRS[kind] / name
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := VERSION_RE.match(p.name)))

    def names(self, kind: str) -> list[str]:
        d = self.root / KIND_DIRS[kind]
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and self.versions(kind, p.name))

    def read(self, kind: str, name: str, version: int) -> tuple[Artifact | None, str | None]:
        """(the version, None), or (None, what is wrong with its manifest) for a damaged one."""
        path = self.root / KIND_DIRS[kind] / name / f"v{version:04d}"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None, "manifest.json is missing"
        except (OSError, ValueError) as e:
            return None, f"manifest.json is unreadable ({' '.join(str(e).split())[:200]})"
        if not isinstance(manifest, dict) or (missing := [k for k in REQUIRED if k not in manifest]):
            what = ", ".join(missing) if isinstance(manifest, dict) else "everything (it is not a JSON object)"
            return None, f"manifest.json lacks {what}"
        if manifest.get("manifest_hash") != manifest_hash(manifest):
            return None, "manifest.json was edited after publishing (its manifest_hash does not match)"
        if (manifest["kind"], manifest["name"], manifest["version"]) != (kind, name, version):
            return None, (f"manifest.json describes {manifest['kind']} {manifest['name']!r} v{manifest['version']}, "
                          "not this directory")
        return Artifact(path, manifest), None

    def load(self, kind: str, name: str, version: int) -> Artifact:
        art, problem = self.read(kind, name, version)
        if problem:
            ref = f"{KIND_DIRS[kind]}/{name}:v{version}"
            raise RlhfError(f"{ref} is damaged: {problem}; run `rlhf artifacts verify {ref}`")
        return art

    def scan(self) -> Iterator[tuple[str, Artifact | None, str | None]]:
        """(exact ref, version or None, problem or None) for every version directory, damaged ones included."""
        for kind in KIND_DIRS:
            for name in self.names(kind):
                for v in self.versions(kind, name):
                    yield (f"{KIND_DIRS[kind]}/{name}:v{v}", *self.read(kind, name, v))

    def list(self) -> list[Artifact]:
        """Every intact version; a damaged one is left out (`scan` reports it)."""
        return [a for _, a, _ in self.scan() if a]

    def check_files(self, art: Artifact) -> None:
        """Every file the manifest lists is present at its recorded size: cheap, and before any load.

        A same-size change is left to `verify`, which rehashes everything.
        """
        for rel, size in art.manifest["file_sizes"].items():
            try:
                actual = (art.path / rel).stat().st_size
            except OSError:
                problem = f"{rel} is missing"
            else:
                if actual == size:
                    continue
                problem = f"{rel} is {actual} bytes where its manifest records {size}"
            raise RlhfError(f"{art.ref} is damaged: {problem}; run `rlhf artifacts verify {art.ref}`")

    def locate(self, ref: str, kind: str | None = None) -> tuple[str, str, int]:
        """(kind, name, version) that `ref` names, or fail with a line that lists what exists."""
        m = REF_RE.match(ref.strip())
        if not m:
            raise RlhfError(
                f"{ref!r} is not a valid ref; write name, name:latest, name:vN or name@<hash prefix>"
            )
        if m["sha"] is not None and not MIN_HASH_PREFIX <= len(m["sha"]) <= 64:
            raise RlhfError(f"{ref!r} is not a valid ref: the hash prefix after '@' needs {MIN_HASH_PREFIX} to 64 "
                            "hex digits; `rlhf artifacts list` shows each version's hash")
        name = m["name"]
        kinds = [kind] if kind else list(KIND_DIRS)
        if m["kind"]:
            qualified = next(k for k, d in KIND_DIRS.items() if d == m["kind"])
            if kind and kind != qualified:
                raise RlhfError(f"ref {ref!r} names a {qualified}, but a {kind} is needed here")
            kinds = [qualified]
        found = [k for k in kinds if self.versions(k, name)]
        # A dataset given as model= (say): say that, not "did you mean <a similar name>".
        if not found and kind and (other := next((k for k in KIND_DIRS if self.versions(k, name)), None)):
            existing = ", ".join(self.names(kind)) or "none yet"
            raise RlhfError(f"{ref!r} is a {other} ({KIND_DIRS[other]}/{name}), not a {kind}; "
                            f"give a {kind} here (existing {KIND_DIRS[kind]}: {existing})")
        if not found:
            existing = sorted({n for k in kinds for n in self.names(k)})
            what = " or ".join(KIND_DIRS[k] for k in kinds)
            close = difflib.get_close_matches(name, existing, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            listing = ", ".join(existing) if existing else "none"
            raise RlhfError(
                f"no artifact named {name!r} in {what} of workspace {self.root}{hint} (existing: {listing})"
            )
        if len(found) > 1:
            options = " or ".join(f"{KIND_DIRS[k]}/{ref}" for k in found)
            raise RlhfError(f"ref {ref!r} is ambiguous: it exists as {' and '.join(found)}; write {options}")
        k = found[0]
        versions = self.versions(k, name)
        have = ", ".join(f"v{v}" for v in versions)
        if m["sha"]:
            prefix = m["sha"].lower()
            # A damaged version's recorded hash cannot be trusted, so it matches nothing.
            hits = [v for v in versions if (a := self.read(k, name, v)[0]) and a.content_hash.startswith(prefix)]
            if len(hits) != 1:
                problem = "matches no version" if not hits else f"matches {len(hits)} versions"
                raise RlhfError(f"ref {ref!r} {problem} of {KIND_DIRS[k]}/{name} (versions: {have})")
            return k, name, hits[0]
        if m["tag"] and m["tag"] != "latest":
            v = int(m["tag"][1:])
            if v not in versions:
                raise RlhfError(f"no version v{v} of {KIND_DIRS[k]}/{name}; it has {have}")
            return k, name, v
        return k, name, versions[-1]

    def resolve(self, ref: str, kind: str | None = None, check_files: bool = True) -> Artifact:
        """Resolve a ref to exactly one intact version, or fail with one line that says why.

        With `check_files` (what every stage reading an input wants) its files are checked too.
        """
        art = self.load(*self.locate(ref, kind))
        if check_files:
            self.check_files(art)
        return art

    # -- checking --------------------------------------------------------------

    def verify(self, ref: str) -> list[str]:
        """Recompute every hash; return one line per damaged manifest, changed, missing or extra file."""
        kind, name, version = self.locate(ref)
        art, problem = self.read(kind, name, version)
        problems = [f"manifest: {problem}"] if problem else []
        if art is None:
            # An edited manifest that still lists files: say so, and still check them.
            path = self.root / KIND_DIRS[kind] / name / f"v{version:04d}"
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except (OSError, ValueError):
                return problems
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                return problems
            art = Artifact(path, manifest)
        recorded = art.manifest["files"]
        actual = hash_tree(art.path)
        problems += [f"changed: {p}" for p in recorded if p in actual and actual[p] != recorded[p]]
        problems += [f"missing: {p}" for p in recorded if p not in actual]
        problems += [f"unexpected: {p}" for p in actual if p not in recorded]
        if content_hash(recorded) != art.manifest.get("content_hash"):
            problems.append("manifest: content_hash does not match its file list")
        return problems

    def lineage(self, ref: str) -> str:
        """The tree of inputs behind `ref`, back to imported files and the base model."""
        art = self.resolve(ref, check_files=False)
        lines = [f"{art.ref}  [{art.manifest['stage']}]  @{art.content_hash[:12]}"]
        self._lineage_lines(art, "", lines, seen=set())
        return "\n".join(lines)

    def _lineage_lines(self, art: Artifact, indent: str, lines: list[str], seen: set[str]) -> None:
        inputs = art.manifest.get("inputs", [])
        for i, inp in enumerate(inputs):
            last = i == len(inputs) - 1
            branch, child_indent = ("└── ", "    ") if last else ("├── ", "│   ")
            if "file" in inp:
                lines.append(f"{indent}{branch}{inp['role']}: file {inp['file']}  sha256 {inp['sha256'][:12]}")
                continue
            parent, problem = self._load_input(inp)
            if parent is None:
                lines.append(f"{indent}{branch}{inp['role']}: {inp['ref']}  ({problem})")
                continue
            note = "" if parent.content_hash == inp["content_hash"] else "  (CHANGED since it was used)"
            if "loaded_as" in inp:
                note += f"  ({inp['loaded_as']})"
            lines.append(f"{indent}{branch}{inp['role']}: {parent.ref}  [{parent.manifest['stage']}]"
                         f"  @{parent.content_hash[:12]}{note}")
            if parent.ref in seen:
                continue
            seen.add(parent.ref)
            self._lineage_lines(parent, indent + child_indent, lines, seen)

    def _load_input(self, inp: dict[str, Any]) -> tuple[Artifact | None, str]:
        path = self.root / inp["path"]
        m = VERSION_RE.match(path.name)
        kind = next((k for k, d in KIND_DIRS.items() if d == path.parent.parent.name), None)
        if not path.is_dir() or not m or kind is None:
            return None, "missing from this workspace"
        art, problem = self.read(kind, path.parent.name, int(m[1]))
        return art, f"damaged: {problem}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
