/*
 * drops.bpf.c: every TCP segment the kernel drops, with the kernel's own
 * reason, the segment's addresses, ports and flags, and the socket it
 * belonged to when the kernel knew one.
 *
 * Tracepoints: skb:kfree_skb with its `reason` (Linux 5.17+), and
 * sock:inet_sock_set_state (4.16+), only to learn who owns each socket,
 * taken raw where the kernel's BTF allows (on_inet_sock_set_state).
 *
 * kfree_skb fires for every packet of every protocol the kernel frees as a
 * drop, so the first test is the cheapest: the ethertype in the record
 * (host order) must be IPv4 or IPv6 and the IP header must say TCP, before
 * any map is touched. The headers are read from the packet itself, at
 * skb->head + skb->network_header, offsets the running kernel's BTF gives
 * (OFF_SK_BUFF_ macros); without them nothing can be told apart and nothing
 * is reported. The event carries the first HDR_BYTES bytes from the network
 * header (an IPv4 header with options and the first 14 bytes of TCP fit):
 * user space reads the addresses and flags from them as on the wire. Only a
 * TCP header right after the IPv6 header is found (no extension headers),
 * and only the first fragment of an IPv4 packet has one.
 *
 * The socket is the record's rx_sk (the receiving socket, on kernels that
 * have it) or else skb->sk (the sender's, on the output path; on input the
 * kernel takes it from the skb once it has found the socket). Its local
 * port tells the direction: a segment whose source port is the socket's
 * own was being sent, any other (and any without a socket) was received.
 * LPORT for -L and the counts is the local end of that direction.
 *
 * The owner is the socket's, not the task on the CPU: most drops happen in
 * softirq context. Only connect() and listen() are recorded
 * (TCPTRACE_OWNERS_AT_OPEN, owners.bpf.h); any other socket, an accepted one included, or
 * no socket at all, falls back to the owner of the listener on the local
 * port, except for NO_SOCKET (no socket wanted the segment).
 *
 * QUEUE_PURGE (in 6.12's and 6.18's tables, not 6.1's) is what
 * __skb_queue_purge() reports for every skb of a dead socket's queues. A
 * server that closes first gets one per connection: the peer's FIN,
 * queued on the orphaned socket and acted on, is freed with it (tcp_fin -> inet_csk_destroy_sock ->
 * sk_stream_kill_queues). With SKIP_EMPTY_PURGE (that reason's number) such
 * a segment without payload is counted in drops_hidden instead of shown;
 * one with payload (data never read) still is.
 *
 * Reasons are numbers whose names differ between kernels: user space names
 * them from the format file and fills filter_reasons (--reason) or sets
 * SKIP_REASONS_UPTO, the kernel's NOT_SPECIFIED and the values before it
 * (NOT_DROPPED_YET, CONSUMED), which are not drops.
 */
#define TCPTRACE_OWNERS 1
#define TCPTRACE_OWNERS_AT_OPEN 1 /* owners.bpf.h */
#include "tcptrace.h"
#include "workload.bpf.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define HDR_BYTES 80
#define TCP_FIXED_BYTES 14 /* ports, sequence, ack, data offset, flags */

/* Which of pid/comm and state carry a value. */
#define F_OWNER 1
#define F_STATE 2

