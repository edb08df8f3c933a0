/*
 * addresses.bpf.h: a connection's endpoints, from whichever form the
 * tracepoint record has. Part of tcptrace.h, which defines what it uses
 * first.
 *
 * Events carry addresses as 16 bytes with a family: IPv4 in the first 4.
 * Records give them in one of three forms:
 * - an IPv4 and an IPv6 copy (saddr/daddr and saddr_v6/daddr_v6) and a
 *   family field, which picks one: FILL_ENDPOINTS(), COPY_ADDRS();
 * - the same copies without a family field (tcp tracepoints before 5.13):
 *   an IPv4 connection's IPv6 copies hold ::ffff:a.b.c.d, and
 *   COPY_MAPPED_ADDRS() derives the family from that;
 * - struct sockaddr_in / sockaddr_in6 (tcp_send_reset since 6.10): family,
 *   then the port in network order at byte 2, then the address at byte 4
 *   (IPv4) or 8 (IPv6): COPY_SOCKADDRS(), SOCKADDR_PORT().
 *
 * These are macros because every tracepoint has its own record struct. The
 * record is a BPF program's context, which the verifier lets a program read
 * only at constant offsets from the context pointer itself: byte arrays
 * have alignment 1, so the copies compile to byte loads at any offset.
 */

#define COPY_ADDRS(ev, args)                                                   \
	do {                                                                   \
		if ((ev)->family == AF_INET6) {                                \
			__builtin_memcpy((ev)->saddr, (args)->saddr_v6, 16);   \
			__builtin_memcpy((ev)->daddr, (args)->daddr_v6, 16);   \
		} else {                                                       \
			__builtin_memcpy((ev)->saddr, (args)->saddr, 4);       \
			__builtin_memcpy((ev)->daddr, (args)->daddr, 4);       \
		}                                                              \
	} while (0)

/* Family, ports and addresses of a record with a family field; the
 * source is this host. */
#define FILL_ENDPOINTS(ev, args)                                               \
	do {                                                                   \
		(ev)->family = (args)->family;                                 \
		(ev)->lport = (args)->sport;                                   \
		(ev)->rport = (args)->dport;                                   \
		COPY_ADDRS(ev, args);                                          \
	} while (0)

/*
 * Turns a pair of v4-mapped addresses (::ffff:a.b.c.d, as the kernel stores
 * an IPv4 socket's addresses in the IPv6 copies) into IPv4 in place and
 * returns the family they are. Both addresses of a socket are of one kind;
 * the destination is examined.
 */
static __always_inline u16 unmap_v4(u8 *saddr, u8 *daddr)
{
	u8 zeros = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		zeros |= daddr[i];
	if (zeros != 0 || daddr[10] != 0xff || daddr[11] != 0xff)
		return AF_INET6;
	__builtin_memcpy(saddr, saddr + 12, 4);
	__builtin_memset(saddr + 4, 0, 12);
	__builtin_memcpy(daddr, daddr + 12, 4);
	__builtin_memset(daddr + 4, 0, 12);
	return AF_INET;
}

/*
 * The IPv6 copies are fetched with a helper call, not copied: next to the
 * byte tests of unmap_v4() the compiler may address the record through a
 * pointer it derived from the context pointer, which the verifier refuses.
 * A helper takes any address.
 */
#define COPY_MAPPED_ADDRS(ev, args)                                            \
	do {                                                                   \
		read_kernel((ev)->saddr, 16, (args)->saddr_v6);                \
		read_kernel((ev)->daddr, 16, (args)->daddr_v6);                \
		(ev)->family = unmap_v4((ev)->saddr, (ev)->daddr);             \
	} while (0)

/* The port of a struct sockaddr_in/in6 held as bytes (network order). */
#define SOCKADDR_PORT(sa) (((u16)(sa)[2] << 8) | (sa)[3])

/* Family, ports and addresses of a record with saddr/daddr as sockaddrs. */
#define COPY_SOCKADDRS(ev, args)                                               \
	do {                                                                   \
		__builtin_memcpy(&(ev)->family, (args)->saddr, sizeof((ev)->family)); \
		(ev)->lport = SOCKADDR_PORT((args)->saddr);                    \
		(ev)->rport = SOCKADDR_PORT((args)->daddr);                    \
		if ((ev)->family == AF_INET6) {                                \
			__builtin_memcpy((ev)->saddr, &(args)->saddr[8], 16);  \
			__builtin_memcpy((ev)->daddr, &(args)->daddr[8], 16);  \
		} else {                                                       \
			__builtin_memcpy((ev)->saddr, &(args)->saddr[4], 4);   \
			__builtin_memcpy((ev)->daddr, &(args)->daddr[4], 4);   \
		}                                                              \
	} while (0)
