import Foundation
import PalisadeIdentity

/// L7 rules: which requests a destination accepts, by source identity,
/// method, path, host and headers. Pure: the in-agent HTTP proxy asks
/// `HTTPRuleSet.decide` for every request. Deny wins; once a destination
/// (and port) has rules, a request no rule allows is denied.
public struct HTTPPolicy: Hashable, Sendable {
    public enum Action: String, Hashable, Sendable { case allow, deny, audit }

    /// Who sent the request (from the tunnel's SVID, or a JWT at the edge).
    public enum Source: Hashable, Sendable {
        case spiffeID(SpiffeID)
        case spiffePrefix(String)           // "spiffe://td/ns/shop/" (ends with '/')
        case jwt(String)                    // "jwt:ISSUER/SUBJECT"
        case namespace(String)              // Kubernetes-style: spiffe://TD/ns/NAME/...
        case cidr(CIDR)                     // the calling workload's address
    }

    public struct Rule: Hashable, Sendable {
        public var action: Action
        public var from: [Source]            // empty: anyone
        public var methods: [String]         // upper case; empty: any
        public var paths: [PathPattern]      // empty: any
        public var hosts: [String]           // lower case, port stripped; empty: any
        public var headers: [String: String] // lower-case names, exact values
        public var ports: [Int]              // empty: every port the policy governs
        public var location: SourceLocation
        public init(action: Action, from: [Source] = [], methods: [String] = [], paths: [PathPattern] = [], hosts: [String] = [],
                    headers: [String: String] = [:], ports: [Int] = [], location: SourceLocation) {
            self.action = action; self.from = from; self.methods = methods; self.paths = paths; self.hosts = hosts
            self.headers = headers; self.ports = ports; self.location = location
        }
    }

    public var name: String
    public var selector: [String: String]     // destination workloads' labels
    /// The destination ports this policy governs (their connections go
    /// through the proxy; a request no rule allows is denied); empty: every port.
    public var ports: [Int]
    public var rules: [Rule]
    public var location: SourceLocation
    /// Only workloads of this namespace (Istio policies are namespaced).
    public var namespace: String? = nil
    /// What the governed ports speak; nil: told from the first bytes.
    public var appProtocol: AppProtocol? = nil

    /// A port's application protocol, as Kubernetes' appProtocol says it.
    /// Declared, the proxy reads every connection as that protocol: an
    /// HTTP/2 port answers a bad preface with GOAWAY PROTOCOL_ERROR (RFC
    /// 9113 3.4) instead of reading it as an HTTP/1.1 request. Undeclared,
    /// a connection starting with "PRI " is HTTP/2 and any other HTTP/1.x.
    public enum AppProtocol: String, Hashable, Sendable, CaseIterable {
        case http = "http"       // HTTP/1.x
        case h2c = "h2c"         // HTTP/2 with prior knowledge (also gRPC)
    }
}

/// `/exact`, a prefix `/api/` followed by `*` or `**`, or a safe glob where
/// `*` matches within one path segment and `**` across segments.
public struct PathPattern: Hashable, Sendable, CustomStringConvertible {
    public let text: String
    let segments: [String]

    public init?(_ text: String) {
        guard text.hasPrefix("/"), !text.contains("//"), !text.contains("?"), !text.contains("#"),
              !text.split(separator: "/").contains(where: { $0 == "." || $0 == ".." }) else { return nil }
        let segs = text.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
        // "**" only as a whole segment; "*" anywhere within one.
        guard segs.allSatisfy({ !$0.contains("**") || $0 == "**" }) else { return nil }
        self.text = text
        segments = segs
    }

    public var description: String { text }

    /// Matches a normalized request path (see `HTTPRuleSet.normalize`).
    /// The path's segments (what follows each "/") are walked in place,
    /// with no array of them per request.
    public func matches(_ path: String) -> Bool {
        let u = path.utf8
        let start = u.firstIndex(of: UInt8(ascii: "/")).map { u.index(after: $0) }   // nil: no segment at all
        return Self.match(segments[...], u, from: start)
    }

