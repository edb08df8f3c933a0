/*
 * exporter.bpf.c: the counters and histograms `tcptrace exporter` serves to
 * Prometheus, kept in the kernel. No event leaves the kernel: user space
 * reads the maps when it is scraped.
 *
 * Tracepoints: sock:inet_sock_set_state (Linux 4.16+) for state changes,
 * session lifespans and bytes, and how connects end; optional ones, each
 * feeding its own metrics: tcp:tcp_retransmit_skb and
 * tcp:tcp_retransmit_synack (4.15+), tcp:tcp_send_reset (4.16+; a reason
 * since 6.10), tcp:tcp_receive_reset (4.16+) and skb:kfree_skb with its
 * reason (5.17+) for TCP drops, tcp:tcp_probe (4.16+) for smoothed RTTs,
 * tcp:tcp_cong_state_set (5.19+) for congestion state changes.
 *
 * Everything is counted in one struct per CPU (a per-CPU array of one
 * entry): no atomic operation, no lock, and user space sums the CPUs' copies
 * with one map read per scrape. A tracepoint program cannot run twice at
 * once on one CPU, so plain increments are safe.
 *
 * The semantics are those of the tools that show the same things one event
 * at a time, decided by the same code (lifecycle.bpf.h):
 * - A session (life.bpf.c) is observed when it changes to CLOSE: its
 *   lifespan, and its bytes from struct tcp_sock at offsets from BTF
 *   (tcp_bytes(): bytes_acked includes our SYN and FIN). A session born
 *   before the exporter started is not observed.
 * - A connect (connect.bpf.c) ends ok at ->ESTABLISHED, or failed at ->CLOSE:
 *   refused when a reset arrived meanwhile, else the socket's sk_err says
 *   how (sock_error()).
 * - Retransmits (retrans.bpf.c) that the kernel failed to send (err != 0,
 *   6.18 reports them) are left out; the state is the tracepoint's.
 * - Resets sent are counted by the kernel's reason (tcp_send_reset.reason,
 *   6.10+); the names come from the running kernel's format file.
 * - Drops (drops.bpf.c) are TCP segments freed by kfree_skb with a reason
 *   past NOT_SPECIFIED (DROP_SKIP_UPTO), counted by reason number in an
 *   array sized from the format's reason table (DROP_REASON_SLOTS).
 * - RTTs (probe.bpf.c's --hist rtt) are tcp_probe's srtt, already in
 *   microseconds (srtt_us >> 3), one per segment an established socket
 *   receives: an ACK-clocked sample of the smoothed RTT, not one per
 *   connection. The slots are the other histograms' (upper bound 2^k
 *   inclusive) so that each Prometheus bucket is exact.
 * - Congestion state changes (probe.bpf.c's CA_STATE): tcp_cong_state_set
 *   gives only the new state, so the previous one is kept per socket in
 *   struct conn, which exists from a session's start (enum tcp_ca_state
 *   starts at Open, 0: the socket is zeroed) to its CLOSE. A socket born
 *   before the exporter started, or one conns could not hold (counted as
 *   untracked), is not counted. The kernel calls tcp_set_ca_state() with
 *   the state it already has too: that is no change and is not counted.
 * The local port of a connecting socket is chosen after CLOSE->SYN_SENT, so
 * -L/-D are checked when a session or a connect ends, and at every change.
 *
 * With --top-cgroups (TOP_CGROUPS), sessions, connects, retransmits and
 * resets are also counted per cgroup v2 id, the SOCKET's (workload.bpf.h:
 * never the task on the CPU, which in softirq is any task), in a hash of
 * TOP_CGROUPS entries: not an LRU, so that a cgroup it has no room for is
 * counted as lost rather than silently pushing another out; user space
 * deletes the entries of cgroups that are gone. A reset sent for no full
 * socket (none, TIME_WAIT, a request) has no cgroup and is not counted there.
 *
 * Per-socket state lives in an LRU hash: a socket whose end is never seen
 * cannot pin an entry in a daemon that runs for months.
 */
#define TCPTRACE_NO_EVENTS 1
#include "tcptrace.h"
#include "lifecycle.bpf.h"
#ifdef TOP_CGROUPS
#include "workload.bpf.h"
#endif

