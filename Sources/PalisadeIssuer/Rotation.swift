import Foundation
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
    public init() {}

    public static func load(_ state: String) -> Rotation {
        FileManager.default.contents(atPath: "\(state)/rotation.json").flatMap { try? JSONDecoder().decode(Rotation.self, from: $0) } ?? Rotation()
    }

    public func save(_ state: String) throws {
        try JSONEncoder().encode(self).write(to: URL(fileURLWithPath: "\(state)/rotation.json"), options: .atomic)
    }

    /// The signing CA and the trusted ones this state means.
    public static func authorities(state: String, trustDomain: String) throws -> Issuer.Authorities {
        let r = load(state)
        let current = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca", trustDomain: trustDomain)
        guard r.phase != .idle else { return .init(signing: current, trusted: [current], generation: r.generation) }
        let next = try CertificateAuthority.loadOrCreate(directory: "\(state)/ca-next", trustDomain: trustDomain)
        return .init(signing: r.phase == .switched ? next : current, trusted: [current, next], generation: r.generation)
    }

    /// What the running issuer's nodes last reported (`nodes.json`).
    public static func reports(_ state: String) -> [String: Issuer.NodeReport] {
        let dec = JSONDecoder()
        dec.dateDecodingStrategy = .iso8601
        return FileManager.default.contents(atPath: "\(state)/nodes.json").flatMap { try? dec.decode([String: Issuer.NodeReport].self, from: $0) } ?? [:]
    }

    /// The serial of the root in `dir/ca.pem`.
    public static func serial(_ dir: String) -> String? {
        (try? String(contentsOfFile: "\(dir)/ca.pem", encoding: .utf8)).flatMap { try? Certificate(pemEncoded: $0) }?.serialNumber.description
    }
}
