"""`rlhf label ...`: the labeling store from the command line.

    rlhf label users add alice [--role annotator|admin]     # prints alice's one-time login token
    rlhf label load candidates:v3 [--overlap 3] [--name NAME]
    rlhf label load-ab candidates:v4 candidates:v5 [--name NAME] [--overlap 1]
    rlhf label status
    rlhf label serve [--port 8501] [--address 127.0.0.1]  # the Streamlit app, on http://127.0.0.1:8501
    rlhf label export [--pairs all|best-vs-rest] [--min-annotators N] [--task-set NAME]

Each takes `--db URL` (default: $RLHF_LABEL_DB, else sqlite:///<workspace>/labels.db).
On PostgreSQL the tables have plain names (users, items, labels, ...): give the app a
database of its own, or a schema of its own with
`postgresql+psycopg2://user@host/db?options=-csearch_path%3Dlabeling` (create it first).
SQLAlchemy and the store are imported only when a label command runs, so `rlhf --help`
stays fast.
"""

from __future__ import annotations

import argparse

from rlhf.report import pct

ROLES = ("annotator", "admin")  # as labeling_app.store.ROLES, repeated to keep the import lazy


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _address(text: str) -> str:
    """An IP address or a host name to listen on."""
    import ipaddress
    import re

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or host name")


def add_label_parser(subparsers: argparse._SubParsersAction, common_parent: argparse.ArgumentParser) -> None:
    """Add `label` and its actions to the `rlhf` parser; `common_parent` carries --workspace."""
    db = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --db given before the action is not reset by the action's own default.
    db.add_argument("--db", default=argparse.SUPPRESS, metavar="URL",
                    help="labels database URL (default: $RLHF_LABEL_DB, else sqlite:///<workspace>/labels.db)")
    parents = [common_parent, db]
    label = subparsers.add_parser("label", parents=parents, help="human preference labeling: users, task sets, export")
    actions = label.add_subparsers(dest="label_action", required=True, metavar="ACTION")

    users = actions.add_parser("users", parents=parents, help="manage annotators and admins")
    users_actions = users.add_subparsers(dest="users_action", required=True, metavar="ACTION")
    add = users_actions.add_parser("add", parents=parents, help="add a user and print their one-time login token")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="annotator")

    load = actions.add_parser("load", parents=parents, help="make a ranking task set from a candidates dataset")
    load.add_argument("ref", help="candidates dataset ref, e.g. candidates:v3")
    load.add_argument("--overlap", type=_positive_int, default=3, help="distinct annotators per item (default 3)")
    load.add_argument("--name", help="task set name (default: <dataset>-v<version>)")

    load_ab = actions.add_parser("load-ab", parents=parents,
                                 help="make a blind A/B task set from two candidates datasets")
    load_ab.add_argument("ref_a", help="candidates of the first model")
    load_ab.add_argument("ref_b", help="candidates of the second model")
    load_ab.add_argument("--name", help="task set name (default: ab-<a>-v<N>-<b>-v<M>)")
    load_ab.add_argument("--overlap", type=_positive_int, default=1, help="votes per prompt (default 1)")

    actions.add_parser("status", parents=parents, help="progress per task set and annotator, and agreement")

    serve = actions.add_parser("serve", parents=parents, help="start the Streamlit labeling app")
    serve.add_argument("--port", type=_port, default=8501, help="port to listen on (default 8501)")
    serve.add_argument("--address", type=_address, default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; to reach it from "
                            "elsewhere, put a TLS reverse proxy in front rather than listening on 0.0.0.0)")

    export = actions.add_parser("export", parents=parents,
                                help="write preferences + rankings (or ab_votes for an A/B task set)")
    export.add_argument("--pairs", choices=("all", "best-vs-rest"), default="all")
    export.add_argument("--min-annotators", type=_positive_int, default=1,
                        help="skip items with fewer usable labels (default 1)")
    export.add_argument("--task-set", help="task set name (default: the most recently loaded)")


def run_label(args: argparse.Namespace, artifact_store) -> int:
    """Run one `rlhf label` action; user errors raise RlhfError for the caller to print."""
    from labeling_app.store import LabelStore

    store = LabelStore.for_workspace(artifact_store.root, getattr(args, "db", None))
    try:
        if args.label_action == "users":
            return _users_add(store, args)
        if args.label_action in ("load", "load-ab"):
            return _load(store, artifact_store, args)
        if args.label_action == "export":
            return _export(store, artifact_store, args)
        if args.label_action == "serve":
            return _serve(store, artifact_store, args)
        return _status(store)
    finally:
        store.close()


