/* SPDX-License-Identifier: GPL-2.0 */
/* Header parsing into a flow tuple. Uses bpf_skb_load_bytes so the same code
 * serves tc (offset after the Ethernet header) and cgroup_skb (offset 0). */
#ifndef PAL_PARSE_H
#define PAL_PARSE_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* linux/icmp.h drags in glibc headers; the echo layout is all we need. */
struct pal_icmp_echo {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 sequence;
};
#define PAL_ICMP_ECHOREPLY 0
#define PAL_ICMP_ECHO 8
#define PAL_ICMPV6_ECHO_REQUEST 128
#define PAL_ICMPV6_ECHO_REPLY 129

enum pal_parse_result {
	PAL_PARSE_OK = 0,
	PAL_PARSE_NOT_IP = 1,     /* not our business (ARP, ...) */
	PAL_PARSE_MALFORMED = 2,
	PAL_PARSE_SLOW = 3,       /* direct access not possible: use pal_parse */
};

struct pal_flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;          /* network byte order; ICMP echo: the identifier */
	__u16 dport;          /* network byte order; ICMP: 0 for policy */
	__u16 ct_sport;       /* ports used for conntrack (ICMP echo id) */
	__u16 ct_dport;
	__u8 protocol;
	__u8 family;          /* 4 or 6 */
	__u8 tcp_flags;
	__u8 fragment;        /* 1 if a non-first fragment: no L4 header */
	__u8 always_allow;    /* IPv6 neighbour discovery */
};

static __always_inline void pal_v4_mapped(__u8 out[16], __u32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(&out[12], &addr, 4);
}

static __always_inline int pal_parse_l4(struct __sk_buff *skb, __u32 off, struct pal_flow *f)
{
	if (f->fragment)
		return PAL_PARSE_OK;
	switch (f->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr th;
		if (bpf_skb_load_bytes(skb, off, &th, sizeof(th)) < 0)
			return PAL_PARSE_MALFORMED;
		f->sport = th.source;
		f->dport = th.dest;
		f->tcp_flags = ((__u8 *)&th)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr uh;
		if (bpf_skb_load_bytes(skb, off, &uh, sizeof(uh)) < 0)
			return PAL_PARSE_MALFORMED;
		f->sport = uh.source;
		f->dport = uh.dest;
		break;
	}
	case IPPROTO_ICMP: {
		struct pal_icmp_echo ih;
		if (bpf_skb_load_bytes(skb, off, &ih, sizeof(ih)) < 0)
			return PAL_PARSE_MALFORMED;
		if (ih.type == PAL_ICMP_ECHO || ih.type == PAL_ICMP_ECHOREPLY) {
			f->ct_sport = ih.id;
			f->ct_dport = ih.id;
		}
		return PAL_PARSE_OK;
	}
	case IPPROTO_ICMPV6: {
		struct pal_icmp_echo ih;
		if (bpf_skb_load_bytes(skb, off, &ih, sizeof(ih)) < 0)
			return PAL_PARSE_MALFORMED;
		if (ih.type == PAL_ICMPV6_ECHO_REQUEST || ih.type == PAL_ICMPV6_ECHO_REPLY) {
			f->ct_sport = ih.id;
			f->ct_dport = ih.id;
		}
		/* Link control that IPv6 cannot work without: multicast listener
		 * query/report (130-132, 143), router and neighbour discovery and
		 * redirect (133-137). */
		if ((ih.type >= 130 && ih.type <= 137) || ih.type == 143)
			f->always_allow = 1;
		return PAL_PARSE_OK;
	}
	default:
		return PAL_PARSE_OK;
	}
	f->ct_sport = f->sport;
	f->ct_dport = f->dport;
	return PAL_PARSE_OK;
}

