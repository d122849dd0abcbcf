/* SPDX-License-Identifier: GPL-2.0 */
/* tc (clsact) programs on the host side of each pod veth. Packets the pod
 * sends arrive at the host side's ingress (the pod's egress); packets to the
 * pod leave through the host side's egress (the pod's ingress). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include "lib/enforce.h"

static __always_inline int pal_tc(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct pal_endpoint *ep = bpf_map_lookup_elem(&pal_ep_ifindex, &ifindex);
	/* Palisade attaches only to enrolled workloads' veths: no endpoint entry
	 * means state is being torn down or is inconsistent, so fail closed. */
	if (!ep) {
		pal_count(dir, PAL_REASON_DENY_NO_ENDPOINT, skb->len);
		return TC_ACT_SHOT;
	}
	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK;
	return pal_judge(skb, ep, dir, ETH_HLEN, ifindex, 0) ? TC_ACT_OK : TC_ACT_SHOT;
}

SEC("tc")
int pal_from_pod(struct __sk_buff *skb)
{
	return pal_tc(skb, PAL_DIR_EGRESS);
}

SEC("tc")
int pal_to_pod(struct __sk_buff *skb)
{
	return pal_tc(skb, PAL_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
