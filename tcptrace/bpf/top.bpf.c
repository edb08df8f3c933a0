/*
 * top.bpf.c: the bytes each TCP socket moves, counted in the kernel per
 * socket and read every interval (tcptrace top).
 *
 * Tracepoints: sock:sock_send_length and sock:sock_recv_length (Linux 6.3+)
 * fire as every sendmsg/recvmsg of any socket returns, with the socket, its
 * family and protocol and the return value: the bytes the call moved
 * (send(), write(), sendfile() and splice() all end in sock_sendmsg), or an
 * error. They run in the calling process, so the task on the CPU is the one
 * moving the bytes. They fire for every socket of every protocol, so the
 * protocol is tested first. A recv with MSG_PEEK moves nothing (the
 * kernel's own print format shows 0 for it). tcp:tcp_destroy_sock (4.15+)
 * marks the end of a socket.
 *
 * Before 6.3 (TOP_ACKED): tcp:tcp_probe, which fires in softirq for every
 * segment an established socket receives. TX is then the advance of
 * snd_una: the bytes the peer acknowledged, in sequence space (a FIN counts
 * one), from the socket's first probe while tracing; RX and the owner are
 * unknown to the kernel (user space asks /proc for the owner), so -p
 * matches nothing.
 *
 * Counting without losing a byte to the reader: a socket's struct event
 * lives in one of two hashes, `counts` for even generations and
 * `counts_odd` for odd ones; `generation` (an array user space writes) says
 * which. Every interval user space advances the generation, waits for an
 * RCU grace period (every program that read the old one has returned: the
 * programs of a tracepoint run inside one RCU read-side section), then takes
 * the old hash with lookup-and-delete. No program writes that hash any
 * more, so nothing counted between the read and the clear is lost, and the
 * hashes hold only the sockets that moved bytes in one interval.
 *
 * The key is the socket's address with closed_ns 0. At tcp_destroy_sock the
 * entry of the current generation moves to closed_ns = now: its bytes are
 * still shown for this interval, and the next socket at that address counts
 * apart. No send or receive can be running on a socket being destroyed (each
 * holds a reference to its file), so the move races with no writer. The
 * change to CLOSE is no end: an application may still read what it received
 * before it (a half-closed connection), so nothing moves then.
 *
 * Endpoints are read from struct sock_common at BTF offsets, once per
 * socket and interval; without BTF they stay zero and -L/-D match nothing.
 * An entry the hash cannot store is counted as lost.
 */
#define MSG_PEEK 2

struct count_key {
	u64 sk;
	u64 closed_ns; /* 0 while the socket lives */
};

