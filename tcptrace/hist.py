"""log2 histograms as the kernel keeps them (spec.Histogram) and as bcc's
print_log2_hist prints them, so that a bcc user reads them at a glance.

Slot 0 holds the value 0 and slot k >= 1 the values 2**(k-1) .. 2**k - 1.
As in bcc, the first printed bucket is "0 -> 1" (slots 0 and 1), and a
histogram is printed up to its highest non-empty bucket.
"""

STARS = 40


def slot(value):
    """The kernel's slot of a value (probe.bpf.c's log2_slot)."""
    return value.bit_length()


def buckets(slots):
    """[(low, high, count)] from {slot: count}, from "0 -> 1" up to the
    highest non-empty slot; [] when every count is zero."""
    top = max((s for s, c in slots.items() if c), default=0)
    if top == 0 and not slots.get(0):
        return []
    out = [(0, 1, slots.get(0, 0) + slots.get(1, 0))]
    for k in range(2, top + 1):
        out.append((1 << (k - 1), (1 << k) - 1, slots.get(k, 0)))
    return out


def total(rows):
    return sum(count for _low, _high, count in rows)


def _stars(count, most, width):
    if most <= 0:
        return ""
    n = min(width, -(-count * width // most)) if count else 0
    return "*" * n


def render(rows, unit):
    """bcc's print_log2_hist text for one histogram (without a label)."""
    if not rows:
        return ""
    wide = len(rows) > 32
    width = STARS // 2 if wide else STARS
    if wide:
        head = "               %-29s : count     distribution" % unit
        body = "%20d -> %-20d : %-8d |%-*s|"
    else:
        head = "     %-19s : count     distribution" % unit
        body = "%10d -> %-10d : %-8d |%-*s|"
    most = max(count for _low, _high, count in rows)
    lines = [head]
    for low, high, count in rows:
        lines.append(body % (low, high, count, width, _stars(count, most, width)))
    return "\n".join(lines) + "\n"
