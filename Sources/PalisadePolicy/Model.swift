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

    public var summary: String {
        let l = matchLabels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        let e = matchExpressions.map { "\($0.key) \($0.op.rawValue) (\($0.values.joined(separator: ",")))" }
        return (l + e).joined(separator: " ")
    }

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

    /// A one-line reading for dumps ("namespace=shop app=web", "any workload").
    public var summary: String {
        var parts: [String] = []
        if let spiffeID { parts.append("spiffeID=\(spiffeID)") }
        if let spiffeIDPrefix { parts.append("spiffeIDPrefix=\(spiffeIDPrefix)") }
        if let namespace { parts.append("namespace=\(namespace)") }
        if let n = namespaceLabels { parts.append("namespaceLabels{\(n.summary)}") }
        if !labels.isEmpty { parts.append(labels.summary) }
        return parts.isEmpty ? "any workload" : parts.joined(separator: " ")
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
    /// Addresses DNS answered for names the selector matches (egress only).
    case fqdn(FQDNSelector)
}

/// Ports of a rule: a protocol and, for TCP/UDP, an inclusive range or a
/// port name. protocol nil = any protocol (and then no port).
///
/// A named port is resolved as Kubernetes resolves it: for ingress, on the
/// selected (destination) workload; for egress, on the peer workload, so an
/// egress named port matches workload peers only (selectors, `all`, or any
/// peer), never a CIDR or the host: an address has no port names.
public struct PortRule: Hashable, Codable, Sendable {
    public var proto: IPProtocol?
    public var first: UInt16?
    public var last: UInt16?
    /// A port name (a workload's `ports:` entry); first/last are nil then.
    public var name: String?
    public init(proto: IPProtocol?, first: UInt16? = nil, last: UInt16? = nil) {
        self.proto = proto; self.first = first; self.last = last ?? first
    }
    public init(proto: IPProtocol, name: String) {
        self.proto = proto; self.name = name
    }
    /// Numbered ports only; a named port needs the workload that names it.
    public func matches(proto p: UInt8, port: UInt16) -> Bool {
        if name != nil { return false }
        if let proto, proto.rawValue != p { return false }
        guard let first, let last else { return true }
        return port >= first && port <= last
    }
    /// A named port against the workload that resolves it.
    public func matches(proto p: UInt8, port: UInt16, on w: WorkloadIdentity?) -> Bool {
        guard let name else { return matches(proto: p, port: port) }
        guard let w, let proto, proto.rawValue == p else { return false }
        return w.ports.contains { $0.name == name && $0.proto == proto && $0.port == port }
    }
}

/// A port a workload declares by name (a Kubernetes containerPort name).
public struct NamedPort: Hashable, Codable, Sendable, CustomStringConvertible {
    public var name: String
    public var port: UInt16
    public var proto: IPProtocol
    public init(name: String, port: UInt16, proto: IPProtocol = .tcp) { self.name = name; self.port = port; self.proto = proto }
    public var description: String { "\(name)=\(port)/\(proto.description.lowercased())" }

    /// Parses `NAME=PORT[/PROTOCOL]` (protocol tcp unless given).
    public init?(_ s: String) {
        let parts = s.split(separator: "=", maxSplits: 1)
        guard parts.count == 2, NamedPort.isValidName(String(parts[0])) else { return nil }
        let rest = parts[1].split(separator: "/", maxSplits: 1)
        guard let n = Int(rest[0]), (1...65535).contains(n) else { return nil }
        var proto = IPProtocol.tcp
        if rest.count == 2 {
            guard let p = IPProtocol(name: String(rest[1])), p.hasPorts else { return nil }
            proto = p
        }
        self.init(name: String(parts[0]), port: UInt16(n), proto: proto)
    }

    /// The ports of several instances of one identity (each kept once).
    public static func union(_ a: [NamedPort], _ b: [NamedPort]) -> [NamedPort] {
        var out = a
        for p in b where !out.contains(p) { out.append(p) }
        return out
    }

    /// Kubernetes' IANA_SVC_NAME: 1-15 lowercase letters, digits and '-',
    /// at least one letter, no leading, trailing or double '-'.
    public static func isValidName(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 15 && s.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "-") }
            && s.contains(where: \.isLetter) && !s.hasPrefix("-") && !s.hasSuffix("-") && !s.contains("--")
    }
}

public struct Rule: Hashable, Codable, Sendable {
    public var action: Action
    /// Empty: any peer.
    public var peers: [Peer]
    /// Empty: any protocol and port.
    public var ports: [PortRule]
    public var location: SourceLocation
    /// DNS rule (egress): the names the selected workloads may resolve
    /// through the agent's DNS proxy; nil: this rule says nothing about DNS.
    public var dns: [FQDNSelector]?
    public init(action: Action, peers: [Peer], ports: [PortRule], location: SourceLocation, dns: [FQDNSelector]? = nil) {
        self.action = action; self.peers = peers; self.ports = ports; self.location = location; self.dns = dns
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
    /// Has an instance on this node: only such workloads get policy entries
    /// here (others are peers: their node enforces their own policy).
    public var isLocal: Bool
    /// Named ports of the identity's instances (their union).
    public var ports: [NamedPort]

    public init(spiffeID: SpiffeID, labels: [String: String] = [:], namespace: String = "default",
                namespaceLabels: [String: String]? = nil, addresses: [IPAddress] = [], remoteAddresses: Set<IPAddress> = [],
                isLocal: Bool = true, ports: [NamedPort] = []) {
        self.remoteAddresses = remoteAddresses
        self.isLocal = isLocal; self.ports = ports
        self.spiffeID = spiffeID; self.labels = labels; self.namespace = namespace
        self.namespaceLabels = namespaceLabels ?? ["kubernetes.io/metadata.name": namespace]
        self.addresses = addresses
    }
}
