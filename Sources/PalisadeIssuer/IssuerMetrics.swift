import Foundation
import NIOConcurrencyHelpers
import Prometheus
import X509

/// The issuer's Prometheus metrics (`palisade ca serve --metrics-address`):
/// SVIDs issued and requests refused, and a rotation's progress phase by
/// phase (which phase since when, how many nodes trust the new root, how
/// many hold SVIDs from it), read from the issuer's state directory when
/// scraped, so `palisade ca rotate` run elsewhere shows at once.
public final class IssuerMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let issuer: Issuer
    private let state: String
    private let store: IssuerStoreView?
    private let counted = NIOLockedValueBox<[String: (counter: Counter, seen: Int)]>([:])

    public init(issuer: Issuer, state: String, store: IssuerStoreView?) {
        self.issuer = issuer; self.state = state; self.store = store
    }

    static func name(_ metric: String, unit: String = "", help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "palisade", subsystem: "issuer", metricName: metric, unitName: unit, helpText: help)
    }

    /// The exposition, brought up to date.
    public func render() -> [UInt8] {
        for (key, total) in issuer.counters { advance(key, to: total) }
        let rotation = Rotation.load(state)
        let phase = Self.name("rotation_phase", help: "1 for the root rotation phase in force (idle, prepared, switched).")
        for p in [Rotation.Phase.idle, .prepared, .switched] {
            registry.makeGauge(descriptor: phase, labels: [("phase", p.rawValue)]).set(rotation.phase == p ? 1.0 : 0.0)
        }
        registry.makeGauge(descriptor: Self.name("rotation_generation", help: "Signing generation (changes when a rotation switches or rolls back)."))
            .set(Double(rotation.generation))
        registry.makeGauge(descriptor: Self.name("rotation_phase_entered", unit: "timestamp_seconds", help: "When the current rotation phase was entered."))
            .set(rotation.since?.timeIntervalSince1970 ?? 0)
        let current = Rotation.serial("\(state)/ca"), next = rotation.phase == .idle ? nil : Rotation.serial("\(state)/ca-next")
        let nextRoot = rotation.phase == .idle ? nil : Rotation.rootSerial("\(state)/ca-next")
        let reports = Rotation.current(Rotation.reports(state))
        let nodes = Self.name("rotation_nodes", help: "Nodes by what they hold: reporting (own and federated), trusting the new root, own nodes whose node SVID the new root signed.")
        let own = reports.values.filter { $0.trustDomain == nil }
        registry.makeGauge(descriptor: nodes, labels: [("state", "reporting")]).set(Double(reports.count))
        registry.makeGauge(descriptor: nodes, labels: [("state", "trusting_new_root")])
            .set(Double(nextRoot.map { n in reports.values.filter { $0.trusts.contains(n) }.count } ?? 0))
        registry.makeGauge(descriptor: nodes, labels: [("state", "on_new_root")])
            .set(Double(next.map { n in own.filter { $0.nodeSVIDSignedBy == n }.count } ?? 0))
        registry.makeGauge(descriptor: nodes, labels: [("state", "on_current_root")])
            .set(Double(current.map { c in own.filter { $0.nodeSVIDSignedBy == c }.count } ?? 0))
        let expiry = Self.name("root_not_after", unit: "timestamp_seconds", help: "Expiry of the current root and, during a rotation, the new one.")
        for (label, dir) in [("current", "ca"), ("next", "ca-next")] where label == "current" || next != nil {
            let notAfter = (try? String(contentsOfFile: "\(state)/\(dir)/ca.pem", encoding: .utf8)).flatMap { try? Certificate(pemEncoded: $0) }?.notValidAfter
            registry.makeGauge(descriptor: expiry, labels: [("root", label)]).set(notAfter?.timeIntervalSince1970 ?? 0)
        }
        if let store {
            registry.makeGauge(descriptor: Self.name("store_connected", help: "1 while the issuer's copy of the store is live."))
                .set(store.mirror.connected ? 1.0 : 0.0)
        }
        return registry.emitToBuffer()
    }

    /// Issued/refused counts as Prometheus counters (the issuer keeps totals).
    private func advance(_ key: String, to total: Int) {
        counted.withLockedValue { all in
            if all[key] == nil {
                let parts = key.split(separator: "/", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { return }
                let counter = parts[0] == "issued"
                    ? registry.makeCounter(descriptor: Self.name("svids_issued", unit: "total", help: "SVIDs signed, by kind (node-joined, node-renewed, workload)."),
                                           labels: [("kind", parts[1])])
                    : registry.makeCounter(descriptor: Self.name("requests_refused", unit: "total", help: "Join and signing requests refused, by reason."),
                                           labels: [("reason", parts[1])])
                all[key] = (counter, 0)
            }
            guard let entry = all[key], total > entry.seen else { return }
            entry.counter.increment(by: Int64(total - entry.seen))
            all[key] = (entry.counter, total)
        }
    }
}
