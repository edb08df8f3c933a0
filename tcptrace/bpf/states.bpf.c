/*
 * states.bpf.c: every TCP state change, with the time spent in the old state.
 *
 * Tracepoint: sock:inet_sock_set_state (Linux 4.16+; it fires for every
 * protocol that uses inet sockets, so TCP is picked by its protocol field).
 *
 * The time in the old state is the gap since this socket's previous change,
 * kept per socket address in an LRU hash: a socket opened before tracing began
 * and never closed cannot pin an entry forever. The entry is dropped when
 * the socket reaches CLOSE. A socket seen for the first time has no previous
 * change: its time is 0 when the old state is its birth (CLOSE, or LISTEN for
 * a child a listener creates) and unknown otherwise.
 *
 * C-PID and C-COMM are whatever task is on the CPU, as in bcc's tcpstates:
 * many changes happen in softirq context, on behalf of no process at all.
 */
#include "tcptrace.h"
#include "workload.bpf.h"

#define DELTA_UNKNOWN 0xffffffffffffffffULL

struct event {
	u64 ts_ns;
	u64 skaddr;
	u64 delta_ns;
	u32 pid;
	s32 oldstate;
	s32 newstate;
	u16 family;
	u16 lport;
	u16 rport;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

BPF_TABLE("lru_hash", u64, u64, last_change, TCPTRACE_MAX_SOCKETS);

int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (args->protocol != IPPROTO_TCP)
		return 0;

	struct event ev = {};
	u64 skaddr = args->skaddr;
	u64 now = bpf_ktime_get_ns();
	s32 oldstate = args->oldstate;
	s32 newstate = args->newstate;

	workload_track(skaddr, oldstate, newstate, args->sport);
	u64 *then = last_change.lookup(&skaddr);
	if (then)
		ev.delta_ns = now - *then;
	else if (oldstate == TCP_CLOSE || (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV))
		ev.delta_ns = 0;
	else
		ev.delta_ns = DELTA_UNKNOWN;

	if (newstate == TCP_CLOSE)
		last_change.delete(&skaddr);
	else
		last_change.update(&skaddr, &now);

	/* Filtered only now: a change that carries no port yet (connect()
	 * without bind() reaches SYN_SENT with local port 0; on 6.1 a
	 * listener's child is reported before its peer is copied in) must
	 * still time the socket's next change. */
	if (!family_ok(args->family) || !ports_ok(args->sport, args->dport))
		return 0;
	if (!workload_read(skaddr, &ev.cgroup_id, &ev.netns))
		return 0;

	ev.ts_ns = now;
	ev.skaddr = skaddr;
	ev.pid = current_pid();
	ev.oldstate = oldstate;
	ev.newstate = newstate;
	FILL_ENDPOINTS(&ev, args);
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	emit(args, &ev, sizeof(ev));
	return 0;
}
