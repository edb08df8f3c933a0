/*
 * resets.bpf.c: every TCP reset sent or received, with the socket's owner,
 * its state and, where the kernel gives it, why the reset was sent.
 *
 * Tracepoints: tcp:tcp_send_reset and tcp:tcp_receive_reset (Linux 4.16+),
 * and sock:inet_sock_set_state, which tells whose socket it is (connect and
 * listen happen in the owner's context; resets fire in softirq, where the
 * task on the CPU is unrelated) and what state it is in (tcp_receive_reset
 * has no state field).
 *
 * tcp_send_reset has two layouts. Older kernels (6.1) carry sport, dport,
 * family and the address copies of the other tcp tracepoints, all from the
 * socket, and fire only for a full socket: a reset answering a segment that
 * found no socket (a SYN to a closed port), a TIME_WAIT or a request socket
 * is not traced. Since 6.10 the tracepoint fires for those too (skaddr 0 and
 * state 0 when there is no socket), adds a reason, and stores the addresses
 * as struct sockaddr_in / sockaddr_in6 (family, port in network order, the
 * address at byte 4 or, for IPv6, at byte 8). When they come from the
 * segment the kernel swaps them, so the source is the side sending the
 * reset in every case: LADDR/LPORT is always this host.
 *
 * An abort (close() with unread data, SO_LINGER 0, disconnect) moves the
 * socket to CLOSE just before the RST goes out, so the tracepoint says CLOSE
 * and the socket has already dropped its owner: both are kept here past
 * CLOSE, in an LRU hash, so the row shows the state the socket left and who
 * owned it.
 *
 * Under -c, a reset whose key the count map cannot store is counted as lost
 * (count_event() in counting.bpf.h), never dropped in silence.
 */
#define TCPTRACE_OWNERS 1

#define DIR_SENT 0
#define DIR_RECV 1
#define REASON_NONE -1
#define STATE_FROM_SEEN -1 /* the tracepoint has no state field */

struct event {
	u64 ts_ns;
	u64 skaddr;
	u32 pid;
	s32 state;
	s32 reason;
	u16 family;
	u16 lport;
	u16 rport;
	u8 dir;
	u8 owner_known;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

struct count_key {
	u8 saddr[16];
	u8 daddr[16];
	u16 family;
	u16 lport;
	u16 rport;
	u8 dir;
	u8 unused;
	s32 reason;
};

/* Before the shared code, which keys the count map with it. */
#define COUNT_KEY struct count_key
#include "tcptrace.h"
#include "workload.bpf.h"

/* What the state changes told about a socket. */
struct sock_seen {
	s32 state;
	s32 before;		   /* the state it left for `state` */
	struct owner closed_owner; /* its owner when it reached CLOSE */
};

BPF_TABLE("lru_hash", u64, struct sock_seen, seen, TCPTRACE_MAX_SOCKETS);

int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol))
		return 0;

	u64 skaddr = args->skaddr;
	s32 newstate = args->newstate;
	struct sock_seen s = {};

	track_owner(skaddr, args->oldstate, newstate, args->sport);
	workload_track(skaddr, args->oldstate, newstate, args->sport);
	s.state = newstate;
	s.before = args->oldstate;
	if (newstate == TCP_CLOSE) {
		struct owner *o = owner_of(skaddr);
		if (o)
			__builtin_memcpy(&s.closed_owner, o, sizeof(s.closed_owner));
		forget_owner(skaddr);
	}
	seen.update(&skaddr, &s);
	return 0;
}

/* Filters, owner and state from what was seen, then out. */
static __always_inline int deliver(void *ctx, struct event *ev)
{
	if (!family_ok(ev->family) || !ports_ok(ev->lport, ev->rport))
		return 0;

	u64 skaddr = ev->skaddr;
	struct owner *o = 0;
	struct sock_seen *s = 0;

	if (skaddr) {
		o = owner_of(skaddr);
		s = seen.lookup(&skaddr);
	}
	/*
	 * What a socket left behind at CLOSE describes the reset its own
	 * abort sends right after; for any other reset it belongs to an
	 * earlier socket at the same address.
	 */
	int closed = s && s->state == TCP_CLOSE;
	int aborting = ev->dir == DIR_SENT && closed &&
		    (ev->state == TCP_CLOSE || ev->state == STATE_FROM_SEEN);

	if (aborting) {
		ev->state = s->before;
		if (!o && owner_known(&s->closed_owner))
			o = &s->closed_owner;
	} else if (ev->dir == DIR_RECV || ev->state == STATE_FROM_SEEN) {
		ev->state = s && !closed ? s->state : 0;
	}
	ev->owner_known = copy_owner(o, &ev->pid, ev->comm);
	if (!owner_ok(o))
		return 0;
	/* a reset that answers a segment no socket wanted has none (skaddr
	 * 0); one sent from TIME_WAIT has a timewait socket */
	if (!workload_read_any(skaddr, &ev->cgroup_id, &ev->netns))
		return 0;

#ifdef TCPTRACE_COUNT
	struct count_key key = {};

	__builtin_memcpy(key.saddr, ev->saddr, 16);
	__builtin_memcpy(key.daddr, ev->daddr, 16);
	key.family = ev->family;
	key.lport = ev->lport;
	key.rport = ev->rport;
	key.dir = ev->dir;
	key.reason = ev->reason;
	count_event(&key);
#else
	emit(ctx, ev, sizeof(*ev));
#endif
	return 0;
}

int on_tcp_send_reset(struct tp_tcp_send_reset *args)
{
	struct event ev = {};

	ev.ts_ns = bpf_ktime_get_ns();
	ev.skaddr = args->skaddr;
	ev.dir = DIR_SENT;
#ifdef HAS_TCP_SEND_RESET_STATE
	ev.state = args->state;
#else
	ev.state = STATE_FROM_SEEN;
#endif
#ifdef HAS_TCP_SEND_RESET_REASON
	ev.reason = args->reason;
#else
	ev.reason = REASON_NONE;
#endif

#if HAS_TCP_SEND_RESET_SADDR == 28
	COPY_SOCKADDRS(&ev, args);
#elif defined(HAS_TCP_SEND_RESET_SPORT) && defined(HAS_TCP_SEND_RESET_SADDR_V6)
#ifdef HAS_TCP_SEND_RESET_FAMILY
	FILL_ENDPOINTS(&ev, args);
#else
	ev.lport = args->sport;
	ev.rport = args->dport;
	COPY_MAPPED_ADDRS(&ev, args);
#endif
#else
#error "tcp:tcp_send_reset has neither address layout tcptrace knows"
#endif
	return deliver(args, &ev);
}

int on_tcp_receive_reset(struct tp_tcp_receive_reset *args)
{
	struct event ev = {};

	ev.ts_ns = bpf_ktime_get_ns();
	ev.skaddr = args->skaddr;
	ev.dir = DIR_RECV;
	ev.reason = REASON_NONE;
#ifdef HAS_TCP_RECEIVE_RESET_FAMILY
	FILL_ENDPOINTS(&ev, args);
#else
	ev.lport = args->sport;
	ev.rport = args->dport;
	COPY_MAPPED_ADDRS(&ev, args);
#endif
	return deliver(args, &ev);
}
