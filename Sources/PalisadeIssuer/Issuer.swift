import Foundation
import NIOConcurrencyHelpers
import PalisadeCA
import PalisadeIdentity
import X509

/// The only holder of a trust domain's signing key when nodes join it
/// (`palisade ca serve`). A node joins once with a one-time token and gets
/// its node SVID; from then on it authenticates with that SVID and sends
/// CSRs, and gets SVIDs only for the SPIFFE IDs it is entitled to: those the
/// operator's registrations allow for that node and, when the issuer reads
/// the store, those registered under that node there.
public final class Issuer: Sendable {
    /// The signing CA, the roots nodes must trust, and the signing
    /// generation (it changes when a rotation switches the signing key:
    /// nodes then re-issue every SVID).
    public struct Authorities: Sendable {
        public var signing: CertificateAuthority
        public var trusted: [CertificateAuthority]
        public var generation: Int
        public init(signing: CertificateAuthority, trusted: [CertificateAuthority], generation: Int) {
            self.signing = signing; self.trusted = trusted; self.generation = generation
        }
    }
    private let authorities: NIOLockedValueBox<Authorities>
    public var ca: CertificateAuthority { authorities.withLockedValue { $0.signing } }
    public var current: Authorities {
        get { authorities.withLockedValue { $0 } }
        set { authorities.withLockedValue { $0 = newValue } }
    }
    /// Every root nodes must trust now (two during a rotation).
    public var bundle: [Certificate] { authorities.withLockedValue { $0.trusted.flatMap(\.bundle) } }
    public let tokens: JoinTokens
    public let nodeLifetime: TimeInterval
    public let svidLifetime: TimeInterval
    private let rules: NIOLockedValueBox<Registrations>
    /// The SPIFFE IDs the store lists under a node (nil: the issuer does not
    /// read a store, and the registrations alone decide).
    private let registered: (@Sendable (String) -> Set<SpiffeID>?)?
    private let counts = NIOLockedValueBox<[String: Int]>([:])
    private let revokedNodes = NIOLockedValueBox<Set<String>>([])
    private let log: @Sendable (String) -> Void

    public init(ca: CertificateAuthority, tokens: JoinTokens, registrations: Registrations, nodeLifetime: TimeInterval = 86400,
                svidLifetime: TimeInterval = 3600, registered: (@Sendable (String) -> Set<SpiffeID>?)? = nil,
                log: @escaping @Sendable (String) -> Void = { _ in }) {
        authorities = NIOLockedValueBox(Authorities(signing: ca, trusted: [ca], generation: 0))
        self.tokens = tokens; self.nodeLifetime = nodeLifetime; self.svidLifetime = svidLifetime
        rules = NIOLockedValueBox(registrations)
        self.registered = registered; self.log = log
    }

    public var registrations: Registrations {
        get { rules.withLockedValue { $0 } }
        set { rules.withLockedValue { $0 = newValue } }
    }

    /// Nodes that get nothing more (`palisade ca revoke-node`): no join, no
    /// renewal, no workload SVID.
    public var revoked: Set<String> {
        get { revokedNodes.withLockedValue { $0 } }
        set { revokedNodes.withLockedValue { $0 = newValue } }
    }

    /// SVIDs issued and requests refused, by kind and reason.
    public var counters: [String: Int] { counts.withLockedValue { $0 } }
    private func count(_ key: String) { counts.withLockedValue { $0[key, default: 0] += 1 } }

    /// The SPIFFE ID of node `name` in this trust domain.
    public static func nodeID(_ name: String, trustDomain: String) throws -> SpiffeID {
        try SpiffeID("spiffe://\(trustDomain)/palisade/node/\(name)")
    }

    /// The node name in a node SPIFFE ID of this trust domain, if it is one.
    public func nodeName(_ id: SpiffeID) -> String? {
        guard id.trustDomain == ca.trustDomain, id.path.hasPrefix("/palisade/node/") else { return nil }
        let name = String(id.path.dropFirst("/palisade/node/".count))
        return name.isEmpty || name.contains("/") ? nil : name
    }

    /// A node's first SVID: the token names the node, the CSR must ask for
    /// that node's ID.
    public func join(token: String, csr: CertificateSigningRequest, now: Date = Date()) -> Result<[Certificate], CAError> {
        let node: String
        switch tokens.consume(token, now: now) {
        case .success(let n): node = n
        case .failure(let e): return refuse("join", "bad-token", e.description)
        }
        if revoked.contains(node) { return refuse("join", "revoked", "node \(node) is revoked") }
        let expected: SpiffeID
        do { expected = try Self.nodeID(node, trustDomain: ca.trustDomain) } catch { return refuse("join", "bad-csr", "node name '\(node)': \(error)") }
        switch SVIDRequest.requestedID(csr) {
        case .failure(let e): return refuse("join", "bad-csr", "node \(node): \(e)")
        case .success(let id) where id != expected:
            return refuse("join", "not-entitled", "a join token for node \(node) cannot get \(id)")
        case .success:
            return issue(expected, csr, lifetime: nodeLifetime, now: now, kind: "node-joined")
        }
    }

