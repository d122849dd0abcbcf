import Crypto
import Foundation
import PalisadeIdentity
import SwiftASN1
import X509

/// What `certs list` shows about one SVID.
public struct SVIDInfo: Codable, Sendable {
    public var spiffeID: String
    public var serial: String
    public var notBefore: Date
    public var notAfter: Date
    public var rotateAt: Date
    public var certificateFile: String
    public var keyFile: String
}

/// The node's X.509-SVIDs on disk (STATE/svids): one certificate chain and
/// one private key (0600) per SPIFFE ID, re-issued with a new key at half of
/// the lifetime so peers never see an expired one.
public final class SVIDStore: @unchecked Sendable {
    public let directory: String
    let ca: CertificateAuthority
    public let lifetime: TimeInterval
    private var cache: [SpiffeID: SVIDInfo] = [:]

    public init(directory: String, ca: CertificateAuthority, lifetime: TimeInterval) throws {
        self.directory = directory
        self.ca = ca
        self.lifetime = lifetime
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    }

    static func fileStem(_ id: SpiffeID) -> String {
        (id.trustDomain + id.path).map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" ? $0 : "_" }.map(String.init).joined()
    }

    func paths(_ id: SpiffeID) -> (cert: String, key: String) {
        let stem = "\(directory)/\(SVIDStore.fileStem(id))"
        return ("\(stem).pem", "\(stem).key")
    }

    public static func info(of cert: Certificate, id: String, cert certPath: String, key keyPath: String) -> SVIDInfo {
        // Half-life of the lifetime asked for: notBefore is backdated by the
        // clock-skew allowance, which must not count (with a short lifetime
        // it would put the rotation in the past and re-issue endlessly).
        let start = min(cert.notValidBefore.addingTimeInterval(CertificateAuthority.clockSkewAllowance), cert.notValidAfter)
        let half = start.addingTimeInterval(cert.notValidAfter.timeIntervalSince(start) / 2)
        return SVIDInfo(spiffeID: id, serial: cert.serialNumber.description, notBefore: cert.notValidBefore, notAfter: cert.notValidAfter,
                        rotateAt: half, certificateFile: certPath, keyFile: keyPath)
    }

    /// Makes sure each ID has a current SVID; returns the IDs (re)issued.
    @discardableResult
    public func ensure(_ ids: Set<SpiffeID>, now: Date = Date()) throws -> [SpiffeID] {
        var issued: [SpiffeID] = []
        for id in ids.sorted() {
            if let known = cache[id] ?? load(id), now < known.rotateAt {
                cache[id] = known
                continue
            }
            let key = P256.Signing.PrivateKey()
            let cert = try ca.issue(id, publicKey: .init(key.publicKey), lifetime: lifetime, now: now)
            let (certPath, keyPath) = paths(id)
            // Key first: a reader that sees the new certificate finds its key.
            try writeSecret(key.pemRepresentation, to: keyPath)
            let chain = try ([cert] + ca.intermediates).map { try $0.serializeAsPEM().pemString }.joined(separator: "\n")
            try (chain + "\n").write(toFile: certPath, atomically: true, encoding: .utf8)
            cache[id] = SVIDStore.info(of: cert, id: id.description, cert: certPath, key: keyPath)
            issued.append(id)
        }
        // Identities no longer on this node lose their SVIDs.
        for (id, info) in cache where !ids.contains(id) {
            unlink(info.certificateFile); unlink(info.keyFile)
            cache[id] = nil
        }
        return issued
    }

    public func cached(_ id: SpiffeID) -> SVIDInfo? { cache[id] }

    func load(_ id: SpiffeID) -> SVIDInfo? {
        let (certPath, keyPath) = paths(id)
        guard let text = try? String(contentsOfFile: certPath, encoding: .utf8),
              let doc = try? PEMDocument.parseMultiple(pemString: text).first, let cert = try? Certificate(pemDocument: doc),
              FileManager.default.fileExists(atPath: keyPath) else { return nil }
        return SVIDStore.info(of: cert, id: id.description, cert: certPath, key: keyPath)
    }

    /// Every SVID in the directory (read from disk; works without the agent).
    public static func list(directory: String) -> [SVIDInfo] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { $0.hasSuffix(".pem") }.sorted().compactMap { name in
            let certPath = "\(directory)/\(name)"
            guard let text = try? String(contentsOfFile: certPath, encoding: .utf8),
                  let doc = try? PEMDocument.parseMultiple(pemString: text).first, let cert = try? Certificate(pemDocument: doc),
                  case .success(let id) = SPIFFEVerifier.checkLeaf(cert, trustDomain: nil) else { return nil }
            return info(of: cert, id: id.description, cert: certPath, key: String(certPath.dropLast(4)) + ".key")
        }
    }
}
