"""`rlhf ... | head`: a reader that goes away early ends the command quietly (issue 13, section 5, defect 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf import cli


@pytest.mark.parametrize("args", [["artifacts", "show", "sft:v1"], ["artifacts", "list"]], ids=["show", "list"])
def test_closed_pipe_exits_quietly_without_a_traceback(tmp_path, args):
    ws = tmp_path / "ws"
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    assert cli.main(["--workspace", str(ws), "data", "import", "sft", str(rows)]) == 0
    # The read end is closed before the command starts, so its first write fails every time (as `head` exiting).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "--workspace", str(ws), *args],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)

    assert proc.stderr == ""
    assert proc.returncode == 1  # the status of Python's recipe; the empty stderr is what tells it from a crash