    /// `from`: where the path's next segment starts; nil when none is left.
    static func match(_ pat: ArraySlice<String>, _ u: String.UTF8View, from: String.Index?) -> Bool {
        guard let first = pat.first else { return from == nil }
        if first == "**" {
            // Zero or more segments.
            var at = from
            while true {
                if match(pat.dropFirst(), u, from: at) { return true }
                guard let a = at else { return false }
                at = next(u, after: a)
            }
        }
        guard let from else { return false }
        let end = u[from...].firstIndex(of: UInt8(ascii: "/")) ?? u.endIndex
        guard glob(first, Substring(u[from..<end])) else { return false }
        return match(pat.dropFirst(), u, from: end == u.endIndex ? nil : u.index(after: end))
    }

    /// Where the segment after the one starting at `start` starts.
    static func next(_ u: String.UTF8View, after start: String.Index) -> String.Index? {
        guard let slash = u[start...].firstIndex(of: UInt8(ascii: "/")) else { return nil }
        return u.index(after: slash)
    }

    /// `*` within one segment.
    static func glob(_ pattern: String, _ s: Substring) -> Bool {
        if !pattern.utf8.contains(UInt8(ascii: "*")) { return pattern.utf8.elementsEqual(s.utf8) }
        let parts = pattern.split(separator: "*", omittingEmptySubsequences: false)
        guard s.hasPrefix(parts[0]) else { return false }
        var rest = s.dropFirst(parts[0].count)
        for (i, part) in parts.enumerated().dropFirst() {
            if i == parts.count - 1 { return rest.hasSuffix(part) && rest.count >= part.count }
            guard let r = rest.range(of: part) else { return false }
            rest = rest[r.upperBound...]
        }
        return true
    }
}

/// The facts of one request, as the proxy parsed them.
public struct HTTPRequestFacts: Sendable {
    /// The JWT identity of a request whose bearer token did not verify:
    /// deny rules on JWT identities match it (fail closed), allows do not.
    public static let unverifiedJWT = JWTIdentity.unverified
    public var source: SpiffeID?
    public var jwtIdentity: String?
    /// The calling workload's address (as its node's agent reports it).
    public var sourceAddress: IPAddress?
    public var method: String
    public var path: String
    public var host: String
    /// Lower-case names; every field line's value, in the order received
    /// (HTTP/1.1 and HTTP/2 collect them the same way: HeaderValues).
    public var headers: [String: [String]]
    public init(source: SpiffeID?, jwtIdentity: String? = nil, sourceAddress: IPAddress? = nil, method: String, path: String, host: String,
                headers: [String: [String]] = [:]) {
        self.source = source; self.jwtIdentity = jwtIdentity; self.sourceAddress = sourceAddress
        self.method = method; self.path = path; self.host = host; self.headers = headers
    }
    /// One value per header.
    public init(source: SpiffeID?, jwtIdentity: String? = nil, sourceAddress: IPAddress? = nil, method: String, path: String, host: String,
                headers: [String: String]) {
        self.init(source: source, jwtIdentity: jwtIdentity, sourceAddress: sourceAddress, method: method, path: path, host: host,
                  headers: headers.mapValues { [$0] })
    }
}

