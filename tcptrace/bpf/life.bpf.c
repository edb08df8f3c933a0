/*
 * life.bpf.c: one event per TCP session when it closes, with its owner,
 * the bytes it moved and how long it lived (bcc's tcplife, fixed).
 *
 * Tracepoints: sock:inet_sock_set_state (Linux 4.16+) sees sessions born
 * (CLOSE->SYN_SENT for connect, LISTEN->SYN_RECV for a listener's child) and
 * die (->CLOSE). Optional: tcp:tcp_destroy_sock frees the state of a socket
 * whose end was not seen; under -x, tcp:tcp_retransmit_skb counts
 * retransmits and tcp:tcp_receive_reset tells a reset apart from a local
 * abort.
 *
 * Bytes are the kernel's own counters, read from struct tcp_sock at the
 * change to CLOSE, at offsets the running kernel's BTF gives (OFF_ macros;
 * without them the counts are left unknown rather than read from a guessed
 * layout, which is how tcplife prints garbage). bytes_acked counts the
 * sequence space the peer acknowledged, so it includes our SYN (active side
 * only: a passive child starts after its SYN-ACK was acknowledged) and our
 * FIN; bytes_received includes the peer's FIN if it came while this was
 * still a full socket. A socket its process has already closed is handed to
 * a TIME_WAIT mini-socket (and changes to CLOSE) as soon as its own FIN is
 * acknowledged, so the side that closes first may miss the peer's FIN.
 *
 * The process is the socket's owner (owners.bpf.h), not the
 * task on the CPU: most changes to CLOSE happen in softirq context.
 *
 * Listeners (CLOSE->LISTEN->CLOSE) are not sessions. A socket first seen in
 * another state was opened before tracing began: it is reported as partial,
 * its lifespan counted from the first change seen.
 *
 * Per-socket state lives in a plain hash bounded by TCPTRACE_MAX_SOCKETS,
 * freed at CLOSE and at tcp_destroy_sock; a full map is counted, not hidden.
 */
#define TCPTRACE_OWNERS 1
#include "tcptrace.h"
#include "lifecycle.bpf.h"
#include "workload.bpf.h"

#define CLOSER_UNKNOWN 0
#define CLOSER_LOCAL 1  /* we sent the first FIN, aborted, or gave up */
#define CLOSER_REMOTE 2 /* the peer's FIN came first */
#define CLOSER_RESET 3  /* a reset from the peer came first */

