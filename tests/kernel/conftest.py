"""tests/kernel: what `make test-kernel` runs on further real kernels.

test_kernel_smoke.py is the privileged smoke suite that scripts/test-kernel.sh
runs inside each of Debian's 6.1 and 6.12 kernels under qemu, and
test_kernel_saved.py holds that kernel's saved set (tests/data/formats, made
by harvest.py) against what it reports. On the host `make test` already runs
the full privileged suite, so these two are collected only when
TCPTRACE_KERNEL_SMOKE is set (the guest sets it; set it by hand to run them
on the host: they pass on each kernel). The other files here are unit tests
on the data the guests brought back, and always run.
"""

import os

GUEST_ONLY = ["test_kernel_smoke.py", "test_kernel_saved.py"]
collect_ignore = [] if os.environ.get("TCPTRACE_KERNEL_SMOKE") else GUEST_ONLY