/* A socket's bytes in one interval: the value of both hashes. */
struct event {
	u64 ts_ns; /* when the socket's entry of this interval began */
	u64 rx_bytes;
	u64 tx_bytes;
	u64 calls; /* sendmsg/recvmsg calls that moved bytes; ACKs that advanced snd_una under TOP_ACKED */
	u32 pid;
	u16 family;
	u16 lport;
	u16 rport;
	u8 tx_acked; /* TX is acknowledged bytes (TOP_ACKED) */
	u8 owner_known;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

#include "tcptrace.h"
#include "workload.bpf.h"

#if !defined(HAVE_SOCK_SEND_LENGTH) || !defined(HAVE_SOCK_RECV_LENGTH)
#define TOP_ACKED 1
#endif

#ifndef TCPTRACE_MAX_COUNTS
#define TCPTRACE_MAX_COUNTS 16384
#endif

BPF_ARRAY(generation, u32, 1);
BPF_HASH(counts, struct count_key, struct event, TCPTRACE_MAX_COUNTS);
BPF_HASH(counts_odd, struct count_key, struct event, TCPTRACE_MAX_COUNTS);

static __always_inline u32 odd_generation(void)
{
	u32 zero = 0;
	u32 *g = generation.lookup(&zero);

	return g ? (*g & 1) : 0;
}

static __always_inline struct event *entry_of(struct count_key *key, u32 odd)
{
	if (odd)
		return counts_odd.lookup(key);
	return counts.lookup(key);
}

/* Stores a new entry unless another CPU did first; the entry, or 0 when the
 * hash is full (a loss, counted). */
static __always_inline struct event *new_entry(struct count_key *key, struct event *fresh, u32 odd)
{
	struct event *v;

	if (odd)
		v = counts_odd.lookup_or_try_init(key, fresh);
	else
		v = counts.lookup_or_try_init(key, fresh);
	if (!v)
		stat_inc(STAT_LOST_OUTPUT);
	return v;
}

#ifndef TOP_ACKED
/* The socket's endpoints, from struct sock_common at BTF offsets. */
static __always_inline void read_endpoints(u64 sk, u16 family, struct event *ev)
{
#if defined(OFF_SOCK_COMMON_SKC_NUM) && defined(OFF_SOCK_COMMON_SKC_DPORT)
	u16 dport = 0;

	read_kernel(&ev->lport, sizeof(ev->lport), (void *)(sk + OFF_SOCK_COMMON_SKC_NUM));
	read_kernel(&dport, sizeof(dport), (void *)(sk + OFF_SOCK_COMMON_SKC_DPORT));
	ev->rport = (dport >> 8) | (dport << 8); /* network order */
#endif
	if (family == AF_INET6) {
#if defined(OFF_SOCK_COMMON_SKC_V6_RCV_SADDR) && defined(OFF_SOCK_COMMON_SKC_V6_DADDR)
		read_kernel(ev->saddr, 16, (void *)(sk + OFF_SOCK_COMMON_SKC_V6_RCV_SADDR));
		read_kernel(ev->daddr, 16, (void *)(sk + OFF_SOCK_COMMON_SKC_V6_DADDR));
#endif
	} else {
#if defined(OFF_SOCK_COMMON_SKC_RCV_SADDR) && defined(OFF_SOCK_COMMON_SKC_DADDR)
		read_kernel(ev->saddr, 4, (void *)(sk + OFF_SOCK_COMMON_SKC_RCV_SADDR));
		read_kernel(ev->daddr, 4, (void *)(sk + OFF_SOCK_COMMON_SKC_DADDR));
#endif
	}
}

static __always_inline void count_bytes(u64 sk, u16 family, s32 ret, int received)
{
	if (ret <= 0 || !family_ok(family))
		return;
	u32 pid = current_pid();
	if (!pid_ok(pid))
		return;

	struct count_key key = {};
	key.sk = sk;
	u32 odd = odd_generation();
	struct event *v = entry_of(&key, odd);
	if (!v) {
		struct event fresh = {};
		fresh.ts_ns = bpf_ktime_get_ns();
		fresh.family = family;
		read_endpoints(sk, family, &fresh);
		if (!ports_ok(fresh.lport, fresh.rport))
			return;
		if (!workload_read(sk, &fresh.cgroup_id, &fresh.netns))
			return;
		v = new_entry(&key, &fresh, odd);
		if (!v)
			return;
	}
	if (received)
		__sync_fetch_and_add(&v->rx_bytes, ret);
	else
		__sync_fetch_and_add(&v->tx_bytes, ret);
	__sync_fetch_and_add(&v->calls, 1);
	/* The last process to move bytes owns the row: plain stores, a race
	 * between two owners of one socket leaves one of them. Only a new
	 * owner costs the name. */
	if (v->pid != pid || !v->owner_known) {
		v->pid = pid;
		bpf_get_current_comm(v->comm, sizeof(v->comm));
		v->owner_known = 1;
	}
}
#endif /* !TOP_ACKED */

#ifdef HAVE_SOCK_SEND_LENGTH
int on_sock_send_length(struct tp_sock_send_length *args)
{
	if (!is_tcp(args->protocol))
		return 0;
#ifndef TOP_ACKED
	count_bytes(args->sk, args->family, args->ret, 0);
#endif
	return 0;
}
#endif

#ifdef HAVE_SOCK_RECV_LENGTH
int on_sock_recv_length(struct tp_sock_recv_length *args)
{
	if (!is_tcp(args->protocol) || (args->flags & MSG_PEEK))
		return 0;
#ifndef TOP_ACKED
	count_bytes(args->sk, args->family, args->ret, 1);
#endif
	return 0;
}
#endif

#ifdef TOP_ACKED
/* snd_una at the socket's last probe; LRU: a socket whose destroy was
 * missed is forgotten when the table needs the room. */
struct acked_state {
	u32 una;
	u32 unused;
};

BPF_TABLE("lru_hash", u64, struct acked_state, acked, TCPTRACE_MAX_SOCKETS);

static __always_inline u64 probe_socket(struct tp_tcp_probe *args)
{
#if defined(HAS_TCP_PROBE_SKADDR)
	return args->skaddr;
#else
	return args->sock_cookie;
#endif
}
#endif

/* Attached only under TOP_ACKED (a stand-in for the tracepoints above). */
int on_tcp_probe(struct tp_tcp_probe *args)
{
#if defined(TOP_ACKED) && !defined(FILTER_PIDS) /* -p: the owner is unknown in softirq, nothing matches */
	struct event fresh = {};

	COPY_SOCKADDRS(&fresh, args);
	if (!family_ok(fresh.family) || !ports_ok(fresh.lport, fresh.rport))
		return 0;
	u64 sk = probe_socket(args);
	u32 una = args->snd_una;
	struct acked_state *s = acked.lookup(&sk);
	if (!s) {
		struct acked_state first = {};
		first.una = una;
		if (acked.update(&sk, &first) != 0)
			stat_inc(STAT_UNTRACKED);
		return 0;
	}
	u32 step = una - s->una;
	if ((s32)step <= 0)
		return 0;
	s->una = una; /* probes of one socket are serialized by its lock */

	struct count_key key = {};
	key.sk = sk;
	u32 odd = odd_generation();
	struct event *v = entry_of(&key, odd);
	if (!v) {
		u64 full = 0;
#if defined(HAS_TCP_PROBE_SKADDR)
		full = args->skaddr;
#endif
		fresh.tx_acked = 1;
		fresh.ts_ns = bpf_ktime_get_ns();
		if (!workload_read(full, &fresh.cgroup_id, &fresh.netns))
			return 0;
		v = new_entry(&key, &fresh, odd);
		if (!v)
			return 0;
	}
	__sync_fetch_and_add(&v->tx_bytes, step);
	__sync_fetch_and_add(&v->calls, 1);
#endif
	return 0;
}

int on_tcp_destroy_sock(struct tp_tcp_destroy_sock *args)
{
	struct count_key key = {};
#if defined(TOP_ACKED) && !defined(HAS_TCP_PROBE_SKADDR) && defined(HAS_TCP_DESTROY_SOCK_SOCK_COOKIE)
	key.sk = args->sock_cookie;
#else
	key.sk = args->skaddr;
#endif
#ifdef TOP_ACKED
	acked.delete(&key.sk);
#endif
	u32 odd = odd_generation();
	struct event *v = entry_of(&key, odd);
	if (!v)
		return 0;
	struct event last = *v;
	struct count_key closed = key;
	closed.closed_ns = bpf_ktime_get_ns();
	if (odd) {
		if (counts_odd.update(&closed, &last) != 0)
			stat_inc(STAT_LOST_OUTPUT);
		counts_odd.delete(&key);
	} else {
		if (counts.update(&closed, &last) != 0)
			stat_inc(STAT_LOST_OUTPUT);
		counts.delete(&key);
	}
	return 0;
}
