import CPalisadeShared
import Foundation
import PalisadeBPF

/// Typed handles on every Palisade map, from a loaded object or from pins.
public struct PalisadeMaps {
    public let endpointsByIfindex: TypedMap<UInt32, pal_endpoint>
    public let endpointsByCgroup: TypedMap<UInt64, pal_endpoint>
    public let ipcache: TypedMap<pal_ipcache_key, pal_ipcache_value>
    public let policy: TypedMap<pal_policy_key, pal_policy_value>
    /// identity -> peer class, per generation (see palisade_shared.h).
    public let peerClasses: TypedMap<pal_peer_class_key, UInt32>
    public let defaults: TypedMap<pal_defaults_key, pal_defaults_value>
    public let config: TypedMap<UInt32, pal_config>
    public let conntrack: TypedMap<pal_ct_key, pal_ct_value>
    public let counters: PerCPUMap<UInt32, pal_counter>
    public let eventBucket: PerCPUMap<UInt32, pal_event_bucket>
    public let events: BPFMap
    public let meshEndpoints: TypedMap<UInt64, pal_mesh_endpoint>
    public let redirectBySocket: TypedMap<UInt64, pal_redirect_origin>
    public let redirectByFlow: TypedMap<pal_redirect_key, pal_redirect_origin>
    /// Same-node fast path sockets (values are socket cookies when read).
    public let fastPath: TypedMap<pal_sock_key, UInt64>
    /// Ports of local workloads with HTTP rules (see palisade_shared.h).
    public let l7Ports: TypedMap<pal_l7_port_key, UInt32>
    /// DNS sent to the agent's proxy, by socket cookie and by addresses.
    public let dnsBySocket: TypedMap<UInt64, pal_redirect_origin>
    public let dnsByFlow: TypedMap<pal_redirect_key, pal_redirect_origin>
    /// The proxy's UDP socket while it is open (sockmap: written as an fd).
    public let dnsProxy: TypedMap<UInt32, UInt64>

    init(lookup: (MapName) throws -> BPFMap) throws {
        endpointsByIfindex = try TypedMap(lookup(.endpointsByIfindex))
        endpointsByCgroup = try TypedMap(lookup(.endpointsByCgroup))
        ipcache = try TypedMap(lookup(.ipcache))
        policy = try TypedMap(lookup(.policy))
        peerClasses = try TypedMap(lookup(.peerClasses))
        defaults = try TypedMap(lookup(.defaults))
        config = try TypedMap(lookup(.config))
        conntrack = try TypedMap(lookup(.conntrack))
        counters = try PerCPUMap(lookup(.counters))
        eventBucket = try PerCPUMap(lookup(.eventBucket))
        events = try lookup(.events)
        meshEndpoints = try TypedMap(lookup(.meshEndpoints))
        redirectBySocket = try TypedMap(lookup(.redirectBySocket))
        redirectByFlow = try TypedMap(lookup(.redirectByFlow))
        fastPath = try TypedMap(lookup(.fastPath))
        l7Ports = try TypedMap(lookup(.l7Ports))
        dnsBySocket = try TypedMap(lookup(.dnsBySocket))
        dnsByFlow = try TypedMap(lookup(.dnsByFlow))
        dnsProxy = try TypedMap(lookup(.dnsProxy))
    }

    /// Opens the maps pinned under pinRoot, without loading any program
    /// (the CLI uses this; it works while the agent is stopped).
    public static func openPinned(at pinRoot: String) throws -> PalisadeMaps {
        try PalisadeMaps { try BPFMap(pinnedAt: "\(pinRoot)/\($0.rawValue)") }
    }

    static func from(_ object: BPFObject) throws -> PalisadeMaps {
        try PalisadeMaps { try object.map(named: $0.rawValue) }
    }

    public var activeConfig: pal_config {
        (try? config.lookup(0)) ?? pal_config()
    }

    /// Counters summed over CPUs, indexed [direction][reason].
    public func counterTotals() throws -> [[pal_counter]] {
        var out = Array(repeating: Array(repeating: pal_counter(), count: Int(PAL_REASON_MAX.rawValue)), count: Int(PAL_DIR_MAX.rawValue))
        for d in 0..<Int(PAL_DIR_MAX.rawValue) {
            for r in 0..<Int(PAL_REASON_MAX.rawValue) {
                let perCPU = try counters.lookup(UInt32(d * Int(PAL_REASON_MAX.rawValue) + r))
                out[d][r] = perCPU.reduce(into: pal_counter()) { $0.packets += $1.packets; $0.bytes += $1.bytes }
            }
        }
        return out
    }

    public func eventTotals() throws -> pal_event_bucket {
        try eventBucket.lookup(0).reduce(into: pal_event_bucket()) {
            $0.suppressed += $1.suppressed
            $0.lost += $1.lost
        }
    }
}