/* Slots of the arrays in struct metrics, which user space reads by the
 * same numbers (tcptrace/exporter.py):
 * - transitions: oldstate * STATE_SLOTS + newstate;
 * - histograms: slot k counts values in (2^(k-1), 2^k], slot 0 counts 0 and 1;
 * - retransmits: the state, 0 when the tracepoint has none (4.19);
 * - resets_sent: the kernel's reason 0..125, REASON_OTHER for 126 and above,
 *   REASON_NONE when tcp_send_reset has no reason (before 6.10);
 * - connect_errors: sk_err 0..254, 255 for any larger one;
 * - ca_transitions: old congestion state * CA_SLOTS + new one.
 * Every size is a power of two, for SLOT(). */
#define STATE_SLOTS 16
#define TRANSITION_SLOTS 256
#define HIST_SLOTS 64
#define REASON_SLOTS 128
#define REASON_OTHER 126
#define REASON_NONE 127
#define ERRNO_SLOTS 256
#define CA_SLOTS 8
#define CA_TRANSITION_SLOTS 64

/*
 * An array index the verifier can bound. Once clang has proven a range
 * check it may index with another copy of the value, one the verifier knows
 * nothing about; after the empty asm clang knows nothing either, so the
 * mask stays, on the very register used to index. The value is already
 * below size: the mask changes nothing.
 */
#define SLOT(value, size)                                                      \
	({                                                                     \
		u32 __slot = (value);                                          \
		asm volatile("" : "+r"(__slot));                               \
		__slot & ((size) - 1);                                         \
	})

struct metrics {
	u64 transitions[TRANSITION_SLOTS];
	u64 duration_ns[HIST_SLOTS];
	u64 duration_ns_sum;
	u64 tx_bytes[HIST_SLOTS];
	u64 tx_bytes_sum;
	u64 rx_bytes[HIST_SLOTS];
	u64 rx_bytes_sum;
	u64 retransmits[STATE_SLOTS];
	u64 synack_retransmits;
	u64 resets_sent[REASON_SLOTS];
	u64 resets_received;
	u64 connects_ok;
	u64 connects_reset;
	u64 connects_unknown;
	u64 connect_errors[ERRNO_SLOTS];
	u64 srtt_us[HIST_SLOTS];
	u64 srtt_us_sum;
	u64 ca_transitions[CA_TRANSITION_SLOTS];
};

BPF_PERCPU_ARRAY(metrics, struct metrics, 1);

struct conn {
	u64 birth_ns;
	u32 connecting; /* from CLOSE->SYN_SENT to the end of the handshake */
	u8 reset;	/* a reset arrived while connecting */
	u8 ca_state;	/* the last congestion state (enum tcp_ca_state) */
	u16 unused;
};

BPF_TABLE("lru_hash", u64, struct conn, conns, TCPTRACE_MAX_SOCKETS);

#ifdef TOP_REMOTES
/* Per remote address, for --top-remotes: an LRU hash of TOP_REMOTES
 * entries, of which user space shows the busiest K. */
struct remote_key {
	u8 addr[16];
	u16 family;
	u16 unused[3];
};

struct remote_counts {
	u64 connections;
	u64 retransmits;
};

BPF_TABLE("lru_hash", struct remote_key, struct remote_counts, remotes, TOP_REMOTES);

#define REMOTE_KEY(key, args)                                                  \
	do {                                                                   \
		(key)->family = (args)->family;                                \
		if ((key)->family == AF_INET6)                                 \
			__builtin_memcpy((key)->addr, (args)->daddr_v6, 16);   \
		else                                                           \
			__builtin_memcpy((key)->addr, (args)->daddr, 4);       \
	} while (0)

static __always_inline struct remote_counts *remote_counts_of(struct remote_key *key)
{
	struct remote_counts zero = {};
	struct remote_counts *c = remotes.lookup_or_try_init(key, &zero);

	if (!c)
		stat_inc(STAT_LOST_OUTPUT); /* an event that could not be counted */
	return c;
}
#endif

#ifdef TOP_CGROUPS
/* Per cgroup id, for --top-cgroups (exporter.py's CGROUP_COUNTS). */
struct cgroup_counts {
	u64 sessions;
	u64 connects_ok;
	u64 connects_failed;
	u64 retransmits;
	u64 resets_sent;
	u64 resets_received;
};

BPF_HASH(cgroups, u64, struct cgroup_counts, TOP_CGROUPS);

#define CGROUP_ADD(id, member)                                                 \
	do {                                                                   \
		struct cgroup_counts *__c = cgroup_counts_of(id);              \
		if (__c)                                                       \
			__sync_fetch_and_add(&__c->member, 1);                 \
	} while (0)

