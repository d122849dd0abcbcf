/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: the canonical key of a flow, and marking it closing. */
#ifndef PAL_CONNTRACK_H
#define PAL_CONNTRACK_H

#include "maps.h"
#include "parse.h"

/* Canonical conntrack key; *swapped is 1 when the packet's source is end b. */
static __always_inline void pal_ct_key_for(struct pal_ct_key *k, const struct pal_flow *f, __u32 ep, __u8 *swapped)
{
	__u64 s0, s1, d0, d1;
	__builtin_memcpy(&s0, f->saddr, 8);
	__builtin_memcpy(&s1, f->saddr + 8, 8);
	__builtin_memcpy(&d0, f->daddr, 8);
	__builtin_memcpy(&d1, f->daddr + 8, 8);
	int src_first = s0 < d0 || (s0 == d0 && (s1 < d1 || (s1 == d1 && f->ct_sport <= f->ct_dport)));
	if (src_first) {
		__builtin_memcpy(k->addr_a, f->saddr, 16);
		__builtin_memcpy(k->addr_b, f->daddr, 16);
		k->port_a = f->ct_sport;
		k->port_b = f->ct_dport;
	} else {
		__builtin_memcpy(k->addr_a, f->daddr, 16);
		__builtin_memcpy(k->addr_b, f->saddr, 16);
		k->port_a = f->ct_dport;
		k->port_b = f->ct_sport;
	}
	k->protocol = f->protocol;
	k->endpoint_id = ep;
	*swapped = !src_first;
}

/* A FIN or RST marks the flow closing; the agent's garbage collection drops
 * closing flows 10 s after their last packet. (Deleting on RST here cost
 * ~20% of the program's run time on connection churn, measured with
 * kernel.bpf_stats_enabled; a reused tuple of a closed, allowed flow is
 * still allowed by the same policy, and applies sweep what they revoke.) */
static __always_inline void pal_ct_track_close(struct pal_ct_value *ct, const struct pal_flow *f, const struct pal_ct_key *key)
{
	if (f->protocol != IPPROTO_TCP)
		return;
	if ((f->tcp_flags & 0x05) && !(ct->flags & PAL_CT_CLOSING)) /* RST or FIN */
		ct->flags |= PAL_CT_CLOSING;
}

#endif