/// How a rule's `headers: {name: value}` reads a request that carries the
/// header several times, or as a comma-separated list (RFC 9110 5.3 makes
/// the two equivalent, and a workload may read either its first or its last
/// value). The header's values are its field lines split at commas,
/// trimmed. A deny or audit rule matches when ANY value (or the whole
/// combined list) equals the rule's value; an allow rule matches only when
/// EVERY value does (or the whole combined list does), and never when the
/// header is absent. So repeating a header can neither skip a deny nor
/// widen an allow, whatever value the workload reads. Both proxies collect
/// every field line (HTTP/1.1 in order of the head, HTTP/2 in order of the
/// header block), so the two protocols decide one request alike.
public enum HeaderValues {
    public static func matches(_ lines: [String]?, _ wanted: String, denyLike: Bool) -> Bool {
        guard let lines, !lines.isEmpty else { return false }
        if lines.count == 1 && lines[0] == wanted { return true }
        if lines.joined(separator: ", ") == wanted { return true }
        let elements = lines.flatMap { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
        if denyLike { return lines.contains(wanted) || elements.contains(wanted) }
        return !elements.isEmpty && elements.allSatisfy { $0 == wanted }
    }
}

public struct HTTPDecision: Hashable, Sendable {
    public var allowed: Bool
    /// Short, for the 403 body and the access log: never internals.
    public var reason: String
    /// "policy/rule-index" of the deciding rule, nil for the default.
    public var rule: String?
    /// An audit rule matched: allowed, but logged as would-be-denied.
    public var audited: Bool
}

/// The L7 rules that apply to one destination (its labels) and port.
public struct HTTPRuleSet: Sendable {
    public let policies: [HTTPPolicy]
    public init(_ policies: [HTTPPolicy]) { self.policies = policies }

    /// The L7 documents (HTTPPolicy, Istio AuthorizationPolicy) of policy
    /// files that also hold L3/L4 policies; every error is reported.
    public static func load(_ files: [(name: String, text: String)]) throws -> HTTPRuleSet {
        var out: [HTTPPolicy] = []
        var errors: [InputError] = []
        for f in files {
            do {
                for doc in try YAMLValue.documents(f.text, file: f.name) where !doc.isNull {
                    let kind = try? doc.mapping()["kind"]?.string()
                    do {
                        if kind == "HTTPPolicy" { out.append(try HTTPPolicyParser.parse(doc)) }
                        else if kind == "AuthorizationPolicy" { out.append(try IstioImport.parse(doc)) }
                    } catch let e as InputError { errors.append(e) }
                }
            } catch let e as InputError { errors.append(e) }
        }
        if !errors.isEmpty { throw PolicyLoadErrors(errors: errors) }
        return HTTPRuleSet(out)
    }

    func rules(labels: [String: String], namespace: String? = nil, port: Int) -> [(String, HTTPPolicy.Rule)] {
        policies.filter { p in (p.ports.isEmpty || p.ports.contains(port)) && p.selector.allSatisfy { labels[$0.key] == $0.value }
                               && (p.namespace == nil || p.namespace == namespace) }
            .flatMap { p in
                p.rules.enumerated().filter { $0.element.ports.isEmpty || $0.element.ports.contains(port) }.map { ("\(p.name)/\($0.offset)", $0.element) }
            }
    }

    /// Does any rule name a JWT identity?
    public var namesJWTIdentities: Bool {
        policies.contains { $0.rules.contains { $0.from.contains { if case .jwt = $0 { return true } else { return false } } } }
    }

    /// The ports on which a destination has L7 rules; 0 means every port.
    public func ports(labels: [String: String], namespace: String? = nil) -> Set<Int> {
        Set(policies.filter { p in p.selector.allSatisfy { labels[$0.key] == $0.value } && (p.namespace == nil || p.namespace == namespace) }
            .flatMap { $0.ports.isEmpty ? [0] : $0.ports })
    }

    /// Does the destination have L7 rules (so its traffic needs the proxy)?
    public func applies(labels: [String: String], namespace: String? = nil, port: Int) -> Bool {
        policies.contains { p in (p.ports.isEmpty || p.ports.contains(port)) && p.selector.allSatisfy { labels[$0.key] == $0.value }
                                 && (p.namespace == nil || p.namespace == namespace) }
    }

