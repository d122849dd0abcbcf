import CLibbpf
import CPalisadeShared
import Foundation
import PalisadeBPF
import PalisadeIdentity
import PalisadePolicy

public struct DatapathError: Error, CustomStringConvertible {
    public var message: String
    public init(_ m: String) { message = m }
    public var description: String { message }
}

/// Where the compiled eBPF objects are: beside the binary (SwiftPM resource
/// bundle), or a directory named by PALISADE_BPF_DIR.
public enum BPFObjects {
    public static func path(of name: String) throws -> String {
        if let dir = ProcessInfo.processInfo.environment["PALISADE_BPF_DIR"] {
            return "\(dir)/\(name).bpfobj"
        }
        guard let url = Bundle.module.url(forResource: name, withExtension: "bpfobj") else {
            throw DatapathError("eBPF object \(name).bpfobj is not in the resource bundle; rebuild with swift build or set PALISADE_BPF_DIR")
        }
        return url.path
    }
}

/// The kernel side of Palisade on this node: loaded programs, pinned maps,
/// attachments, and the double-buffered policy state.
public final class Datapath {
    public let pinRoot: String
    public let maps: PalisadeMaps
    let tcObject: BPFObject
    let cgroupObject: BPFObject
    public let fromPod: BPFProgram
    public let toPod: BPFProgram
    public let cgroupIngress: BPFProgram
    public let cgroupEgress: BPFProgram
    let sockObject: BPFObject
    public let connect4: BPFProgram
    public let connect6: BPFProgram
    public let sockops: BPFProgram
    public let skMsg: BPFProgram
    public let sendmsg4: BPFProgram
    public let sendmsg6: BPFProgram
    public let recvmsg4: BPFProgram
    public let recvmsg6: BPFProgram
    public let dnsFile: BPFProgram
    /// Held by an apply and by writes of learned addresses into the active
    /// generation, so that neither undoes the other.
    let generationLock = NSRecursiveLock()

    /// Loads the programs, reusing maps already pinned under pinRoot (so a
    /// restarted agent adopts the state that kept enforcing while it was down).
    public init(pinRoot: String) throws {
        guard Reason.coversKernelReasons else { throw BPFError("name", "enum pal_reason (Reason and palisade_shared.h disagree)", errno: EINVAL) }
        self.pinRoot = pinRoot
        try BPFFS.ensure(directory: pinRoot)
        try FileManager.default.createDirectory(atPath: "\(pinRoot)/links", withIntermediateDirectories: true)
        tcObject = try BPFObject(path: try BPFObjects.path(of: "tc"), pinRoot: pinRoot)
        try tcObject.load()
        cgroupObject = try BPFObject(path: try BPFObjects.path(of: "cgroup_skb"), pinRoot: pinRoot)
        try cgroupObject.load()
        maps = try PalisadeMaps.from(tcObject)
        fromPod = try tcObject.program(named: "pal_from_pod")
        toPod = try tcObject.program(named: "pal_to_pod")
        cgroupIngress = try cgroupObject.program(named: "pal_cg_ingress")
        cgroupEgress = try cgroupObject.program(named: "pal_cg_egress")
        sockObject = try BPFObject(path: try BPFObjects.path(of: "sock"), pinRoot: pinRoot)
        try sockObject.load()
        connect4 = try sockObject.program(named: "pal_connect4")
        connect6 = try sockObject.program(named: "pal_connect6")
        sockops = try sockObject.program(named: "pal_sockops")
        skMsg = try sockObject.program(named: "pal_sk_msg")
        sendmsg4 = try sockObject.program(named: "pal_sendmsg4")
        sendmsg6 = try sockObject.program(named: "pal_sendmsg6")
        recvmsg4 = try sockObject.program(named: "pal_recvmsg4")
        recvmsg6 = try sockObject.program(named: "pal_recvmsg6")
        dnsFile = try sockObject.program(named: "pal_dns_file")
        // The sk_msg verdict program belongs to the pinned sockhash (it is
        // replaced, not stacked, when a restarted agent attaches again).
        if bpf_prog_attach(skMsg.fd, maps.fastPath.map.fd, BPF_SK_MSG_VERDICT, 0) != 0 {
            throw DatapathError("attach pal_sk_msg to pal_sock_fast: \(String(cString: strerror(errno)))")
        }
    }

