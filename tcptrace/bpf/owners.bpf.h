/*
 * owners.bpf.h: the process a socket belongs to, for events that fire in
 * softirq context, where the task on the CPU is unrelated. Part of
 * tcptrace.h, which defines what it uses first; the maps exist only in
 * programs that define TCPTRACE_OWNERS.
 *
 * Only transitions that the kernel makes inside a system call of the owning
 * process are trusted: CLOSE->SYN_SENT (connect), CLOSE->LISTEN (listen),
 * ->FIN_WAIT1 and ->LAST_ACK (close or shutdown). A child socket of a
 * listener (LISTEN->SYN_RECV, in softirq) inherits the listener's owner,
 * looked up by local port. A later process-context transition wins: the
 * process that closes a socket holds it, even if another created it.
 *
 * With TCPTRACE_OWNERS_AT_OPEN only connect() and listen() are recorded:
 * for a tool that needs the owner of the rare socket an event names (drops),
 * which finds an accepted child's by the listener on its local port when
 * the event comes; three map operations per connection instead of about
 * seven.
 *
 * The -p filter (FILTER_PIDS) never matches an unknown owner: owner_ok().
 */
#ifdef TCPTRACE_OWNERS
/* User space writes listeners opened before tracing into listen_owners
 * with this layout. */
struct owner {
	u32 pid;
	u32 known;
	char comm[TASK_COMM_LEN];
};

BPF_HASH(owners, u64, struct owner, TCPTRACE_MAX_SOCKETS);
BPF_HASH(listen_owners, u16, struct owner, 4096);

static __always_inline void set_owner_current(u64 skaddr, struct owner *o)
{
	o->pid = current_pid();
	o->known = 1;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	if (owners.update(&skaddr, o) != 0)
		stat_inc(STAT_UNTRACKED);
}

#ifdef TCPTRACE_OWNERS_AT_OPEN
#define OWNERS_ALL_CHANGES 0
#else
#define OWNERS_ALL_CHANGES 1
#endif

/* Call for every TCP state change, before reading the owner, and call
 * forget_owner() once a change to CLOSE has been handled. */
static __always_inline void track_owner(u64 skaddr, s32 oldstate, s32 newstate, u16 lport)
{
	struct owner o = {};

	if (newstate == TCP_SYN_SENT ||
	    (OWNERS_ALL_CHANGES && (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK))) {
		set_owner_current(skaddr, &o);
	} else if (newstate == TCP_LISTEN) {
		set_owner_current(skaddr, &o);
		listen_owners.update(&lport, &o);
	} else if (OWNERS_ALL_CHANGES && oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
		struct owner *parent = listen_owners.lookup(&lport);
		if (parent && owners.update(&skaddr, parent) != 0)
			stat_inc(STAT_UNTRACKED);
	} else if (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) {
		listen_owners.delete(&lport);
	}
}

static __always_inline struct owner *owner_of(u64 skaddr)
{
	return owners.lookup(&skaddr);
}

static __always_inline void forget_owner(u64 skaddr)
{
	owners.delete(&skaddr);
}

static __always_inline int owner_known(struct owner *o)
{
	return o && o->known;
}

/* Whether -p lets an event of this owner through. */
static __always_inline int owner_ok(struct owner *o)
{
#ifdef FILTER_PIDS
	return owner_known(o) && pid_ok(o->pid);
#else
	return 1;
#endif
}

/* Copies a known owner into an event's pid and comm; returns whether it
 * was known (both are left as they were otherwise). */
static __always_inline int copy_owner(struct owner *o, u32 *pid, char *comm)
{
	if (!owner_known(o))
		return 0;
	*pid = o->pid;
	__builtin_memcpy(comm, o->comm, TASK_COMM_LEN);
	return 1;
}
#endif /* TCPTRACE_OWNERS */
