import Foundation
import NIOConcurrencyHelpers
import NIOCore
import PalisadeRelay
import NIOHTTP1
import PalisadeIdentity

/// The verdict on one HTTP request, from the destination's L7 rules.
public struct HTTPVerdict: Sendable {
    public var allowed: Bool
    /// Short and safe to show the caller (the 403 body).
    public var reason: String
    public var rule: String?
    public init(allowed: Bool, reason: String, rule: String?) { self.allowed = allowed; self.reason = reason; self.rule = rule }
}

/// Judges a request: method, path (with query), Host, headers (lower-case names).
/// `jwtIdentity`: what a verified bearer token names ("jwt:ISSUER/SUBJECT"),
/// "jwt:unverified" for a token that did not verify, nil without a token.
public typealias HTTPGate = @Sendable (_ method: String, _ uri: String, _ host: String, _ headers: [String: [String]],
                                       _ jwtIdentity: String?) -> HTTPVerdict

/// Verifies a bearer token on the proxy's behalf: the identity it carries
/// ("jwt:ISSUER/SUBJECT"), or nil when it is refused.
public typealias BearerVerifier = @Sendable (_ token: String, _ eventLoop: EventLoop) -> EventLoopFuture<String?>

/// The identity a verification produced, or JWTIdentity.unverified for a
/// token that did not verify (JWT deny rules meet it).
func bearerIdentity(_ result: Result<String?, Error>) -> String {
    (try? result.get()).flatMap { $0 } ?? JWTIdentity.unverified
}

/// The token of an `Authorization: Bearer` value.
func bearerToken(_ authorization: String?) -> String? {
    guard let a = authorization, a.count > 7, a.prefix(7).lowercased() == "bearer " else { return nil }
    let t = a.dropFirst(7).trimmingCharacters(in: .whitespaces)
    return t.isEmpty ? nil : t
}

/// A request target's path, as the access log shows it (no query: it may
/// carry secrets).
func withoutQuery(_ uri: String) -> String {
    guard let q = uri.utf8.firstIndex(of: UInt8(ascii: "?")) else { return uri }
    return String(uri[..<q])
}

/// Makes the recorder of one proxied connection's requests (access log and
/// metrics), once per connection: its source and destination are fixed, so
/// what depends only on them is looked up once, not per request.
public typealias HTTPRecorderFactory = @Sendable (_ source: String, _ destination: String) -> (@Sendable (AccessLogEntry) -> Void)

/// One access-log line: never the Authorization header, never a body.
public struct AccessLogEntry: Codable, Sendable {
    public var time: String
    public var source: String
    public var destination: String
    public var destinationAddress: String
    public var method: String
    public var path: String
    public var status: Int
    public var requestBytes: Int
    public var responseBytes: Int
    public var durationMs: Double
    public var decision: String
    public var rule: String?
}

/// What a caller of the HTTP proxy may hold: how long a request head may
/// take once its first byte arrived (slow headers, "slowloris"), how long a
/// request body may stall, and how large a head may be (431 past it; the
/// HTTP/2 side advertises the same header list size). Set once by the agent
/// from its configuration, read when a connection starts.
public struct HTTPLimits: Sendable {
    public var requestHeadTimeout: TimeAmount = .seconds(10)
    public var bodyIdleTimeout: TimeAmount = .seconds(30)
    /// A connection idle between requests is closed after this (nginx: 75 s).
    public var keepAliveTimeout: TimeAmount = .seconds(75)
    public var maxHeaderListSize = 64 << 10
    public var maxHeaderFields = 256
    public init() {}

    private static let box = NIOLockedValueBox(HTTPLimits())
    public static var current: HTTPLimits {
        get { box.withLockedValue { $0 } }
        set { box.withLockedValue { $0 = newValue } }
    }
}

/// What a proxied port speaks: told from the first bytes ("PRI " starts
/// HTTP/2's preface, anything else is HTTP/1.x), or declared by its rules.
public enum L7AppProtocol: Sendable {
    case detect, http1, http2
}

/// Who is talking to whom through one proxied connection, and where its
/// requests are judged and logged.
package struct L7Context: Sendable {
    package var gate: HTTPGate
    /// Only then are a request's headers collected for the gate.
    package var usesHeaders: Bool = true
    /// Set when the rules name JWT identities: a request's bearer token is
    /// verified before it is judged.
    package var verifyBearer: BearerVerifier? = nil
    package var appProtocol = L7AppProtocol.detect
    package var source: String
    package var destination: String
    package var destinationAddress: String
    package var log: (@Sendable (AccessLogEntry) -> Void)?
    /// The caller's side is a tunnel stream (an HTTP/2 stream ends itself
    /// once END_STREAM went both ways), not a socket.
    package var callerIsStream = false

    package init(gate: @escaping HTTPGate, usesHeaders: Bool = true, verifyBearer: BearerVerifier? = nil, appProtocol: L7AppProtocol = .detect,
                 source: String, destination: String, destinationAddress: String, log: (@Sendable (AccessLogEntry) -> Void)? = nil,
                 callerIsStream: Bool = false) {
        self.gate = gate; self.usesHeaders = usesHeaders; self.verifyBearer = verifyBearer; self.appProtocol = appProtocol
        self.source = source; self.destination = destination; self.destinationAddress = destinationAddress; self.log = log
        self.callerIsStream = callerIsStream
    }

    /// One finished (or refused) request, to the access log and metrics.
    func record(method: String, path: String, status: Int, requestBytes: Int, responseBytes: Int, start: Date, verdict: HTTPVerdict) {
        log?(AccessLogEntry(time: UTCTime.string(start, milliseconds: true), source: source, destination: destination, destinationAddress: destinationAddress,
                            method: method, path: path, status: status, requestBytes: requestBytes, responseBytes: responseBytes,
                            durationMs: Date().timeIntervalSince(start) * 1000, decision: (verdict.allowed ? Outcome.allowed : .denied).rawValue,
                            rule: verdict.rule))
    }
}
