import CPalisadeShared
import PalisadeIdentity

/// A flow as the policy sees it, from one workload's point of view.
public struct Flow: Hashable, Sendable, CustomStringConvertible {
    public var local: NumericIdentity
    public var direction: Direction
    public var peerAddress: IPAddress
    public var proto: UInt8
    public var port: UInt16        // destination port (TCP/UDP), else 0
    public init(local: NumericIdentity, direction: Direction, peerAddress: IPAddress, proto: UInt8, port: UInt16) {
        self.local = local; self.direction = direction; self.peerAddress = peerAddress; self.proto = proto; self.port = port
    }
    public var description: String { "\(direction) local=\(local) peer=\(peerAddress) proto=\(proto) port=\(port)" }
}

public struct Decision: Hashable, Sendable {
    public var verdict: Verdict          // allow, deny or audit; .none never
    public var ruleID: UInt32            // 0 when not selected by any policy
    public var enforced: Bool            // selected by a policy in this direction
}

/// The straightforward reading of the policy: walk every policy and rule.
/// It is the reference the compiled maps are checked against, and it is what
/// `policy explain` reports (with the rule that decided).
public struct ReferenceEvaluator {
    public let set: PolicySet
    public let universe: Universe
    private let ruleIDs: [String: UInt32]   // "policy/direction/index" -> id, same numbering as the compiler

    public init(set: PolicySet, universe: Universe) {
        self.set = set
        self.universe = universe
        var ids: [String: UInt32] = [:]
        var n: UInt32 = 0
        for p in set.policies {
            for d in Direction.allCases {
                guard let rs = p.rules(d) else { continue }
                n += 1; ids["\(p.name)/\(d)/default"] = n
                for i in rs.indices { n += 1; ids["\(p.name)/\(d)/\(i)"] = n }
            }
        }
        ruleIDs = ids
    }

    /// The compiler's number of a rule ("default": the policy's default
    /// verdict). Numbered above from the same policies, so it is always
    /// there; 0 (no rule) keeps a gap from crashing the evaluator.
    private func ruleID(_ policy: String, _ direction: Direction, _ slot: String) -> UInt32 {
        ruleIDs["\(policy)/\(direction)/\(slot)"] ?? 0
    }

    enum PeerKind { case workload(NumericIdentity, WorkloadIdentity), host, external }

    func peerKind(_ a: IPAddress) -> PeerKind {
        for (id, w) in universe.workloads where w.addresses.contains(a) { return .workload(id, w) }
        if universe.hostAddresses.contains(a) { return .host }
        return .external
    }

    func matches(_ peer: Peer, address: IPAddress, kind: PeerKind) -> Bool {
        switch peer {
        case .entity(.all): return true
        case .entity(.host): if case .host = kind { return true } else { return false }
        case .entity(.world): if case .external = kind { return true } else { return false }
        case .cidr(let c, let except):
            return c.contains(address) && !except.contains { $0.contains(address) }
        case .workloads(let sel): if case .workload(_, let w) = kind { return sel.matches(w) } else { return false }
        case .fqdn(let sel): return universe.learned[address]?.contains { sel.matches($0) } ?? false
        }
    }

    /// Does the rule's port list admit the flow? Named ports resolve on the
    /// local workload for ingress; for egress on the peer workload, and only
    /// through peers that name workloads (an address has no port names).
    func portMatches(_ r: Rule, _ f: Flow, local: WorkloadIdentity, kind: PeerKind) -> Bool {
        if r.ports.isEmpty { return true }
        for p in r.ports {
            if p.name == nil {
                if p.matches(proto: f.proto, port: f.port) { return true }
            } else if f.direction == .ingress {
                if p.matches(proto: f.proto, port: f.port, on: local) { return true }
            } else if case .workload(_, let w) = kind, p.matches(proto: f.proto, port: f.port, on: w) {
                let viaWorkloadPeer = r.peers.isEmpty || r.peers.contains {
                    switch $0 {
                    case .workloads(let sel): return sel.matches(w)
                    case .entity(.all): return true
                    default: return false
                    }
                }
                if viaWorkloadPeer { return true }
            }
        }
        return false
    }

    public func evaluate(_ f: Flow) -> Decision {
        guard let local = universe.workloads[f.local], local.isLocal else { return Decision(verdict: .allow, ruleID: 0, enforced: false) }
        let kind = peerKind(f.peerAddress)
        var enforced = false
        var best: (Verdict, UInt32) = (.none, 0)
        var fallback: (Verdict, UInt32) = (.none, 0)
        for p in set.policies where p.selector.matches(local) {
            guard let rs = p.rules(f.direction) else { continue }
            enforced = true
            let def: Verdict = p.mode == .enforce ? .deny : .audit
            if def.rank > fallback.0.rank { fallback = (def, ruleID(p.name, f.direction, "default")) }
            for (i, r) in rs.enumerated() {
                let peerOK = r.peers.isEmpty || r.peers.contains { matches($0, address: f.peerAddress, kind: kind) }
                let portOK = portMatches(r, f, local: local, kind: kind)
                guard peerOK && portOK else { continue }
                let v: Verdict = r.action == .allow ? .allow : (p.mode == .enforce ? .deny : .audit)
                if v.rank > best.0.rank { best = (v, ruleID(p.name, f.direction, "\(i)")) }
            }
        }
        if !enforced { return Decision(verdict: .allow, ruleID: 0, enforced: false) }
        if best.0 != .none { return Decision(verdict: best.0, ruleID: best.1, enforced: true) }
        return Decision(verdict: fallback.0, ruleID: fallback.1, enforced: true)
    }
}

