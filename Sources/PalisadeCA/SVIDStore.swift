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
    let signer: SVIDSigner
    public let lifetime: TimeInterval
    private var cache: [SpiffeID: SVIDInfo] = [:]
    /// Requests the signer refused in the last `ensure`, and why.
    public private(set) var refused: [SpiffeID: String] = [:]
    /// Every SVID is re-issued at the next `ensure` (the signing key changed).
    private var renewEverything = false
    public func renewAll() { renewEverything = true }

    public init(directory: String, signer: SVIDSigner, lifetime: TimeInterval) throws {
        self.directory = directory
        self.signer = signer
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
    /// `first`, when it needs issuing, is asked for alone before the others:
    /// the node's own SVID, which a remote issuer needs to authenticate the
    /// node's other requests. A signer that cannot be reached throws; the
    /// SVIDs already on disk stay in use until they expire.
    @discardableResult
    public func ensure(_ ids: Set<SpiffeID>, first: SpiffeID? = nil, now: Date = Date()) throws -> [SpiffeID] {
        var due: [SpiffeID] = []
        for id in ids.sorted() {
            if !renewEverything, let known = cache[id] ?? load(id), now < known.rotateAt {
                cache[id] = known
                continue
            }
            due.append(id)
        }
        refused = [:]
        var issued: [SpiffeID] = []
        if let first, let i = due.firstIndex(of: first) {
            due.remove(at: i)
            issued += try issue([first], now: now)
        }
        if !due.isEmpty { issued += try issue(due, now: now) }
        renewEverything = false
        // Identities no longer on this node lose their SVIDs.
        for (id, info) in cache where !ids.contains(id) {
            unlink(info.certificateFile); unlink(info.keyFile)
            cache[id] = nil
        }
        return issued
    }

    /// New keys, one CSR each, signed together; each SVID written with its key.
    private func issue(_ ids: [SpiffeID], now: Date) throws -> [SpiffeID] {
        var keys: [SpiffeID: P256.Signing.PrivateKey] = [:]
        var requests: [SVIDRequest] = []
        for id in ids {
            let key = P256.Signing.PrivateKey()
            keys[id] = key
            requests.append(try SVIDRequest.make(id, key: key))
        }
        let results = try signer.sign(requests, lifetime: lifetime, now: now)
        var issued: [SpiffeID] = []
        for id in ids {
            switch results[id] {
            case .success(let chain)?:
                guard let leaf = chain.first, leaf.publicKey == Certificate.PublicKey(keys[id]!.publicKey),
                      case .success(let named) = SPIFFEVerifier.checkLeaf(leaf, trustDomain: id.trustDomain), named == id else {
                    refused[id] = "the signer returned a certificate that is not this key's SVID for \(id)"
                    continue
                }
                let (certPath, keyPath) = paths(id)
                // Key first: a reader that sees the new certificate finds its key.
                try writeSecret(keys[id]!.pemRepresentation, to: keyPath)
                let pem = try chain.map { try $0.serializeAsPEM().pemString }.joined(separator: "\n")
                try (pem + "\n").write(toFile: certPath, atomically: true, encoding: .utf8)
                cache[id] = SVIDStore.info(of: leaf, id: id.description, cert: certPath, key: keyPath)
                issued.append(id)
            case .failure(let e)?: refused[id] = e.description
            case nil: refused[id] = "the signer did not answer this request"
            }
        }
        return issued
    }

    /// The chain and key (PEM) of an SVID on disk that is still valid: a
    /// node authenticates to its issuer with its own.
    public func credentials(_ id: SpiffeID, now: Date = Date()) -> (chain: String, key: String)? {
        Self.credentials(id, directory: directory, now: now)
    }

    /// The same, read from a directory without a store (the issuer client
    /// reads them while the store is signing).
    public static func credentials(_ id: SpiffeID, directory: String, now: Date = Date()) -> (chain: String, key: String)? {
        let stem = "\(directory)/\(SVIDStore.fileStem(id))"
        guard let text = try? String(contentsOfFile: stem + ".pem", encoding: .utf8),
              let doc = try? PEMDocument.parseMultiple(pemString: text).first, let cert = try? Certificate(pemDocument: doc),
              now < cert.notValidAfter,
              let key = try? String(contentsOfFile: stem + ".key", encoding: .utf8) else { return nil }
        return (text, key)
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
