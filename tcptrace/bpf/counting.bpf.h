/*
 * counting.bpf.h: what leaves the kernel, and what is counted when it
 * cannot. Part of tcptrace.h, which defines what it uses first.
 *
 * tcptrace_stats holds, per CPU, the events that were lost and the sockets
 * that were not tracked; the runtime reads it, reports the losses and exits
 * with its lost-events status. Nothing is dropped without a count here.
 *
 * Output goes to one stream named `events`: a BPF ring buffer when
 * TCPTRACE_RINGBUF is set (kernel 5.8+, one ordered stream for all CPUs),
 * else a per-CPU perf buffer. Every failed submission is counted, for both
 * kinds: a full ring buffer drops silently, and a perf buffer tells user
 * space only when a later event gets through.
 *
 * Count mode (TCPTRACE_COUNT, `-c`): a tool that defines COUNT_KEY (its
 * struct count_key) before tcptrace.h gets the `counts` hash and
 * count_event(), which adds 1 under a key, or counts the event as lost when
 * the key cannot be stored.
 */

/* Slots of tcptrace_stats, read and reported by the runtime. */
#define STAT_LOST_OUTPUT 0 /* events the output buffer did not take, or a count not stored */
#define STAT_UNTRACKED 1   /* sockets not tracked: a per-socket map was full, or a slot taken */
#define STAT_EMITTED 2     /* events handed to the ring buffer (paces wakeups) */
#define STAT_SLOTS 3

BPF_PERCPU_ARRAY(tcptrace_stats, u64, STAT_SLOTS);

static __always_inline void stat_inc(u32 slot)
{
	u64 *value = tcptrace_stats.lookup(&slot);
	if (value)
		(*value)++;
}

/* A program that only counts in maps (exporter.bpf.c) defines
 * TCPTRACE_NO_EVENTS: no output buffer is created for it. */
#ifndef TCPTRACE_NO_EVENTS
#ifdef TCPTRACE_RINGBUF
BPF_RINGBUF_OUTPUT(events, TCPTRACE_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/*
 * Ring buffer wakeups: the kernel wakes the reader for every event submitted
 * while the reader is caught up, which at a few thousand events a second is
 * nearly every event, and waking a Python reader costs more than the event.
 * Only one event in TCPTRACE_WAKEUP_EVERY per CPU wakes it: the reader also
 * polls every 100 ms, which bounds how late the others are seen.
 */
#ifndef TCPTRACE_WAKEUP_EVERY
#define TCPTRACE_WAKEUP_EVERY 256
#endif
#define BPF_RB_NO_WAKEUP 1
#define BPF_RB_FORCE_WAKEUP 2

/*
 * A ring buffer's reservation can fail with the ring nearly empty: measured
 * on 6.18 at full-speed loopback load (about 600,000 events in 2 s), with
 * the ring at most 0 % full and room for a small record right after; such
 * failures come in short runs (consistent with the ring's lock giving up
 * rather than waiting, as the resilient spinlock of some kernels since 6.15
 * does). One try: 21 events lost in 8 loads. Up to RINGBUF_TRIES tries in
 * all: 12 in 24 loads, none in 20 of them. A full ring fails every try
 * quickly: with a 32 KiB ring losing nearly every event, the load ran within
 * 1 % of its speed with one try (the spread between loads: 8 %). Whatever
 * still fails is counted as lost.
 */
#ifdef TCPTRACE_RINGBUF
#define RINGBUF_TRIES 16

static __always_inline int ringbuf_put(void *event, u32 size, u64 flags)
{
#pragma unroll
	for (int i = 0; i < RINGBUF_TRIES; i++)
		if (events.ringbuf_output(event, size, flags) == 0)
			return 0;
	return -1;
}
#endif

static __always_inline void emit(void *ctx, void *event, u32 size)
{
#ifdef TCPTRACE_RINGBUF
	u32 slot = STAT_EMITTED;
	u64 *emitted = tcptrace_stats.lookup(&slot);
	u64 flags = BPF_RB_FORCE_WAKEUP;

	if (emitted && (*emitted)++ % TCPTRACE_WAKEUP_EVERY != 0)
		flags = BPF_RB_NO_WAKEUP;
	if (ringbuf_put(event, size, flags) != 0)
		stat_inc(STAT_LOST_OUTPUT);
#else
	/* The perf buffer reports a drop only when a later event gets
	 * through: counting here also counts drops at the end of a run. */
	if (events.perf_submit(ctx, event, size) != 0)
		stat_inc(STAT_LOST_OUTPUT);
#endif
}
#endif /* TCPTRACE_NO_EVENTS */

#ifdef TCPTRACE_COUNT
#ifndef TCPTRACE_MAX_COUNTS
#define TCPTRACE_MAX_COUNTS 16384
#endif

/* The map alone, for a tool that counts its own way. */
#define COUNT_MAP(key_type) BPF_HASH(counts, key_type, u64, TCPTRACE_MAX_COUNTS)

#ifdef COUNT_KEY
COUNT_MAP(COUNT_KEY);

/*
 * bcc's atomic_increment() inserts a new key with BPF_NOEXIST and ignores
 * the result, so a count is lost without a word when the map is full or
 * when another CPU inserted the same key first. Here a key that another CPU
 * inserted is found by the second lookup of lookup_or_try_init(), and only
 * a key that cannot be stored at all is a loss, counted as one.
 */
static __always_inline void count_event(COUNT_KEY *key)
{
	u64 zero = 0;
	u64 *count = counts.lookup_or_try_init(key, &zero);

	if (count)
		__sync_fetch_and_add(count, 1);
	else
		stat_inc(STAT_LOST_OUTPUT);
}
#endif /* COUNT_KEY */
#endif /* TCPTRACE_COUNT */
