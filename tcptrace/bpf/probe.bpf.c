/*
 * probe.bpf.c: congestion window, RTT and windows of live TCP connections,
 * from tcp:tcp_probe, aggregated in the kernel.
 *
 * Tracepoints: tcp:tcp_probe (Linux 4.16+) fires in tcp_rcv_established()
 * for every segment an established socket receives, before the segment is
 * processed: snd_una is the value before the ACK it carries. It is the
 * SENDER of bulk data that sees one per ACK (hundreds of thousands a second
 * on loopback), so nothing here emits per probe unless asked (PROBE_ALL).
 * srtt is already in microseconds (srtt_us >> 3). Optional:
 * tcp:tcp_cong_state_set (5.19+), the congestion state (CA_STATE) of each
 * socket; sock:inet_sock_set_state (4.16+) for owners (owners.bpf.h), for
 * the last bytes acknowledged at close and to free per-socket state;
 * tcp:tcp_destroy_sock frees what a missed close left.
 *
 * Three modes:
 * - events (default): one event per socket per PROBE_INTERVAL_NS, the first
 *   probe after the interval has passed; PROBE_ALL: every probe.
 * - PROBE_HIST: a log2 histogram of srtt or snd_cwnd (HIST_OF), one per
 *   remote address, remote or local port (HIST_BY), in a per-CPU hash.
 * - TCPTRACE_COUNT (-c): a summary per connection (struct count_value).
 *   Bytes acked is the sum of snd_una's advances between probes, modulo
 *   2^32 (seq_advance()), plus at the change to CLOSE the advance to
 *   tcp_sock.snd_una read at its BTF offset: acknowledgements that arrive
 *   after close(), in FIN_WAIT1, are processed outside
 *   tcp_rcv_established() and have no probe. A transfer that began while
 *   tracing counts its FIN too (N + 1 for N bytes), never its SYN.
 *
 * A socket is its struct sock address where tcp_probe has `skaddr` (6.18);
 * before that, the address learned at the change to ESTABLISHED for the same
 * endpoints (tcp_probe's endpoints are sockaddrs), else its sock_cookie: a
 * socket established before tracing then has no owner and no CA_STATE.
 *
 * Per-socket state (socks) is a hash bounded by TCPTRACE_MAX_SOCKETS, freed
 * at CLOSE and at tcp_destroy_sock; a socket it cannot hold is counted as
 * untracked, and a count or histogram entry that cannot be stored as lost.
 */
#define TCPTRACE_OWNERS 1

#define CA_UNKNOWN 0xff
#define CA_OPEN 0 /* enum tcp_ca_state, a stable user-space interface */

#define HIST_RTT 1
#define HIST_CWND 2
#define BY_NONE 0
#define BY_RADDR 1
#define BY_RPORT 2
#define BY_LPORT 3

#define INFINITE_SSTHRESH 0x7fffffff

