/*
 * tcptrace.h: what every tcptrace program shares.
 *
 * No kernel header is included. Tracepoint records are the generated
 * `struct tp_<event>` (laid out from the running kernel's format files, with
 * HAS_<EVENT>_<FIELD> macros giving each present field's size), and the few
 * kernel struct offsets a tool needs come from BTF as integer #defines.
 *
 * Output goes to one stream named `events`: a BPF ring buffer when
 * TCPTRACE_RINGBUF is set (kernel 5.8+, one ordered stream for all CPUs),
 * else a per-CPU perf buffer. Every failed submission is counted here in
 * tcptrace_stats, for both kinds: a full ring buffer drops silently, and a
 * perf buffer tells user space only when a later event gets through.
 */

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TASK_COMM_LEN 16

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10
#define TCP_CLOSING 11
#define TCP_NEW_SYN_RECV 12

#ifndef TCPTRACE_MAX_SOCKETS
#define TCPTRACE_MAX_SOCKETS 65536
#endif
#ifndef TCPTRACE_RINGBUF_PAGES
#define TCPTRACE_RINGBUF_PAGES 256
#endif
#define TCPTRACE_MAX_FILTER 64

/* Slots of tcptrace_stats, read and reported by the runtime. */
#define STAT_LOST_OUTPUT 0 /* events the output buffer did not take (full, or the reservation refused) */
#define STAT_UNTRACKED 1   /* sockets not tracked: a per-socket map was full */
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

static __always_inline void emit(void *ctx, void *event, u32 size)
{
#ifdef TCPTRACE_RINGBUF
	u32 slot = STAT_EMITTED;
	u64 *emitted = tcptrace_stats.lookup(&slot);
	u64 flags = BPF_RB_FORCE_WAKEUP;

	if (emitted && (*emitted)++ % TCPTRACE_WAKEUP_EVERY != 0)
		flags = BPF_RB_NO_WAKEUP;
	if (events.ringbuf_output(event, size, flags) != 0)
		stat_inc(STAT_LOST_OUTPUT);
#else
	/* The perf buffer reports a drop only when a later event gets
	 * through: counting here also counts drops at the end of a run. */
	if (events.perf_submit(ctx, event, size) != 0)
		stat_inc(STAT_LOST_OUTPUT);
#endif
}
#endif /* TCPTRACE_NO_EVENTS */

/* Filters: integer #defines and maps filled by user space before attach. */
static __always_inline int family_ok(u16 family)
{
#ifdef FILTER_FAMILY
	return family == FILTER_FAMILY;
#else
	return family == AF_INET || family == AF_INET6;
#endif
}

#ifdef FILTER_LPORTS
BPF_HASH(filter_lports, u16, u8, TCPTRACE_MAX_FILTER);
#endif
#ifdef FILTER_RPORTS
BPF_HASH(filter_rports, u16, u8, TCPTRACE_MAX_FILTER);
#endif
#ifdef FILTER_PIDS
BPF_HASH(filter_pids, u32, u8, TCPTRACE_MAX_FILTER);
#endif

static __always_inline int lport_ok(u16 port)
{
#ifdef FILTER_LPORTS
	return filter_lports.lookup(&port) != 0;
#else
	return 1;
#endif
}

static __always_inline int rport_ok(u16 port)
{
#ifdef FILTER_RPORTS
	return filter_rports.lookup(&port) != 0;
#else
	return 1;
#endif
}

static __always_inline int pid_ok(u32 pid)
{
#ifdef FILTER_PIDS
	return filter_pids.lookup(&pid) != 0;
#else
	return 1;
#endif
}

static __always_inline int ports_ok(u16 lport, u16 rport)
{
	return lport_ok(lport) && rport_ok(rport);
}

/*
 * Addresses travel as 16 bytes with a family: IPv4 in the first 4.
 * Tracepoint records carry both an IPv4 and an IPv6 copy (saddr/daddr and
 * saddr_v6/daddr_v6); the family picks one. Byte arrays have alignment 1,
 * so these copies compile to byte loads, which any record offset allows.
 */
#define COPY_ADDRS(ev, args)                                                   \
	do {                                                                   \
		if ((ev)->family == AF_INET6) {                                \
			__builtin_memcpy((ev)->saddr, (args)->saddr_v6, 16);   \
			__builtin_memcpy((ev)->daddr, (args)->daddr_v6, 16);   \
		} else {                                                       \
			__builtin_memcpy((ev)->saddr, (args)->saddr, 4);       \
			__builtin_memcpy((ev)->daddr, (args)->daddr, 4);       \
		}                                                              \
	} while (0)

