"""tcptrace: see what the kernel's TCP stack is doing, from its stable tracepoints."""

__version__ = "0.1.0"
