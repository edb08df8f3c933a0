/*
 * tcptrace.h: what every tcptrace program shares.
 *
 * No kernel header is included. Tracepoint records are the generated
 * `struct tp_<event>` (laid out from the running kernel's format files, with
 * HAS_<EVENT>_<FIELD> macros giving each present field's size), and the few
 * kernel struct offsets a tool needs come from BTF as integer #defines.
 *
 * Here: constants, the filters, reads of kernel structs. By concern, pasted
 * in below (each header once): counting.bpf.h (output and loss accounting,
 * count mode), addresses.bpf.h (endpoints from any record form),
 * owners.bpf.h (whose socket it is, the -p check). lifecycle.bpf.h (where
 * sessions and connects begin and end) is for the programs that need it.
 */

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TASK_COMM_LEN 16

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10
#define TCP_CLOSING 11
#define TCP_NEW_SYN_RECV 12

#ifndef TCPTRACE_MAX_SOCKETS
#define TCPTRACE_MAX_SOCKETS 65536
#endif
#ifndef TCPTRACE_RINGBUF_PAGES
#define TCPTRACE_RINGBUF_PAGES 256
#endif
#define TCPTRACE_MAX_FILTER 64

#include "counting.bpf.h"

/* Filters: integer #defines and maps filled by user space before attach. */
static __always_inline int family_ok(u16 family)
{
#ifdef FILTER_FAMILY
	return family == FILTER_FAMILY;
#else
	return family == AF_INET || family == AF_INET6;
#endif
}

#ifdef FILTER_LPORTS
BPF_HASH(filter_lports, u16, u8, TCPTRACE_MAX_FILTER);
#endif
#ifdef FILTER_RPORTS
BPF_HASH(filter_rports, u16, u8, TCPTRACE_MAX_FILTER);
#endif
#ifdef FILTER_PIDS
BPF_HASH(filter_pids, u32, u8, TCPTRACE_MAX_FILTER);
#endif

static __always_inline int lport_ok(u16 port)
{
#ifdef FILTER_LPORTS
	return filter_lports.lookup(&port) != 0;
#else
	return 1;
#endif
}

static __always_inline int rport_ok(u16 port)
{
#ifdef FILTER_RPORTS
	return filter_rports.lookup(&port) != 0;
#else
	return 1;
#endif
}

static __always_inline int pid_ok(u32 pid)
{
#ifdef FILTER_PIDS
	return filter_pids.lookup(&pid) != 0;
#else
	return 1;
#endif
}

static __always_inline int ports_ok(u16 lport, u16 rport)
{
	return lport_ok(lport) && rport_ok(rport);
}

static __always_inline u32 current_pid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline int is_tcp(u16 protocol)
{
	return protocol == IPPROTO_TCP;
}

/* A raw tracepoint program's context: the tracepoint's arguments, a u64
 * each in the order of its prototype. A program reads one at the byte
 * offset the plan found in the kernel's BTF (OFF_BTF_TRACE_<EVENT>_<ARG>). */
struct raw_tracepoint_args {
	__u64 args[0];
};
#define raw_arg(ctx, offset) (*(__u64 *)((char *)(ctx) + (offset)))

/* bcc defines KERNEL_VERSION; a plain C preprocessor (tests) may not. */
#ifdef KERNEL_VERSION
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 5, 0)
#define read_kernel bpf_probe_read_kernel
#endif
#endif
#ifndef read_kernel
#define read_kernel bpf_probe_read
#endif

/*
 * Kernel struct members, at the offsets the running kernel's BTF gives
 * (OFF_<STRUCT>_<MEMBER>, defined when a tool lists the member in its spec).
 * Without an offset the value is unknown, never read from a guessed layout.
 *
 * tcp_bytes(): tcp_sock.bytes_acked and bytes_received, the kernel's own
 * counters; bytes_acked counts the sequence space the peer acknowledged
 * (our SYN on the connecting side, and our FIN), bytes_received the peer's
 * FIN. Returns 1 when both were read.
 */
static __always_inline int tcp_bytes(u64 sk, u64 *acked, u64 *received)
{
#if defined(OFF_TCP_SOCK_BYTES_ACKED) && defined(OFF_TCP_SOCK_BYTES_RECEIVED)
	return read_kernel(acked, sizeof(*acked), (void *)(sk + OFF_TCP_SOCK_BYTES_ACKED)) == 0 &&
	       read_kernel(received, sizeof(*received), (void *)(sk + OFF_TCP_SOCK_BYTES_RECEIVED)) == 0;
#else
	return 0;
#endif
}

/*
 * sock_error(): sock.sk_err, the errno a failed socket keeps: ETIMEDOUT when
 * the SYN retries ran out, ECONNREFUSED, an ICMP error, 0 when the
 * application closed it; SOCK_ERROR_UNKNOWN without BTF.
 */
#define SOCK_ERROR_UNKNOWN -1

static __always_inline s32 sock_error(u64 sk)
{
#ifdef OFF_SOCK_SK_ERR
	s32 err = 0;

	read_kernel(&err, sizeof(err), (void *)(sk + OFF_SOCK_SK_ERR));
	return err;
#else
	return SOCK_ERROR_UNKNOWN;
#endif
}

#ifdef HAVE_KFREE_SKB
/* The socket a freed packet belonged to, or 0: rx_sk where the record has
 * it (the receiving socket), else the packet's own skb->sk. */
static __always_inline u64 skb_socket(struct tp_kfree_skb *args, u64 skb)
{
	u64 sk = 0;

#ifdef HAS_KFREE_SKB_RX_SK
	sk = args->rx_sk;
#endif
#ifdef OFF_SK_BUFF_SK
	if (!sk)
		read_kernel(&sk, sizeof(sk), (void *)(skb + OFF_SK_BUFF_SK));
#endif
	return sk;
}
#endif

#include "addresses.bpf.h"
#include "owners.bpf.h"