    /// Mutual TLS mode of an endpoint, enforced on new inbound flows.
    public enum MTLSMode: String, Sendable, CaseIterable, Codable {
        /// Plaintext from outside the mesh is dropped in the kernel.
        case strict
        /// Plaintext from outside the mesh is admitted and counted.
        case permissive
        /// No redirection, no check.
        case disabled

        var endpointFlags: UInt32 {
            switch self {
            case .strict: UInt32(PAL_EP_MTLS_STRICT)
            case .permissive: UInt32(PAL_EP_MTLS_PERMISSIVE)
            case .disabled: 0
            }
        }
    }

    // MARK: Endpoints

    /// Enrolls a pod-like workload: its endpoint entry first, then the tc
    /// programs on the host side of its veth (atomically replacing old ones).
    public func attachPod(interface: String, identity: NumericIdentity, mtls: MTLSMode = .permissive) throws -> Int32 {
        let ifindex = try TC.ifindex(of: interface)
        var ep = pal_endpoint()
        ep.identity = identity.rawValue
        ep.endpoint_id = UInt32(ifindex)
        ep.flags = UInt32(PAL_EP_VERIFY_SOURCE) | mtls.endpointFlags
        try maps.endpointsByIfindex.update(UInt32(ifindex), ep)
        try TC.attach(fromPod, ifindex: ifindex, hook: .ingress)
        try TC.attach(toPod, ifindex: ifindex, hook: .egress)
        return ifindex
    }

    public func detachPod(ifindex: Int32) throws {
        // Filters first: a filter without an endpoint entry fails closed.
        try? TC.detach(ifindex: ifindex, hook: .ingress)
        try? TC.detach(ifindex: ifindex, hook: .egress)
        try maps.endpointsByIfindex.delete(UInt32(ifindex))
    }

    func linkPin(_ cgroupID: UInt64, _ hook: String) -> String { "\(pinRoot)/links/cgroup-\(cgroupID)-\(hook)" }

    /// Enrolls a cgroup workload: endpoint entry, then pinned cgroup links.
    public func attachCgroup(path: String, identity: NumericIdentity, mtls: MTLSMode = .permissive) throws -> UInt64 {
        let id = try CgroupAttach.id(ofCgroup: path)
        var ep = pal_endpoint()
        ep.identity = identity.rawValue
        ep.flags = mtls.endpointFlags
        // Unique per endpoint (scopes conntrack); disjoint from ifindexes.
        ep.endpoint_id = PAL_CT_ENDPOINT_CGROUP_BIT | UInt32(truncatingIfNeeded: id & 0x7fff_ffff)
        try maps.endpointsByCgroup.update(id, ep)
        try CgroupAttach.attach(cgroupIngress, cgroupPath: path, linkPin: linkPin(id, "ingress"))
        try CgroupAttach.attach(cgroupEgress, cgroupPath: path, linkPin: linkPin(id, "egress"))
        return id
    }

    public func detachCgroup(id: UInt64) throws {
        try CgroupAttach.detach(linkPin: linkPin(id, "ingress"))
        try CgroupAttach.detach(linkPin: linkPin(id, "egress"))
        try maps.endpointsByCgroup.delete(id)
    }

    /// Where a workload reaches the agent's outbound listener.
    public struct OutboundListener: Sendable {
        public var ipv4: IPAddress
        public var ipv6: IPAddress
        public var port: UInt16
        public init(ipv4: IPAddress, ipv6: IPAddress, port: UInt16) { self.ipv4 = ipv4; self.ipv6 = ipv6; self.port = port }
    }

