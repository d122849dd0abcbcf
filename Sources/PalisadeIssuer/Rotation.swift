import Foundation
import PalisadeIdentity
import PalisadeCA
import X509

/// A root rotation's state in the issuer's directory (`rotation.json`):
///   idle      sign with ca/, nodes trust ca/
///   prepared  sign with ca/, nodes trust ca/ and ca-next/
///   switched  sign with ca-next/, nodes trust both; every node re-issues
///             its SVIDs when it sees the new generation
/// and `finish` makes ca-next/ the ca/ (the old one kept as ca-retired-TIME/).
/// Each step is a command (`palisade ca rotate STEP`) that checks the nodes
/// are ready for it; the running issuer picks the file up within a second.
public struct Rotation: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable { case idle, prepared, switched }
    public var phase: Phase = .idle
    public var generation = 0
    /// When the phase was entered (metrics, status).
    public var since: Date?
    public init() {}

    public static func load(_ state: String) -> Rotation {
        FileManager.default.contents(atPath: "\(state)/rotation.json").flatMap { try? JSONDecoder().decode(Rotation.self, from: $0) } ?? Rotation()
    }

    public func save(_ state: String) throws {
        var entered = self
        entered.since = Date()
        try JSONEncoder().encode(entered).write(to: URL(fileURLWithPath: "\(state)/rotation.json"), options: .atomic)
    }

    /// The signing CA and the trusted ones this state means.
    public static func authorities(state: String, trustDomain: String) throws -> Issuer.Authorities {
        let r = load(state)
        let current = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca", trustDomain: trustDomain)
        guard r.phase != .idle else { return .init(signing: current, trusted: [current], generation: r.generation) }
        let next = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca-next", trustDomain: trustDomain)
        return .init(signing: r.phase == .switched ? next : current, trusted: [current, next], generation: r.generation)
    }

    /// What the running issuer's nodes last reported (`nodes.json`), and
    /// the federated nodes it saw in the store (`federated.json`, keyed
    /// NAME@TRUST-DOMAIN).
    public static func reports(_ state: String) -> [String: Issuer.NodeReport] {
        let dec = JSONDecoder()
        dec.dateDecodingStrategy = .utc
        let read = { (file: String) in
            FileManager.default.contents(atPath: "\(state)/\(file)").flatMap { try? dec.decode([String: Issuer.NodeReport].self, from: $0) } ?? [:]
        }
        return read("nodes.json").merging(read("federated.json")) { own, _ in own }
    }

    /// Writes the federated nodes' reports (by the running issuer).
    public static func saveFederated(_ reports: [String: Issuer.NodeReport], state: String) throws {
        let enc = JSONEncoder()
        enc.dateEncodingStrategy = .utc
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(reports).write(to: URL(fileURLWithPath: "\(state)/federated.json"), options: .atomic)
    }

    /// The reports a step waits for: this domain's nodes heard from in the
    /// last 10 minutes or not yet (a node that joined but has not probed
    /// counts as not ready), and every federated node the store lists.
    public static func current(_ reports: [String: Issuer.NodeReport], now: Date = Date()) -> [String: Issuer.NodeReport] {
        reports.filter { $0.value.trustDomain != nil || ($0.value.lastSeen.map { now.timeIntervalSince($0) } ?? 0) < 600 }
    }

    /// The serial of the signing certificate in `dir/ca.pem` (what a node's
    /// "signed by" names).
    public static func serial(_ dir: String) -> String? {
        (try? String(contentsOfFile: "\(dir)/ca.pem", encoding: .utf8)).flatMap { try? Certificate(pemEncoded: $0) }?.serialNumber.description
    }

    /// The serial of the root nodes trust for `dir`: `root.pem` when the CA
    /// is an intermediate of an offline root, else `ca.pem` (what a node's
    /// "trusts" names). Rotating an intermediate under the same root needs
    /// no node to learn anything.
    public static func rootSerial(_ dir: String) -> String? {
        guard FileManager.default.fileExists(atPath: "\(dir)/root.pem") else { return serial(dir) }
        return (try? String(contentsOfFile: "\(dir)/root.pem", encoding: .utf8)).flatMap { try? Certificate(pemEncoded: $0) }?.serialNumber.description
    }
}
