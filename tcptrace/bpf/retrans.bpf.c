/*
 * retrans.bpf.c: TCP retransmits, one event (or one count) each, as bcc's
 * tcpretrans reports them, from tracepoints only.
 *
 * Tracepoints: tcp:tcp_retransmit_skb (Linux 4.15+), a segment sent again;
 * tcp:tcp_retransmit_synack (4.15+), a SYN-ACK a listener sent again; and
 * sock:inet_sock_set_state (4.16+), only to learn who owns each socket.
 * Tail loss probes have no tracepoint (bcc's -l needs a kprobe on
 * tcp_send_loss_probe): they are not reported.
 *
 * The PID is the socket's owner, not the task on the CPU: retransmits fire
 * from timers and ACK processing in softirq context, on behalf of whatever
 * task was interrupted. The owner comes from the shared tracking in
 * owners.bpf.h; when it is unknown the event says so, and user space may still
 * find the owner in /proc. A SYN-ACK belongs to a request, not to a socket of
 * its own: its owner is the listener socket's or, for a listener opened before
 * tracing (seeded by user space from /proc), the one listening on its port.
 *
 * The record differs between kernels; the generated HAS_ macros pick the path:
 * - `err` (6.18 has it, 6.8 does not): newer kernels also fire for attempts
 *   that failed and sent nothing (err != 0). Those are left out, since older
 *   kernels never report them, unless FILTER_FAILED asks for only them.
 * - `state` (4.19 lacks it, 5.4 has it): the state is then unknown.
 * - `family` (5.10 lacks it, 5.15 has it): derived from the IPv6 copy of the
 *   addresses, which holds an IPv4-mapped address for an IPv4 connection.
 *
 * Under -c, a retransmit whose key the count map cannot store is counted
 * as lost (count_event() in counting.bpf.h), never dropped in silence.
 */
#define TCPTRACE_OWNERS 1

#define TYPE_RETRANS 1
#define TYPE_SYNACK 2

/* Event flags: which of pid/comm, state and err carry a value. */
#define F_OWNER 1
#define F_STATE 2
#define F_ERR 4

struct event {
	u64 ts_ns;
	u32 pid;
	s32 state;
	s32 err;
	u16 family;
	u16 lport;
	u16 rport;
	u8 type;
	u8 flags;
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
	u16 type;
};

/* Before the shared code, which keys the count map with it. */
#define COUNT_KEY struct count_key
#include "tcptrace.h"
#include "workload.bpf.h"

#if defined(FILTER_FAILED) && defined(HAVE_TCP_RETRANSMIT_SKB) && !defined(HAS_TCP_RETRANSMIT_SKB_ERR)
#error "--failed needs the err field of tcp:tcp_retransmit_skb, which this kernel does not have"
#endif

/* Fills the owner in; 0 when -p is given and this owner is not one of its
 * PIDs. */
static __always_inline int take_owner(struct event *ev, struct owner *o)
{
	if (!owner_ok(o))
		return 0;
	if (copy_owner(o, &ev->pid, ev->comm))
		ev->flags |= F_OWNER;
	return 1;
}

static __always_inline void report(void *ctx, struct event *ev)
{
#ifdef TCPTRACE_COUNT
	struct count_key key = {};

	__builtin_memcpy(key.saddr, ev->saddr, sizeof(key.saddr));
	__builtin_memcpy(key.daddr, ev->daddr, sizeof(key.daddr));
	key.family = ev->family;
	key.lport = ev->lport;
	key.rport = ev->rport;
	key.type = ev->type;
	count_event(&key);
#else
	ev->ts_ns = bpf_ktime_get_ns();
	emit(ctx, ev, sizeof(*ev));
#endif
}

int on_tcp_retransmit_skb(struct tp_tcp_retransmit_skb *args)
{
	struct event ev = {};

#ifdef HAS_TCP_RETRANSMIT_SKB_ERR
	ev.err = args->err;
	ev.flags |= F_ERR;
#ifdef FILTER_FAILED
	if (ev.err == 0)
		return 0;
#else
	if (ev.err != 0)
		return 0;
#endif
#endif

#ifdef HAS_TCP_RETRANSMIT_SKB_FAMILY
	ev.family = args->family;
	COPY_ADDRS(&ev, args);
#else
	COPY_MAPPED_ADDRS(&ev, args);
#endif
	if (!family_ok(ev.family) || !ports_ok(args->sport, args->dport))
		return 0;
	if (!take_owner(&ev, owner_of(args->skaddr)))
		return 0;
	if (!workload_read(args->skaddr, &ev.cgroup_id, &ev.netns))
		return 0;

#ifdef HAS_TCP_RETRANSMIT_SKB_STATE
	ev.state = args->state;
	ev.flags |= F_STATE;
#endif
	ev.type = TYPE_RETRANS;
	ev.lport = args->sport;
	ev.rport = args->dport;
	report(args, &ev);
	return 0;
}

#ifdef HAVE_TCP_RETRANSMIT_SYNACK
int on_tcp_retransmit_synack(struct tp_tcp_retransmit_synack *args)
{
#ifdef FILTER_FAILED
	/* The kernel reports a SYN-ACK only once it was sent. */
	return 0;
#else
	struct event ev = {};
	u16 lport = args->sport;

#ifdef HAS_TCP_RETRANSMIT_SYNACK_FAMILY
	ev.family = args->family;
	COPY_ADDRS(&ev, args);
#else
	COPY_MAPPED_ADDRS(&ev, args);
#endif
	if (!family_ok(ev.family) || !ports_ok(lport, args->dport))
		return 0;

	struct owner *o = owner_of(args->skaddr);
	if (!o)
		o = listen_owners.lookup(&lport);
	if (!take_owner(&ev, o))
		return 0;
	/* skaddr is the listener: the cgroup its children inherit */
	if (!workload_read(args->skaddr, &ev.cgroup_id, &ev.netns))
		return 0;

	/* The connection is half open: a request socket (NEW_SYN_RECV in the
	 * kernel's terms), or a Fast Open child in SYN_RECV. */
	ev.state = TCP_SYN_RECV;
	ev.flags |= F_STATE;
	ev.type = TYPE_SYNACK;
	ev.lport = lport;
	ev.rport = args->dport;
	report(args, &ev);
	return 0;
#endif
}
#endif

#ifdef HAVE_INET_SOCK_SET_STATE
int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol))
		return 0;

	u64 skaddr = args->skaddr;
	s32 newstate = args->newstate;

	track_owner(skaddr, args->oldstate, newstate, args->sport);
	workload_track(skaddr, args->oldstate, newstate, args->sport);
	if (newstate == TCP_CLOSE)
		forget_owner(skaddr);
	return 0;
}
#endif
