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

    /// Loads the programs, reusing maps already pinned under pinRoot (so a
    /// restarted agent adopts the state that kept enforcing while it was down).
    public init(pinRoot: String) throws {
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
    }

    // MARK: Endpoints

    /// Enrolls a pod-like workload: its endpoint entry first, then the tc
    /// programs on the host side of its veth (atomically replacing old ones).
    public func attachPod(interface: String, identity: NumericIdentity) throws -> Int32 {
        let ifindex = try TC.ifindex(of: interface)
        var ep = pal_endpoint()
        ep.identity = identity.rawValue
        ep.endpoint_id = identity.rawValue
        ep.flags = UInt32(PAL_EP_VERIFY_SOURCE)
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
    public func attachCgroup(path: String, identity: NumericIdentity) throws -> UInt64 {
        let id = try CgroupAttach.id(ofCgroup: path)
        var ep = pal_endpoint()
        ep.identity = identity.rawValue
        ep.endpoint_id = identity.rawValue
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

    public func setEventRate(perSecond: UInt32) throws {
        var cfg = maps.activeConfig
        cfg.events_per_second = perSecond
        try maps.config.update(0, cfg)
    }

    // MARK: Policy

    /// Capacity for one generation (the maps hold two during an apply).
    public static let policyCapacity = Int(PAL_MAX_POLICY) / 2
    public static let ipcacheCapacity = Int(PAL_MAX_IPCACHE) / 2
    public static let defaultsCapacity = Int(PAL_MAX_DEFAULTS) / 2

    public struct ApplyResult: Sendable {
        public var generation: UInt64
        public var policyEntries: Int
        public var ipcacheEntries: Int
        public var defaultEntries: Int
        public var conntrackFlushed: Int
        public var seconds: Double
    }

    /// Moves the kernel to a new rule set atomically: the complete new
    /// generation is written to the inactive slot, one write flips the active
    /// slot, then the old slot is cleared. A flow allowed by both rule sets is
    /// never dropped and one denied by both is never admitted. An apply that
    /// would not fit is refused before anything is written.
    public func apply(_ compiled: CompiledPolicy, graceMilliseconds: Int = 20) throws -> ApplyResult {
        let start = Date()
        for (what, n, cap) in [("policy", compiled.entries.count, Datapath.policyCapacity),
                               ("ipcache", compiled.ipcache.count, Datapath.ipcacheCapacity),
                               ("defaults", compiled.defaults.count, Datapath.defaultsCapacity)] where n > cap {
            throw DatapathError("refusing to apply: \(n) \(what) entries exceed the map's capacity of \(cap) per generation; the policy in force is unchanged")
        }
        var cfg = maps.activeConfig
        let active = UInt8(cfg.active_slot & 1)
        let next = active ^ 1

        try clearSlot(next)   // leftovers of an interrupted apply
        do {
            for e in compiled.ipcache { try maps.ipcache.update(e.key(generation: next), e.value) }
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
        let flushed = try flushDeniedConnections(CompiledLookup(compiled))
        return ApplyResult(generation: cfg.generation, policyEntries: compiled.entries.count, ipcacheEntries: compiled.ipcache.count,
                           defaultEntries: compiled.defaults.count, conntrackFlushed: flushed, seconds: Date().timeIntervalSince(start))
    }

    func clearSlot(_ slot: UInt8) throws {
        for k in try maps.policy.keys() where k.generation == slot { try maps.policy.delete(k) }
        for k in try maps.defaults.keys() where k.generation == slot { try maps.defaults.delete(k) }
        for k in try maps.ipcache.keys() where k.generation == slot { try maps.ipcache.delete(k) }
    }

    /// Removes conntrack entries of flows the policy now in force denies, so
    /// revoking access cuts existing connections instead of waiting them out.
    func flushDeniedConnections(_ lookup: CompiledLookup) throws -> Int {
        var flushed = 0
        for (k, v) in try maps.conntrack.entries() {
            let dir = Direction(kernel: k.direction)
            let peer = dir == .ingress ? IPAddress(tuple: k.saddr) : IPAddress(tuple: k.daddr)
            let flow = Flow(local: NumericIdentity(v.local_identity), direction: dir, peerAddress: peer,
                            proto: k.protocol, port: UInt16(bigEndian: k.dport))
            if lookup.evaluate(flow).verdict == .deny {
                if try maps.conntrack.delete(k) { flushed += 1 }
            }
        }
        return flushed
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
        for m in MapName.allCases { unlink("\(pinRoot)/\(m.rawValue)") }
        rmdir(pinRoot)
    }
}