struct event {
	u64 ts_ns;
	u64 span_ns;
	u64 connect_ns;
	u64 tx_bytes;
	u64 rx_bytes;
	u32 pid;
	u32 retransmits;
	u16 family;
	u16 lport;
	u16 rport;
	u8 partial;
	u8 bytes_known;
	u8 connect_known;
	u8 retrans_known;
	u8 closer;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

struct session {
	u64 birth_ns;	  /* the first state change seen; 0 before any */
	u64 handshake_ns; /* entry into SYN_SENT or SYN_RECV */
	u64 connect_ns;	  /* time from handshake_ns to the next other state */
	u32 retransmits;
	u8 partial;
	u8 connect_known;
	u8 closer;
	u8 unused;
};

BPF_HASH(sessions, u64, struct session, TCPTRACE_MAX_SOCKETS);

/*
 * Who closed first, from the first sign of it. The old state matters for
 * sessions first seen half-closed: FIN_WAIT2->CLOSE means our FIN went first.
 */
static __always_inline u8 closer_of(s32 oldstate, s32 newstate)
{
	if (newstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 ||
	    oldstate == TCP_CLOSING || oldstate == TCP_TIME_WAIT)
		return CLOSER_LOCAL;
	if (newstate == TCP_CLOSE_WAIT || oldstate == TCP_CLOSE_WAIT || oldstate == TCP_LAST_ACK)
		return CLOSER_REMOTE;
#if defined(HAVE_TCP_RECEIVE_RESET) && defined(TCPTRACE_EXTENDED)
	/* Straight to CLOSE and no reset received: an abort or a timeout here. */
	if (newstate == TCP_CLOSE)
		return CLOSER_LOCAL;
#endif
	return CLOSER_UNKNOWN;
}

static __always_inline void read_bytes(u64 sk, struct event *ev)
{
	ev->bytes_known = tcp_bytes(sk, &ev->tx_bytes, &ev->rx_bytes);
}

static __always_inline void report(struct tp_inet_sock_set_state *args, u64 sk, struct session *s, u64 now)
{
	/* Ports are checked here, not at birth: connect() picks the local
	 * port after the change to SYN_SENT. The owner is checked here too, so
	 * that -p sees passive sessions, whose owner is known late. */
	if (!ports_ok(args->sport, args->dport))
		return;
	struct owner *o = owner_of(sk);
	if (!owner_ok(o))
		return;

	struct event ev = {};
	if (!workload_read(sk, &ev.cgroup_id, &ev.netns))
		return;
	ev.ts_ns = now;
	ev.span_ns = now - s->birth_ns;
	ev.partial = s->partial;
	copy_owner(o, &ev.pid, ev.comm);
	FILL_ENDPOINTS(&ev, args);
	read_bytes(sk, &ev);
#ifdef TCPTRACE_EXTENDED
	ev.connect_ns = s->connect_ns;
	ev.connect_known = s->connect_known;
	ev.closer = s->closer;
#ifdef HAVE_TCP_RETRANSMIT_SKB
	ev.retransmits = s->retransmits;
	ev.retrans_known = 1;
#endif
#endif
	emit(args, &ev, sizeof(ev));
}

int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol) || !family_ok(args->family))
		return 0;

	u64 sk = args->skaddr;
	s32 oldstate = args->oldstate;
	s32 newstate = args->newstate;
	u64 now = bpf_ktime_get_ns();

	track_owner(sk, oldstate, newstate, args->sport);
	workload_track(sk, oldstate, newstate, args->sport);

	if (listener_change(oldstate, newstate)) {
		sessions.delete(&sk);
		if (newstate == TCP_CLOSE)
			forget_owner(sk);
		return 0;
	}

	/* A birth starts afresh even if an entry is there: one left by a
	 * socket whose end was missed must not lend its age to a new socket
	 * at the same address. */
	int birth = session_begins(oldstate, newstate);
	struct session s = {};
	struct session *known = birth ? 0 : sessions.lookup(&sk);
	if (known)
		s = *known;
	else
		s.partial = !birth;
	if (!s.birth_ns)
		s.birth_ns = now;

	if (in_handshake(newstate) && !in_handshake(oldstate))
		s.handshake_ns = now;
	else if (in_handshake(oldstate) && !in_handshake(newstate) && s.handshake_ns) {
		s.connect_ns = now - s.handshake_ns;
		s.connect_known = 1;
	}
	if (s.closer == CLOSER_UNKNOWN)
		s.closer = closer_of(oldstate, newstate);

	if (newstate == TCP_CLOSE) {
		report(args, sk, &s, now);
		sessions.delete(&sk);
		forget_owner(sk);
		return 0;
	}
	if (sessions.update(&sk, &s) != 0)
		stat_inc(STAT_UNTRACKED);
	return 0;
}

#ifdef HAVE_TCP_DESTROY_SOCK
int on_tcp_destroy_sock(struct tp_tcp_destroy_sock *args)
{
	u64 sk = args->skaddr;

	sessions.delete(&sk);
	forget_owner(sk);
	return 0;
}
#endif

/*
 * A socket first seen here was opened before tracing began: its entry is
 * partial and its lifespan starts at its first state change.
 */
static __always_inline struct session *session_of(u64 sk)
{
	struct session *s = sessions.lookup(&sk);
	if (s)
		return s;
	struct session fresh = {};
	fresh.partial = 1;
	if (sessions.insert(&sk, &fresh) != 0) {
		stat_inc(STAT_UNTRACKED);
		return 0;
	}
	return sessions.lookup(&sk);
}

#ifdef HAVE_TCP_RETRANSMIT_SKB
int on_tcp_retransmit_skb(struct tp_tcp_retransmit_skb *args)
{
#ifdef TCPTRACE_EXTENDED
#ifdef HAS_TCP_RETRANSMIT_SKB_FAMILY
	if (!family_ok(args->family))
		return 0;
#endif
	struct session *s = session_of(args->skaddr);
	if (s)
		__sync_fetch_and_add(&s->retransmits, 1);
#endif
	return 0;
}
#endif

#ifdef HAVE_TCP_RECEIVE_RESET
int on_tcp_receive_reset(struct tp_tcp_receive_reset *args)
{
#ifdef TCPTRACE_EXTENDED
#ifdef HAS_TCP_RECEIVE_RESET_FAMILY
	if (!family_ok(args->family))
		return 0;
#endif
	struct session *s = session_of(args->skaddr);
	if (s && s->closer == CLOSER_UNKNOWN)
		s->closer = CLOSER_RESET;
#endif
	return 0;
}
#endif
