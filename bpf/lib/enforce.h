/* SPDX-License-Identifier: GPL-2.0 */
/* The verdict for one packet at one endpoint: conntrack first, then the
 * peer's identity (ipcache), then the policy of the active generation. */
#ifndef PAL_ENFORCE_H
#define PAL_ENFORCE_H

#include "maps.h"
#include "parse.h"

#define PAL_NS_PER_SEC 1000000000ULL

struct pal_decision {
	__u8 pass;
	__u8 reason;
	__u32 peer_identity;
	__u32 rule_id;
};

static __always_inline void pal_count(__u8 dir, __u8 reason, __u32 len)
{
	__u32 idx = PAL_COUNTER_INDEX(dir, reason);
	struct pal_counter *c = bpf_map_lookup_elem(&pal_counters, &idx);
	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

static __always_inline struct pal_ipcache_value pal_ipcache_lookup(__u8 slot, const __u8 addr[16])
{
	struct pal_ipcache_key key = { .prefixlen = PAL_IPCACHE_BITS_GENERATION + 128, .generation = slot };
	__builtin_memcpy(key.addr, addr, 16);
	struct pal_ipcache_value *v = bpf_map_lookup_elem(&pal_ipcache, &key);
	struct pal_ipcache_value out = { .identity = PAL_ID_WORLD, .cidr_identity = 0, .flags = 0, .peer_class = PAL_ID_WORLD };
	if (v)
		out = *v;
	return out;
}

/* The peer class of an identity known without its address (a tunnelled
 * connection's source): reserved identities are their own class. */
static __always_inline __u32 pal_peer_class_of(__u8 slot, __u32 identity)
{
	if (identity < PAL_ID_FIRST_WORKLOAD || identity >= PAL_ID_FIRST_CIDR)
		return identity;
	struct pal_peer_class_key k = { .identity = identity, .generation = slot };
	__u32 *c = bpf_map_lookup_elem(&pal_peer_class, &k);
	return c ? *c : PAL_CLASS_NONE;
}

/* Ring buffer event, limited per CPU by a token bucket so that a flood of
 * denied packets cannot starve the agent or the ring. */
static __always_inline void pal_emit_event(const struct pal_flow *f, __u8 dir, const struct pal_decision *d,
					   __u32 local_id, __u32 ifindex, __u64 cgroup_id, __u64 now)
{
	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	struct pal_event_bucket *b = bpf_map_lookup_elem(&pal_event_bucket, &zero);
	if (!cfg || !b || cfg->events_per_second == 0)
		return;
	__u64 rate = cfg->events_per_second;
	__u64 elapsed = now - b->last_refill_ns;
	if (elapsed >= PAL_NS_PER_SEC / rate) {
		__u64 add = elapsed * rate / PAL_NS_PER_SEC;
		b->tokens = b->tokens + add > rate ? rate : b->tokens + add;
		b->last_refill_ns = now;
	}
	if (b->tokens == 0) {
		b->suppressed += 1;
		return;
	}
	b->tokens -= 1;
	struct pal_flow_event *e = bpf_ringbuf_reserve(&pal_events, sizeof(*e), 0);
	if (!e) {
		b->lost += 1;
		return;
	}
	e->timestamp_ns = now;
	__builtin_memcpy(e->saddr, f->saddr, 16);
	__builtin_memcpy(e->daddr, f->daddr, 16);
	e->sport = bpf_ntohs(f->sport);
	e->dport = bpf_ntohs(f->dport);
	e->protocol = f->protocol;
	e->direction = dir;
	e->reason = d->reason;
	e->family = f->family;
	e->local_identity = local_id;
	e->peer_identity = d->peer_identity;
	e->rule_id = d->rule_id;
	e->ifindex = ifindex;
	e->cgroup_id = cgroup_id;
	bpf_ringbuf_submit(e, 0);
}

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

/* The policy of the active generation for a new flow: fills d (verdict
 * reason, rule) and returns the defaults entry (0: endpoint not selected in
 * that direction). At most three policy lookups, whatever the size of the
 * cluster: the peer's class (the selectors it matches), its CIDR identity,
 * and any peer. Bumps the winning entry's hit counters. Shared by the packet
 * programs and the connect hooks. */
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
	/* The strongest verdict wins; on a tie, the more specific peer. */
	struct pal_policy_value *win = exact;
	if (cidr && (!win || pal_rank(cidr->verdict) > pal_rank(win->verdict)))
		win = cidr;
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

/* A workload on this node (not a remote one, not a reserved or CIDR identity). */
static __always_inline int pal_is_local_workload(struct pal_ipcache_value v)
{
	return v.identity >= PAL_ID_FIRST_WORKLOAD && v.identity < PAL_ID_FIRST_CIDR &&
	       !(v.flags & PAL_IPCACHE_REMOTE_WORKLOAD);
}

/* Returns 1 to pass, 0 to drop. */
static __always_inline int pal_enforce(struct __sk_buff *skb, const struct pal_endpoint *ep,
				       __u8 dir, struct pal_flow *f, __u32 ifindex, __u64 cgroup_id)
{
	__u32 len = skb->len;
	/* Coarse clock: a tick-resolution read without touching the TSC; flow
	 * timestamps and the event bucket need no better. */
	__u64 now = bpf_ktime_get_coarse_ns();
	struct pal_decision d = { .pass = 1, .reason = PAL_REASON_ALLOW_POLICY, .peer_identity = 0, .rule_id = 0 };
	__u32 local_id = ep->identity;

	if (f->always_allow) {
		pal_count(dir, PAL_REASON_ALLOW_UNENFORCED, len);
		return 1;
	}

	/* Conntrack: one lookup finds the flow whichever end sent this packet. */
	struct pal_ct_key ck = {};
	__u8 swapped = 0;
	pal_ct_key_for(&ck, f, ep->endpoint_id, &swapped);
	struct pal_ct_value *ct = f->fragment ? 0 : bpf_map_lookup_elem(&pal_conntrack, &ck);
	if (ct && (ct->flags & PAL_CT_REVOKED)) {
		/* SYN without ACK: a new connection, judged below (its entry
		 * replaces the tombstone). Anything else belongs to the revoked flow. */
		if (f->protocol == IPPROTO_TCP && (f->tcp_flags & 0x12) == 0x02) {
			ct = 0;
		} else {
			d.pass = 0;
			d.reason = PAL_REASON_DENY_REVOKED;
			d.peer_identity = ct->peer_identity;
			d.rule_id = ct->rule_id;
			pal_count(dir, d.reason, len);
			pal_emit_event(f, dir, &d, local_id, ifindex, cgroup_id, now);
			return 0;
		}
	}
	if (ct) {
		int reply = ct->initiator_is_b != swapped;
		/* Write the shared entry only when something changes, and keep the
		 * per-flow counters plain (approximate under concurrency, as
		 * exact ones would need two locked instructions per packet). */
		if (now - ct->last_seen_ns > PAL_NS_PER_SEC)
			ct->last_seen_ns = now;
		if (reply && !(ct->flags & PAL_CT_SEEN_REPLY))
			ct->flags |= PAL_CT_SEEN_REPLY;
		ct->packets += 1;
		ct->bytes += len;
		pal_ct_track_close(ct, f, &ck);
		pal_count(dir, reply ? PAL_REASON_ALLOW_REPLY : PAL_REASON_ALLOW_ESTABLISHED, len);
		return 1;
	}

	__u32 zero = 0;
	struct pal_config *cfg = bpf_map_lookup_elem(&pal_config, &zero);
	__u8 slot = cfg ? (cfg->active_slot & 1) : 0;

	/* Anti-spoofing, on the first packet of a flow (later packets must match
	 * the flow's entry, which is scoped to this endpoint): what a pod sends
	 * must come from one of its own addresses. */
	if ((ep->flags & PAL_EP_VERIFY_SOURCE) && dir == PAL_DIR_EGRESS &&
	    pal_ipcache_lookup(slot, f->saddr).identity != local_id) {
		d.pass = 0;
		d.reason = PAL_REASON_DENY_SPOOFED;
		pal_count(dir, d.reason, len);
		pal_emit_event(f, dir, &d, local_id, ifindex, cgroup_id, now);
		return 0;
	}

	struct pal_defaults_value *def = 0;
	struct pal_redirect_origin *redirect = 0;
	if (dir == PAL_DIR_EGRESS && f->protocol == IPPROTO_TCP && !f->fragment) {
		/* A connection the connect hook redirected to the agent: it was
		 * judged there against its original destination. Only the hook
		 * (through sockops) writes this map, so a workload cannot fake it. */
		struct pal_redirect_key rk = { .client_port = f->sport, .agent_port = f->dport };
		__builtin_memcpy(rk.client_addr, f->saddr, 16);
		__builtin_memcpy(rk.agent_addr, f->daddr, 16);
		redirect = bpf_map_lookup_elem(&pal_redir_flow, &rk);
	}
	if (redirect) {
		d.reason = PAL_REASON_ALLOW_REDIRECT;
		d.peer_identity = redirect->peer_identity;
		d.rule_id = redirect->rule_id;
	} else if (f->fragment) {
		struct pal_defaults_key dk = { .generation = slot, .direction = dir, .local_identity = local_id };
		if (bpf_map_lookup_elem(&pal_defaults, &dk)) {
			d.pass = 0;
			d.reason = PAL_REASON_DENY_FRAGMENT;
		} else {
			d.reason = PAL_REASON_ALLOW_UNENFORCED;
		}
	} else {
		/* A new flow: who the peer is and what the active generation says.
		 * A connection the agent delivers from the tunnel carries the
		 * authenticated source identity in its mark (see PAL_MARK_MAGIC). */
		struct pal_ipcache_value peer;
		int tunnelled = dir == PAL_DIR_INGRESS && (skb->mark & PAL_MARK_MASK) == PAL_MARK_MAGIC;
		if (tunnelled) {
			peer.identity = skb->mark & PAL_MARK_IDENTITY;
			peer.cidr_identity = 0;
			peer.flags = 0;
			peer.peer_class = pal_peer_class_of(slot, peer.identity);
		} else {
			peer = pal_ipcache_lookup(slot, dir == PAL_DIR_INGRESS ? f->saddr : f->daddr);
		}
		def = pal_policy_decide(slot, dir, local_id, peer, f->protocol, f->dport, len, &d);
		if (dir == PAL_DIR_INGRESS && !tunnelled && !pal_is_local_workload(peer) && d.pass) {
			if (ep->flags & PAL_EP_MTLS_STRICT) {
				d.pass = 0;
				d.reason = PAL_REASON_DENY_PLAINTEXT;
			} else if ((ep->flags & PAL_EP_MTLS_PERMISSIVE) && d.reason != PAL_REASON_AUDIT_WOULD_DENY) {
				d.reason = PAL_REASON_ALLOW_PLAINTEXT;
			}
		}
		/* HTTP rules are enforced by the agent's proxy: a new connection
		 * to such a port that did not come from the agent bypasses them. */
		if (dir == PAL_DIR_INGRESS && !tunnelled && d.pass && f->protocol == IPPROTO_TCP &&
		    pal_has_l7_rules(local_id, f->dport)) {
			d.pass = 0;
			d.reason = PAL_REASON_DENY_L7_BYPASS;
		}
	}

	if (d.pass && !f->fragment) {
		struct pal_ct_value nv = {
			.created_ns = now,
			.last_seen_ns = now,
			.packets = 1,
			.bytes = len,
			.local_identity = local_id,
			.peer_identity = d.peer_identity,
			.rule_id = d.rule_id,
			.flags = d.reason == PAL_REASON_AUDIT_WOULD_DENY ? PAL_CT_AUDIT : 0,
			.direction = dir,
			.initiator_is_b = swapped,
		};
		if (bpf_map_update_elem(&pal_conntrack, &ck, &nv, BPF_ANY) < 0 && (def || redirect)) {
			/* Without an entry the reply would be judged as new: fail closed. */
			d.pass = 0;
			d.reason = PAL_REASON_DENY_CT_FULL;
		}
	}

	pal_count(dir, d.reason, len);
	if (!d.pass || d.reason == PAL_REASON_AUDIT_WOULD_DENY ||
	    (cfg && (cfg->event_flags & PAL_EVENTS_ALLOWED)))
		pal_emit_event(f, dir, &d, local_id, ifindex, cgroup_id, now);
	return d.pass;
}

/* Parse the IP packet at l3_offset and judge it: 1 to pass, 0 to drop.
 * Non-IP packets pass; malformed IP packets are dropped. */
static __always_inline int pal_judge(struct __sk_buff *skb, const struct pal_endpoint *ep, __u8 dir,
				     __u32 l3_offset, __u32 ifindex, __u64 cgroup_id)
{
	struct pal_flow f = {};
	int r = pal_parse_direct(skb, l3_offset, &f);
	if (r == PAL_PARSE_SLOW) {
		__builtin_memset(&f, 0, sizeof(f));
		r = pal_parse(skb, l3_offset, &f);
	}
	if (r == PAL_PARSE_NOT_IP)
		return 1;
	if (r != PAL_PARSE_OK) {
		pal_count(dir, PAL_REASON_DENY_MALFORMED, skb->len);
		return 0;
	}
	return pal_enforce(skb, ep, dir, &f, ifindex, cgroup_id);
}

#endif