struct event {
	u64 ts_ns;
	u32 pid;
	u32 reason;
	s32 state;
	u16 family;
	u8 values_known;
	u8 unused;
	u8 hdr[80];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

#ifdef TCPTRACE_COUNT
struct count_key {
	u32 reason;
	u16 lport;
	u16 unused;
};

COUNT_MAP(struct count_key);
#endif

#ifdef FILTER_REASONS
BPF_HASH(filter_reasons, u32, u8, 1024);
#endif
#ifdef SKIP_EMPTY_PURGE
/* Segments without payload hidden as a dead socket's queue purge, per CPU. */
BPF_PERCPU_ARRAY(drops_hidden, u64, 1);
#endif

#if defined(OFF_SK_BUFF_HEAD) && defined(OFF_SK_BUFF_NETWORK_HEADER)
#define HAVE_HEADERS 1
#endif

static __always_inline int reason_ok(u32 reason)
{
#ifdef FILTER_REASONS
	return filter_reasons.lookup(&reason) != 0;
#elif defined(SKIP_REASONS_UPTO)
	return reason > SKIP_REASONS_UPTO;
#else
	return 1;
#endif
}

#ifdef HAVE_HEADERS
/* Reads the headers into ev->hdr and sets *tcp to the TCP header's kernel
 * address; returns 0 when this is not a TCP segment tcptrace can read. */
static __always_inline int tcp_headers(struct tp_kfree_skb *args, u64 skb, struct event *ev, u64 *tcp)
{
	u64 head = 0;
	u16 nh = 0;

	if (args->protocol != ETH_P_IP && args->protocol != ETH_P_IPV6)
		return 0;
	if (read_kernel(&head, sizeof(head), (void *)(skb + OFF_SK_BUFF_HEAD)) ||
	    read_kernel(&nh, sizeof(nh), (void *)(skb + OFF_SK_BUFF_NETWORK_HEADER)) || !head || nh == 0xffff)
		return 0;
	if (read_kernel(ev->hdr, sizeof(ev->hdr), (void *)(head + nh)))
		return 0;

	u8 version = ev->hdr[0] >> 4;

	if (version == 4 && args->protocol == ETH_P_IP) {
		u32 ihl = (ev->hdr[0] & 0x0f) * 4;
		u16 fragment = ((u16)(ev->hdr[6] & 0x1f) << 8) | ev->hdr[7];

		if (ev->hdr[9] != IPPROTO_TCP || ihl < 20 || fragment)
			return 0;
		ev->family = AF_INET;
		*tcp = head + nh + ihl;
		return 1;
	}
	if (version == 6 && args->protocol == ETH_P_IPV6) {
		if (ev->hdr[6] != IPPROTO_TCP)
			return 0;
		ev->family = AF_INET6;
		*tcp = head + nh + 40;
		return 1;
	}
	return 0;
}
#ifdef SKIP_EMPTY_PURGE
/* A QUEUE_PURGE segment without payload, counted instead of shown. Where
 * no filter after the family's can refuse it (no -L, -D, -p, --cgroup,
 * --netns), as soon as it is known (HIDE_EARLY): the socket, owner and
 * workload reads are the row's, and a server that closes first makes one
 * such segment per connection. Otherwise after the filters, so that the
 * count is what --all-reasons would have added. */
#if !defined(FILTER_LPORTS) && !defined(FILTER_RPORTS) && !defined(FILTER_PIDS) && \
	!defined(FILTER_CGROUPS) && !defined(FILTER_NETNS)
#define HIDE_EARLY 1
#endif

static __always_inline int count_hidden(void)
{
	u32 slot = 0;
	u64 *hidden = drops_hidden.lookup(&slot);

	if (hidden)
		(*hidden)++;
	return 0;
}

/* The TCP payload's length from the IP header's lengths and the TCP
 * header's data offset; negative when they make no sense (an IPv6 jumbo
 * packet of BIG TCP has a payload length of 0), which is never hidden. */
static __always_inline s32 payload_bytes(struct event *ev, u8 *th)
{
	s32 tcp_len = (th[12] >> 4) * 4;

	if (ev->family == AF_INET)
		return (s32)(((u16)ev->hdr[2] << 8) | ev->hdr[3]) - (ev->hdr[0] & 0x0f) * 4 - tcp_len;
	return (s32)(((u16)ev->hdr[4] << 8) | ev->hdr[5]) - tcp_len;
}
#endif
#endif

int on_kfree_skb(struct tp_kfree_skb *args)
{
#ifdef HAVE_HEADERS
	struct event ev = {};
	u64 skb = args->skbaddr;
	u64 tcp = 0;
	u32 reason = args->reason;

	/* Cheapest first: two fields of the record (an IP packet, a reason
	 * wanted), then the packet's headers (TCP?), read from its memory. */
	if (args->protocol != ETH_P_IP && args->protocol != ETH_P_IPV6)
		return 0;
	if (!reason_ok(reason))
		return 0;
	if (!tcp_headers(args, skb, &ev, &tcp) || !family_ok(ev.family))
		return 0;

	/* The TCP header read again from the packet: indexing hdr[] by the
	 * IP header's length is a variable stack offset, which verifiers
	 * before 5.11 refuse. */
	u8 th[TCP_FIXED_BYTES] = {};

	if (read_kernel(th, sizeof(th), (void *)tcp))
		return 0;

	u16 sport = ((u16)th[0] << 8) | th[1], dport = ((u16)th[2] << 8) | th[3];
#ifdef SKIP_EMPTY_PURGE
	int hide = reason == SKIP_EMPTY_PURGE && payload_bytes(&ev, th) == 0;
#ifdef HIDE_EARLY
	if (hide)
		return count_hidden();
#endif
#endif
	u16 lport = dport, rport = sport;
	u64 sk = skb_socket(args, skb);

	if (sk) {
#ifdef OFF_SOCK_COMMON_SKC_NUM
		u16 num = 0;

		read_kernel(&num, sizeof(num), (void *)(sk + OFF_SOCK_COMMON_SKC_NUM));
		if (num == sport && num != dport) {
			lport = sport;
			rport = dport;
		}
#endif
#ifdef OFF_SOCK_COMMON_SKC_STATE
		u8 state = 0;

		if (read_kernel(&state, sizeof(state), (void *)(sk + OFF_SOCK_COMMON_SKC_STATE)) == 0 && state) {
			ev.state = state;
			ev.values_known |= F_STATE;
		}
#endif
	}
	if (!ports_ok(lport, rport))
		return 0;

	struct owner recorded = {};
	struct owner *o = sk && owner_copy(sk, &recorded) ? &recorded : 0;

#ifdef REASON_NO_SOCKET
	if (!o && reason != REASON_NO_SOCKET)
		o = listen_owners.lookup(&lport);
#else
	if (!o)
		o = listen_owners.lookup(&lport);
#endif
#ifdef FILTER_PIDS
	if (!o || !pid_ok(o->pid))
		return 0;
#endif
	if (o && o->known) {
		ev.pid = o->pid;
		__builtin_memcpy(ev.comm, o->comm, sizeof(ev.comm));
		ev.values_known |= F_OWNER;
	}
	/* a request or TIME_WAIT socket has its netns but no cgroup */
	if (!workload_read_any(sk, &ev.cgroup_id, &ev.netns))
		return 0;

#if defined(SKIP_EMPTY_PURGE) && !defined(HIDE_EARLY)
	if (hide)
		return count_hidden();
#endif
#ifdef TCPTRACE_COUNT
	struct count_key key = {};
	u64 zero = 0;

	key.reason = reason;
#ifdef COUNT_BY_LPORT
	key.lport = lport;
#endif
	u64 *count = counts.lookup_or_try_init(&key, &zero);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		stat_inc(STAT_LOST_OUTPUT);
#else
	ev.ts_ns = bpf_ktime_get_ns();
	ev.reason = reason;
	emit(args, &ev, sizeof(ev));
#endif
#endif /* HAVE_HEADERS */
	return 0;
}

/* Three changes of a connection's ten matter here (SYN_SENT, or LISTEN, and
 * each side's CLOSE); the others return before anything is read. */
static __always_inline int state_change_matters(s32 oldstate, s32 newstate)
{
	return owner_change(oldstate, newstate) || workload_change(oldstate, newstate);
}

static __always_inline void state_changed(u64 skaddr, s32 oldstate, s32 newstate, u16 lport)
{
	/* connect() and listen() only (TCPTRACE_OWNERS_AT_OPEN); the delete at
	 * CLOSE keeps a recycled socket address from inheriting a stale owner. */
	track_owner(skaddr, oldstate, newstate, lport);
	workload_track(skaddr, oldstate, newstate, lport);
	if (newstate == TCP_CLOSE)
		forget_owner(skaddr);
}

#if defined(RAW_INET_SOCK_SET_STATE)
/* Taken raw (the plan defines RAW_INET_SOCK_SET_STATE where the kernel's
 * BTF has the tracepoint's prototype and the socket's offsets): the kernel
 * hands over its arguments, sk, oldstate and newstate, at their positions
 * in the context, and writes no record. The record would cost more than
 * this program: the tracepoint fires about ten times per connection, and a
 * drop-free load pays for it. The protocol, and for a listener the local
 * port, come from the socket (the record copies the same fields). */
int on_inet_sock_set_state(struct raw_tracepoint_args *ctx)
{
	s32 oldstate = (s32)raw_arg(ctx, OFF_BTF_TRACE_INET_SOCK_SET_STATE_OLDSTATE);
	s32 newstate = (s32)raw_arg(ctx, OFF_BTF_TRACE_INET_SOCK_SET_STATE_NEWSTATE);

	if (!state_change_matters(oldstate, newstate))
		return 0;

	u64 skaddr = raw_arg(ctx, OFF_BTF_TRACE_INET_SOCK_SET_STATE_SK);
	u16 protocol = 0, lport = 0;

	if (read_kernel(&protocol, sizeof(protocol), (void *)(skaddr + OFF_SOCK_SK_PROTOCOL)) != 0 ||
	    !is_tcp(protocol))
		return 0;
	/* Only a listener's port is used: owners and cgroups by local port. */
	if (oldstate == TCP_LISTEN || newstate == TCP_LISTEN)
		read_kernel(&lport, sizeof(lport), (void *)(skaddr + OFF_SOCK_COMMON_SKC_NUM));
	state_changed(skaddr, oldstate, newstate, lport);
	return 0;
}
#elif defined(HAVE_INET_SOCK_SET_STATE)
int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!state_change_matters(args->oldstate, args->newstate) || !is_tcp(args->protocol))
		return 0;
	state_changed(args->skaddr, args->oldstate, args->newstate, args->sport);
	return 0;
}
#endif