    /// Percent-decodes unreserved characters, collapses nothing: a path with
    /// dot segments, empty segments or an encoded '/' is refused outright
    /// (it would be read differently by the proxy and the server).
    public static func normalize(_ raw: String) -> String? {
        let bytes = raw.utf8
        let end = bytes.firstIndex(of: UInt8(ascii: "?")) ?? bytes.endIndex
        let path = bytes[..<end]
        guard path.first == UInt8(ascii: "/"), !path.contains(UInt8(ascii: "\\")) else { return nil }
        // Most paths have no escapes: Foundation's decoding is skipped for them.
        var decoded = String(Substring(path))
        if path.contains(UInt8(ascii: "%")) {
            let lower = decoded.lowercased()
            if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%2e") { return nil }
            guard let d = decoded.removingPercentEncoding else { return nil }
            decoded = d
        }
        return hasAmbiguousSegment(decoded) ? nil : decoded
    }

    /// An empty segment ("//"), "." or "..": servers read these differently.
    static func hasAmbiguousSegment(_ path: String) -> Bool {
        var length = 0, dots = 0, leading = true
        for b in path.utf8 {
            if b == UInt8(ascii: "/") {
                if (!leading && length == 0) || (length <= 2 && length > 0 && dots == length) { return true }
                leading = false; length = 0; dots = 0
            } else {
                length += 1
                if b == UInt8(ascii: ".") { dots += 1 }
            }
        }
        return length <= 2 && length > 0 && dots == length
    }

    public func decide(_ f: HTTPRequestFacts, labels: [String: String], namespace: String? = nil, port: Int) -> HTTPDecision {
        guard let d = destination(labels: labels, namespace: namespace, port: port) else {
            return HTTPDecision(allowed: true, reason: "no L7 rules", rule: nil, audited: false)
        }
        return d.decide(f)
    }

    /// The rules of one destination and port, picked once per connection
    /// (the proxy judges every request against them); nil: no L7 rules.
    public func destination(labels: [String: String], namespace: String? = nil, port: Int) -> HTTPDestinationRules? {
        guard applies(labels: labels, namespace: namespace, port: port) else { return nil }
        var d = HTTPDestinationRules(rules(labels: labels, namespace: namespace, port: port).map { ($0.0, $0.1) })
        // Policies that disagree on the protocol leave it to detection.
        let declared = Set(policies.filter { p in (p.ports.isEmpty || p.ports.contains(port)) && p.selector.allSatisfy { labels[$0.key] == $0.value }
                                               && (p.namespace == nil || p.namespace == namespace) }.compactMap(\.appProtocol))
        d.appProtocol = declared.count == 1 ? declared.first : nil
        return d
    }
}

/// The rules in force for one destination and port. Deny wins; a request
/// no rule allows is denied (the port has rules, so it is governed).
public struct HTTPDestinationRules: Sendable {
    struct Compiled: Sendable {
        var id: String
        var rule: HTTPPolicy.Rule
        var allowed, denied, audited: HTTPDecision   // made once, not per request
    }
    let rules: [Compiled]
    /// Does any rule look at request headers (else the proxy needs not collect them)?
    public let usesHeaders: Bool
    /// Does any rule name a JWT identity (so bearer tokens must be verified)?
    public let usesJWT: Bool
    /// What the port speaks, when its policies declare it.
    public var appProtocol: HTTPPolicy.AppProtocol?

    init(_ rules: [(String, HTTPPolicy.Rule)]) {
        self.rules = rules.map { id, r in
            Compiled(id: id, rule: r,
                     allowed: HTTPDecision(allowed: true, reason: "allowed by policy \(id)", rule: id, audited: false),
                     denied: HTTPDecision(allowed: false, reason: "denied by policy \(id)", rule: id, audited: false),
                     audited: HTTPDecision(allowed: true, reason: "audit: would be denied (\(id))", rule: id, audited: true))
        }
        usesHeaders = rules.contains { !$0.1.headers.isEmpty }
        usesJWT = rules.contains { $0.1.from.contains { if case .jwt = $0 { return true } else { return false } } }
    }