    /// SVIDs for an authenticated node (the SPIFFE ID of its client
    /// certificate): its own node ID again (renewal), or workload IDs it
    /// is entitled to. Each request is answered on its own.
    public func sign(node: SpiffeID, csrs: [CertificateSigningRequest], lifetime: TimeInterval, now: Date = Date())
        -> [(id: SpiffeID?, result: Result<[Certificate], CAError>)] {
        guard let name = nodeName(node) else {
            return csrs.map { _ in (nil, refuse("svid", "not-a-node", "\(node) is not a node of \(ca.trustDomain)")) }
        }
        if revoked.contains(name) {
            return csrs.map { _ in (nil, refuse("svid", "revoked", "node \(name) is revoked")) }
        }
        return csrs.map { csr in
            switch SVIDRequest.requestedID(csr) {
            case .failure(let e): return (nil, refuse("svid", "bad-csr", "node \(name): \(e)"))
            case .success(let id): return (id, entitled(name, node: node, id).flatMap { _ in
                issue(id, csr, lifetime: id == node ? nodeLifetime : min(lifetime, svidLifetime), now: now, kind: id == node ? "node-renewed" : "workload")
            })
            }
        }
    }

    private func entitled(_ name: String, node: SpiffeID, _ id: SpiffeID) -> Result<Void, CAError> {
        if id == node { return .success(()) }
        guard id.trustDomain == ca.trustDomain else { return refuse("svid", "other-trust-domain", "node \(name) asked for \(id), not in \(ca.trustDomain)") }
        guard !id.path.hasPrefix("/palisade/") else { return refuse("svid", "reserved", "node \(name) asked for \(id): /palisade/ IDs are the mesh's own") }
        guard registrations.allows(node: name, id) else {
            return refuse("svid", "not-entitled", "node \(name) asked for \(id), which no registration allows on that node")
        }
        if let registered, !(registered(name)?.contains(id) ?? false) {
            return refuse("svid", "not-registered", "node \(name) asked for \(id), which the store does not list on that node")
        }
        return .success(())
    }

    private func issue(_ id: SpiffeID, _ csr: CertificateSigningRequest, lifetime: TimeInterval, now: Date, kind: String) -> Result<[Certificate], CAError> {
        do {
            let signing = ca
            let cert = try signing.issue(id, publicKey: csr.publicKey, lifetime: lifetime, now: now)
            count("issued/\(kind)")
            if kind.hasPrefix("node"), let name = nodeName(id) {
                updateReport(name) { $0.nodeSVIDSignedBy = signing.certificate.serialNumber.description }
            }
            return .success([cert] + signing.intermediates)
        } catch {
            return refuse("svid", "signing-failed", "\(id): \(error)")
        }
    }

    /// What each node last told the issuer (its probe): the roots it
    /// trusts, when, and which CA signed its node SVID (for `ca status`
    /// and a rotation's preconditions). Written to `reportFile` on change.
    public struct NodeReport: Codable, Sendable, Equatable {
        public var trusts: [String] = []
        public var lastSeen: Date?
        public var nodeSVIDSignedBy: String?
        /// A node of another trust domain that trusts this one (seen in
        /// the store); nil for this domain's own nodes.
        public var trustDomain: String?
        public init() {}
    }
    private let reports = NIOLockedValueBox<[String: NodeReport]>([:])
    private let reportPath = NIOLockedValueBox<String?>(nil)
    public var reportFile: String? {
        get { reportPath.withLockedValue { $0 } }
        set { reportPath.withLockedValue { $0 = newValue } }
    }
    public var nodeReports: [String: NodeReport] { reports.withLockedValue { $0 } }

    /// A node's probe: the serials of the roots it trusts.
    public func report(node: SpiffeID, trusts: [String], now: Date = Date()) {
        guard let name = nodeName(node) else { return }
        updateReport(name) { $0.trusts = trusts.sorted(); $0.lastSeen = now }
    }

    private func updateReport(_ name: String, _ change: (inout NodeReport) -> Void) {
        let (snapshot, changed): ([String: NodeReport], Bool) = reports.withLockedValue { r in
            var entry = r[name] ?? NodeReport()
            let before = entry
            change(&entry)
            r[name] = entry
            // (lastSeen alone is written at most once a minute.)
            let seenStale = entry.lastSeen.map { new in before.lastSeen.map { new.timeIntervalSince($0) > 60 } ?? true } ?? false
            return (r, before.trusts != entry.trusts || before.nodeSVIDSignedBy != entry.nodeSVIDSignedBy || (entry.lastSeen != nil && seenStale))
        }
        guard changed, let reportFile else { return }
        let enc = JSONEncoder()
        enc.dateEncodingStrategy = .utc
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try? enc.encode(snapshot).write(to: URL(fileURLWithPath: reportFile), options: .atomic)
    }

    private func refuse<T>(_ what: String, _ reason: String, _ message: String) -> Result<T, CAError> {
        count("refused/\(reason)")
        log("\(what) refused (\(reason)): \(message)")
        return .failure(CAError(message))
    }
}
