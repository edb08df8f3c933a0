/*
 * workload.bpf.h: which workload a socket belongs to, read from the socket
 * itself: its cgroup v2 id and its network namespace, and the --cgroup and
 * --netns filters. Included by every event tool after tcptrace.h.
 *
 * The cgroup is the SOCKET's, never the task on the CPU: most state
 * changes, every retransmit and every reset run in softirq, on behalf of
 * whatever task was interrupted. The kernel sets sock.sk_cgrp_data when
 * the socket is created (the creating task's cgroup v2) and copies it into
 * every child a listener accepts, so an accepted socket carries the
 * listener's cgroup. Two layouts (the plan tells which, from BTF):
 *   5.15+: struct sock_cgroup_data { struct cgroup *cgroup; ... }
 *   older: a u64 `val`, the cgroup pointer unless one of its two low bits
 *          is set: then net_cls/net_prio (cgroup v1) hold the word and the
 *          kernel itself sees the root cgroup: unknown (0) here.
 * The id is cgroup->kn->id, the inode number of the cgroup's directory
 * (WORKLOAD_ID_BITS32 before 5.5, where kn->id also carried a generation
 * in its high half: the inode is the low half).
 *
 * --cgroup PATH matches the cgroup and everything below it, also cgroups
 * made after the start: with WORKLOAD_ANCESTORS the socket's ancestor at
 * each level a wanted cgroup sits on (FILTER_CGROUP_LEVELS, a bitmask) is
 * looked up in filter_cgroups; cgroup->ancestors[] (6.0+) holds pointers,
 * ancestor_ids[] (5.5 to 5.19) the ids. Without them, filter_cgroups
 * holds the wanted cgroups and their descendants as they were at the start.
 *
 * WORKLOAD_OWNER_CGROUP (BTF lacks the members above): the cgroup of the
 * task that called connect() or listen(), recorded in that system call
 * (bpf_get_current_cgroup_id, Linux 4.18+) and inherited by accepted
 * children through the listening port; a socket whose connect or listen
 * came before tracing has no cgroup (0). Programs call workload_track() on
 * every state change; it does nothing when the socket's own cgroup is read.
 *
 * The netns is sock_common.skc_net->ns.inum, the inode number that
 * `stat -L /proc/PID/ns/net` shows; 0 when BTF lacks it.
 */

#ifndef TCPTRACE_MAX_CGROUPS
#define TCPTRACE_MAX_CGROUPS 4096
#endif
#define WORKLOAD_MAX_LEVEL 64

#ifdef FILTER_CGROUPS
BPF_HASH(filter_cgroups, u64, u8, TCPTRACE_MAX_CGROUPS);
#endif
#ifdef FILTER_NETNS
BPF_HASH(filter_netns, u32, u8, TCPTRACE_MAX_FILTER);
#endif

#ifdef WORKLOAD_SOCKET_CGROUP
#if defined(OFF_SOCK_CGROUP_DATA_CGROUP)
#define WORKLOAD_CGRP_WORD (OFF_SOCK_SK_CGRP_DATA + OFF_SOCK_CGROUP_DATA_CGROUP)
#else
#define WORKLOAD_CGRP_WORD (OFF_SOCK_SK_CGRP_DATA + OFF_SOCK_CGROUP_DATA_VAL)
#define WORKLOAD_CGRP_TAGGED 1
#endif

static __always_inline u64 kn_cgroup_id(u64 cgrp)
{
	u64 kn = 0, id = 0;

	if (!cgrp || read_kernel(&kn, sizeof(kn), (void *)(cgrp + OFF_CGROUP_KN)) != 0 || !kn)
		return 0;
	read_kernel(&id, sizeof(id), (void *)(kn + OFF_KERNFS_NODE_ID));
#ifdef WORKLOAD_ID_BITS32
	id &= 0xffffffffULL;
#endif
	return id;
}

static __always_inline u64 socket_cgroup(u64 sk)
{
	u64 word = 0;

	read_kernel(&word, sizeof(word), (void *)(sk + WORKLOAD_CGRP_WORD));
#ifdef WORKLOAD_CGRP_TAGGED
	if (word & 3)
		return 0;
#endif
	return word;
}

#ifdef WORKLOAD_ANCESTORS
static __always_inline u64 ancestor_id(u64 cgrp, u32 level)
{
#ifdef OFF_CGROUP_ANCESTORS
	u64 ancestor = 0;

	read_kernel(&ancestor, sizeof(ancestor), (void *)(cgrp + OFF_CGROUP_ANCESTORS + level * 8));
	return kn_cgroup_id(ancestor);
#else
	u64 id = 0;

	read_kernel(&id, sizeof(id), (void *)(cgrp + OFF_CGROUP_ANCESTOR_IDS + level * 8));
	return id;
#endif
}
#endif
#endif /* WORKLOAD_SOCKET_CGROUP */

#ifdef WORKLOAD_OWNER_CGROUP
BPF_TABLE("lru_hash", u64, u64, sock_cgroups, TCPTRACE_MAX_SOCKETS);
BPF_TABLE("lru_hash", u16, u64, listen_cgroups, 4096);
#endif

