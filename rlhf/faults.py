"""Named kill points for the fault-injection tests (tests/faults).

A test sets RLHF_FAULT to a point's name and runs a command: the process SIGKILLs itself on
reaching that point, as an OOM kill or a power cut would, so a kill lands at a known place
instead of racing a timer. Names nest with ':': RLHF_FAULT=publish stops at the first
`publish:<artifact name>`. Unset, as everywhere outside those tests, a point does nothing.
"""

import os
import signal


def point(name: str) -> None:
    want = os.environ.get("RLHF_FAULT")
    if want and (name == want or name.startswith(want + ":")):
        os.kill(os.getpid(), signal.SIGKILL)
