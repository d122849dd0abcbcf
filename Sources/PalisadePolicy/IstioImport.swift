import Foundation
import PalisadeIdentity

/// Istio AuthorizationPolicy (security.istio.io/v1) mapped to HTTPPolicy.
/// Supported: selector.matchLabels, action ALLOW/DENY/AUDIT, from.source
/// principals / requestPrincipals / namespaces, to.operation methods /
/// paths (exact, "prefix*", "*") / hosts / ports, source ipBlocks, when on
/// request.headers[NAME]. Anything else is refused with its location rather
/// than ignored: CUSTOM, not* fields, remoteIpBlocks (X-Forwarded-For is
/// the client's to write), other when keys, suffix paths. Ports: the policy
/// governs the ports its rules name; Istio would also deny requests to the
/// workload's other ports (close those with an L3/L4 Policy).
public enum IstioImport {
    public static func parse(_ text: String, file: String) throws -> [HTTPPolicy] {
        try YAMLValue.documents(text, file: file).filter { !$0.isNull }.map(parse)
    }

    static func unsupported(_ v: YAMLValue, _ what: String) -> InputError { v.error("\(what) is not supported by Palisade's import") }

    static func parse(_ doc: YAMLValue) throws -> HTTPPolicy {
        let m = try doc.mapping(allowedKeys: ["apiVersion", "kind", "metadata", "spec"])
        guard let api = try m["apiVersion"]?.string(), api == "security.istio.io/v1" || api == "security.istio.io/v1beta1" else {
            throw doc.error("expected apiVersion: security.istio.io/v1")
        }
        guard try m["kind"]?.string() == "AuthorizationPolicy" else { throw doc.error("expected kind: AuthorizationPolicy") }
        guard let meta = m["metadata"] else { throw doc.error("missing metadata") }
        let md = try meta.mapping(allowedKeys: ["name", "namespace", "labels", "annotations"])
        guard let name = try md["name"]?.string() else { throw meta.error("missing metadata.name") }
        let namespace = try md["namespace"]?.string() ?? "default"
        let spec = try (m["spec"]?.mapping(allowedKeys: ["selector", "targetRef", "targetRefs", "action", "provider", "rules"])) ?? [:]
        if let t = spec["targetRef"] ?? spec["targetRefs"] { throw unsupported(t, "targetRef (gateway attachment)") }
        if let p = spec["provider"] { throw unsupported(p, "provider (CUSTOM action)") }
        var selector: [String: String] = [:]
        if let sel = spec["selector"] {
            selector = try PolicyParser.labels(try sel.mapping(allowedKeys: ["matchLabels"])["matchLabels"] ?? sel)
        }
        var action = HTTPPolicy.Action.allow
        if let a = spec["action"] {
            switch try a.string() {
            case "ALLOW": action = .allow
            case "DENY": action = .deny
            case "AUDIT": action = .audit
            case "CUSTOM": throw unsupported(a, "action CUSTOM (external authorization)")
            default: throw a.error("expected ALLOW, DENY or AUDIT")
            }
        }
        var rules: [HTTPPolicy.Rule] = []
        for r in try spec["rules"]?.sequence() ?? [] {
            let rm = try r.mapping(allowedKeys: ["from", "to", "when"])
            var from: [HTTPPolicy.Source] = []
            for f in try rm["from"]?.sequence() ?? [] {
                guard let src = try f.mapping(allowedKeys: ["source"])["source"] else { continue }
                let sm = try src.mapping()
                for (k, v) in sm {
                    switch k {
                    case "principals":
                        for p in try v.stringList() {
                            if p == "*" { continue }
                            if p.hasSuffix("*") { from.append(.spiffePrefix("spiffe://" + p.dropLast())) }
                            else { from.append(.spiffeID(try SpiffeID("spiffe://" + p))) }
                        }
                    case "requestPrincipals":
                        for p in try v.stringList() {
                            guard !p.contains("*") else { throw unsupported(v, "a wildcard in requestPrincipals") }
                            from.append(.jwt("jwt:" + p))
                        }
                    case "namespaces": from += try v.stringList().map { .namespace($0) }
                    case "ipBlocks":
                        for b in try v.stringList() {
                            guard let c = CIDR(b.contains("/") ? b : (b.contains(":") ? b + "/128" : b + "/32")) else {
                                throw v.error("expected an IP address or block like 10.0.0.0/8, got '\(b)'")
                            }
                            from.append(.cidr(c))
                        }
                    case "remoteIpBlocks": throw unsupported(v, "remoteIpBlocks (X-Forwarded-For is set by the client; ipBlocks match the caller's address)")
                    default: throw unsupported(v, "source.\(k)")
                    }
                }
            }
            var headers: [String: String] = [:]
            for w in try rm["when"]?.sequence() ?? [] {
                let wm = try w.mapping(allowedKeys: ["key", "values", "notValues"])
                if let nv = wm["notValues"] { throw unsupported(nv, "when.notValues") }
                guard let k = try wm["key"]?.string(), k.hasPrefix("request.headers["), k.hasSuffix("]") else {
                    throw unsupported(w, "a when key other than request.headers[NAME]")
                }
                let values = try wm["values"]?.stringList() ?? []
                guard values.count == 1 else { throw unsupported(w, "a when condition with other than exactly one value") }
                headers[String(k.dropFirst("request.headers[".count).dropLast()).lowercased()] = values[0]
            }
            let tos = try rm["to"]?.sequence() ?? []
            if tos.isEmpty {
                rules.append(.init(action: action, from: from, headers: headers, location: r.location))
            }
            for t in tos {
                guard let op = try t.mapping(allowedKeys: ["operation"])["operation"] else { continue }
                let om = try op.mapping()
                var methods: [String] = [], paths: [PathPattern] = [], hosts: [String] = [], ports: [Int] = []
                for (k, v) in om {
                    switch k {
                    case "methods": methods = try v.stringList().map { $0.uppercased() }
                    case "hosts": hosts = try v.stringList().map { $0.lowercased() }
                    case "paths":
                        for p in try v.stringList() {
                            let pattern: String
                            if p == "*" { pattern = "/**" }
                            else if p.hasSuffix("/*") { pattern = String(p.dropLast()) + "**" }
                            else if p.hasPrefix("*") { throw unsupported(v, "a suffix path match '\(p)'") }
                            else { pattern = p }
                            guard let pp = PathPattern(pattern) else { throw v.error("'\(p)' is not a path this import can map") }
                            paths.append(pp)
                        }
                    case "ports":
                        ports = try v.stringList().map { s in
                            guard let n = Int(s), (1...65535).contains(n) else { throw v.error("expected ports 1-65535, got '\(s)'") }
                            return n
                        }
                    default: throw unsupported(v, "operation.\(k)")
                    }
                }
                rules.append(.init(action: action, from: from, methods: methods, paths: paths, hosts: hosts, headers: headers, ports: ports,
                                   location: t.location))
            }
        }
        // Istio: an ALLOW policy with no rules allows nothing (deny all).
        // The policy governs the ports its rules name (every port if one
        // rule names none): connections to them go through the proxy.
        let governed = rules.contains { $0.ports.isEmpty } ? [] : Array(Set(rules.flatMap(\.ports))).sorted()
        var p = HTTPPolicy(name: "\(namespace)/\(name)", selector: selector, ports: governed, rules: rules, location: doc.location)
        p.namespace = namespace
        if rules.isEmpty && action == .allow { p.rules = [.init(action: .deny, location: doc.location)] }
        return p
    }
}