struct event {
	u64 ts_ns;
	u32 pid;
	u32 cwnd;
	u32 ssthresh;
	u32 srtt_us;
	u32 snd_wnd;
	u32 rcv_wnd;
	u32 snd_nxt;
	u32 snd_una;
	u16 family;
	u16 lport;
	u16 rport;
	u8 owner_known;
	u8 ca_state;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

/* A connection's endpoints: the -c key, and (before 6.18) the way from a
 * probe to its socket. */
struct count_key {
	u8 saddr[16];
	u8 daddr[16];
	u16 family;
	u16 lport;
	u16 rport;
};

struct count_value {
	u64 samples;
	u64 bytes_acked;
	u64 srtt_sum;
	u64 first_ns;
	u64 last_ns;
	u32 srtt_min;
	u32 srtt_max;
	u32 cwnd;
	u32 ssthresh_min;
	u32 pid;
	u8 owner_known;
	u8 unused[3];
	char comm[16];
};

struct hist_key {
	u8 addr[16];
	u16 family;
	u16 port;
	u32 slot;
};

#include "tcptrace.h"
#include "workload.bpf.h"

#if defined(PROBE_HIST) && defined(TCPTRACE_COUNT)
#error "-c/--count and --hist exclude each other: give one"
#endif

struct sock_state {
	u64 last_ns;  /* events: when this socket's last event was emitted */
	u32 prev_una; /* -c: snd_una at the socket's last probe */
	u8 una_known;
	u8 emitted;
	u8 ca_state;
	u8 unused;
};

#ifndef PROBE_HIST
BPF_HASH(socks, u64, struct sock_state, TCPTRACE_MAX_SOCKETS);
#endif
#ifndef HAS_TCP_PROBE_SKADDR
BPF_HASH(sock_by_endpoints, struct count_key, u64, TCPTRACE_MAX_SOCKETS);
#endif
#ifdef TCPTRACE_COUNT
/* Not counting.bpf.h's map of u64 counts: a summary per connection. */
BPF_HASH(counts, struct count_key, struct count_value, TCPTRACE_MAX_COUNTS);
#endif

/* How far a 32-bit sequence number moved forward, modulo 2^32; 0 for a
 * step back (it never goes back while a socket lives). */
static __always_inline u32 seq_advance(u32 before, u32 after)
{
	u32 step = after - before;

	return (s32)step > 0 ? step : 0;
}

/* Whether a socket whose last event was at `last_ns` is due another one. */
static __always_inline int interval_due(u64 last_ns, u64 now, u64 interval_ns)
{
	return now - last_ns >= interval_ns;
}

/* bcc's log2 slot: 0 for 0, else floor(log2(v)) + 1, by halving the
 * width searched (no loop for the verifier to walk). */
static __always_inline u32 log2_slot(u32 v)
{
	u32 r, shift;

	if (v == 0)
		return 0;
	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= v >> 1;
	return r + 1;
}

static __always_inline void fill_key(struct count_key *key, struct tp_tcp_probe *args)
{
	COPY_SOCKADDRS(key, args);
}

static __always_inline u64 sock_of(struct tp_tcp_probe *args, struct count_key *key)
{
#ifdef HAS_TCP_PROBE_SKADDR
	return args->skaddr;
#else
	/* Read from the record first: the verifier refuses a record pointer
	 * the compiler kept, moved, across the map call. */
	u64 fallback = 0;
#ifdef HAS_TCP_PROBE_SOCK_COOKIE
	read_kernel(&fallback, sizeof(fallback), &args->sock_cookie);
#endif
	u64 *sk = sock_by_endpoints.lookup(key);
	if (sk)
		return *sk;
	return fallback;
#endif
}

#ifndef PROBE_HIST
static __always_inline struct sock_state *state_of(u64 sk)
{
	struct sock_state *s = socks.lookup(&sk);
	if (s)
		return s;
	struct sock_state fresh = {};
	fresh.ca_state = CA_UNKNOWN;
	if (socks.insert(&sk, &fresh) != 0) {
		stat_inc(STAT_UNTRACKED);
		return 0;
	}
	return socks.lookup(&sk);
}
#endif

#ifdef PROBE_HIST
#ifndef TCPTRACE_MAX_COUNTS
#define TCPTRACE_MAX_COUNTS 16384
#endif
BPF_PERCPU_HASH(hist, struct hist_key, u64, TCPTRACE_MAX_COUNTS);

static __always_inline void hist_add(struct tp_tcp_probe *args, struct count_key *c)
{
	struct hist_key key = {};
	u64 zero = 0;

#if HIST_OF == HIST_CWND
	key.slot = log2_slot(args->snd_cwnd);
#else
	key.slot = log2_slot(args->srtt);
#endif
#if HIST_BY == BY_RADDR
	key.family = c->family;
	__builtin_memcpy(key.addr, c->daddr, sizeof(key.addr));
#elif HIST_BY == BY_RPORT
	key.port = c->rport;
#elif HIST_BY == BY_LPORT
	key.port = c->lport;
#endif
	u64 *count = hist.lookup_or_try_init(&key, &zero);
	if (count)
		(*count)++; /* per CPU: no other CPU writes this copy */
	else
		stat_inc(STAT_LOST_OUTPUT);
}
#endif

#ifdef TCPTRACE_COUNT
/* The probes of one socket are serialized by its lock: plain updates. */
static __always_inline void count_probe(struct tp_tcp_probe *args, struct count_key *key, u64 sk,
					struct owner *o, u64 now)
{
	struct count_value fresh = {};
	fresh.srtt_min = 0xffffffff;
	fresh.ssthresh_min = 0xffffffff;
	fresh.first_ns = now;
	struct count_value *v = counts.lookup_or_try_init(key, &fresh);
	if (!v) {
		stat_inc(STAT_LOST_OUTPUT);
		return;
	}
	u32 srtt = args->srtt;
	u32 una = args->snd_una;
	v->samples++;
	v->srtt_sum += srtt;
	if (srtt < v->srtt_min)
		v->srtt_min = srtt;
	if (srtt > v->srtt_max)
		v->srtt_max = srtt;
	v->cwnd = args->snd_cwnd;
	if (args->ssthresh < v->ssthresh_min)
		v->ssthresh_min = args->ssthresh;
	v->last_ns = now;
	if (copy_owner(o, &v->pid, v->comm))
		v->owner_known = 1;

