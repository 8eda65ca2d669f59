"""The artifact store: versions, manifests, refs, atomic publishing, concurrency, verify, lineage."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rlhf.artifacts
from rlhf.artifacts import ArtifactStore
from rlhf.errors import RlhfError

REPO = Path(__file__).parents[2]


def make(store: ArtifactStore, kind: str, name: str, files: dict[str, bytes] | None = None,
         stage: str = "test", **writer_fields):
    """Publish one version holding `files` (relative path -> bytes) and return it."""
    files = {"data.txt": name.encode()} if files is None else files
    with store.create(kind, name, stage=stage, config=writer_fields.pop("config", None)) as w:
        for rel, content in files.items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_bytes(content)
        w.metrics.update(writer_fields.pop("metrics", {}))
    return w.result


def resolve_error(store: ArtifactStore, ref: str) -> str:
    with pytest.raises(RlhfError) as info:
        store.resolve(ref)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def entries(name_dir: Path) -> list[str]:
    return sorted(p.name for p in name_dir.iterdir()) if name_dir.is_dir() else []


def visible_versions(name_dir: Path) -> list[str]:
    return [e for e in entries(name_dir) if e.startswith("v")]


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "ws")


# -- creating versions ---------------------------------------------------------------------------


def test_versions_are_numbered_from_one(store):
    first = make(store, "dataset", "chat")
    second = make(store, "dataset", "chat")

    assert first.path == store.root / "datasets" / "chat" / "v0001"
    assert second.path == store.root / "datasets" / "chat" / "v0002"
    assert (first.version, second.version) == (1, 2)
    assert second.ref == "datasets/chat:v2"
    assert store.versions("dataset", "chat") == [1, 2]
    assert (first.path / "data.txt").read_bytes() == b"chat"  # the first version is untouched


def test_manifest_records_everything(store):
    files = {"weights.bin": b"\x00\x01\x02weights", "tokenizer/vocab.json": b'{"a": 1}'}
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    art = make(store, "checkpoint", "sft", files, stage="sft",
               config={"train": {"max_steps": 3}}, metrics={"loss": 1.5})

    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest == art.manifest
    assert set(manifest) == {"name", "version", "kind", "stage", "created_at", "inputs", "config",
                             "metrics", "files", "file_sizes", "content_hash", "manifest_hash", "environment"}
    assert manifest["name"] == "sft"
    assert manifest["version"] == 1
    assert manifest["kind"] == "checkpoint"
    assert manifest["stage"] == "sft"
    assert manifest["inputs"] == []
    assert manifest["config"] == {"train": {"max_steps": 3}}
    assert manifest["metrics"] == {"loss": 1.5}
    assert manifest["files"] == {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert manifest["file_sizes"] == {rel: len(data) for rel, data in files.items()}
    assert len(manifest["content_hash"]) == 64
    int(manifest["content_hash"], 16)
    body = {k: v for k, v in manifest.items() if k != "manifest_hash"}
    assert manifest["manifest_hash"] == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    created = dt.datetime.fromisoformat(manifest["created_at"])
    assert created.tzinfo is not None
    assert before <= created <= dt.datetime.now(dt.timezone.utc)
    assert {"python", "platform", "packages", "device"} <= set(manifest["environment"])


def test_version_directory_holds_exactly_the_files_and_the_manifest(store):
    art = make(store, "report", "cmp", {"summary.md": b"# ok", "plots/a.png": b"png"})

    on_disk = sorted(p.relative_to(art.path).as_posix() for p in art.path.rglob("*") if p.is_file())

    assert on_disk == ["manifest.json", "plots/a.png", "summary.md"]


def test_content_hash_depends_on_content_only(store):
    a = make(store, "dataset", "a", {"x.txt": b"same"})
    b = make(store, "dataset", "b", {"x.txt": b"same"})
    c = make(store, "dataset", "c", {"x.txt": b"different"})

    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


def test_invalid_name_is_rejected(store):
    with pytest.raises(RlhfError, match="artifact name '../evil' is not valid"):
        make(store, "dataset", "../evil")


def test_inputs_record_ref_path_and_hash(store):
    ds = make(store, "dataset", "chat")

    with store.create("checkpoint", "sft", stage="sft") as w:
        w.add_input("data", ds)
    art = w.result

    assert art.manifest["inputs"] == [{
        "role": "data",
        "ref": "datasets/chat:v1",
        "path": "datasets/chat/v0001",
        "content_hash": ds.content_hash,
    }]
    assert art.input("data")["ref"] == "datasets/chat:v1"
    assert art.input("model") is None


# -- refs ------------------------------------------------------------------------------------------


def test_refs_resolve_to_the_right_version(store):
    v1 = make(store, "dataset", "chat", {"d.txt": b"one"})
    v2 = make(store, "dataset", "chat", {"d.txt": b"two"})

    assert store.resolve("chat").path == v2.path
    assert store.resolve("chat:latest").path == v2.path
    assert store.resolve("chat:v1").path == v1.path
    assert store.resolve("chat:v2").path == v2.path
    assert store.resolve(f"chat@{v1.content_hash[:8]}").path == v1.path
    assert store.resolve(f"chat@{v2.content_hash[:8].upper()}").path == v2.path
    assert store.resolve("datasets/chat:v1").path == v1.path
    assert store.resolve("chat", kind="dataset").path == v2.path


def test_kind_qualified_ref_picks_one_of_two_kinds(store):
    ds = make(store, "dataset", "sft")
    ckpt = make(store, "checkpoint", "sft")

    assert store.resolve("datasets/sft:v1").path == ds.path
    assert store.resolve("checkpoints/sft").path == ckpt.path
    assert store.resolve("sft", kind="checkpoint").path == ckpt.path


def test_missing_name_lists_existing_and_suggests_a_close_one(store):
    make(store, "dataset", "support-chat")
    make(store, "checkpoint", "base")

    message = resolve_error(store, "support-chatt:v1")

    assert "no artifact named 'support-chatt'" in message
    assert "did you mean support-chat?" in message
    assert "(existing: base, support-chat)" in message


def test_missing_name_in_an_empty_workspace(store):
    message = resolve_error(store, "base")

    assert "(existing: none)" in message


def test_missing_version_lists_existing_versions(store):
    make(store, "dataset", "chat")
    make(store, "dataset", "chat")

    message = resolve_error(store, "chat:v9")

    assert message == "no version v9 of datasets/chat; it has v1, v2"


@pytest.mark.parametrize("ref", ["", "chat:v", "chat:3", "chat:v1:v2", "-chat", "chat@xyz1", "chat@ab"])
def test_invalid_ref_string(store, ref):
    message = resolve_error(store, ref)

    assert "is not a valid ref" in message


def test_ambiguous_name_suggests_qualified_refs(store):
    make(store, "dataset", "sft")
    make(store, "checkpoint", "sft")

    message = resolve_error(store, "sft:v1")

    assert "ambiguous" in message
    assert "datasets/sft:v1" in message
    assert "checkpoints/sft:v1" in message


def test_hash_prefix_matching_nothing(store):
    art = make(store, "dataset", "chat")
    other = "0000" if not art.content_hash.startswith("0000") else "ffff"

    message = resolve_error(store, f"chat@{other}")

    assert message == f"ref 'chat@{other}' matches no version of datasets/chat (versions: v1)"


def test_kind_mismatch_is_an_error(store):
    make(store, "dataset", "chat")

    with pytest.raises(RlhfError, match="names a dataset, but a checkpoint is needed"):
        store.resolve("datasets/chat", kind="checkpoint")


def test_a_dataset_where_a_checkpoint_is_needed_says_it_is_a_dataset(store):  # issue 13 §5, defect 18
    make(store, "dataset", "hh")
    make(store, "checkpoint", "ppo")  # a close name: it used to get "did you mean ppo?"
    make(store, "checkpoint", "sft")

    with pytest.raises(RlhfError) as info:
        store.resolve("hh:latest", kind="checkpoint")

    assert str(info.value) == ("'hh:latest' is a dataset (datasets/hh), not a checkpoint; "
                               "give a checkpoint here (existing checkpoints: ppo, sft)")


@pytest.mark.parametrize("ref", ["sft@4", "sft@abc", "sft@", "sft@" + "a" * 65])
def test_a_hash_prefix_of_the_wrong_length_says_the_minimum(store, ref):  # issue 13 §5, defect 18
    make(store, "checkpoint", "sft")

    assert resolve_error(store, ref) == (f"{ref!r} is not a valid ref: the hash prefix after '@' needs 4 to 64 hex "
                                         "digits; `rlhf artifacts list` shows each version's hash")


# -- atomicity ---------------------------------------------------------------------------------


def test_exception_inside_create_leaves_nothing(store):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.create("checkpoint", "sft", stage="sft") as w:
            (w.path / "weights.bin").write_bytes(b"half")
            raise Boom()

    name_dir = store.root / "checkpoints" / "sft"
    assert visible_versions(name_dir) == []
    assert [e for e in entries(name_dir) if e.startswith(".tmp-")] == []
    assert w.result is None
    assert store.list() == []


def test_crash_during_publish_leaves_no_version(store, monkeypatch):
    def failing_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rlhf.artifacts.os, "rename", failing_rename)
    with pytest.raises(OSError):
        make(store, "checkpoint", "sft")
    monkeypatch.undo()

    name_dir = store.root / "checkpoints" / "sft"
    assert visible_versions(name_dir) == []
    assert [e for e in entries(name_dir) if e.startswith(".tmp-")] == []
    assert store.list() == []
    # The lock was released: the next writer publishes v1.
    assert make(store, "checkpoint", "sft").version == 1


KILLED_WRITER = """
    import os, signal, sys
    from rlhf.artifacts import ArtifactStore

    store = ArtifactStore(sys.argv[1])
    with store.create("checkpoint", "sft", stage="sft") as w:
        (w.path / "weights.bin").write_bytes(b"half-written")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_inside_create_leaves_no_visible_version(store):
    proc = run_python(KILLED_WRITER, str(store.root))

    assert proc.returncode == -signal.SIGKILL, proc.stderr
    name_dir = store.root / "checkpoints" / "sft"
    assert name_dir.is_dir()  # the writer really got as far as building the version
    assert all(e.startswith(".") for e in entries(name_dir)), entries(name_dir)
    assert store.list() == []
    assert store.versions("checkpoint", "sft") == []
    assert "existing: none" in resolve_error(store, "sft")
    assert make(store, "checkpoint", "sft").version == 1