    /// Redirects the workload's TCP connections to remote workloads to the
    /// agent: its cgroup (every process inside, in whatever network
    /// namespace) gets the connect hooks and sockops, through pinned links.
    public func attachRedirect(cgroupPath: String, identity: NumericIdentity, listener: OutboundListener) throws -> UInt64 {
        let id = try CgroupAttach.id(ofCgroup: cgroupPath)
        var ep = pal_mesh_endpoint()
        ep.identity = identity.rawValue
        let v4 = listener.ipv4.bytes
        ep.agent_addr4 = v4[12..<16].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
        withUnsafeMutableBytes(of: &ep.agent_addr6) { $0.copyBytes(from: listener.ipv6.bytes) }
        ep.agent_port = listener.port.bigEndian
        try maps.meshEndpoints.update(id, ep)
        try CgroupAttach.attach(sockops, cgroupPath: cgroupPath, linkPin: linkPin(id, "sockops"))
        try CgroupAttach.attach(connect4, cgroupPath: cgroupPath, linkPin: linkPin(id, "connect4"))
        try CgroupAttach.attach(connect6, cgroupPath: cgroupPath, linkPin: linkPin(id, "connect6"))
        // DNS to the agent's proxy (idle until the agent sets a DNS port).
        try CgroupAttach.attach(sendmsg4, cgroupPath: cgroupPath, linkPin: linkPin(id, "sendmsg4"))
        try CgroupAttach.attach(sendmsg6, cgroupPath: cgroupPath, linkPin: linkPin(id, "sendmsg6"))
        try CgroupAttach.attach(recvmsg4, cgroupPath: cgroupPath, linkPin: linkPin(id, "recvmsg4"))
        try CgroupAttach.attach(recvmsg6, cgroupPath: cgroupPath, linkPin: linkPin(id, "recvmsg6"))
        try CgroupAttach.attach(dnsFile, cgroupPath: cgroupPath, linkPin: linkPin(id, "dnsfile"))
        return id
    }

