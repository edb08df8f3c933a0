"""SHA-256 without loading OpenSSL.

`import hashlib` initialises libcrypto, about 3-4 ms of every start of
tcptrace (a twentieth of the time to the first event), for digests that
CPython's own implementation gives the same: cache keys and file names."""

try:
    from _sha2 import sha256  # noqa: F401 (CPython 3.12 and later)
except ImportError:
    try:
        from _sha256 import sha256  # noqa: F401 (CPython 3.9 to 3.11)
    except ImportError:
        from hashlib import sha256  # noqa: F401
