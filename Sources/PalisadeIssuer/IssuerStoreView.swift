import Foundation
import PalisadeIdentity
import PalisadeStore

/// What the issuer reads from and writes to the store when it is given one
/// (`palisade ca serve --config OPERATOR.yaml`):
/// - reads PREFIX/workloads/NODE/…: a node gets a workload SVID only for a
///   SPIFFE ID the store lists on that node (with etcd authentication on,
///   only node NODE can write there), on top of the registrations;
/// - reads PREFIX/nodes/…: nodes of other trust domains say which of this
///   domain's roots they trust, so a rotation waits for federated peers too;
/// - writes PREFIX/bundles/TD: this domain's roots (both during a rotation),
///   which federated nodes trust (nodes never write it once an issuer runs).
public final class IssuerStoreView: Sendable {
    public let mirror: StoreMirror
    public let trustDomain: String

    public init(store: Store, prefix: String, trustDomain: String, changed: @escaping @Sendable () -> Void = {},
                failed: @escaping @Sendable (String) -> Void = { _ in }) {
        mirror = StoreMirror(store: store, prefix: prefix, changed: changed, failed: failed)
        self.trustDomain = trustDomain
    }

    public func start() { mirror.start() }
    public func stop() { mirror.stop() }

    var workloadsPrefix: String { "\(mirror.prefix)workloads/" }
    var nodesPrefix: String { "\(mirror.prefix)nodes/" }
    public var bundleKey: String { "\(mirror.prefix)bundles/\(trustDomain)" }

    /// The fields of the agents' records the issuer reads.
    struct WorkloadFields: Decodable { var spiffeID: String }
    struct NodeFields: Decodable {
        var name: String
        var trustDomain: String
        /// Root serials trusted, per trust domain.
        var trusts: [String: [String]]?
    }

    /// The SPIFFE IDs the store lists on `node` (by key: PREFIX/workloads/NODE/NAME).
    /// Empty until the store has answered once: fail closed.
    public func registered(node: String) -> Set<SpiffeID> {
        let prefix = "\(workloadsPrefix)\(node)/"
        var ids = Set<SpiffeID>()
        for (key, value) in mirror.snapshot where key.hasPrefix(prefix) && !key.dropFirst(prefix.count).contains("/") {
            if let w = try? JSONDecoder().decode(WorkloadFields.self, from: Data(value)), let id = try? SpiffeID(w.spiffeID) { ids.insert(id) }
        }
        return ids
    }

    /// Nodes of other trust domains that trust this one, with the roots of
    /// it they trust, keyed NAME@TRUST-DOMAIN.
    public func federatedReports() -> [String: Issuer.NodeReport] {
        var out: [String: Issuer.NodeReport] = [:]
        for (key, value) in mirror.snapshot where key.hasPrefix(nodesPrefix) {
            guard let n = try? JSONDecoder().decode(NodeFields.self, from: Data(value)), n.trustDomain != trustDomain,
                  let roots = n.trusts?[trustDomain] else { continue }
            var report = Issuer.NodeReport()
            report.trusts = roots.sorted()
            report.trustDomain = n.trustDomain
            out["\(n.name)@\(n.trustDomain)"] = report
        }
        return out
    }

    /// Writes this trust domain's roots for federated nodes (PEM).
    public func publishBundle(_ pem: String) async throws {
        if try await mirror.store.get(bundleKey)?.string == pem { return }
        try await mirror.store.put(bundleKey, pem)
    }
}
