/* SPDX-License-Identifier: GPL-2.0 */
/* The policy of the active generation: one entry's lookup, the rank that combines lookups, and the decision for a new flow. */
#ifndef PAL_POLICY_H
#define PAL_POLICY_H

#include "maps.h"
#include "verdict.h"
#include "identity.h"

static __always_inline struct pal_policy_value *
pal_policy_lookup(__u8 slot, __u8 dir, __u32 local_id, __u32 peer_class, __u8 proto, __u16 dport)
{
	struct pal_policy_key key = {
		.prefixlen = PAL_POLICY_BITS_FULL,
		.generation = slot,
		.direction = dir,
		.local_identity = bpf_htonl(local_id),
		.peer_class = bpf_htonl(peer_class),
		.protocol = proto,
		.dport = dport,
	};
	return bpf_map_lookup_elem(&pal_policy, &key);
}

/* Combine two lookups: deny beats audit (would deny) beats allow. */
static __always_inline __u8 pal_rank(__u8 verdict)
{
	switch (verdict) {
	case PAL_VERDICT_DENY: return 3;
	case PAL_VERDICT_AUDIT: return 2;
	case PAL_VERDICT_ALLOW: return 1;
	default: return 0;
	}
}

/* The policy of the active generation for a new flow: fills d (verdict
 * reason, rule) and returns the defaults entry (0: endpoint not selected in
 * that direction). At most four policy lookups, whatever the size of the
 * cluster: the peer's class (the selectors it matches), its CIDR identity,
 * its FQDN class (the toFQDNs selectors whose names DNS answered with it)
 * and any peer. Bumps the winning entry's hit counters. Shared by the
 * packet programs and the connect hooks. */
static __always_inline struct pal_defaults_value *
pal_policy_decide(__u8 slot, __u8 dir, __u32 local_id, struct pal_ipcache_value peer, __u8 proto,
		  __u16 dport, __u32 len, struct pal_decision *d)
{
	d->peer_identity = peer.identity;
	struct pal_defaults_key dk = { .generation = slot, .direction = dir, .local_identity = local_id };
	struct pal_defaults_value *def = bpf_map_lookup_elem(&pal_defaults, &dk);
	if (!def) {
		d->pass = 1;
		d->reason = PAL_REASON_ALLOW_UNENFORCED;
		return 0;
	}
	dport = (proto == IPPROTO_TCP || proto == IPPROTO_UDP) ? dport : 0;
	struct pal_policy_value *exact = (peer.peer_class != PAL_CLASS_NONE && (def->lookups & PAL_LOOKUP_PEER)) ?
		pal_policy_lookup(slot, dir, local_id, peer.peer_class, proto, dport) : 0;
	struct pal_policy_value *cidr = (peer.cidr_identity && (def->lookups & PAL_LOOKUP_CIDR)) ?
		pal_policy_lookup(slot, dir, local_id, peer.cidr_identity, proto, dport) : 0;
	struct pal_policy_value *any = (def->lookups & PAL_LOOKUP_ANY) ?
		pal_policy_lookup(slot, dir, local_id, PAL_ID_ANY, proto, dport) : 0;
	struct pal_policy_value *fqdn = (peer.fqdn_class && (def->lookups & PAL_LOOKUP_FQDN)) ?
		pal_policy_lookup(slot, dir, local_id, peer.fqdn_class, proto, dport) : 0;
	/* The strongest verdict wins; on a tie, the more specific peer. */
	struct pal_policy_value *win = exact;
	if (cidr && (!win || pal_rank(cidr->verdict) > pal_rank(win->verdict)))
		win = cidr;
	if (fqdn && (!win || pal_rank(fqdn->verdict) > pal_rank(win->verdict)))
		win = fqdn;
	if (any && (!win || pal_rank(any->verdict) > pal_rank(win->verdict)))
		win = any;
	__u8 verdict = win ? win->verdict : def->verdict;
	d->rule_id = win ? win->rule_id : def->rule_id;
	if (win) {
		__sync_fetch_and_add(&win->packets, 1);
		__sync_fetch_and_add(&win->bytes, len);
	}
	switch (verdict) {
	case PAL_VERDICT_ALLOW:
		d->pass = 1;
		d->reason = PAL_REASON_ALLOW_POLICY;
		break;
	case PAL_VERDICT_AUDIT:
		d->pass = 1;
		d->reason = PAL_REASON_AUDIT_WOULD_DENY;
		break;
	default:
		d->pass = 0;
		d->reason = win ? PAL_REASON_DENY_POLICY : PAL_REASON_DENY_DEFAULT;
		break;
	}
	return def;
}

#endif