# -- concurrency ---------------------------------------------------------------------------------


CONCURRENT_WRITER = """
    import sys, time
    from pathlib import Path
    from rlhf.artifacts import ArtifactStore

    root, barrier, who = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    store = ArtifactStore(root)
    store.check_writable()
    # File barrier: start writing only once both writers are ready.
    (barrier / who).touch()
    deadline = time.monotonic() + 30
    while len(list(barrier.iterdir())) < 2:
        if time.monotonic() > deadline:
            sys.exit("barrier timeout")
        time.sleep(0.001)
    for i in range(5):
        with store.create("dataset", "shared", stage="test") as w:
            (w.path / "payload.txt").write_text(f"{who}-{i}")
"""


def test_concurrent_writers_get_distinct_versions(store, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    code = textwrap.dedent(CONCURRENT_WRITER)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store.root), str(barrier), who],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in ("a", "b")]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]

    for out, err, rc in results:
        assert rc == 0, err
    assert store.versions("dataset", "shared") == list(range(1, 11))
    payloads = []
    for v in range(1, 11):
        art = store.resolve(f"shared:v{v}")
        assert art.manifest["version"] == v
        assert art.path.name == f"v{v:04d}"
        assert store.verify(f"shared:v{v}") == []
        payloads.append((art.path / "payload.txt").read_text())
    assert sorted(payloads) == sorted(f"{who}-{i}" for who in ("a", "b") for i in range(5))
    name_dir = store.root / "datasets" / "shared"
    assert [e for e in entries(name_dir) if e.startswith(".tmp-")] == []