    static let redirectHooks = ["connect4", "connect6", "sockops", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6", "dnsfile"]

    public func detachRedirect(cgroupID id: UInt64) throws {
        for hook in Datapath.redirectHooks { try CgroupAttach.detach(linkPin: linkPin(id, hook)) }
        _ = try maps.meshEndpoints.delete(id)
    }

    /// The origin of a connection the agent accepted on its outbound
    /// listener, or nil if the kernel did not redirect it. The entry is
    /// consumed: a tuple is looked up once.
    public func takeRedirect(client: IPAddress, clientPort: UInt16, agent: IPAddress, agentPort: UInt16) -> pal_redirect_origin? {
        var k = pal_redirect_key()
        withUnsafeMutableBytes(of: &k.client_addr) { $0.copyBytes(from: client.bytes) }
        withUnsafeMutableBytes(of: &k.agent_addr) { $0.copyBytes(from: agent.bytes) }
        k.client_port = clientPort.bigEndian
        k.agent_port = agentPort.bigEndian
        guard let o = (try? maps.redirectByFlow.lookup(k)) ?? nil else { return nil }
        _ = try? maps.redirectByFlow.delete(k)
        return o
    }

    // MARK: DNS

    /// Sends enrolled workloads' DNS to the proxy on `port` (the address is
    /// each workload's outbound listener address), for as long as the socket
    /// `udpDescriptor` is open; port 0 turns the redirection off.
    public func setDNSProxy(port: UInt16, udpDescriptor: Int32?) throws {
        if let fd = udpDescriptor { try maps.dnsProxy.update(UInt32(PAL_DNS_PROXY_UDP), UInt64(fd)) }
        var cfg = maps.activeConfig
        cfg.dns_port = port.bigEndian
        try maps.config.update(0, cfg)
    }

    /// Is the DNS proxy's socket in the kernel's map (the agent is there)?
    public var dnsProxyRegistered: Bool {
        (try? maps.dnsProxy.lookup(UInt32(PAL_DNS_PROXY_UDP))) != nil
    }

    /// The origin of a DNS datagram the proxy received (kept: a socket sends
    /// several queries), or of a DNS connection it accepted (consumed).
    public func dnsOrigin(client: IPAddress, clientPort: UInt16, agent: IPAddress, agentPort: UInt16, tcp: Bool) -> pal_redirect_origin? {
        if tcp { return takeRedirect(client: client, clientPort: clientPort, agent: agent, agentPort: agentPort) }
        var k = pal_redirect_key()
        withUnsafeMutableBytes(of: &k.client_addr) { $0.copyBytes(from: client.bytes) }
        withUnsafeMutableBytes(of: &k.agent_addr) { $0.copyBytes(from: agent.bytes) }
        k.client_port = clientPort.bigEndian
        k.agent_port = agentPort.bigEndian
        return (try? maps.dnsByFlow.lookup(k)) ?? nil
    }

    /// Runs `body` with no apply and no learned-address write in between.
    public func exclusively<T>(_ body: () throws -> T) rethrows -> T {
        generationLock.lock()
        defer { generationLock.unlock() }
        return try body()
    }

    /// Writes ipcache entries of learned addresses into the active
    /// generation (an apply rebuilds them from the cache in the next).
    /// `remove`: /128 entries to delete. A full map is an error.
    public func writeLearned(_ entries: [IPCacheEntry], remove: [CIDR]) throws {
        try exclusively {
            let slot = UInt8(maps.activeConfig.active_slot & 1)
            for e in entries { try maps.ipcache.update(e.key(generation: slot), e.value) }
            for c in remove { _ = try maps.ipcache.delete(IPCacheEntry(cidr: c, identity: .world).key(generation: slot)) }
        }
    }

    public func setEvents(perSecond: UInt32, allowedFlows: Bool) throws {
        var cfg = maps.activeConfig
        cfg.events_per_second = perSecond
        cfg.event_flags = allowedFlows ? UInt32(PAL_EVENTS_ALLOWED) : 0
        try maps.config.update(0, cfg)
    }

    // MARK: Policy

    /// Capacity for one generation (the maps hold two during an apply).
    public static let policyCapacity = Int(PAL_MAX_POLICY) / 2
    public static let ipcacheCapacity = Int(PAL_MAX_IPCACHE) / 2
    public static let defaultsCapacity = Int(PAL_MAX_DEFAULTS) / 2
    public static let peerClassCapacity = Int(PAL_MAX_PEER_CLASS) / 2

    public struct ApplyResult: Sendable {
        public var generation: UInt64
        public var policyEntries: Int
        public var ipcacheEntries: Int
        public var defaultEntries: Int
        public var peerClassEntries: Int
        public var conntrackFlushed: Int
        public var seconds: Double
    }

    /// Moves the kernel to a new rule set atomically: the complete new
    /// generation is written to the inactive slot, one write flips the active
    /// slot, then the old slot is cleared. A flow allowed by both rule sets is
    /// never dropped and one denied by both is never admitted. An apply that
    /// would not fit is refused before anything is written.
    /// `lookup`: the same policy as `compiled`, when the caller built it already.
    public func apply(_ compiled: CompiledPolicy, lookup: CompiledLookup? = nil, graceMilliseconds: Int = 20,
                      keepFlowsTo: Set<IPAddress> = []) throws -> ApplyResult {
        generationLock.lock()
        defer { generationLock.unlock() }
        let start = Date()
        for (what, n, cap) in [("policy", compiled.entries.count, Datapath.policyCapacity),
                               ("ipcache", compiled.ipcache.count, Datapath.ipcacheCapacity),
                               ("defaults", compiled.defaults.count, Datapath.defaultsCapacity),
                               ("peer class", compiled.peerClasses.count, Datapath.peerClassCapacity)] where n > cap {
            throw DatapathError("refusing to apply: \(n) \(what) entries exceed the map's capacity of \(cap) per generation; the policy in force is unchanged")
        }
        var cfg = maps.activeConfig
        let active = UInt8(cfg.active_slot & 1)
        let next = active ^ 1

        try clearSlot(next)   // leftovers of an interrupted apply
        do {
            for e in compiled.ipcache { try maps.ipcache.update(e.key(generation: next), e.value) }
            for e in compiled.peerClassEntries { try maps.peerClasses.update(e.key(generation: next), e.peerClass.rawValue) }
            for e in compiled.defaults { try maps.defaults.update(e.key(generation: next), e.value) }
            for e in compiled.entries { try maps.policy.update(e.key(generation: next), e.value) }
        } catch {
            try? clearSlot(next)
            throw DatapathError("apply failed, the policy in force is unchanged: \(error)")
        }

        cfg.active_slot = UInt32(next)
        cfg.generation += 1
        try maps.config.update(0, cfg)
        // Programs that read the old slot just before the flip finish within
        // microseconds (they run under RCU); wait well past that.
        usleep(UInt32(graceMilliseconds * 1000))
        try clearSlot(active)
        // Fast-path sockets bypass the packet programs: after any change of
        // policy they go back to the enforced path (new connections that the
        // new policy admits join the fast path again).
        try clearFastPath()
        let flushed = try flushDeniedConnections(lookup ?? CompiledLookup(compiled), keep: keepFlowsTo)
        return ApplyResult(generation: cfg.generation, policyEntries: compiled.entries.count, ipcacheEntries: compiled.ipcache.count,
                           defaultEntries: compiled.defaults.count, peerClassEntries: compiled.peerClasses.count, conntrackFlushed: flushed, seconds: Date().timeIntervalSince(start))
    }

    /// A local workload's port with HTTP rules; port 0 stands for every port.
    public struct L7Port: Hashable, Sendable {
        public var identity: NumericIdentity
        public var port: UInt16
        public init(identity: NumericIdentity, port: UInt16) { self.identity = identity; self.port = port }
    }

    /// Makes the kernel's set of L7 ports exactly `wanted`: new ones first
    /// (callers are redirected to the proxy and direct flows refused from
    /// then on), stale ones after. More than the map holds is an error, and
    /// nothing is written.
    public func setL7Ports(_ wanted: Set<L7Port>) throws {
        guard wanted.count <= Int(PAL_MAX_L7_PORTS) else {
            throw DatapathError("\(wanted.count) ports with HTTP rules exceed pal_l7_port's capacity of \(PAL_MAX_L7_PORTS)")
        }
        func key(_ p: L7Port) -> pal_l7_port_key {
            var k = pal_l7_port_key()
            k.identity = p.identity.rawValue
            k.port = p.port.bigEndian
            k.protocol = UInt8(IPPROTO_TCP)
            return k
        }
        for p in wanted { try maps.l7Ports.update(key(p), 1) }
        for k in try maps.l7Ports.keys() where !wanted.contains(L7Port(identity: NumericIdentity(k.identity), port: UInt16(bigEndian: k.port))) {
            _ = try maps.l7Ports.delete(k)
        }
    }

    /// Moves every same-node fast-path connection back to the packet path.
    public func clearFastPath() throws {
        for k in try maps.fastPath.keys() { _ = try? maps.fastPath.delete(k) }
    }

    func clearSlot(_ slot: UInt8) throws {
        try maps.policy.delete(try maps.policy.keys().filter { $0.generation == slot })
        try maps.defaults.delete(try maps.defaults.keys().filter { $0.generation == slot })
        try maps.ipcache.delete(try maps.ipcache.keys().filter { $0.generation == slot })
        try maps.peerClasses.delete(try maps.peerClasses.keys().filter { $0.generation == slot })
    }

    /// Removes conntrack entries of flows the policy now in force denies, so
    /// revoking access cuts existing connections instead of waiting them out.
    /// Flows the new policy denies become tombstones (PAL_CT_REVOKED: their
    /// packets are dropped until the entry expires, 10 s after revocation);
    /// tombstones of flows it admits again are removed. Returns how many
    /// flows were revoked.
    /// Flows to addresses in `keep` are left alone: addresses DNS taught
    /// whose TTL ran out (expiry stops new connections, not open ones).
    func flushDeniedConnections(_ lookup: CompiledLookup, keep: Set<IPAddress> = []) throws -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)   // the clock of bpf_ktime_get_coarse_ns()
        let now = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        let revoked = UInt8(PAL_CT_REVOKED)
        var readmitted: [pal_ct_key] = []
        var count = 0
        for (k, v) in try maps.conntrack.entries() {
            let flow = ConntrackFlow(k, v)
            let dir = Direction(kernel: v.direction)
            let peer = dir == .ingress ? flow.initiator : flow.responder
            let f = Flow(local: NumericIdentity(v.local_identity), direction: dir, peerAddress: peer,
                         proto: k.protocol, port: flow.responderPort)
            let denied = lookup.evaluate(f).verdict == .deny && !keep.contains(peer)
            if denied && v.flags & revoked == 0 {
                var t = v
                t.flags |= revoked
                t.last_seen_ns = now
                // (If the flow ended meanwhile, there is nothing to revoke.)
                if (try? maps.conntrack.update(k, t, flags: UInt64(BPF_EXIST))) != nil { count += 1 }
            } else if !denied && v.flags & revoked != 0 {
                readmitted.append(k)
            }
        }
        _ = try maps.conntrack.delete(readmitted)
        return count
    }

    // MARK: Conntrack garbage collection

    /// Idle limits: a closing TCP flow goes after 10 s, an unanswered one
    /// after 60 s, an established one after 6 h; other protocols after 60 s.
    public struct ConntrackTimeouts: Sendable {
        public var tcpEstablished: UInt64 = 6 * 3600 * 1_000_000_000
        public var tcpClosing: UInt64 = 10 * 1_000_000_000
        public var other: UInt64 = 60 * 1_000_000_000
        public init() {}
    }

    /// Removes expired conntrack entries; returns how many were removed and
    /// how many remain.
    @discardableResult
    public func collectConntrackGarbage(timeouts: ConntrackTimeouts = .init()) throws -> (removed: Int, remaining: Int) {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)   // the clock of bpf_ktime_get_coarse_ns()
        let now = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        var expired: [pal_ct_key] = []
        let all = try maps.conntrack.entries()
        for (k, v) in all {
            let idle = now > v.last_seen_ns ? now - v.last_seen_ns : 0
            let limit: UInt64
            if v.flags & UInt8(PAL_CT_REVOKED) != 0 {
                limit = timeouts.tcpClosing   // a tombstone: long enough for both ends to give up
            } else if k.protocol == 6 {
                if v.flags & UInt8(PAL_CT_CLOSING) != 0 { limit = timeouts.tcpClosing }
                else if v.flags & UInt8(PAL_CT_SEEN_REPLY) == 0 { limit = timeouts.other }
                else { limit = timeouts.tcpEstablished }
            } else {
                limit = timeouts.other
            }
            if idle > limit { expired.append(k) }
        }
        let removed = try maps.conntrack.delete(expired)
        return (removed, all.count - removed)
    }

    // MARK: Teardown

    /// Removes every attachment and pin under pinRoot.
    public static func removeAll(pinRoot: String, podIfindexes: [Int32]) {
        for i in podIfindexes {
            try? TC.detach(ifindex: i, hook: .ingress)
            try? TC.detach(ifindex: i, hook: .egress)
        }
        let fm = FileManager.default
        if let links = try? fm.contentsOfDirectory(atPath: "\(pinRoot)/links") {
            for l in links { unlink("\(pinRoot)/links/\(l)") }
        }
        rmdir("\(pinRoot)/links")
        // Every pin in the directory, not only the maps this build names:
        // libbpf pins each map an object declares (pinning by name), so a
        // map a newer or older object added is removed too.
        for m in Set(MapName.allCases.map(\.rawValue)).union((try? fm.contentsOfDirectory(atPath: pinRoot)) ?? []) {
            unlink("\(pinRoot)/\(m)")
        }
        rmdir(pinRoot)
    }
}

/// A conntrack entry read back in initiator/responder terms.
public struct ConntrackFlow {
    public var initiator: IPAddress
    public var initiatorPort: UInt16
    public var responder: IPAddress
    public var responderPort: UInt16

    public init(_ k: pal_ct_key, _ v: pal_ct_value) {
        let a = IPAddress(tuple: k.addr_a), b = IPAddress(tuple: k.addr_b)
        let pa = UInt16(bigEndian: k.port_a), pb = UInt16(bigEndian: k.port_b)
        if v.initiator_is_b != 0 {
            (initiator, initiatorPort, responder, responderPort) = (b, pb, a, pa)
        } else {
            (initiator, initiatorPort, responder, responderPort) = (a, pa, b, pb)
        }
    }
}