/* Call on every TCP state change, before workload_read(). LRU maps: a
 * socket's entry is replaced when its address is reused by the next
 * connect, listen or accept, and nothing pins one forever. */
/* Whether workload_track() has anything to do with this change. */
static __always_inline int workload_change(s32 oldstate, s32 newstate)
{
#ifdef WORKLOAD_OWNER_CGROUP
	return newstate == TCP_SYN_SENT || newstate == TCP_LISTEN || (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV);
#else
	return 0;
#endif
}

static __always_inline void workload_track(u64 sk, s32 oldstate, s32 newstate, u16 lport)
{
#ifdef WORKLOAD_OWNER_CGROUP
	if (newstate == TCP_SYN_SENT || newstate == TCP_LISTEN) {
		u64 id = bpf_get_current_cgroup_id();
#ifdef WORKLOAD_ID_BITS32
		id &= 0xffffffffULL;
#endif
		sock_cgroups.update(&sk, &id);
		if (newstate == TCP_LISTEN)
			listen_cgroups.update(&lport, &id);
	} else if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
		u64 *parent = listen_cgroups.lookup(&lport);
		if (parent)
			sock_cgroups.update(&sk, parent);
	}
#endif
}

static __always_inline u32 socket_netns(u64 sk)
{
#if defined(OFF_SOCK_COMMON_SKC_NET) && defined(OFF_NET_NS) && defined(OFF_NS_COMMON_INUM)
	u64 net = 0;
	u32 inum = 0;

	/* sock_common is the first member of struct sock */
	if (read_kernel(&net, sizeof(net), (void *)(sk + OFF_SOCK_COMMON_SKC_NET)) != 0 || !net)
		return 0;
	read_kernel(&inum, sizeof(inum), (void *)(net + OFF_NET_NS + OFF_NS_COMMON_INUM));
	return inum;
#else
	return 0;
#endif
}

static __always_inline int cgroup_wanted(u64 cgrp, u64 id)
{
#if !defined(FILTER_CGROUPS)
	return 1;
#elif defined(WORKLOAD_ANCESTORS) && defined(FILTER_CGROUP_LEVELS)
	s32 level = -1;

	if (!cgrp || read_kernel(&level, sizeof(level), (void *)(cgrp + OFF_CGROUP_LEVEL)) != 0)
		return 0;
#pragma unroll
	for (u32 i = 0; i < WORKLOAD_MAX_LEVEL; i++) {
		/* a constant test: only the wanted levels are compiled in */
		if (!(((u64)FILTER_CGROUP_LEVELS >> i) & 1) || (s32)i > level)
			continue;
		u64 ancestor = ancestor_id(cgrp, i);
		if (ancestor && filter_cgroups.lookup(&ancestor))
			return 1;
	}
	return 0;
#else
	return id && filter_cgroups.lookup(&id) != 0;
#endif
}

static __always_inline int netns_wanted(u32 netns)
{
#ifdef FILTER_NETNS
	return netns && filter_netns.lookup(&netns) != 0;
#else
	return 1;
#endif
}

static __always_inline int workload_of(u64 sk, int full, u64 *cgroup_id, u32 *netns)
{
	u64 cgrp = 0, id = 0;
	u32 ns = 0;

	if (sk) {
		if (full) {
#if defined(WORKLOAD_SOCKET_CGROUP)
			cgrp = socket_cgroup(sk);
			id = kn_cgroup_id(cgrp);
#elif defined(WORKLOAD_OWNER_CGROUP)
			u64 *recorded = sock_cgroups.lookup(&sk);
			if (recorded)
				id = *recorded;
#endif
		}
		ns = socket_netns(sk);
	}
	if (!cgroup_wanted(cgrp, id) || !netns_wanted(ns))
		return 0;
	*cgroup_id = id;
	*netns = ns;
	return 1;
}

/*
 * The socket's cgroup id and netns into *cgroup_id and *netns (0 where
 * unknown, and for sk 0: an event without a socket); returns 0 when
 * --cgroup or --netns leaves the socket out. For a full socket (struct
 * sock): what the state tracepoint and the retransmit ones give.
 */
static __always_inline int workload_read(u64 sk, u64 *cgroup_id, u32 *netns)
{
	return workload_of(sk, 1, cgroup_id, netns);
}

/*
 * The same for a pointer that may be a TIME_WAIT or request socket (a
 * reset sent from TIME_WAIT, a dropped segment's socket): only their
 * struct sock_common is there, with the netns but no cgroup (0).
 */
static __always_inline int workload_read_any(u64 sk, u64 *cgroup_id, u32 *netns)
{
	int full = 0;
#ifdef OFF_SOCK_COMMON_SKC_STATE
	u8 state = 0;

	if (sk && read_kernel(&state, sizeof(state), (void *)(sk + OFF_SOCK_COMMON_SKC_STATE)) == 0)
		full = state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV;
#endif
	return workload_of(sk, full, cgroup_id, netns);
}