# -- verify ------------------------------------------------------------------------------------


def make_verifiable(store):
    return make(store, "checkpoint", "sft", {"weights.bin": b"w" * 100, "config.json": b"{}"})


def test_verify_clean(store):
    make_verifiable(store)

    assert store.verify("sft") == []


def test_verify_changed_file(store):
    art = make_verifiable(store)
    (art.path / "weights.bin").write_bytes(b"tampered")

    assert store.verify("sft") == ["changed: weights.bin"]


def test_verify_missing_file(store):
    art = make_verifiable(store)
    (art.path / "config.json").unlink()

    assert store.verify("sft") == ["missing: config.json"]


def test_verify_unexpected_file(store):
    art = make_verifiable(store)
    (art.path / "extra").mkdir()
    (art.path / "extra" / "notes.txt").write_text("hi")

    assert store.verify("sft") == ["unexpected: extra/notes.txt"]


def test_verify_tampered_file_list(store):
    art = make_verifiable(store)
    manifest = json.loads((art.path / "manifest.json").read_text())
    del manifest["files"]["config.json"]
    (art.path / "config.json").unlink()
    (art.path / "manifest.json").write_text(json.dumps(manifest))

    assert store.verify("sft") == ["manifest: manifest.json was edited after publishing (its manifest_hash does not "
                                   "match)", "manifest: content_hash does not match its file list"]


