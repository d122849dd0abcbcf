import CPalisadeShared
import PalisadeIdentity
import PalisadePolicy

/// Asks the live kernel maps what the datapath would decide for the first
/// packet of a flow, with the same lookups in the same order as
/// bpf/lib/enforce.h (the tries do the longest-prefix matching themselves).
/// `policy explain` is built on it, so it cannot drift from the kernel.
public struct KernelLookup {
    public let maps: PalisadeMaps
    public init(maps: PalisadeMaps) { self.maps = maps }

    public struct Answer: Sendable {
        public var enforced: Bool
        public var verdict: Verdict
        public var ruleID: UInt32
        public var peerIdentity: UInt32
        public var peerCIDRIdentity: UInt32
        /// The class the peer was looked up with (0: it matches no selector).
        public var peerClass: UInt32
        /// The FQDN class of a learned address (0: none).
        public var peerFQDNClass: UInt32 = 0
        public var generation: UInt64
    }

    public func decide(local: NumericIdentity, direction: Direction, peer: IPAddress, proto: UInt8, port: UInt16) throws -> Answer {
        let cfg = maps.activeConfig
        let slot = UInt8(cfg.active_slot & 1)
        var ik = pal_ipcache_key()
        ik.prefixlen = UInt32(PAL_IPCACHE_BITS_GENERATION) + 128
        ik.generation = slot
        withUnsafeMutableBytes(of: &ik.addr) { for i in 0..<16 { $0[i] = peer.bytes[i] } }
        let ip = try maps.ipcache.lookup(ik)
        let peerID = ip?.identity ?? NumericIdentity.world.rawValue
        let cidrID = ip?.cidr_identity ?? 0
        let peerClass = ip?.peer_class ?? NumericIdentity.world.rawValue
        let fqdnClass = ip?.fqdn_class ?? 0

        var dk = pal_defaults_key()
        dk.generation = slot
        dk.direction = direction.kernel
        dk.local_identity = local.rawValue
        guard let def = try maps.defaults.lookup(dk) else {
            return Answer(enforced: false, verdict: .allow, ruleID: 0, peerIdentity: peerID, peerCIDRIdentity: cidrID, peerClass: peerClass,
                          peerFQDNClass: fqdnClass, generation: cfg.generation)
        }
        let dport: UInt16 = (proto == 6 || proto == 17) ? port : 0
        func look(_ id: UInt32) throws -> pal_policy_value? {
            let e = PolicyEntry(local: local, direction: direction, peer: NumericIdentity(id), proto: proto, port: dport,
                                portBits: 16, verdict: .none, ruleID: 0)
            return try maps.policy.lookup(e.key(generation: slot))
        }
        func rank(_ v: pal_policy_value) -> Int { Verdict(rawValue: v.verdict)?.rank ?? 0 }
        func may(_ bit: UInt32) -> Bool { def.lookups & UInt8(bit) != 0 }
        var win = peerClass != PAL_CLASS_NONE && may(PAL_LOOKUP_PEER) ? try look(peerClass) : nil
        if cidrID != 0, may(PAL_LOOKUP_CIDR), let c = try look(cidrID), win == nil || rank(c) > rank(win!) { win = c }
        if fqdnClass != 0, may(PAL_LOOKUP_FQDN), let c = try look(fqdnClass), win == nil || rank(c) > rank(win!) { win = c }
        if may(PAL_LOOKUP_ANY), let a = try look(0), win == nil || rank(a) > rank(win!) { win = a }
        let verdict = Verdict(rawValue: win?.verdict ?? def.verdict) ?? .deny
        return Answer(enforced: true, verdict: verdict, ruleID: win?.rule_id ?? def.rule_id,
                      peerIdentity: peerID, peerCIDRIdentity: cidrID, peerClass: peerClass, peerFQDNClass: fqdnClass, generation: cfg.generation)
    }
}