static __always_inline struct cgroup_counts *cgroup_counts_of(u64 id)
{
	struct cgroup_counts zero = {};
	struct cgroup_counts *c;

	if (!id)
		return 0; /* unknown: no cgroup to count for */
	c = cgroups.lookup_or_try_init(&id, &zero);
	if (!c)
		stat_inc(STAT_LOST_OUTPUT); /* no room for another cgroup */
	return c;
}

static __always_inline u64 cgroup_of(u64 sk, int full)
{
	u64 id = 0;
	u32 netns = 0;

	if (full)
		workload_read(sk, &id, &netns);
	else
		workload_read_any(sk, &id, &netns);
	return id;
}
#define CGROUP_COUNT(sk, full, member) CGROUP_ADD(cgroup_of(sk, full), member)
#else
#define CGROUP_COUNT(sk, full, member) do { } while (0)
#endif

static __always_inline struct metrics *counters(void)
{
	u32 zero = 0;

	return metrics.lookup(&zero);
}

static __always_inline u32 hist_slot(u64 value)
{
	if (value <= 1)
		return 0;
	u32 slot = bpf_log2l(value - 1); /* bits of value - 1: 2^slot >= value */
	return SLOT(slot < HIST_SLOTS ? slot : HIST_SLOTS - 1, HIST_SLOTS);
}

static __always_inline void observe_session(struct metrics *m, u64 sk, u64 span_ns)
{
	u64 tx = 0, rx = 0;

	m->duration_ns[hist_slot(span_ns)]++;
	m->duration_ns_sum += span_ns;
	if (tcp_bytes(sk, &tx, &rx)) {
		m->tx_bytes[hist_slot(tx)]++;
		m->tx_bytes_sum += tx;
		m->rx_bytes[hist_slot(rx)]++;
		m->rx_bytes_sum += rx;
	}
}

static __always_inline void count_failed_connect(struct metrics *m, struct conn *c, u64 sk)
{
	if (c->reset) {
		m->connects_reset++;
		return;
	}
	s32 err = sock_error(sk);
	if (err < 0) {
		m->connects_unknown++;
		return;
	}
	u32 slot = err < ERRNO_SLOTS - 1 ? err : ERRNO_SLOTS - 1;
	m->connect_errors[SLOT(slot, ERRNO_SLOTS)]++;
}

int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol))
		return 0;

	u64 sk = args->skaddr;
	s32 oldstate = args->oldstate;
	s32 newstate = args->newstate;
	int counted = ports_ok(args->sport, args->dport);
	struct metrics *m = counters();

	if (!m)
		return 0;
#ifdef TOP_CGROUPS
	workload_track(sk, oldstate, newstate, args->sport);
#endif
	/* Unsigned: a negative state fails the bound too. */
	u32 from = oldstate, to = newstate;
	if (counted && from < STATE_SLOTS && to < STATE_SLOTS)
		m->transitions[SLOT(from * STATE_SLOTS + to, TRANSITION_SLOTS)]++;
#ifdef TOP_REMOTES
	if (counted && newstate == TCP_ESTABLISHED && (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV)) {
		struct remote_key key = {};
		REMOTE_KEY(&key, args);
		struct remote_counts *r = remote_counts_of(&key);
		if (r)
			__sync_fetch_and_add(&r->connections, 1);
	}
#endif

	if (session_begins(oldstate, newstate)) {
		struct conn fresh = {};
		fresh.birth_ns = bpf_ktime_get_ns();
		fresh.connecting = connect_begins(oldstate, newstate);
		if (conns.update(&sk, &fresh) != 0)
			stat_inc(STAT_UNTRACKED);
		return 0;
	}
	if (!handshake_ends(newstate))
		return 0;
	struct conn *c = conns.lookup(&sk);
	if (!c)
		return 0;
	if (c->connecting) {
		c->connecting = 0;
		if (counted && !connect_failed(newstate)) {
			m->connects_ok++;
			CGROUP_COUNT(sk, 1, connects_ok);
		} else if (counted) {
			count_failed_connect(m, c, sk);
			CGROUP_COUNT(sk, 1, connects_failed);
		}
	}
	if (newstate == TCP_CLOSE) {
		if (counted) {
			observe_session(m, sk, bpf_ktime_get_ns() - c->birth_ns);
			CGROUP_COUNT(sk, 1, sessions);
		}
		conns.delete(&sk);
	}
	return 0;
}