def _users_add(store, args: argparse.Namespace) -> int:
    from labeling_app.auth import add_user

    user, token = add_user(store, args.name, args.role)
    print(f"added {user.role} {user.name!r}. Login token (shown once, only its hash is stored):")
    print(token)
    return 0


def _load(store, artifact_store, args: argparse.Namespace) -> int:
    from labeling_app.labels import load_ab_task_set, load_task_set

    if args.label_action == "load":
        loaded = load_task_set(store, artifact_store, args.ref, overlap=args.overlap, name=args.name)
    else:
        loaded = load_ab_task_set(store, artifact_store, args.ref_a, args.ref_b, name=args.name, overlap=args.overlap)
    ts = loaded.task_set
    print(f"loaded {ts.kind} task set {ts.name!r}: {loaded.items} items x {ts.overlap} annotators "
          f"from {', '.join(c['ref'] for c in ts.candidate_refs)}")
    for reason, n in loaded.skipped.items():
        print(f"  left out {n} prompts: {reason}")
    return 0


def _export(store, artifact_store, args: argparse.Namespace) -> int:
    from labeling_app.export import export, export_ab

    ts = store.task_set(args.task_set)
    if ts.kind == "ab":
        votes = export_ab(artifact_store, store, task_set=ts.name)
        m = votes.manifest["metrics"]
        print(f"wrote {votes.ref}: {m['votes']} votes ({m['excluded_flagged']} flagged left out)")
        return 0
    preferences, rankings = export(artifact_store, store, pairs=args.pairs, min_annotators=args.min_annotators,
                                   task_set=ts.name)
    m = preferences.manifest["metrics"]
    print(f"wrote {rankings.ref}: {m['labels']} labels from {m['annotators']} annotators")
    print(f"wrote {preferences.ref}: {m['pairs']} pairs from {m['items']} items; {m['ties']} tied pairs, "
          f"{m['excluded_flagged']} flagged and {m['excluded_none_acceptable']} none-acceptable labels left out, "
          f"{m['skipped_min_annotators']} items below --min-annotators")
    print(f"  agreement {pct(m['pairwise_agreement'])}, Krippendorff's alpha {_num(m['krippendorff_alpha'])}")
    return 0


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _status(store) -> int:
    from labeling_app.labels import agreement_report, annotator_progress, task_set_progress

    print(f"labels database: {store.safe_url}")
    sets = task_set_progress(store)
    if not sets:
        print("no task sets; load one with `rlhf label load candidates:vK`")
    for p in sets:
        line = (f"  {p.name:32s} {p.kind:4s} {p.labels:5d}/{p.needed:<5d} labels  "
                f"{p.complete_items}/{p.items} items complete")
        if p.kind == "rank":
            report = agreement_report(store, p.name)
            line += f"  agreement {pct(report.pairwise.rate)}  alpha {_num(report.krippendorff_alpha)}"
        print(line)
    people = annotator_progress(store)
    if people:
        print("annotators:")
    for a in people:
        print(f"  {a.name:24s} {a.role:9s} done {a.done:4d}  leased {a.leased:2d}  skipped {a.skipped:3d}  "
              f"flagged {a.flagged:3d}")
    return 0


def _serve(store, artifact_store, args: argparse.Namespace) -> int:
    """Run `streamlit run labeling_app/app.py` on this workspace and database until it exits."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from labeling_app.sessions import ensure_schema

    ensure_schema(store)  # LabelStore created the rest; the app finds the schema ready
    app = Path(__file__).with_name("app.py")
    env = {**os.environ, "RLHF_WORKSPACE": str(artifact_store.root), "RLHF_LABEL_DB": store.url}
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.address,
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal"]  # annotators need no Deploy button or developer menu
    host = f"[{args.address}]" if ":" in args.address else args.address
    print(f"labeling app for {store.safe_url} on http://{host}:{args.port} (Ctrl+C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # A plain `kill` of this process must not leave the server running without it.
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Streamlit got the same Ctrl+C from the terminal and is stopping
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
