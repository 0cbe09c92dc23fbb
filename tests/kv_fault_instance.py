"""`python tests/kv_fault_instance.py DIE_FILE --flags of jaxserve.launch.instance`: jaxserve.launch.instance whose server exits
abruptly (status 17) when a CommitKvTransfer arrives once DIE_FILE exists, as a crash between prepare and
commit would. The fault is this test-side subclass; production code has no hook for it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from jaxserve.instance.server import InstanceServer  # noqa: E402
from jaxserve.launch import instance as launcher  # noqa: E402


def dying_server(die_file: str):
    class DyingBeforeCommit(InstanceServer):
        async def CommitKvTransfer(self, request, context):
            if os.path.exists(die_file):
                os._exit(17)
            return await super().CommitKvTransfer(request, context)
    return DyingBeforeCommit


if __name__ == "__main__":
    launcher.InstanceServer = dying_server(sys.argv.pop(1))
    app.run(launcher.main)