# -- lineage -------------------------------------------------------------------------------------


def build_chain(store, tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"messages": []}\n')
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF-bytes")

    with store.create("dataset", "chat", stage="data import") as w:
        (w.path / "data.jsonl").write_text("{}\n")
        w.add_file_input("source", raw)
    ds = w.result
    with store.create("checkpoint", "base", stage="base import") as w:
        (w.path / "model.safetensors").write_bytes(b"weights")
        w.add_file_input("gguf", gguf)
    base = w.result
    with store.create("checkpoint", "sft", stage="sft") as w:
        (w.path / "adapter.safetensors").write_bytes(b"adapter")
        w.add_input("model", base)
        w.add_input("data", ds)
    return w.result, base, ds, raw, gguf


def test_lineage_prints_the_tree_back_to_raw_files(store, tmp_path):
    sft, base, ds, raw, gguf = build_chain(store, tmp_path)

    out = store.lineage("sft")

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()[:12]

    assert out.splitlines() == [
        f"checkpoints/sft:v1  [sft]  @{sft.content_hash[:12]}",
        f"├── model: checkpoints/base:v1  [base import]  @{base.content_hash[:12]}",
        f"│   └── gguf: file {gguf.resolve()}  sha256 {sha(gguf)}",
        f"└── data: datasets/chat:v1  [data import]  @{ds.content_hash[:12]}",
        f"    └── source: file {raw.resolve()}  sha256 {sha(raw)}",
    ]


def test_lineage_marks_a_deleted_parent_as_missing(store, tmp_path):
    sft, base, ds, raw, gguf = build_chain(store, tmp_path)
    shutil.rmtree(base.path)

    lines = store.lineage("sft").splitlines()

    assert lines[1] == "├── model: checkpoints/base:v1  (missing from this workspace)"
    assert lines[2] == f"└── data: datasets/chat:v1  [data import]  @{ds.content_hash[:12]}"
    assert str(raw.resolve()) in lines[3]
    assert len(lines) == 4


def test_add_file_input_of_a_directory_hashes_its_tree(store, tmp_path):
    src = tmp_path / "hf_model"
    src.mkdir()
    (src / "config.json").write_text("{}")

    with store.create("checkpoint", "base", stage="base import") as w:
        w.add_file_input("source", src, format="transformers")

    inp = w.result.input("source")
    assert inp["file"] == str(src.resolve())
    assert inp["format"] == "transformers"
    assert inp["sha256"] == rlhf.artifacts.content_hash(
        {"config.json": hashlib.sha256(b"{}").hexdigest()})


