/*
 * lifecycle.bpf.h: where a TCP connection's life begins and ends, as
 * sock:inet_sock_set_state shows it. life.bpf.c (one event per session),
 * connect.bpf.c (one event per active open) and exporter.bpf.c (the same,
 * counted) all decide with these, so they agree on what a session and a
 * connect are.
 *
 * - A session is born at CLOSE->SYN_SENT (connect(), in the caller's
 *   context) or LISTEN->SYN_RECV (a listener's child, in softirq), and ends
 *   at the change to CLOSE. Listeners (CLOSE->LISTEN->CLOSE) are not
 *   sessions.
 * - A connect runs from CLOSE->SYN_SENT to the end of the handshake:
 *   ->ESTABLISHED when the SYN-ACK arrives, ->CLOSE when it fails. A
 *   simultaneous open passes through SYN_RECV on the way: still connecting.
 * - A failed connect was refused when a reset arrived during the handshake
 *   (tcp:tcp_receive_reset); otherwise the socket's sk_err says why
 *   (sock_error(): ETIMEDOUT when the SYN retries ran out, an ICMP error,
 *   0 when the application closed it first, unknown without BTF).
 * - The kernel picks a connecting socket's local port after
 *   CLOSE->SYN_SENT: port filters are applied when a session or a connect
 *   ends, not at its birth.
 */
#include "tcptrace.h"

static __always_inline int connect_begins(s32 oldstate, s32 newstate)
{
	return oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT;
}

static __always_inline int session_begins(s32 oldstate, s32 newstate)
{
	return connect_begins(oldstate, newstate) || (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV);
}

static __always_inline int listener_change(s32 oldstate, s32 newstate)
{
	return newstate == TCP_LISTEN || (oldstate == TCP_LISTEN && newstate == TCP_CLOSE);
}

static __always_inline int in_handshake(s32 state)
{
	return state == TCP_SYN_SENT || state == TCP_SYN_RECV;
}

static __always_inline int handshake_ends(s32 newstate)
{
	return newstate == TCP_ESTABLISHED || newstate == TCP_CLOSE;
}

/* The connect that ended with this change failed. */
static __always_inline int connect_failed(s32 newstate)
{
	return newstate == TCP_CLOSE;
}
