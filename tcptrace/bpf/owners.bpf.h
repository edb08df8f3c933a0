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
 * With TCPTRACE_OWNERS_AT_OPEN only connect() and listen() are recorded,
 * in a table of slots instead of a hash map (owner_copy() instead of
 * owner_of()): for a tool that needs the owner of the rare socket an event
 * names (drops), which finds an accepted child's by the listener on its
 * local port when the event comes.
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

BPF_HASH(listen_owners, u16, struct owner, 4096);

#ifdef TCPTRACE_OWNERS_AT_OPEN
#define OWNERS_ALL_CHANGES 0
/*
 * The owners of connect()ed and listening sockets, in a table of
 * TCPTRACE_MAX_SOCKETS slots, in buckets of OWNER_WAYS picked by a hash of
 * the socket's address: a map lookup, a few compares and plain writes at
 * connect() and at close, where a hash map takes a locked insert and a
 * locked delete (measured on 6.18: about 400 ns of the program's time per
 * connection, most of what a drop-free load pays). A socket whose bucket
 * live sockets fill takes one of their slots: the one it displaces is
 * counted as not tracked (STAT_UNTRACKED), and its drops fall back to the
 * listener's owner. A bucket is full only when four sockets open at once
 * share it: with 5,000 connect()ed sockets open, about one connect() in
 * 3,500 displaces one (one in 14 with a slot per bucket). A slot is
 * claimed by writing its socket last and read by checking its socket
 * before and after the copy, so that a reader does not take a slot being
 * rewritten for its own (stores keep their order on x86; a CPU that
 * reorders them leaves a window of a few instructions).
 */
#define OWNER_WAYS 4
#if (TCPTRACE_MAX_SOCKETS & (TCPTRACE_MAX_SOCKETS - 1)) != 0 || TCPTRACE_MAX_SOCKETS < OWNER_WAYS
#error "TCPTRACE_MAX_SOCKETS must be a power of two, at least OWNER_WAYS"
#endif
struct owner_slot {
	u64 sk;
	struct owner o;
};

struct owner_bucket {
	struct owner_slot way[OWNER_WAYS];
};

BPF_ARRAY(owner_buckets, struct owner_bucket, TCPTRACE_MAX_SOCKETS / OWNER_WAYS);

#define owners_barrier() asm volatile("" ::: "memory")
#define SLOT_SK(slot) (*(volatile u64 *)&(slot)->sk)

static __always_inline u32 owner_hash(u64 skaddr)
{
	return (u32)((skaddr * 0x9E3779B97F4A7C15ULL) >> 32);
}

static __always_inline struct owner_bucket *owner_bucket(u64 skaddr)
{
	u32 index = owner_hash(skaddr) & (TCPTRACE_MAX_SOCKETS / OWNER_WAYS - 1);

	return owner_buckets.lookup(&index);
}

/* 0 when stored without displacing another socket's owner. */
static __always_inline int save_owner(u64 skaddr, struct owner *o)
{
	struct owner_bucket *bucket = owner_bucket(skaddr);
	u32 pick = OWNER_WAYS, empty = OWNER_WAYS;

	if (!bucket)
		return -1;
#pragma unroll
	for (u32 i = 0; i < OWNER_WAYS; i++) {
		u64 held = SLOT_SK(&bucket->way[i]);

		if (held == skaddr && pick == OWNER_WAYS)
			pick = i;
		if (!held && empty == OWNER_WAYS)
			empty = i;
	}
	int displaced = 0;

	if (pick == OWNER_WAYS)
		pick = empty;
	if (pick == OWNER_WAYS) {  /* all ways live: one of them goes */
		pick = (owner_hash(skaddr) >> 28) & (OWNER_WAYS - 1);
		displaced = 1;
	}
	pick &= OWNER_WAYS - 1;  /* bounded for the verifier */
	struct owner_slot *slot = &bucket->way[pick];

	SLOT_SK(slot) = 0;
	owners_barrier();
	__builtin_memcpy(&slot->o, o, sizeof(*o));
	owners_barrier();
	SLOT_SK(slot) = skaddr;
	return displaced ? -1 : 0;
}

/* Copies the socket's owner into *out; 0 when it has none recorded. */
static __always_inline int owner_copy(u64 skaddr, struct owner *out)
{
	struct owner_bucket *bucket = owner_bucket(skaddr);

	if (!bucket)
		return 0;
#pragma unroll
	for (u32 i = 0; i < OWNER_WAYS; i++) {
		struct owner_slot *slot = &bucket->way[i];

		if (SLOT_SK(slot) != skaddr)
			continue;
		owners_barrier();
		__builtin_memcpy(out, &slot->o, sizeof(*out));
		owners_barrier();
		return SLOT_SK(slot) == skaddr && out->known;
	}
	return 0;
}

static __always_inline void forget_owner(u64 skaddr)
{
	struct owner_bucket *bucket = owner_bucket(skaddr);

	if (!bucket)
		return;
#pragma unroll
	for (u32 i = 0; i < OWNER_WAYS; i++) {
		if (SLOT_SK(&bucket->way[i]) == skaddr)
			SLOT_SK(&bucket->way[i]) = 0;
	}
}
#else
#define OWNERS_ALL_CHANGES 1
BPF_HASH(owners, u64, struct owner, TCPTRACE_MAX_SOCKETS);

static __always_inline int save_owner(u64 skaddr, struct owner *o)
{
	return owners.update(&skaddr, o);
}

static __always_inline struct owner *owner_of(u64 skaddr)
{
	return owners.lookup(&skaddr);
}

static __always_inline void forget_owner(u64 skaddr)
{
	owners.delete(&skaddr);
}
#endif

static __always_inline void set_owner_current(u64 skaddr, struct owner *o)
{
	o->pid = current_pid();
	o->known = 1;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	if (save_owner(skaddr, o) != 0)
		stat_inc(STAT_UNTRACKED);
}

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
#if OWNERS_ALL_CHANGES
	} else if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
		struct owner *parent = listen_owners.lookup(&lport);
		if (parent && save_owner(skaddr, parent) != 0)
			stat_inc(STAT_UNTRACKED);
#endif
	} else if (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) {
		listen_owners.delete(&lport);
	}
}

/* Whether track_owner() or forget_owner() (at CLOSE) has anything to do
 * with this change: a program may return before reading anything else
 * when it has not (most changes of a connection). */
static __always_inline int owner_change(s32 oldstate, s32 newstate)
{
	return newstate == TCP_SYN_SENT || newstate == TCP_LISTEN || newstate == TCP_CLOSE ||
	       (OWNERS_ALL_CHANGES && (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK ||
				       (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV)));
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
