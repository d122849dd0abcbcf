import Foundation

/// The issuer's HTTP API (JSON over HTTPS, TLS 1.3, on `palisade ca serve`'s port):
///   POST /v1/join   {token, csr}           no client certificate   -> {chain, bundle}
///   POST /v1/sign   {csrs, lifetimeSeconds} node SVID as client cert -> {results: [{spiffeID, chain | error}], bundle}
///   GET  /v1/bundle                                                  -> {bundle}
/// PEM throughout; a chain is leaf first, without the root.
enum IssuerAPI {
    struct JoinRequest: Codable { var token: String; var csr: String }
    struct JoinResponse: Codable { var chain: String; var bundle: String }
    struct SignRequest: Codable { var csrs: [String]; var lifetimeSeconds: Double }
    struct SignResult: Codable { var spiffeID: String?; var chain: String?; var error: String? }
    struct SignResponse: Codable { var results: [SignResult]; var bundle: String }
    /// `generation` changes when the issuer switches its signing key (a
    /// root rotation): a node re-issues every SVID when it sees a new one.
    struct BundleResponse: Codable { var bundle: String; var generation: Int? }
    /// A node's probe says which roots it trusts (serials, comma-separated).
    static let trustsHeader = "x-palisade-trusts"
    struct ErrorResponse: Codable { var error: String }

    /// The SPIFFE ID the issuer's own TLS certificate carries.
    static func issuerPath() -> String { "/palisade/issuer" }

    /// Request bodies are small (a CSR is ~400 bytes).
    static let maxBody = 256 << 10
}