    static let ambiguous = HTTPDecision(allowed: false, reason: "denied: ambiguous path", rule: nil, audited: false)
    static let noRule = HTTPDecision(allowed: false, reason: "denied: no rule allows this request", rule: nil, audited: false)

    public func decide(_ f: HTTPRequestFacts) -> HTTPDecision {
        guard let path = HTTPRuleSet.normalize(f.path) else { return Self.ambiguous }
        var allow: Compiled?, audit: Compiled?
        for c in rules where Self.matches(c.rule, f, path: path) {
            switch c.rule.action {
            case .deny: return c.denied
            case .audit: audit = audit ?? c
            case .allow: allow = allow ?? c
            }
        }
        if var a = allow?.allowed { a.audited = audit != nil; return a }
        return audit?.audited ?? Self.noRule
    }

    static func matches(_ r: HTTPPolicy.Rule, _ f: HTTPRequestFacts, path: String) -> Bool {
        if !r.from.isEmpty {
            let ok = r.from.contains { s in
                switch s {
                case .spiffeID(let id): return f.source == id
                case .spiffePrefix(let p): return f.source.map { $0.description.hasPrefix(p) } ?? false
                case .jwt(let j): return f.jwtIdentity == j || (f.jwtIdentity == HTTPRequestFacts.unverifiedJWT && r.action == .deny)
                case .namespace(let ns): return f.source.map { $0.path.hasPrefix("/ns/\(ns)/") } ?? false
                // Caller's address unknown: a deny rule on addresses still
                // applies (fail closed), an allow rule does not.
                case .cidr(let c): return f.sourceAddress.map(c.contains) ?? (r.action == .deny)
                }
            }
            if !ok { return false }
        }
        if !r.methods.isEmpty && !r.methods.contains(f.method) && !r.methods.contains(f.method.uppercased()) { return false }
        if !r.paths.isEmpty && !r.paths.contains(where: { $0.matches(path) }) { return false }
        if !r.hosts.isEmpty {
            let host = f.host.split(separator: ":").first.map { $0.lowercased() } ?? ""
            if !r.hosts.contains(host) { return false }
        }
        for (k, v) in r.headers where !HeaderValues.matches(f.headers[k], v, denyLike: r.action != .allow) { return false }
        return true
    }
}

/// Parses `kind: HTTPPolicy` documents (palisade.dev/v1).
public enum HTTPPolicyParser {
    public static func parse(_ text: String, file: String) throws -> [HTTPPolicy] {
        try YAMLValue.documents(text, file: file).filter { !$0.isNull }.map(parse)
    }

    static func parse(_ doc: YAMLValue) throws -> HTTPPolicy {
        let m = try doc.mapping(allowedKeys: ["apiVersion", "kind", "metadata", "spec"])
        guard try m["apiVersion"]?.string() == "palisade.dev/v1" else { throw doc.error("expected apiVersion: palisade.dev/v1") }
        guard try m["kind"]?.string() == "HTTPPolicy" else { throw doc.error("expected kind: HTTPPolicy") }
        guard let meta = m["metadata"], let nameV = try meta.mapping(allowedKeys: ["name", "namespace", "labels", "annotations"])["name"] else {
            throw doc.error("missing metadata.name")
        }
        guard let spec = m["spec"] else { throw doc.error("missing spec") }
        let s = try spec.mapping(allowedKeys: ["selector", "port", "ports", "rules", "appProtocol"])
        guard let sel = s["selector"] else { throw spec.error("missing field 'selector' (labels of the destination workloads)") }
        let selector = try PolicyParser.labels(try sel.mapping(allowedKeys: ["labels"])["labels"] ?? sel)
        guard let rulesV = s["rules"] else { throw spec.error("missing field 'rules'") }
        let rules = try rulesV.sequence().map(parseRule)
        var ports = try (s["ports"]?.sequence() ?? []).map { try $0.int(in: 1...65535) }
        if let p = s["port"] { ports.append(try p.int(in: 1...65535)) }
        var appProtocol: HTTPPolicy.AppProtocol?
        if let v = s["appProtocol"] {
            let text = try v.string()
            guard let p = HTTPPolicy.AppProtocol(rawValue: text) else {
                throw v.error("appProtocol: expected one of \(HTTPPolicy.AppProtocol.allCases.map(\.rawValue).joined(separator: ", ")), got '\(text)'")
            }
            appProtocol = p
        }
        return HTTPPolicy(name: try nameV.string(), selector: selector, ports: ports,
                          rules: rules, location: doc.location, appProtocol: appProtocol)
    }

