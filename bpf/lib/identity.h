/* SPDX-License-Identifier: GPL-2.0 */
/* A peer's identity: by address (the ipcache), or by identity alone for a tunnelled peer (its peer class). */
#ifndef PAL_IDENTITY_H
#define PAL_IDENTITY_H

#include "maps.h"

static __always_inline struct pal_ipcache_value pal_ipcache_lookup(__u8 slot, const __u8 addr[16])
{
	struct pal_ipcache_key key = { .prefixlen = PAL_IPCACHE_BITS_GENERATION + 128, .generation = slot };
	__builtin_memcpy(key.addr, addr, 16);
	struct pal_ipcache_value *v = bpf_map_lookup_elem(&pal_ipcache, &key);
	struct pal_ipcache_value out = { .identity = PAL_ID_WORLD, .cidr_identity = 0, .flags = 0, .peer_class = PAL_ID_WORLD, .fqdn_class = 0 };
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

/* A workload on this node (not a remote one, not a reserved or CIDR identity). */
static __always_inline int pal_is_local_workload(struct pal_ipcache_value v)
{
	return v.identity >= PAL_ID_FIRST_WORKLOAD && v.identity < PAL_ID_FIRST_CIDR &&
	       !(v.flags & PAL_IPCACHE_REMOTE_WORKLOAD);
}

#endif
