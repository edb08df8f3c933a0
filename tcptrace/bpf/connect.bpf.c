/*
 * connect.bpf.c: active TCP opens, with the connecting process, the time the
 * handshake took and, for a failed one, how it failed.
 *
 * Tracepoints: sock:inet_sock_set_state (Linux 4.16+); tcp:tcp_receive_reset
 * (optional) tells a connect refused by a reset from other failures.
 *
 * CLOSE->SYN_SENT happens inside connect(), in the caller's context: the PID,
 * the task name and the start time are taken there. The kernel picks the
 * local port only after that change, so the row is written, and the port
 * filters applied, when the socket leaves the handshake: ->ESTABLISHED when
 * the SYN-ACK arrives (the latency runs from connect() to the SYN-ACK, as
 * bcc's tcpconnlat measures it), ->CLOSE when it fails. A reset received
 * before that means refused. Otherwise the socket's sk_err, read at an
 * offset from the running kernel's BTF, says why: ETIMEDOUT when the SYN
 * retries ran out, an ICMP error, or 0 when the application closed the
 * socket before the handshake completed. Without BTF the cause stays
 * unknown rather than guessed.
 *
 * A connect already under way when tracing began is not reported: its
 * process and start are unknown.
 */
#include "tcptrace.h"
#include "lifecycle.bpf.h"
#include "workload.bpf.h"

struct event {
	u64 ts_ns;
	u64 skaddr;
	u64 lat_ns;
	u32 pid;
	s32 error;
	u16 family;
	u16 lport;
	u16 rport;
	u8 failed;
	u8 reset;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

struct attempt {
	u64 start_ns;
	u32 pid;
	u32 reset; /* a reset arrived during the handshake */
	char comm[TASK_COMM_LEN];
};

/* LRU: an attempt whose end is never seen cannot pin an entry. */
BPF_TABLE("lru_hash", u64, struct attempt, attempts, TCPTRACE_MAX_SOCKETS);

int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol) || !family_ok(args->family))
		return 0;

	u64 skaddr = args->skaddr;
	s32 oldstate = args->oldstate;
	s32 newstate = args->newstate;
	u64 now = bpf_ktime_get_ns();

	workload_track(skaddr, oldstate, newstate, args->sport);
	if (connect_begins(oldstate, newstate)) {
		struct attempt a = {};
		a.pid = current_pid();
		if (!pid_ok(a.pid))
			return 0;
		a.start_ns = now;
		bpf_get_current_comm(a.comm, sizeof(a.comm));
		attempts.update(&skaddr, &a);
		return 0;
	}
	if (!handshake_ends(newstate))
		return 0;

	struct attempt *a = attempts.lookup(&skaddr);
	if (!a)
		return 0;
	struct event ev = {};
	ev.ts_ns = now;
	ev.skaddr = skaddr;
	ev.lat_ns = now - a->start_ns;
	ev.pid = a->pid;
	ev.reset = a->reset ? 1 : 0;
	__builtin_memcpy(ev.comm, a->comm, sizeof(ev.comm));
	attempts.delete(&skaddr);

	if (!ports_ok(args->sport, args->dport))
		return 0;
	if (!workload_read(skaddr, &ev.cgroup_id, &ev.netns))
		return 0;
	if (connect_failed(newstate)) {
		ev.failed = 1;
		ev.error = sock_error(skaddr); /* SOCK_ERROR_UNKNOWN without BTF */
	}
#ifdef FILTER_FAILED
	if (!ev.failed)
		return 0;
#endif
	FILL_ENDPOINTS(&ev, args);
	emit(args, &ev, sizeof(ev));
	return 0;
}

#ifdef HAVE_TCP_RECEIVE_RESET
int on_tcp_receive_reset(struct tp_tcp_receive_reset *args)
{
	u64 skaddr = args->skaddr;
	struct attempt *a = attempts.lookup(&skaddr);

	if (a)
		a->reset = 1;
	return 0;
}
#endif