# -- workspace -------------------------------------------------------------------------------


def test_workspace_that_is_or_is_under_a_regular_file_is_refused(tmp_path):  # issue 13 §5, defect 18
    (tmp_path / "file").write_text("not a directory")

    with pytest.raises(RlhfError) as info:
        ArtifactStore(tmp_path / "file")
    assert str(info.value) == (f"workspace {tmp_path / 'file'} is a file, not a directory; "
                               "pass --workspace DIR or set RLHF_WORKSPACE to a directory")

    with pytest.raises(RlhfError) as info:
        ArtifactStore(tmp_path / "file" / "ws")
    assert str(info.value).startswith(f"workspace {tmp_path / 'file' / 'ws'} is under {tmp_path / 'file'}, "
                                      "which is a file, not a directory;")


@pytest.mark.parametrize("args", [["artifacts", "list"], ["data", "import", "sft", "x.jsonl"]], ids=["list", "import"])
def test_cli_on_a_workspace_that_is_a_file_exits_2_naming_it(tmp_path, capsys, args):  # issue 13 §5, defect 18
    from rlhf import cli

    ws = tmp_path / "ws"
    ws.write_text("not a directory")

    rc = cli.main(["--workspace", str(ws), *args])

    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err == f"error: workspace {ws} is a file, not a directory; pass --workspace DIR or set RLHF_WORKSPACE to a directory\n"


def test_list_returns_every_version_of_every_kind(store):
    make(store, "dataset", "chat")
    make(store, "dataset", "chat")
    make(store, "checkpoint", "base")

    assert [a.ref for a in store.list()] == ["datasets/chat:v1", "datasets/chat:v2", "checkpoints/base:v1"]


# -- stale temporaries (issue 13: 10) --------------------------------------------------------------


def temporaries(store: ArtifactStore, kind_dir: str, name: str) -> list[str]:
    return [e for e in entries(store.root / kind_dir / name) if e.startswith(".tmp-")]


def test_the_next_writer_removes_a_killed_writers_temporary(store):
    assert run_python(KILLED_WRITER, str(store.root)).returncode == -signal.SIGKILL
    assert len(temporaries(store, "checkpoints", "sft")) == 1

    assert make(store, "checkpoint", "sft").version == 1
    assert temporaries(store, "checkpoints", "sft") == []


def test_a_live_writers_temporary_is_kept(store):
    with store.create("checkpoint", "sft", stage="sft") as slow:
        (slow.path / "weights.bin").write_bytes(b"still writing")
        assert make(store, "checkpoint", "sft").version == 1  # another writer publishes meanwhile
        assert (slow.path / "weights.bin").read_bytes() == b"still writing"
    assert slow.result.version == 2
    assert temporaries(store, "checkpoints", "sft") == []


def test_only_temporaries_of_gone_writers_on_this_host_are_removed(store):
    make(store, "checkpoint", "sft")
    name_dir = store.root / "checkpoints" / "sft"
    me = rlhf.artifacts._owner()
    pid, start, boot, host = me.split(".", 3)
    uid = "0" * 32
    names = {
        "reused pid": f".tmp-{uid}.{pid}.{int(start) + 1}.{boot}.{host}",  # same pid, another process
        "earlier boot": f".tmp-{uid}.{pid}.{start}.{'f' * len(boot)}.{host}",
        "other host": f".tmp-{uid}.{pid}.{int(start) + 1}.{boot}.not-{host}",
        "no owner": f".tmp-{'1' * 32}",
        "live": f".tmp-{'2' * 32}.{me}",
    }
    for n in names.values():
        (name_dir / n).mkdir()

    make(store, "checkpoint", "sft")
    assert sorted(temporaries(store, "checkpoints", "sft")) == sorted(
        names[k] for k in ("other host", "no owner", "live"))