/// Looks a flow up in compiled entries exactly as the datapath does: ipcache
/// longest prefix for the peer (its class and CIDR identity), then the policy
/// trie for (class), (CIDR) and (any), the stronger verdict winning, then the
/// default. Used by explain, the tunnel's inbound check and tests.
public struct CompiledLookup: Sendable {
    public let compiled: CompiledPolicy
    let entries: [PolicyEntry.Slot: PolicyEntry]
    let defaults: [String: DefaultEntry]
    let ipcache: [CIDR: IPCacheEntry]

    public init(_ c: CompiledPolicy) {
        compiled = c
        entries = Dictionary(c.entries.map { ($0.slot, $0) }, uniquingKeysWith: { a, _ in a })
        defaults = Dictionary(c.defaults.map { ("\($0.local.rawValue)/\($0.direction)", $0) }, uniquingKeysWith: { a, _ in a })
        ipcache = Dictionary(c.ipcache.map { ($0.cidr, $0) }, uniquingKeysWith: { a, _ in a })
    }

    /// (identity, CIDR identity) of an address, as the ipcache trie answers.
    public func identities(of a: IPAddress) -> (NumericIdentity, NumericIdentity?) {
        let e = entry(of: a)
        return (e?.identity ?? .world, e?.cidrIdentity)
    }

    /// The ipcache entry the trie answers an address with (nil: none).
    public func entry(of a: IPAddress) -> IPCacheEntry? {
        for len in stride(from: 128, through: 0, by: -1) {
            if let e = ipcache[CIDR(address: a, mappedPrefixLength: len)] { return e }
        }
        return nil
    }

    /// What to write for an address DNS answered for `names`: nothing (no
    /// toFQDNs selector matches them), its /128 ipcache entry with the FQDN
    /// class, or nil when the set of selectors has no class yet (a new
    /// generation must be compiled).
    public func learnedEntry(_ a: IPAddress, names: Set<String>) -> IPCacheEntry?? {
        let matched = FQDNClasses.matching(compiled.fqdnSelectors, names)
        if matched.isEmpty { return .some(nil) }
        guard let cls = compiled.fqdnClasses[matched] else { return nil }
        let host = CIDR(address: a, mappedPrefixLength: 128)
        var e = entry(of: a) ?? IPCacheEntry(cidr: host, identity: .world)
        if e.cidr != host {
            // Inside a broader entry (a policy CIDR): a /128 of its own that
            // keeps what the broader one said.
            e = IPCacheEntry(cidr: host, identity: e.identity, cidrIdentity: e.cidrIdentity, remote: e.remote, peerClass: e.peerClass)
        }
        e.fqdnClass = cls
        return .some(e)
    }

    /// What the /128 entry of an address DNS no longer vouches for becomes:
    /// the entry it would have without learning (a workload's, the host's,
    /// a policy /32), or nil when it existed only for the learned names.
    public func unlearnedEntry(_ a: IPAddress) -> IPCacheEntry? {
        let host = CIDR(address: a, mappedPrefixLength: 128)
        guard var e = ipcache[host], e.identity != .world || compiled.cidrIdentities[host] != nil else { return nil }
        e.fqdnClass = nil
        return e
    }

    /// The class an identity is looked up with (nil: matches no selector).
    public func peerClass(of identity: NumericIdentity) -> NumericIdentity? { compiled.peerClass(of: identity) }

    func longest(_ local: NumericIdentity, _ d: Direction, _ peer: NumericIdentity, _ proto: UInt8, _ port: UInt16) -> PolicyEntry? {
        for bits in stride(from: 16, through: 0, by: -1) {
            let mask: UInt16 = bits == 0 ? 0 : ~UInt16(0) << (16 - bits)
            if let e = entries[.init(local: local, direction: d, peer: peer, proto: proto, port: port & mask, portBits: bits)] { return e }
        }
        return entries[.init(local: local, direction: d, peer: peer, proto: nil, port: 0, portBits: 0)]
    }

    public func evaluate(_ f: Flow) -> Decision {
        let e = entry(of: f.peerAddress)
        return evaluate(local: f.local, direction: f.direction, peer: e?.identity ?? .world, cidrPeer: e?.cidrIdentity,
                        fqdnClass: e?.fqdnClass, proto: f.proto, port: f.port)
    }

    /// The same lookups for a peer known by identity rather than address
    /// (a tunnelled connection's authenticated source).
    public func evaluate(local: NumericIdentity, direction: Direction, peer: NumericIdentity, cidrPeer: NumericIdentity?,
                         fqdnClass: NumericIdentity? = nil, proto: UInt8, port: UInt16) -> Decision {
        guard let def = defaults["\(local.rawValue)/\(direction)"] else {
            return Decision(verdict: .allow, ruleID: 0, enforced: false)
        }
        let port = (proto == 6 || proto == 17) ? port : 0
        // Same order and tie-break as the datapath: strongest verdict, then the more specific peer.
        func may(_ bit: UInt32) -> Bool { def.lookups & UInt8(bit) != 0 }
        var win = may(PAL_LOOKUP_PEER) ? peerClass(of: peer).flatMap { longest(local, direction, $0, proto, port) } : nil
        for candidate in [may(PAL_LOOKUP_CIDR) ? cidrPeer.flatMap { longest(local, direction, $0, proto, port) } : nil,
                          may(PAL_LOOKUP_FQDN) ? fqdnClass.flatMap { longest(local, direction, $0, proto, port) } : nil,
                          may(PAL_LOOKUP_ANY) ? longest(local, direction, .any, proto, port) : nil] {
            if let c = candidate, win == nil || c.verdict.rank > win!.verdict.rank { win = c }
        }
        if let win { return Decision(verdict: win.verdict, ruleID: win.ruleID, enforced: true) }
        return Decision(verdict: def.verdict, ruleID: def.ruleID, enforced: true)
    }
}