	struct sock_state *s = state_of(sk);
	if (!s)
		return;
	if (s->una_known)
		v->bytes_acked += seq_advance(s->prev_una, una);
	s->prev_una = una;
	s->una_known = 1;
}
#endif

int on_tcp_probe(struct tp_tcp_probe *args)
{
	struct count_key key = {};

	fill_key(&key, args);
	if (!family_ok(key.family) || !ports_ok(key.lport, key.rport))
		return 0;
	u64 sk = sock_of(args, &key);
#ifdef FILTER_PIDS
	if (!owner_ok(owner_of(sk)))
		return 0;
#endif
#if (defined(FILTER_CGROUPS) || defined(FILTER_NETNS)) && (defined(PROBE_HIST) || defined(TCPTRACE_COUNT))
	u64 cgroup_id = 0;
	u32 netns = 0;
	if (!workload_read(sk, &cgroup_id, &netns))
		return 0;
#endif

#if defined(PROBE_HIST)
	hist_add(args, &key);
#elif defined(TCPTRACE_COUNT)
	count_probe(args, &key, sk, owner_of(sk), bpf_ktime_get_ns());
#else
	u64 now = bpf_ktime_get_ns();
	struct sock_state *s = state_of(sk);
	u8 ca_state = CA_UNKNOWN;
	if (s) {
#ifndef PROBE_ALL
		if (s->emitted && !interval_due(s->last_ns, now, PROBE_INTERVAL_NS))
			return 0;
		s->last_ns = now;
		s->emitted = 1;
#endif
		ca_state = s->ca_state;
	}

	struct event ev = {};
	/* Read when a row is due only: the socket's workload does not change. */
	if (!workload_read(sk, &ev.cgroup_id, &ev.netns))
		return 0;
	ev.ts_ns = now;
	ev.family = key.family;
	ev.lport = key.lport;
	ev.rport = key.rport;
	__builtin_memcpy(ev.saddr, key.saddr, sizeof(ev.saddr));
	__builtin_memcpy(ev.daddr, key.daddr, sizeof(ev.daddr));
	ev.cwnd = args->snd_cwnd;
	ev.ssthresh = args->ssthresh;
	ev.srtt_us = args->srtt;
	ev.snd_wnd = args->snd_wnd;
	ev.rcv_wnd = args->rcv_wnd;
	ev.snd_nxt = args->snd_nxt;
	ev.snd_una = args->snd_una;
	ev.ca_state = ca_state;
	ev.owner_known = copy_owner(owner_of(sk), &ev.pid, ev.comm);
	emit(args, &ev, sizeof(ev));
#endif
	return 0;
}

#ifdef HAVE_TCP_CONG_STATE_SET
int on_tcp_cong_state_set(struct tp_tcp_cong_state_set *args)
{
#if !defined(PROBE_HIST) && !defined(TCPTRACE_COUNT)
	struct sock_state *s = state_of(args->skaddr);
	if (s)
		s->ca_state = args->cong_state;
#endif
	return 0;
}
#endif

static __always_inline void forget_socket(u64 sk)
{
#ifndef PROBE_HIST
	socks.delete(&sk);
#endif
	forget_owner(sk);
}

#if defined(TCPTRACE_COUNT) && defined(OFF_TCP_SOCK_SND_UNA)
/* The acknowledgements since the socket's last probe, at its close. */
static __always_inline void count_close(u64 sk, struct count_key *key)
{
	struct sock_state *s = socks.lookup(&sk);
	struct count_value *v = counts.lookup(key);
	u32 una = 0;

	if (s && s->una_known && v && read_kernel(&una, sizeof(una), (void *)(sk + OFF_TCP_SOCK_SND_UNA)) == 0) {
		v->bytes_acked += seq_advance(s->prev_una, una);
		v->last_ns = bpf_ktime_get_ns();
	}
}
#endif

#ifdef HAVE_INET_SOCK_SET_STATE
int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol))
		return 0;
	u64 sk = args->skaddr;
	s32 oldstate = args->oldstate;
	s32 newstate = args->newstate;
	struct count_key key = {};

	track_owner(sk, oldstate, newstate, args->sport);
	workload_track(sk, oldstate, newstate, args->sport);
	FILL_ENDPOINTS(&key, args);
#if !defined(PROBE_HIST) && !defined(TCPTRACE_COUNT) && defined(HAVE_TCP_CONG_STATE_SET)
	/* A socket born while tracing starts Open and its later changes are
	 * all seen; one born before shows no state until it changes. */
	if ((oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) ||
	    (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV)) {
		struct sock_state *s = state_of(sk);
		if (s)
			s->ca_state = CA_OPEN;
	}
#endif
#ifndef HAS_TCP_PROBE_SKADDR
	if (newstate == TCP_ESTABLISHED && sock_by_endpoints.update(&key, &sk) != 0)
		stat_inc(STAT_UNTRACKED);
#endif
	if (newstate != TCP_CLOSE)
		return 0;
#if defined(TCPTRACE_COUNT) && defined(OFF_TCP_SOCK_SND_UNA)
	count_close(sk, &key);
#endif
#ifndef HAS_TCP_PROBE_SKADDR
	sock_by_endpoints.delete(&key);
#endif
	forget_socket(sk);
	return 0;
}
#endif

#ifdef HAVE_TCP_DESTROY_SOCK
int on_tcp_destroy_sock(struct tp_tcp_destroy_sock *args)
{
	forget_socket(args->skaddr);
#if defined(HAS_TCP_DESTROY_SOCK_SOCK_COOKIE) && !defined(PROBE_HIST)
	u64 cookie = args->sock_cookie; /* a socket known by its cookie alone */
	socks.delete(&cookie);
#endif
	return 0;
}
#endif