# -- manifest integrity (issue 13: 11, 12) -----------------------------------------------------------


def edit_manifest(art, change) -> None:
    path = art.path / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change", [
    lambda m: m["metrics"].update(loss=0.01),
    lambda m: m["inputs"].append({"role": "model", "ref": "checkpoints/other:v1", "path": "checkpoints/other/v0001",
                                  "content_hash": "0" * 64}),
], ids=["metrics", "input ref"])
def test_an_edited_manifest_fails_verify_and_every_load(store, change, capsys):
    from conftest import rlhf as cli

    art = make(store, "checkpoint", "sft", metrics={"loss": 1.5})
    edit_manifest(art, change)

    edited = "manifest: manifest.json was edited after publishing (its manifest_hash does not match)"
    assert store.verify("sft") == [edited]
    message = resolve_error(store, "sft:v1")
    assert message.startswith("checkpoints/sft:v1 is damaged: manifest.json was edited")
    assert message.endswith("run `rlhf artifacts verify checkpoints/sft:v1`")
    assert store.list() == []  # not offered for reuse (sweeps, compare's cached answers)
    assert cli(store.root, "artifacts", "verify", "sft") == 1
    assert edited in capsys.readouterr().out
    assert cli(store.root, "artifacts", "lineage", "sft") == 2


@pytest.mark.parametrize("content, problem", [
    ("{}", "manifest.json lacks name, version, kind"),
    (None, "manifest.json lacks files"),
    ("[1, 2]", "manifest.json lacks everything (it is not a JSON object)"),
    ("{not json", "manifest.json is unreadable"),
    ("missing", "manifest.json is missing"),
])
def test_a_damaged_version_is_reported_and_the_rest_still_listed(store, capsys, content, problem):
    from conftest import rlhf as cli

    make(store, "dataset", "chat")
    broken = make(store, "dataset", "chat")
    make(store, "checkpoint", "base")
    manifest = broken.path / "manifest.json"
    if content is None:
        edit_manifest(broken, lambda m: m.pop("files"))
    elif content == "missing":
        manifest.unlink()
    else:
        manifest.write_text(content)

    assert cli(store.root, "artifacts", "list") == 1
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["datasets/chat:v1", "checkpoints/base:v1"]
    assert err.startswith(f"error: datasets/chat:v2 is damaged: {problem}") and err.count("\n") == 1
    assert [a.ref for a in store.list()] == ["datasets/chat:v1", "checkpoints/base:v1"]

    assert cli(store.root, "artifacts", "verify", "chat:v2") == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"datasets/chat:v2: manifest: {problem}")
    assert "failed verification" in err
    assert problem in resolve_error(store, "chat:latest")  # never silently the older version


def test_a_stray_version_directory_is_reported_not_fatal(store, capsys):
    from conftest import rlhf as cli

    make(store, "dataset", "chat")
    (store.root / "datasets" / "chat" / "v0002").mkdir()

    assert cli(store.root, "artifacts", "list") == 1
    out, err = capsys.readouterr()
    assert out.split()[0] == "datasets/chat:v1"
    assert err.strip() == ("error: datasets/chat:v2 is damaged: manifest.json is missing; "
                           "run `rlhf artifacts verify datasets/chat:v2`")
    assert make(store, "dataset", "chat").version == 3  # the number stays taken


# -- damaged files caught before loading (issue 13: 13) ---------------------------------------------


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.unlink(), "weights.bin is missing"),
    (lambda p: p.write_bytes(b"w" * 10), "weights.bin is 10 bytes where its manifest records 100"),
])
def test_a_missing_or_truncated_file_fails_resolve_naming_the_file(store, damage, problem):
    art = make_verifiable(store)
    damage(art.path / "weights.bin")

    assert resolve_error(store, "sft") == (f"checkpoints/sft:v1 is damaged: {problem}; "
                                           "run `rlhf artifacts verify checkpoints/sft:v1`")
    assert store.resolve("sft", check_files=False).version == 1  # show and lineage still work