/* Parse an IP packet whose IP header starts at off; version read from it. */
static __always_inline int pal_parse(struct __sk_buff *skb, __u32 off, struct pal_flow *f)
{
	__u8 first;
	if (bpf_skb_load_bytes(skb, off, &first, 1) < 0)
		return PAL_PARSE_MALFORMED;
	if ((first >> 4) == 4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return PAL_PARSE_MALFORMED;
		__u32 ihl = ip.ihl * 4;
		if (ihl < sizeof(ip))
			return PAL_PARSE_MALFORMED;
		f->family = 4;
		f->protocol = ip.protocol;
		pal_v4_mapped(f->saddr, ip.saddr);
		pal_v4_mapped(f->daddr, ip.daddr);
		if (bpf_ntohs(ip.frag_off) & 0x1fff)
			f->fragment = 1;
		return pal_parse_l4(skb, off + ihl, f);
	}
	if ((first >> 4) == 6) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return PAL_PARSE_MALFORMED;
		f->family = 6;
		f->protocol = ip6.nexthdr;
		__builtin_memcpy(f->saddr, &ip6.saddr, 16);
		__builtin_memcpy(f->daddr, &ip6.daddr, 16);
		__u32 l4 = off + sizeof(ip6);
		/* Walk a bounded number of extension headers. */
#pragma unroll
		for (int i = 0; i < 4; i++) {
			__u8 nh = f->protocol;
			if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS) {
				__u8 ext[2];
				if (bpf_skb_load_bytes(skb, l4, ext, 2) < 0)
					return PAL_PARSE_MALFORMED;
				f->protocol = ext[0];
				l4 += (ext[1] + 1) * 8;
			} else if (nh == IPPROTO_FRAGMENT) {
				__u8 frag[4];
				if (bpf_skb_load_bytes(skb, l4, frag, 4) < 0)
					return PAL_PARSE_MALFORMED;
				f->protocol = frag[0];
				if (((frag[2] << 8) | frag[3]) & 0xfff8)
					f->fragment = 1;
				l4 += 8;
			} else {
				break;
			}
		}
		return pal_parse_l4(skb, l4, f);
	}
	return PAL_PARSE_NOT_IP;
}

/* Fast path: reads headers in place (no helper calls) for the common
 * packets: IPv4 with any options, IPv6 without extension headers, TCP, UDP,
 * ICMP echo. Anything else, or headers not in the linear part, returns
 * PAL_PARSE_SLOW and the caller falls back to pal_parse. */
static __always_inline int pal_parse_direct(struct __sk_buff *skb, __u32 off, struct pal_flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	void *l3 = data + off;
	void *l4;
	if (l3 + 1 > data_end)
		return PAL_PARSE_SLOW;
	__u8 version = (*(__u8 *)l3) >> 4;
	if (version == 4) {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > data_end)
			return PAL_PARSE_SLOW;
		__u32 ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return PAL_PARSE_MALFORMED;
		if (bpf_ntohs(ip->frag_off) & 0x1fff)
			return PAL_PARSE_SLOW;
		f->family = 4;
		f->protocol = ip->protocol;
		pal_v4_mapped(f->saddr, ip->saddr);
		pal_v4_mapped(f->daddr, ip->daddr);
		l4 = l3 + ihl;
	} else if (version == 6) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return PAL_PARSE_SLOW;
		__u8 nh = ip6->nexthdr;
		if (nh != IPPROTO_TCP && nh != IPPROTO_UDP)
			return PAL_PARSE_SLOW;
		f->family = 6;
		f->protocol = nh;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		l4 = (void *)(ip6 + 1);
	} else {
		return PAL_PARSE_SLOW;
	}
	if (f->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return PAL_PARSE_SLOW;
		f->sport = th->source;
		f->dport = th->dest;
		f->tcp_flags = ((__u8 *)th)[13];
	} else if (f->protocol == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return PAL_PARSE_SLOW;
		f->sport = uh->source;
		f->dport = uh->dest;
	} else {
		return PAL_PARSE_SLOW;
	}
	f->ct_sport = f->sport;
	f->ct_dport = f->dport;
	return PAL_PARSE_OK;
}

#endif
