import CPalisadeShared
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import SwiftASN1
import X509
import NIOPosix
import PalisadeCA
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy
import PalisadeL7
import PalisadeTunnel

/// The trust bundles in force, read by the tunnel's event loops.
final class TrustBox: Sendable {
    private let value = NIOLockedValueBox((verifier: SPIFFEVerifier(bundles: [:]), fingerprint: ""))
    var current: SPIFFEVerifier { value.withLockedValue { $0.verifier } }
    /// Returns true if the bundles changed.
    @discardableResult
    func set(_ v: SPIFFEVerifier) -> Bool {
        let fp = v.fingerprint
        return value.withLockedValue {
            guard fp != $0.fingerprint else { return false }
            $0 = (v, fp)
            return true
        }
    }
}

extension Agent {
    /// The trust bundles: this trust domain's CA and the federated ones.
    func verifier() throws -> SPIFFEVerifier {
        var bundles: [String: [Certificate]] = [config.trustDomain: signer.bundle]
        for (td, path) in config.federatedBundles {
            let text = try String(contentsOfFile: path, encoding: .utf8)
            bundles[td, default: []] += try PEMDocument.parseMultiple(pemString: text).map { try Certificate(pemDocument: $0) }
        }
        // Federation through the store: other trust domains' bundles as
        // their nodes published them (configured files take precedence).
        for (td, pem) in storeSync?.bundles() ?? [:] where td != config.trustDomain && config.federatedBundles[td] == nil {
            if let certs = try? PEMDocument.parseMultiple(pemString: pem).map({ try Certificate(pemDocument: $0) }), !certs.isEmpty {
                bundles[td] = certs
            }
        }
        return SPIFFEVerifier(bundles: bundles)
    }

    /// Re-reads the trust bundles; a change reaches the inbound proxy and the pools.
    func refreshTrust() {
        do {
            if trust.set(try verifier()) {
                try inbound?.updateVerifier(trust.current)
                log.info("trust bundles", metadata: ["trust-domains": "\(trust.current.bundles.keys.sorted().joined(separator: ","))"])
            }
        } catch {
            log.error("trust bundles not updated", metadata: ["error": "\(error)"])
        }
    }
}