    static func parseRule(_ v: YAMLValue) throws -> HTTPPolicy.Rule {
        let m = try v.mapping(allowedKeys: ["action", "from", "methods", "paths", "hosts", "headers", "ports"])
        var action = HTTPPolicy.Action.allow
        if let a = m["action"] {
            guard let act = HTTPPolicy.Action(rawValue: try a.string()) else { throw a.error("expected allow, deny or audit") }
            action = act
        }
        let from = try (m["from"]?.sequence() ?? []).map { e -> HTTPPolicy.Source in
            let f = try e.mapping(allowedKeys: ["spiffeID", "spiffeIDPrefix", "jwt", "namespace", "cidr"])
            guard f.count == 1, let (k, val) = f.first else { throw e.error("expected exactly one of spiffeID, spiffeIDPrefix, jwt, namespace, cidr") }
            switch k {
            case "spiffeID": return .spiffeID(try PolicyParser.spiffe(val))
            case "spiffeIDPrefix":
                let p = try val.string()
                guard p.hasPrefix("spiffe://"), p.hasSuffix("/") else { throw val.error("expected a prefix like spiffe://TD/ns/NAME/ (ending with '/')") }
                return .spiffePrefix(p)
            case "jwt":
                let j = try val.string()
                guard j.hasPrefix("jwt:") else { throw val.error("expected a JWT identity jwt:ISSUER/SUBJECT") }
                return .jwt(j)
            case "cidr":
                let t = try val.string()
                guard let c = CIDR(t) else { throw val.error("expected an address block like 10.0.0.0/8 or fd00::/8, got '\(t)'") }
                return .cidr(c)
            default: return .namespace(try val.string())
            }
        }
        let methods = try (m["methods"]?.stringList() ?? []).map { $0.uppercased() }
        let known: Set<String> = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"]
        if let bad = methods.first(where: { !known.contains($0) }), let mv = m["methods"] { throw mv.error("unknown HTTP method '\(bad)'") }
        let paths = try (m["paths"]?.sequence() ?? []).map { p -> PathPattern in
            let t = try p.string()
            guard let pat = PathPattern(t) else {
                throw p.error("expected a path starting with '/', without '//', '.', '..', '?' or '#', with '*' within a segment or '**' as a whole segment, got '\(t)'")
            }
            return pat
        }
        let hosts = try (m["hosts"]?.stringList() ?? []).map { $0.lowercased() }
        var headers: [String: String] = [:]
        if let h = m["headers"] {
            for (k, val) in try h.stringMap() {
                guard !k.isEmpty, k.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }) else { throw h.error("invalid header name '\(k)'") }
                guard k.lowercased() != "authorization" else { throw h.error("matching on the Authorization header is not allowed (use a jwt source)") }
                headers[k.lowercased()] = val
            }
        }
        let ports = try (m["ports"]?.sequence() ?? []).map { try $0.int(in: 1...65535) }
        return HTTPPolicy.Rule(action: action, from: from, methods: methods, paths: paths, hosts: hosts, headers: headers, ports: ports, location: v.location)
    }
}
