/*
 * accept.bpf.c: passive TCP opens, one row when a listener's new connection
 * is established, with the listening process.
 *
 * Tracepoint: sock:inet_sock_set_state (Linux 4.16+). A listener's child
 * socket appears with LISTEN->SYN_RECV and is established with
 * SYN_RECV->ESTABLISHED, both in softirq context: the process is the one
 * that put the listener in LISTEN (owners.bpf.h hands it to the child), not the task on the CPU.
 *
 * Since Linux 4.4 a SYN only creates a request socket (NEW_SYN_RECV), which
 * no state tracepoint reports; the child socket is created when the
 * client's final ACK arrives and is established at once, so its time in
 * SYN_RECV is near zero. It is a real handshake time only for TCP Fast
 * Open, where the child exists from the SYN on.
 *
 * The row is written at the handshake, whether or not the application ever
 * calls accept(): the accept() call itself has no tracepoint.
 */
#define TCPTRACE_OWNERS 1
#include "tcptrace.h"
#include "workload.bpf.h"

struct event {
	u64 ts_ns;
	u64 skaddr;
	u64 syn_recv_ns;
	u32 pid;
	u16 family;
	u16 lport;
	u16 rport;
	u8 owner_known;
	u8 unused;
	u8 saddr[16];
	u8 daddr[16];
	char comm[16];
	u64 cgroup_id;
	u32 netns;
};

/* Children between LISTEN->SYN_RECV and their next change: when they were born. */
BPF_TABLE("lru_hash", u64, u64, children, TCPTRACE_MAX_SOCKETS);

int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (!is_tcp(args->protocol))
		return 0;

	u64 skaddr = args->skaddr;
	s32 oldstate = args->oldstate;
	s32 newstate = args->newstate;
	u64 now = bpf_ktime_get_ns();

	track_owner(skaddr, oldstate, newstate, args->sport);
	workload_track(skaddr, oldstate, newstate, args->sport);
	if (newstate == TCP_CLOSE) {
		forget_owner(skaddr);
		children.delete(&skaddr);
		return 0;
	}
	if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
		children.update(&skaddr, &now);
		return 0;
	}
	if (oldstate != TCP_SYN_RECV || newstate != TCP_ESTABLISHED)
		return 0;

	u64 *born = children.lookup(&skaddr);
	if (!born)
		return 0;
	struct event ev = {};
	ev.syn_recv_ns = now - *born;
	children.delete(&skaddr);

	if (!family_ok(args->family) || !ports_ok(args->sport, args->dport))
		return 0;
	struct owner *o = owner_of(skaddr);
	if (!owner_ok(o))
		return 0;
	/* the listener's cgroup: the kernel copied it into the child */
	if (!workload_read(skaddr, &ev.cgroup_id, &ev.netns))
		return 0;
	ev.owner_known = copy_owner(o, &ev.pid, ev.comm);
	ev.ts_ns = now;
	ev.skaddr = skaddr;
	FILL_ENDPOINTS(&ev, args);
	emit(args, &ev, sizeof(ev));
	return 0;
}
