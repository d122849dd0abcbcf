import CPalisadeShared
import PalisadeIdentity
import PalisadePolicy

/// Pinned map names (the map names in bpf/lib/maps.h) and program names.
public enum MapName: String, CaseIterable, Sendable {
    case endpointsByIfindex = "pal_ep_ifindex"
    case endpointsByCgroup = "pal_ep_cgroup"
    case ipcache = "pal_ipcache"
    case policy = "pal_policy"
    case peerClasses = "pal_peer_class"
    case defaults = "pal_defaults"
    case config = "pal_config"
    case conntrack = "pal_conntrack"
    case counters = "pal_counters"
    case eventBucket = "pal_event_bucket"
    case events = "pal_events"
    case meshEndpoints = "pal_mesh_ep"
    case redirectBySocket = "pal_redir_sock"
    case redirectByFlow = "pal_redir_flow"
    case fastPath = "pal_sock_fast"
    case l7Ports = "pal_l7_port"
    case dnsBySocket = "pal_dns_sock"
    case dnsByFlow = "pal_dns_flow"
    case dnsProxy = "pal_dns_proxy"
}

/// Names for enum pal_reason, used in dumps, metrics and flow events.
public enum Reason: UInt8, CaseIterable, Sendable, CustomStringConvertible {
    case allowPolicy = 0, allowEstablished, allowReply, allowUnenforced
    case denyPolicy, denyDefault, auditWouldDeny, denyMalformed, denyFragment, denyConntrackFull, denySpoofed, denyNoEndpoint
    case denyPlaintext, allowPlaintext, allowRedirect, denyL7Bypass, denyRevoked

    public var description: String {
        switch self {
        case .allowPolicy: "allowed-by-policy"
        case .allowEstablished: "allowed-established"
        case .allowReply: "allowed-reply"
        case .allowUnenforced: "allowed-unenforced"
        case .denyPolicy: "denied-by-policy"
        case .denyDefault: "denied-default"
        case .auditWouldDeny: "audit-would-deny"
        case .denyMalformed: "denied-malformed"
        case .denyFragment: "denied-fragment"
        case .denyConntrackFull: "denied-conntrack-full"
        case .denySpoofed: "denied-spoofed-source"
        case .denyNoEndpoint: "denied-no-endpoint"
        case .denyPlaintext: "denied-plaintext-strict-mtls"
        case .allowPlaintext: "allowed-plaintext-permissive"
        case .allowRedirect: "allowed-redirected-to-agent"
        case .denyL7Bypass: "denied-l7-bypass"
        case .denyRevoked: "denied-revoked"
        }
    }

    public var passes: Bool {
        switch self {
        case .allowPolicy, .allowEstablished, .allowReply, .allowUnenforced, .auditWouldDeny, .allowPlaintext, .allowRedirect: true
        default: false
        }
    }

    /// How a packet with this reason is reported (flow events, metrics).
    public var outcome: Outcome { self == .auditWouldDeny ? .audit : passes ? .allowed : .denied }
}

extension Reason {
    /// These names cover enum pal_reason exactly (the datapath refuses to
    /// load otherwise: a reason without a name would be misreported).
    public static var coversKernelReasons: Bool {
        allCases.count == Int(PAL_REASON_MAX.rawValue) && allCases.enumerated().allSatisfy { Int($0.element.rawValue) == $0.offset }
    }
}

extension Direction {
    public init(kernel: UInt8) { self = kernel == UInt8(PAL_DIR_INGRESS.rawValue) ? .ingress : .egress }
    public var kernel: UInt8 { self == .ingress ? UInt8(PAL_DIR_INGRESS.rawValue) : UInt8(PAL_DIR_EGRESS.rawValue) }
}

extension IPAddress {
    /// From the 16 address bytes of a kernel struct (a C tuple).
    public init<T>(tuple: T) {
        // A C array of 16 bytes; an Array or pointer here would read its
        // header, not the address.
        precondition(MemoryLayout<T>.size == 16, "IPAddress(tuple:) takes a 16-byte C array")
        var t = tuple
        let bytes = withUnsafeBytes(of: &t) { Array($0.prefix(16)) }
        self.init(bytes16: bytes)
    }
}
