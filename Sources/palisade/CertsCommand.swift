import ArgumentParser
import Foundation
import PalisadeAgent
import PalisadeCA

/// `palisade certs list|show` and `palisade ca bundle`: read from the state
/// directory, so they work while the agent is stopped. Keys are never shown.
struct CertsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "certs", abstract: "The node's X.509-SVIDs.",
                                                    subcommands: [List.self, Show.self, VerifyCert.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Identity, serial, expiry and time to rotation of every SVID.")
        @OptionGroup var options: ConfigOption
        @Option var output: OutputFormat = .table
        func run() throws {
            let config = try options.load()
            let svids = SVIDStore.list(directory: config.svidDir)
            if output == .json { try printJSON(svids); return }
            let now = Date()
            printTable(["SPIFFE ID", "SERIAL", "NOT AFTER", "ROTATES IN"], svids.map { s in
                let left = s.rotateAt.timeIntervalSince(now)
                return [s.spiffeID, String(s.serial.prefix(23)), ISO8601DateFormatter().string(from: s.notAfter),
                        left > 0 ? "\(Int(left) / 60)m\(Int(left) % 60)s" : "due"]
            })
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One SVID's details and PEM certificate chain.")
        @OptionGroup var options: ConfigOption
        @Argument(help: "spiffe://TRUST-DOMAIN/PATH") var spiffeID: String
        @Option var output: OutputFormat = .table
        func run() throws {
            let config = try options.load()
            guard let s = SVIDStore.list(directory: config.svidDir).first(where: { $0.spiffeID == spiffeID }) else {
                throw CLIError("no SVID for \(spiffeID) in \(config.svidDir)")
            }
            if output == .json { try printJSON(s); return }
            print("spiffe id:   \(s.spiffeID)\nserial:      \(s.serial)\nnot before:  \(s.notBefore)\nnot after:   \(s.notAfter)\nrotates at:  \(s.rotateAt)\nkey file:    \(s.keyFile) (0600)")
            print(try String(contentsOfFile: s.certificateFile, encoding: .utf8), terminator: "")
        }
    }
}

struct CACommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ca", abstract: "The trust domain's certificate authority.",
                                                    subcommands: [Bundle.self, CAServe.self, CAJoinToken.self, CARevokeNode.self, CARotate.self, CAStatus.self])

    struct Bundle: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the trust bundle (PEM): for nodes joining an issuer, and for federated trust domains.")
        @OptionGroup var options: ConfigOption
        @Option(help: "Print the bundle of the issuer whose state directory this is (where palisade ca serve runs).") var issuerState: String?
        func run() throws {
            let config = try options.load()
            let path = issuerState.map { "\($0)/ca/ca.pem" } ?? config.issuer?.bundleFile ?? "\(config.caDir)/ca.pem"
            guard let pem = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw CLIError("no CA certificate at \(path) (the agent, or palisade ca serve, creates it on first start)")
            }
            print(pem, terminator: pem.hasSuffix("\n") ? "" : "\n")
        }
    }
}

import X509
import SwiftASN1

/// `palisade certs verify FILE`: checks a PEM chain (leaf first) the way the
/// mTLS listener will: SPIFFE rules plus a chain to the bundle of the leaf's
/// own trust domain (the node's CA, or a configured federated bundle).
struct VerifyCert: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "verify", abstract: "Verify an X.509-SVID (PEM chain, leaf first) against the trust bundles.")
    @OptionGroup var options: ConfigOption
    @Argument(help: "PEM file: the leaf certificate, then any intermediates.") var file: String

    func run() async throws {
        let config = try options.load()
        func certs(_ path: String) throws -> [Certificate] {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw CLIError("\(path): cannot read file") }
            do { return try PEMDocument.parseMultiple(pemString: text).map { try Certificate(pemDocument: $0) } } catch {
                throw CLIError("\(path): not a PEM certificate chain: \(error)")
            }
        }
        var bundles: [String: [Certificate]] = [:]
        let own = config.issuer?.bundleFile ?? "\(config.caDir)/ca.pem"
        if FileManager.default.fileExists(atPath: own) { bundles[config.trustDomain] = try certs(own) }
        for (td, path) in config.federatedBundles { bundles[td, default: []] += try certs(path) }
        let chain = try certs(file)
        guard let leaf = chain.first else { throw CLIError("\(file): no certificate") }
        switch await SPIFFEVerifier(bundles: bundles).verify(leaf: leaf, intermediates: Array(chain.dropFirst())) {
        case .success(let id): print("valid X.509-SVID for \(id)")
        case .failure(let r):
            FileHandle.standardError.write(Data("rejected: \(r)\n".utf8))
            throw ExitCode(1)
        }
    }
}
