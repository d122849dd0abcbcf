/* SPDX-License-Identifier: GPL-2.0 */
/* cgroup_skb programs for workloads that are cgroups sharing the host's
 * network. The endpoint is the deepest enrolled cgroup containing the
 * socket's cgroup. */
#include <linux/bpf.h>
#include "lib/enforce.h"

#define PAL_MAX_CGROUP_DEPTH 16

static __always_inline struct pal_endpoint *pal_cgroup_endpoint(struct __sk_buff *skb, __u64 *id)
{
	__u64 cg = bpf_skb_cgroup_id(skb);
	struct pal_endpoint *ep = bpf_map_lookup_elem(&pal_ep_cgroup, &cg);
	if (ep) {
		*id = cg;
		return ep;
	}
	for (int level = PAL_MAX_CGROUP_DEPTH; level >= 1; level--) {
		__u64 anc = bpf_skb_ancestor_cgroup_id(skb, level);
		if (anc == 0 || anc == cg)
			continue;
		ep = bpf_map_lookup_elem(&pal_ep_cgroup, &anc);
		if (ep) {
			*id = anc;
			return ep;
		}
	}
	return 0;
}

static __always_inline int pal_cg(struct __sk_buff *skb, __u8 dir)
{
	__u64 cgid = 0;
	struct pal_endpoint *ep = pal_cgroup_endpoint(skb, &cgid);
	if (!ep)
		return 1;
	return pal_judge(skb, ep, dir, 0, 0, cgid);
}

SEC("cgroup_skb/ingress")
int pal_cg_ingress(struct __sk_buff *skb)
{
	return pal_cg(skb, PAL_DIR_INGRESS);
}

SEC("cgroup_skb/egress")
int pal_cg_egress(struct __sk_buff *skb)
{
	return pal_cg(skb, PAL_DIR_EGRESS);
}

char LICENSE[] SEC("license") = "GPL";
