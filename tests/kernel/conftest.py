"""tests/kernel: what `make test-kernel` runs on a second real kernel.

test_kernel_smoke.py is the privileged smoke suite that scripts/test-kernel.sh
runs inside Debian's 6.1 kernel under qemu. On the host `make test` already
runs the full privileged suite, so the smoke file is collected only when
TCPTRACE_KERNEL_SMOKE is set (the guest sets it; set it by hand to run the
suite on the host: it passes on either kernel). The other files here are
unit tests on the data the guest brought back, and always run.
"""

import os

collect_ignore = [] if os.environ.get("TCPTRACE_KERNEL_SMOKE") else ["test_kernel_smoke.py"]
