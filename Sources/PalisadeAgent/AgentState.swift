import Foundation
import PalisadeIdentity
import PalisadePolicy

/// What the agent persists in its state directory: identity numbers (stable
/// across restarts), what each rule id means, what it attached (so a restart
/// or --cleanup can find it), and the status of the last policy apply.
/// The CLI reads it to put names on map entries.
public struct AgentState: Codable, Sendable {
    public struct IdentityRecord: Codable, Sendable {
        public var spiffeID: SpiffeID
        public var namespace: String
        public var labels: [String: String]
    }
    public struct EndpointRecord: Codable, Hashable, Sendable {
        public var workload: String
        public var identity: NumericIdentity
        public var interface: String?
        public var ifindex: Int32?
        public var cgroupPath: String?
        public var cgroupID: UInt64?
        /// The cgroup whose connections are redirected to the tunnel.
        public var redirectCgroupID: UInt64?
        public var mtls: String?
    }
    public struct PolicyStatus: Codable, Sendable {
        public var generation: UInt64 = 0
        public var appliedAt: Date?
        public var files: [String] = []
        public var policies = 0
        public var policyEntries = 0
        /// identity -> peer class entries, and per-workload default entries.
        public var peerClassEntries = 0
        public var defaultEntries = 0
        /// Compiling the policy for this node's workloads (before the kernel write).
        public var compileSeconds = 0.0
        public var applySeconds = 0.0
        public var lastError: String?
        public var lastErrorAt: Date?
        /// Why the declared policy is not in the kernel (nil: it is).
        public var notInstalled: String?
        /// Workloads held at default deny meanwhile (their policy could not be installed).
        public var lockedDown: [String]?
    }

    public var allocator = IdentityAllocator()
    public var identities: [UInt32: IdentityRecord] = [:]
    public var cidrIdentities: [String: UInt32] = [:]
    /// Peer class -> the rule selectors its identities match (for dumps).
    public var peerClasses: [UInt32: [String]] = [:]
    /// FQDN class -> the toFQDNs selectors it stands for. (Optional, like
    /// the next: a state file written before them still loads.)
    public var fqdnClasses: [UInt32: [String]]?
    /// The toFQDNs selectors in force (what explain matches a name with).
    public var fqdnSelectors: [FQDNSelector]?
    public var rules: [RuleInfo] = []
    public var endpoints: [EndpointRecord] = []
    public var policy = PolicyStatus()
    public var workloadErrors: [String] = []
    /// The shared store, when configured: reachable, revision seen, last error.
    public struct StoreStatus: Codable, Sendable {
        public var connected: Bool
        public var revision: Int64
        public var lastError: String?
        public var peers: Int
    }
    public var store: StoreStatus?
    /// The trust domain's issuer, when the node has one: reachable at the
    /// last contact, when it last answered, why it did not.
    public struct IssuerStatus: Codable, Sendable, Equatable {
        public var address: String
        public var reachable: Bool
        public var lastContact: Date?
        public var lastError: String?
        /// SPIFFE IDs of this node the issuer refused, with the reason.
        public var refused: [String: String] = [:]
    }
    public var issuer: IssuerStatus?
    /// File descriptors the agent held at its last reconcile, and its limit.
    public struct Files: Codable, Sendable {
        public var open: Int
        public var limit: Int
    }
    public var files: Files?

    public init() {}

    public static func load(_ path: String) -> AgentState? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        let d = JSONDecoder()
        d.dateDecodingStrategy = .utc
        return try? d.decode(AgentState.self, from: data)
    }

    public func save(_ path: String) throws {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        e.dateEncodingStrategy = .utc
        let data = try e.encode(self)
        let tmp = path + ".tmp"
        try data.write(to: URL(fileURLWithPath: tmp))
        if rename(tmp, path) != 0 { throw CocoaError(.fileWriteUnknown) }
    }

    /// A readable name for a numeric identity.
    public func name(of id: UInt32) -> String {
        if let r = NumericIdentity(id).reservedName { return r }
        if let rec = identities[id] { return rec.spiffeID.description }
        if let c = cidrIdentities.first(where: { $0.value == id }) { return "cidr:\(c.key)" }
        if let f = fqdnClasses?[id] { return "fqdn:{\(f.joined(separator: " | "))}" }
        return "identity \(id)"
    }

    /// A readable name for the peer of a policy entry: a peer class (by
    /// the selectors it stands for), a reserved or a CIDR identity.
    public func peerName(of id: UInt32) -> String {
        if id == 0 { return "any" }
        guard NumericIdentity(id).isWorkload else { return name(of: id) }
        return peerClasses[id].map { $0.joined(separator: " & ") } ?? "class \(id)"
    }

    public func rule(_ id: UInt32) -> RuleInfo? {
        id >= 1 && Int(id) <= rules.count ? rules[Int(id) - 1] : nil
    }
}