static __always_inline u32 current_pid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline int is_tcp(u16 protocol)
{
	return protocol == IPPROTO_TCP;
}

/* bcc defines KERNEL_VERSION; a plain C preprocessor (tests) may not. */
#ifdef KERNEL_VERSION
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 5, 0)
#define read_kernel bpf_probe_read_kernel
#endif
#endif
#ifndef read_kernel
#define read_kernel bpf_probe_read
#endif

/*
 * Kernel struct members, at the offsets the running kernel's BTF gives
 * (OFF_<STRUCT>_<MEMBER>, defined when a tool lists the member in its spec).
 * Without an offset the value is unknown, never read from a guessed layout.
 *
 * tcp_bytes(): tcp_sock.bytes_acked and bytes_received, the kernel's own
 * counters; bytes_acked counts the sequence space the peer acknowledged
 * (our SYN on the connecting side, and our FIN), bytes_received the peer's
 * FIN. Returns 1 when both were read.
 */
static __always_inline int tcp_bytes(u64 sk, u64 *acked, u64 *received)
{
#if defined(OFF_TCP_SOCK_BYTES_ACKED) && defined(OFF_TCP_SOCK_BYTES_RECEIVED)
	return read_kernel(acked, sizeof(*acked), (void *)(sk + OFF_TCP_SOCK_BYTES_ACKED)) == 0 &&
	       read_kernel(received, sizeof(*received), (void *)(sk + OFF_TCP_SOCK_BYTES_RECEIVED)) == 0;
#else
	return 0;
#endif
}

/*
 * sock_error(): sock.sk_err, the errno a failed socket keeps: ETIMEDOUT when
 * the SYN retries ran out, ECONNREFUSED, an ICMP error, 0 when the
 * application closed it; SOCK_ERROR_UNKNOWN without BTF.
 */
#define SOCK_ERROR_UNKNOWN -1

static __always_inline s32 sock_error(u64 sk)
{
#ifdef OFF_SOCK_SK_ERR
	s32 err = 0;

	read_kernel(&err, sizeof(err), (void *)(sk + OFF_SOCK_SK_ERR));
	return err;
#else
	return SOCK_ERROR_UNKNOWN;
#endif
}

/*
 * Socket owners (TCPTRACE_OWNERS): the process a socket belongs to, for
 * events that fire in softirq context, where the task on the CPU is unrelated.
 *
 * Only transitions that the kernel makes inside a system call of the owning
 * process are trusted: CLOSE->SYN_SENT (connect), CLOSE->LISTEN (listen),
 * ->FIN_WAIT1 and ->LAST_ACK (close or shutdown). A child socket of a
 * listener (LISTEN->SYN_RECV, in softirq) inherits the listener's owner,
 * looked up by local port. A later process-context transition wins: the
 * process that closes a socket holds it, even if another created it.
 */
#ifdef TCPTRACE_OWNERS
struct owner {
	u32 pid;
	u32 known;
	char comm[TASK_COMM_LEN];
};

BPF_HASH(owners, u64, struct owner, TCPTRACE_MAX_SOCKETS);
BPF_HASH(listen_owners, u16, struct owner, 4096);

static __always_inline void set_owner_current(u64 skaddr, struct owner *o)
{
	o->pid = current_pid();
	o->known = 1;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	if (owners.update(&skaddr, o) != 0)
		stat_inc(STAT_UNTRACKED);
}

/* Call for every TCP state change, before reading the owner, and call
 * forget_owner() once a change to CLOSE has been handled. */
static __always_inline void track_owner(u64 skaddr, s32 oldstate, s32 newstate, u16 lport)
{
	struct owner o = {};

	if (newstate == TCP_SYN_SENT || newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK) {
		set_owner_current(skaddr, &o);
	} else if (newstate == TCP_LISTEN) {
		set_owner_current(skaddr, &o);
		listen_owners.update(&lport, &o);
	} else if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
		struct owner *parent = listen_owners.lookup(&lport);
		if (parent && owners.update(&skaddr, parent) != 0)
			stat_inc(STAT_UNTRACKED);
	} else if (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) {
		listen_owners.delete(&lport);
	}
}

static __always_inline struct owner *owner_of(u64 skaddr)
{
	return owners.lookup(&skaddr);
}

static __always_inline void forget_owner(u64 skaddr)
{
	owners.delete(&skaddr);
}
#endif /* TCPTRACE_OWNERS */

/*
 * Count mode (TCPTRACE_COUNT): tools add 1 to `counts` under their key
 * struct instead of emitting an event; user space reads the map.
 */
#ifdef TCPTRACE_COUNT
#define COUNT_MAP(key_type) BPF_HASH(counts, key_type, u64, 16384)
#endif
