import CPalisadeShared
import Foundation
import PalisadeIdentity
import PalisadeBPF
import PalisadeDatapath
import PalisadeMetrics
import PalisadePolicy

/// A decoded deny (or audit) event from the kernel's ring buffer.
public struct FlowEvent: Codable, Sendable {
    public var time: Date
    public var verdict: String
    public var reason: String
    public var direction: String
    public var source: String
    public var destination: String
    public var sourcePort: UInt16
    public var destinationPort: UInt16
    public var proto: String
    public var localIdentity: UInt32
    public var peerIdentity: UInt32
    public var local: String
    public var peer: String
    public var rule: String?
    public var ifindex: UInt32
    public var cgroupID: UInt64
    /// DNS lookups through the agent's proxy: the name, what the answer
    /// gave (addresses), and the proxy's result.
    public var dnsName: String?
    public var dnsAnswer: [String]?
    public var dnsResult: String?
}

/// Polls the ring buffer and appends each event as a JSON line to a file
/// in the state directory (rotated at 16 MiB), with identities named.
final class FlowEventWriter: @unchecked Sendable {
    let ring: RingBuffer
    let stream: FlowStream
    let file: EventFile

    init(maps: PalisadeMaps, path: String, socket: String, names: @escaping @Sendable () -> AgentState, metrics: AgentMetrics) throws {
        let file = EventFile(path: path)
        self.file = file
        let stream = try FlowStream(path: socket) { metrics.recordAdminRefusal(endpoint: "flows", reason: AdminRefusal.tooManyConnections.rawValue) }
        self.stream = stream
        let bootOffset = Date().timeIntervalSince1970 - Double(clockMonotonicNanoseconds()) / 1e9
        ring = try RingBuffer(map: maps.events) { bytes in
            guard bytes.count >= MemoryLayout<pal_flow_event>.size else { return }
            let e = bytes.loadUnaligned(as: pal_flow_event.self)
            let state = names()
            let reason = Reason(rawValue: e.reason) ?? .denyDefault
            let dir = Direction(kernel: e.direction)
            let src = IPAddress(tuple: e.saddr), dst = IPAddress(tuple: e.daddr)
            let local = state.name(of: e.local_identity), peer = state.name(of: e.peer_identity)
            let event = FlowEvent(
                time: Date(timeIntervalSince1970: bootOffset + Double(e.timestamp_ns) / 1e9),
                verdict: reason.outcome.rawValue, reason: reason.description, direction: dir.rawValue,
                source: src.description, destination: dst.description, sourcePort: e.sport, destinationPort: e.dport,
                proto: IPProtocol(rawValue: e.protocol)?.description ?? "\(e.protocol)",
                localIdentity: e.local_identity, peerIdentity: e.peer_identity, local: local, peer: peer,
                rule: state.rule(e.rule_id)?.summary, ifindex: e.ifindex, cgroupID: e.cgroup_id)
            if let line = file.append(event) { stream.publish(line) }
            metrics.recordEvent(verdict: event.verdict, direction: event.direction, local: local, peer: peer)
        }
    }
    /// An event the agent itself saw (a DNS lookup), written like the kernel's.
    func publish(_ event: FlowEvent) {
        if let line = file.append(event) { stream.publish(line) }
    }

    func start() { ring.start() }
    func stop() { ring.stop(); stream.stop() }
}

func clockMonotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)   // the clock of bpf_ktime_get_coarse_ns()
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

final class EventFile: @unchecked Sendable {
    let path: String
    let lock = NSLock()
    let encoder: JSONEncoder
    static let maxBytes = 16 << 20
    init(path: String) {
        self.path = path
        encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .utc
    }
    /// Appends the event as a JSON line; returns the line.
    @discardableResult
    func append(_ e: FlowEvent) -> [UInt8]? {
        guard var data = try? encoder.encode(e) else { return nil }
        data.append(0x0a)
        lock.lock(); defer { lock.unlock() }
        if let attrs = try? FileManager.default.attributesOfItem(atPath: path), (attrs[.size] as? Int ?? 0) > EventFile.maxBytes {
            _ = rename(path, path + ".1")
        }
        // (A file that cannot be made leaves the handle nil: the line is dropped.)
        if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600]) }
        if let h = FileHandle(forWritingAtPath: path) {
            h.seekToEndOfFile()
            h.write(data)
            h.closeFile()
        }
        return Array(data)
    }
}
