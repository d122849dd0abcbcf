/* SPDX-License-Identifier: GPL-2.0 */
/* cgroup_skb programs for workloads that are cgroups sharing the host's
 * network. The endpoint is the deepest enrolled cgroup containing the
 * socket's cgroup. */
#include <linux/bpf.h>
#include "lib/enforce.h"
#include "lib/cgroup.h"

static __always_inline struct pal_endpoint *pal_cgroup_endpoint(struct __sk_buff *skb, __u64 *id)
{
#define PAL_SKB_ANCESTOR(level) bpf_skb_ancestor_cgroup_id(skb, level)
	return PAL_DEEPEST_ENROLLED(pal_ep_cgroup, bpf_skb_cgroup_id(skb), PAL_SKB_ANCESTOR, id);
#undef PAL_SKB_ANCESTOR
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