#ifdef HAVE_TCP_RETRANSMIT_SKB
int on_tcp_retransmit_skb(struct tp_tcp_retransmit_skb *args)
{
#ifdef HAS_TCP_RETRANSMIT_SKB_ERR
	if (args->err != 0)
		return 0;
#endif
	if (!ports_ok(args->sport, args->dport))
		return 0;
	struct metrics *m = counters();
	if (!m)
		return 0;
	u32 slot = 0; /* the tracepoint has no state (4.19) */
#ifdef HAS_TCP_RETRANSMIT_SKB_STATE
	s32 state = args->state;
	if (state > 0 && state < STATE_SLOTS)
		slot = state;
#endif
	m->retransmits[SLOT(slot, STATE_SLOTS)]++;
	CGROUP_COUNT(args->skaddr, 1, retransmits);
#if defined(TOP_REMOTES) && defined(HAS_TCP_RETRANSMIT_SKB_FAMILY)
	struct remote_key key = {};
	REMOTE_KEY(&key, args);
	struct remote_counts *r = remote_counts_of(&key);
	if (r)
		__sync_fetch_and_add(&r->retransmits, 1);
#endif
	return 0;
}
#endif

#ifdef HAVE_TCP_RETRANSMIT_SYNACK
int on_tcp_retransmit_synack(struct tp_tcp_retransmit_synack *args)
{
	if (!ports_ok(args->sport, args->dport))
		return 0;
	struct metrics *m = counters();
	if (m)
		m->synack_retransmits++;
	return 0;
}
#endif

#ifdef HAVE_TCP_SEND_RESET
int on_tcp_send_reset(struct tp_tcp_send_reset *args)
{
	u16 lport = 0, rport = 0;

#if HAS_TCP_SEND_RESET_SADDR == 28
	/* struct sockaddr_in/in6 (6.10+), port in network order at byte 2;
	 * the source is always the side sending the reset (see resets.bpf.c). */
	lport = ((u16)args->saddr[2] << 8) | args->saddr[3];
	rport = ((u16)args->daddr[2] << 8) | args->daddr[3];
#elif defined(HAS_TCP_SEND_RESET_SPORT)
	lport = args->sport;
	rport = args->dport;
#endif
	if (!ports_ok(lport, rport))
		return 0;
	struct metrics *m = counters();
	if (!m)
		return 0;
	u32 slot = REASON_NONE;
#ifdef HAS_TCP_SEND_RESET_REASON
	u32 reason = args->reason;
	slot = reason < REASON_OTHER ? reason : REASON_OTHER;
#endif
	m->resets_sent[SLOT(slot, REASON_SLOTS)]++;
	CGROUP_COUNT(args->skaddr, 0, resets_sent);
	return 0;
}
#endif

#ifdef HAVE_TCP_RECEIVE_RESET
int on_tcp_receive_reset(struct tp_tcp_receive_reset *args)
{
	u64 sk = args->skaddr;
	struct conn *c = conns.lookup(&sk);

	if (c && c->connecting)
		c->reset = 1;
	if (!ports_ok(args->sport, args->dport))
		return 0;
	struct metrics *m = counters();
	if (m)
		m->resets_received++;
	CGROUP_COUNT(sk, 1, resets_received);
	return 0;
}
#endif

#ifdef HAVE_KFREE_SKB
/*
 * kfree_skb fires for every packet of every protocol the kernel drops, so
 * the work is ordered by cost: the record's ethertype (host order) and
 * reason first, then the IP header read from the packet at skb->head +
 * skb->network_header (offsets from BTF; without them TCP cannot be told
 * apart and nothing is counted), as drops.bpf.c decides it: IPv4 carrying
 * TCP and not a later fragment, or IPv6 whose next header is TCP.
 */
#if defined(DROP_REASON_SLOTS) && defined(OFF_SK_BUFF_HEAD) && defined(OFF_SK_BUFF_NETWORK_HEADER)
#define COUNT_DROPS 1
#endif
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

#ifdef COUNT_DROPS
struct drop_counts {
	u64 reasons[DROP_REASON_SLOTS];
};

BPF_PERCPU_ARRAY(drops, struct drop_counts, 1);
/* Reasons past the format's table: subsystem reasons carry their subsystem
 * in the high bits (SKB_DROP_REASON_SUBSYS_SHIFT, 6.4+). */
BPF_HASH(drops_beyond, u32, u64, DROPS_BEYOND);

/* The segment's TCP header offset from the network header and its family,
 * or 0 when the packet is not TCP (or not one whose ports can be read). */
