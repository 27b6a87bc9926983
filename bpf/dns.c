// SPDX-License-Identifier: Apache-2.0
/*
 * DNS observation: cgroup skb programs linked to the root of the cgroup v2 hierarchy (they
 * see every socket's packets and always pass them) that copy each DNS message to or from port
 * DNS_PORT, UDP or TCP, into the ring buffer as an EV_DNS_MESSAGE, with the socket's cgroup.
 * Userspace parses the message (sensor/dnsmessage.py): questions become `dns:NAME`
 * behaviours, and answers tell which name an address a cgroup connects to came from.
 *
 * A TCP segment is copied only when it starts a length-prefixed message (the first segment of
 * a reply; a message spread over several segments is captured in part and says so). IPv6
 * extension headers and IPv4 fragments are not followed.
 *
 * Configured with -D only:
 *   DNS_RINGBUF_PAGES  ring buffer size in pages (power of two)   default 256
 *   DNS_PORT           the resolvers' port                         default 53
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include "events.h"

#ifndef DNS_RINGBUF_PAGES
#define DNS_RINGBUF_PAGES 256
#endif
#ifndef DNS_PORT
#define DNS_PORT 53
#endif

BPF_RINGBUF_OUTPUT(events, DNS_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, __u64, 1); /* records dropped: the ring buffer was full */

static __always_inline int dns_copy(struct __sk_buff *skb, __u8 direction)
{
	__u8 proto = 0;
	__u32 l4;
	__u16 family;
	__u32 peer[4] = {};
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl = 0;
		__u16 frag = 0;
		/* ingress: the peer is the source; egress: the destination */
		if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 6, &frag, 2) ||
		    bpf_skb_load_bytes(skb, 9, &proto, 1) ||
		    bpf_skb_load_bytes(skb, direction == DNS_DIR_ANSWER ? 12 : 16, &peer[0], 4))
			return 1;
		if (bpf_ntohs(frag) & 0x3fff)
			return 1;
		l4 = (vihl & 0xf) * 4;
		family = ENV_AF_INET;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 6, &proto, 1) ||
		    bpf_skb_load_bytes(skb, direction == DNS_DIR_ANSWER ? 8 : 24, peer, 16))
			return 1;
		l4 = 40;
		family = ENV_AF_INET6;
	} else {
		return 1;
	}
	__u16 ports[2] = {};
	__u32 off;
	if (proto == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, l4, ports, 4))
			return 1;
		off = l4 + 8;
	} else if (proto == IPPROTO_TCP) {
		__u8 doff = 0;
		if (bpf_skb_load_bytes(skb, l4, ports, 4) || bpf_skb_load_bytes(skb, l4 + 12, &doff, 1))
			return 1;
		off = l4 + (doff >> 4) * 4 + 2;
	} else {
		return 1;
	}
	__u16 peer_port = bpf_ntohs(direction == DNS_DIR_ANSWER ? ports[0] : ports[1]);
	if (peer_port != DNS_PORT || skb->len < off + 12)
		return 1;
	__u64 len = skb->len - off;
	__u16 msg_len = len > 0xffff ? 0xffff : len;
	if (len > DNS_MESSAGE_CAPTURE)
		len = DNS_MESSAGE_CAPTURE;
	/* A bound the compiler cannot drop: the verifier needs to see it at the call. */
	asm volatile("%[len] &= 2047" : [len] "+r"(len));
	if (len > DNS_MESSAGE_CAPTURE || len < 12)
		return 1;
	struct dns_message_event *ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		__u32 zero = 0;
		__u64 *n = lost.lookup(&zero);
		if (n)
			*n += 1;
		return 1;
	}
	if (bpf_skb_load_bytes(skb, off, ev->msg, len) != 0) {
		events.ringbuf_discard(ev, 0);
		return 1;
	}
	ev->hdr.type = EV_DNS_MESSAGE;
	ev->hdr.version = DNS_MESSAGE_EVENT_VERSION;
	ev->hdr.size = sizeof(*ev);
	ev->hdr.ktime = bpf_ktime_get_ns();
	ev->cgroup_id = bpf_skb_cgroup_id(skb);
	ev->family = family;
	ev->protocol = proto;
	ev->direction = direction;
	ev->peer_port = peer_port;
	ev->msg_len = msg_len;
	__builtin_memcpy(ev->peer, peer, 16);
	ev->captured = len;
	ev->pad = 0;
	ev->pad2 = 0;
	events.ringbuf_submit(ev, 0);
	return 1;
}

int dns_answer(struct __sk_buff *skb)
{
	return dns_copy(skb, DNS_DIR_ANSWER);
}

int dns_query(struct __sk_buff *skb)
{
	return dns_copy(skb, DNS_DIR_QUERY);
}
