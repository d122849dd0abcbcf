import PalisadeIdentity

/// Where in which file something was written, for errors, explain and dumps.
public struct SourceLocation: Hashable, Codable, CustomStringConvertible, Sendable {
    public var file: String
    public var line: Int
    public var column: Int
    public init(file: String, line: Int, column: Int = 1) { self.file = file; self.line = line; self.column = column }
    public var description: String { "\(file):\(line):\(column)" }
}

public enum Direction: String, Codable, CaseIterable, Sendable {
    case ingress, egress
}

public enum Action: String, Codable, Sendable {
    case allow, deny
}

/// enforce: selected workloads are default-deny. audit: nothing is dropped by
/// this policy; what it would deny is counted and reported as "would deny".
public enum PolicyMode: String, Codable, Sendable {
    case enforce, audit
}

public enum IPProtocol: UInt8, Codable, CaseIterable, Sendable, CustomStringConvertible {
    case icmp = 1, tcp = 6, udp = 17, icmpv6 = 58
    public var description: String {
        switch self { case .icmp: "ICMP"; case .tcp: "TCP"; case .udp: "UDP"; case .icmpv6: "ICMPv6" }
    }
    public var hasPorts: Bool { self == .tcp || self == .udp }
    public init?(name: String) {
        switch name.uppercased() {
        case "TCP": self = .tcp
        case "UDP": self = .udp
        case "ICMP": self = .icmp
        case "ICMPV6": self = .icmpv6
        default: return nil
        }
    }
}

/// Kubernetes-style label selector: all of matchLabels and all expressions.
/// An empty selector selects everything.
public struct LabelSelector: Hashable, Codable, Sendable {
    public enum Operator: String, Codable, Sendable { case `in` = "In", notIn = "NotIn", exists = "Exists", doesNotExist = "DoesNotExist" }
    public struct Requirement: Hashable, Codable, Sendable {
        public var key: String
        public var op: Operator
        public var values: [String]
        public init(key: String, op: Operator, values: [String]) { self.key = key; self.op = op; self.values = values }
    }
    public var matchLabels: [String: String]
    public var matchExpressions: [Requirement]

    public init(matchLabels: [String: String] = [:], matchExpressions: [Requirement] = []) {
        self.matchLabels = matchLabels
        self.matchExpressions = matchExpressions
    }

    public var isEmpty: Bool { matchLabels.isEmpty && matchExpressions.isEmpty }

    public func matches(_ labels: [String: String]) -> Bool {
        for (k, v) in matchLabels where labels[k] != v { return false }
        for r in matchExpressions {
            let value = labels[r.key]
            switch r.op {
            case .in: if value == nil || !r.values.contains(value!) { return false }
            case .notIn: if let value, r.values.contains(value) { return false }
            case .exists: if value == nil { return false }
            case .doesNotExist: if value != nil { return false }
            }
        }
        return true
    }
}

/// Which workloads a policy applies to, or which workloads a rule names as
/// peers. Every field given must match (AND); an empty selector matches all.
public struct WorkloadSelector: Hashable, Codable, Sendable {
    public var spiffeID: SpiffeID?
    public var spiffeIDPrefix: SpiffeID?
    public var labels: LabelSelector
    /// Namespaces by label selector over namespace labels (Kubernetes import);
    /// nil means any namespace.
    public var namespaceLabels: LabelSelector?
    /// Restrict to one namespace (a Kubernetes policy's own namespace).
    public var namespace: String?

    public init(spiffeID: SpiffeID? = nil, spiffeIDPrefix: SpiffeID? = nil, labels: LabelSelector = .init(),
                namespaceLabels: LabelSelector? = nil, namespace: String? = nil) {
        self.spiffeID = spiffeID
        self.spiffeIDPrefix = spiffeIDPrefix
        self.labels = labels
        self.namespaceLabels = namespaceLabels
        self.namespace = namespace
    }

    public func matches(_ w: WorkloadIdentity) -> Bool {
        if let id = spiffeID, w.spiffeID != id { return false }
        if let p = spiffeIDPrefix, !w.spiffeID.isWithin(p) { return false }
        if let ns = namespace, w.namespace != ns { return false }
        if let nsSel = namespaceLabels, !nsSel.matches(w.namespaceLabels) { return false }
        return labels.matches(w.labels)
    }
}

public enum Entity: String, Codable, Sendable {
    case host, world, all
}

/// A peer of a rule.
public enum Peer: Hashable, Codable, Sendable {
    case workloads(WorkloadSelector)
    case cidr(CIDR, except: [CIDR])
    case entity(Entity)
}

/// Ports of a rule: a protocol and, for TCP/UDP, an inclusive range.
/// protocol nil = any protocol (and then no port).
public struct PortRule: Hashable, Codable, Sendable {
    public var proto: IPProtocol?
    public var first: UInt16?
    public var last: UInt16?
    public init(proto: IPProtocol?, first: UInt16? = nil, last: UInt16? = nil) {
        self.proto = proto; self.first = first; self.last = last ?? first
    }
    public func matches(proto p: UInt8, port: UInt16) -> Bool {
        if let proto, proto.rawValue != p { return false }
        guard let first, let last else { return true }
        return port >= first && port <= last
    }
}

public struct Rule: Hashable, Codable, Sendable {
    public var action: Action
    /// Empty: any peer.
    public var peers: [Peer]
    /// Empty: any protocol and port.
    public var ports: [PortRule]
    public var location: SourceLocation
    public init(action: Action, peers: [Peer], ports: [PortRule], location: SourceLocation) {
        self.action = action; self.peers = peers; self.ports = ports; self.location = location
    }
}

public struct Policy: Hashable, Codable, Sendable {
    public var name: String
    public var mode: PolicyMode
    public var selector: WorkloadSelector
    /// nil: this policy does not isolate that direction. [] isolates and allows nothing.
    public var ingress: [Rule]?
    public var egress: [Rule]?
    public var location: SourceLocation

    public init(name: String, mode: PolicyMode = .enforce, selector: WorkloadSelector, ingress: [Rule]?, egress: [Rule]?, location: SourceLocation) {
        self.name = name; self.mode = mode; self.selector = selector
        self.ingress = ingress; self.egress = egress; self.location = location
    }

    public func rules(_ d: Direction) -> [Rule]? { d == .ingress ? ingress : egress }
}

/// What the policy engine knows about one workload identity.
public struct WorkloadIdentity: Hashable, Codable, Sendable {
    public var spiffeID: SpiffeID
    public var labels: [String: String]
    public var namespace: String
    public var namespaceLabels: [String: String]
    public var addresses: [IPAddress]
    /// Addresses of instances on other nodes (a subset of addresses).
    /// Connections to them travel through the agents' mTLS tunnel.
    public var remoteAddresses: Set<IPAddress>

    public init(spiffeID: SpiffeID, labels: [String: String] = [:], namespace: String = "default",
                namespaceLabels: [String: String]? = nil, addresses: [IPAddress] = [], remoteAddresses: Set<IPAddress> = []) {
        self.remoteAddresses = remoteAddresses
        self.spiffeID = spiffeID; self.labels = labels; self.namespace = namespace
        self.namespaceLabels = namespaceLabels ?? ["kubernetes.io/metadata.name": namespace]
        self.addresses = addresses
    }
}