static __always_inline u32 tcp_offset(u16 protocol, u64 skb, u64 *nh_addr, u16 *family)
{
	u64 head = 0;
	u16 nh = 0;
	u8 ip[10] = {};

	if (read_kernel(&head, sizeof(head), (void *)(skb + OFF_SK_BUFF_HEAD)) ||
	    read_kernel(&nh, sizeof(nh), (void *)(skb + OFF_SK_BUFF_NETWORK_HEADER)) || !head || nh == 0xffff)
		return 0;
	*nh_addr = head + nh;
	if (read_kernel(ip, sizeof(ip), (void *)*nh_addr))
		return 0;
	if (protocol == ETH_P_IP && ip[0] >> 4 == 4) {
		u32 ihl = (ip[0] & 0x0f) * 4;
		u16 fragment = ((u16)(ip[6] & 0x1f) << 8) | ip[7];

		if (ip[9] != IPPROTO_TCP || ihl < 20 || fragment)
			return 0;
		*family = AF_INET;
		return ihl;
	}
	if (protocol == ETH_P_IPV6 && ip[0] >> 4 == 6 && ip[6] == IPPROTO_TCP) {
		*family = AF_INET6;
		return 40;
	}
	return 0;
}

#if defined(FILTER_LPORTS) || defined(FILTER_RPORTS)
/* -L/-D as `tcptrace drops` applies them: the local end is the socket's own
 * port when the segment was being sent from it, else the destination. */
static __always_inline int drop_ports_ok(struct tp_kfree_skb *args, u64 skb, u64 tcp)
{
	u16 ports[2] = {};

	if (read_kernel(ports, sizeof(ports), (void *)tcp))
		return 0;
	u16 sport = __builtin_bswap16(ports[0]), dport = __builtin_bswap16(ports[1]);
	u64 sk = skb_socket(args, skb);
#ifdef OFF_SOCK_COMMON_SKC_NUM
	u16 num = 0;

	if (sk && read_kernel(&num, sizeof(num), (void *)(sk + OFF_SOCK_COMMON_SKC_NUM)) == 0 && num == sport &&
	    num != dport)
		return ports_ok(sport, dport);
#endif
	return ports_ok(dport, sport);
}
#endif
#endif /* COUNT_DROPS */

int on_kfree_skb(struct tp_kfree_skb *args)
{
#ifdef COUNT_DROPS
	u16 protocol = args->protocol;
	u32 reason = args->reason;

	if (protocol != ETH_P_IP && protocol != ETH_P_IPV6)
		return 0;
#ifdef DROP_SKIP_UPTO
	if (reason <= DROP_SKIP_UPTO)
		return 0;
#endif
	u64 skb = args->skbaddr, nh = 0;
	u16 family = 0;
	u32 offset = tcp_offset(protocol, skb, &nh, &family);

	if (!offset || !family_ok(family))
		return 0;
#if defined(FILTER_LPORTS) || defined(FILTER_RPORTS)
	if (!drop_ports_ok(args, skb, nh + offset))
		return 0;
#endif
	if (reason < DROP_REASON_SLOTS) {
		u32 zero = 0;
		struct drop_counts *d = drops.lookup(&zero);

		if (d)
			d->reasons[SLOT(reason, DROP_REASON_SLOTS)]++;
		return 0;
	}
	u64 none = 0;
	u64 *count = drops_beyond.lookup_or_try_init(&reason, &none);

	if (count)
		__sync_fetch_and_add(count, 1);
	else
		stat_inc(STAT_LOST_OUTPUT); /* a drop that could not be counted */
#endif
	return 0;
}
#endif

#ifdef HAVE_TCP_PROBE
int on_tcp_probe(struct tp_tcp_probe *args)
{
	if (!ports_ok(args->sport, args->dport))
		return 0;
	struct metrics *m = counters();
	if (!m)
		return 0;
	u32 srtt = args->srtt;
	m->srtt_us[hist_slot(srtt)]++;
	m->srtt_us_sum += srtt;
	return 0;
}
#endif

#ifdef HAVE_TCP_CONG_STATE_SET
int on_tcp_cong_state_set(struct tp_tcp_cong_state_set *args)
{
	u64 sk = args->skaddr;
	struct conn *c = conns.lookup(&sk);

	if (!c)
		return 0;
	u32 from = c->ca_state, to = args->cong_state;
	if (from == to)
		return 0;
	c->ca_state = to;
	if (!ports_ok(args->sport, args->dport))
		return 0;
	struct metrics *m = counters();
	if (!m)
		return 0;
	if (from < CA_SLOTS && to < CA_SLOTS)
		m->ca_transitions[SLOT(from * CA_SLOTS + to, CA_TRANSITION_SLOTS)]++;
	else
		stat_inc(STAT_LOST_OUTPUT); /* a state past enum tcp_ca_state's: no slot */
	return 0;
}
#endif
