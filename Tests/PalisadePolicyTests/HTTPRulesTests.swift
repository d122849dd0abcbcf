import XCTest
import PalisadeIdentity
import PalisadeTestSupport
@testable import PalisadePolicy

/// L7 rules (the pure part): matching, deny wins, default deny,
/// safe paths, precise errors.
final class HTTPRulesTests: XCTestCase {
    let billing = """
    apiVersion: palisade.dev/v1
    kind: HTTPPolicy
    metadata: {name: billing}
    spec:
      selector: {labels: {app: billing}}
      port: 8080
      rules:
        - from: [{spiffeID: "spiffe://shop.test/ns/shop/sa/frontend"}]
          methods: [POST]
          paths: ["/charges", "/charges/*/refund"]
        - from: [{spiffeIDPrefix: "spiffe://shop.test/ns/ops/"}]
          methods: [GET]
          paths: ["/admin/**"]
          headers: {x-env: prod}
        - action: deny
          paths: ["/admin/secrets/**"]
        - from: [{jwt: "jwt:https://idp.test/alice"}]
          methods: [GET]
          hosts: [billing.shop]
          paths: ["/invoices/*"]
    """

    func facts(_ source: String?, _ method: String, _ path: String, host: String = "billing", headers: [String: String] = [:], jwt: String? = nil) -> HTTPRequestFacts {
        HTTPRequestFacts(source: source.flatMap { try? SpiffeID($0) }, jwtIdentity: jwt, method: method, path: path, host: host, headers: headers)
    }

    func testDecisions() throws {
        let set = HTTPRuleSet(try HTTPPolicyParser.parse(billing, file: "billing.yaml"))
        let labels = ["app": "billing"]
        func allowed(_ f: HTTPRequestFacts, port: Int = 8080) -> Bool { set.decide(f, labels: labels, port: port).allowed }
        let fe = "spiffe://shop.test/ns/shop/sa/frontend", ops = "spiffe://shop.test/ns/ops/sa/oncall"
        XCTAssertTrue(allowed(facts(fe, "POST", "/charges")))
        XCTAssertTrue(allowed(facts(fe, "POST", "/charges/ch_123/refund")))
        XCTAssertTrue(allowed(facts(fe, "POST", "/charges?x=1")), "the query is not part of the path")
        XCTAssertFalse(allowed(facts(fe, "GET", "/charges")), "method")
        XCTAssertFalse(allowed(facts(fe, "POST", "/charges/a/b/refund")), "* is one segment")
        XCTAssertFalse(allowed(facts("spiffe://shop.test/ns/shop/sa/other", "POST", "/charges")), "source")
        XCTAssertTrue(allowed(facts(ops, "GET", "/admin/users/1", headers: ["x-env": "prod"])))
        XCTAssertFalse(allowed(facts(ops, "GET", "/admin/users/1", headers: ["x-env": "dev"])), "header")
        XCTAssertFalse(allowed(facts(ops, "GET", "/admin/secrets/k", headers: ["x-env": "prod"])), "deny wins over allow")
        let d = set.decide(facts(ops, "GET", "/admin/secrets/k", headers: ["x-env": "prod"]), labels: labels, port: 8080)
        XCTAssertEqual(d.rule, "billing/2")
        XCTAssertTrue(allowed(facts(nil, "GET", "/invoices/7", host: "Billing.Shop:8080", jwt: "jwt:https://idp.test/alice")))
        XCTAssertFalse(allowed(facts(nil, "GET", "/invoices/7", host: "other", jwt: "jwt:https://idp.test/alice")), "host")
        XCTAssertFalse(allowed(facts(nil, "GET", "/x")), "default deny once the destination has rules")
        XCTAssertTrue(allowed(facts(nil, "GET", "/x"), port: 9090), "other port: no L7 rules")
        XCTAssertTrue(set.decide(facts(nil, "GET", "/x"), labels: ["app": "other"], port: 8080).allowed, "other workload")
        // Paths that servers and proxies could read differently are refused.
        for p in ["/charges/../admin/secrets/k", "/charges//x", "/admin/%2e%2e/secrets", "/admin%2fsecrets", "/a\\b"] {
            XCTAssertFalse(allowed(facts(fe, "POST", p)), p)
        }
    }

    /// Repeated or listed headers: a deny matches any value, an allow needs every value.
    func testRepeatedHeadersNeitherSkipDenyNorWidenAllow() throws {
        let set = HTTPRuleSet(try HTTPPolicyParser.parse("""
        apiVersion: palisade.dev/v1
        kind: HTTPPolicy
        metadata: {name: h}
        spec:
          selector: {labels: {app: h}}
          rules:
            - paths: ["/open/**"]
            - paths: ["/prod/**"]
              headers: {x-env: prod}
            - action: deny
              headers: {x-debug: "1"}
        """, file: "h.yaml"))
        func allowed(_ path: String, _ headers: [String: [String]]) -> Bool {
            set.decide(HTTPRequestFacts(source: nil, method: "GET", path: path, host: "h", headers: headers), labels: ["app": "h"], port: 80).allowed
        }
        XCTAssertTrue(allowed("/open/a", [:]))
        XCTAssertTrue(allowed("/open/a", ["x-debug": ["0"]]))
        for debug in [["1"], ["1", "0"], ["0", "1"], ["1", "1"], ["0, 1"], ["0,1"], ["2", " 1 "]] {
            XCTAssertFalse(allowed("/open/a", ["x-debug": debug]), "x-debug \(debug) must meet the deny")
        }
        XCTAssertTrue(allowed("/prod/a", ["x-env": ["prod"]]))
        XCTAssertTrue(allowed("/prod/a", ["x-env": ["prod", "prod"]]))
        for env in [[], ["dev"], ["prod", "dev"], ["dev", "prod"], ["prod, dev"]] as [[String]] {
            XCTAssertFalse(allowed("/prod/a", env.isEmpty ? [:] : ["x-env": env]), "x-env \(env) must not meet the allow")
        }
        // A rule value with a comma compares with the whole list.
        XCTAssertTrue(HeaderValues.matches(["a", "b"], "a, b", denyLike: false))
        XCTAssertTrue(HeaderValues.matches(["a, b"], "a, b", denyLike: true))
    }

    func testGlobs() {
        let p = PathPattern("/api/*/items/**")!
        XCTAssertTrue(p.matches("/api/v1/items"))
        XCTAssertTrue(p.matches("/api/v1/items/a/b"))
        XCTAssertFalse(p.matches("/api/v1/x/items"))
        XCTAssertTrue(PathPattern("/files/*.png")!.matches("/files/cat.png"))
        XCTAssertFalse(PathPattern("/files/*.png")!.matches("/files/a/cat.png"))
        XCTAssertNil(PathPattern("relative"))
        XCTAssertNil(PathPattern("/a/**b"))
        XCTAssertNil(PathPattern("/a/../b"))
    }

    /// Path patterns walk a path's segments in place; the plain reading
    /// splits it into segments and matches them recursively. Both agree on
    /// random patterns and paths (with "*", "**", empty segments, a path
    /// without a leading "/").
    func testPathPatternsAgreeWithTheSplitReading() {
        func glob(_ p: Substring, _ s: Substring) -> Bool {
            guard let star = p.firstIndex(of: "*") else { return p == s }
            let head = p[..<star], tail = p[p.index(after: star)...]
            guard s.hasPrefix(head) else { return false }
            var rest = s.dropFirst(head.count)
            while true {
                if glob(tail, rest) { return true }
                if rest.isEmpty { return false }
                rest = rest.dropFirst()
            }
        }
        func reference(_ pat: ArraySlice<Substring>, _ path: ArraySlice<Substring>) -> Bool {
            guard let first = pat.first else { return path.isEmpty }
            if first == "**" { return (0...path.count).contains { reference(pat.dropFirst(), path.dropFirst($0)) } }
            guard let seg = path.first, glob(first, seg) else { return false }
            return reference(pat.dropFirst(), path.dropFirst())
        }
        var rng = SplitMix64(seed: 17)
        let patternSegments = ["a", "b", "*", "**", "a*", "*b", "a*b", "", "ab"]
        let pathSegments = ["a", "b", "ab", "aab", "ba", "", "x"]
        var checked = 0, matched = 0
        for _ in 0..<20_000 {
            let text = "/" + (0..<Int.random(in: 0...4, using: &rng)).map { _ in patternSegments.randomElement(using: &rng)! }.joined(separator: "/")
            guard let pattern = PathPattern(text) else { continue }
            let path = (Bool.random(using: &rng) ? "/" : "")
                + (0..<Int.random(in: 0...5, using: &rng)).map { _ in pathSegments.randomElement(using: &rng)! }.joined(separator: "/")
            let want = reference(text.split(separator: "/", omittingEmptySubsequences: false).dropFirst(),
                                 path.split(separator: "/", omittingEmptySubsequences: false).dropFirst())
            XCTAssertEqual(pattern.matches(path), want, "pattern \(text) path \(path)")
            checked += 1
            if want { matched += 1 }
        }
        XCTAssertGreaterThan(checked, 5_000)
        XCTAssertGreaterThan(matched, 500, "too few matches to say anything")
    }

    /// The proxy's byte-level path check against the plain reading of the
    /// rule (split into segments; "", "." and ".." refused) on random paths.
    func testPathNormalizationAgreesWithTheSegmentReading() {
        func reference(_ raw: String) -> String? {
            let path = raw.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? raw
            guard path.hasPrefix("/"), !path.contains("\\") else { return nil }
            var decoded = path
            if path.contains("%") {
                let lower = path.lowercased()
                if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%2e") { return nil }
                guard let d = path.removingPercentEncoding else { return nil }
                decoded = d
            }
            if decoded.contains("//") || decoded.split(separator: "/").contains(where: { $0 == "." || $0 == ".." }) { return nil }
            return decoded
        }
        let pieces = ["/", "/", "/", ".", "..", "...", "a", "b.c", "%41", "%2e", "%2F", "%zz", "?", "?x=/../", "\\", "é", "*"]
        var rng = SystemRandomNumberGenerator()
        var refused = 0
        for _ in 0..<20_000 {
            let path = (0..<Int.random(in: 0...7, using: &rng)).map { _ in pieces.randomElement(using: &rng)! }.joined()
            let got = HTTPRuleSet.normalize(path)
            XCTAssertEqual(got, reference(path), path)
            if got == nil { refused += 1 }
        }
        XCTAssertGreaterThan(refused, 1000)
        XCTAssertLessThan(refused, 19_000)
        XCTAssertEqual(HTTPRuleSet.normalize("/a/%41/b?x"), "/a/A/b")
        XCTAssertNil(HTTPRuleSet.normalize("/a/./b"))
        XCTAssertNil(HTTPRuleSet.normalize("/a/.."))
        XCTAssertEqual(HTTPRuleSet.normalize("/a/.../b"), "/a/.../b")
    }

    /// A bearer token that did not verify ("jwt:unverified"): deny rules on
    /// JWT identities apply to it (it might be anyone), allow rules do not.
    func testUnverifiedTokensMeetDenyRulesOnly() throws {
        let set = try HTTPRuleSet.load([(name: "j.yaml", text: """
            apiVersion: palisade.dev/v1
            kind: HTTPPolicy
            metadata: {name: j}
            spec:
              selector: {labels: {app: web}}
              rules:
                - from: [{jwt: "jwt:https://idp/alice"}]
                - action: deny
                  from: [{jwt: "jwt:https://idp/mallory"}]
                - paths: ["/open"]
            """)])
        let rules = try XCTUnwrap(set.destination(labels: ["app": "web"], port: 80))
        XCTAssertTrue(rules.usesJWT)
        XCTAssertTrue(set.namesJWTIdentities)
        func decide(_ jwt: String?, _ path: String) -> Bool {
            rules.decide(HTTPRequestFacts(source: nil, jwtIdentity: jwt, method: "GET", path: path, host: "web")).allowed
        }
        XCTAssertTrue(decide("jwt:https://idp/alice", "/x"))
        XCTAssertFalse(decide("jwt:https://idp/mallory", "/open"), "deny wins")
        XCTAssertFalse(decide(HTTPRequestFacts.unverifiedJWT, "/x"), "an unverified token is nobody an allow names")
        XCTAssertFalse(decide(HTTPRequestFacts.unverifiedJWT, "/open"), "and meets every deny on JWT identities")
        XCTAssertTrue(decide(nil, "/open"), "no token: the JWT deny does not apply")
    }

    /// A port's declared protocol reaches the rules of that destination
    /// and port; policies that disagree leave it to detection; a value
    /// Palisade does not know is an error with its place.
    func testAppProtocolIsDeclaredPerPort() throws {
        func policy(_ name: String, port: Int, _ proto: String?) -> String {
            "apiVersion: palisade.dev/v1\nkind: HTTPPolicy\nmetadata: {name: \(name)}\nspec:\n  selector: {labels: {app: api}}\n  port: \(port)\n"
                + (proto.map { "  appProtocol: \($0)\n" } ?? "") + "  rules:\n    - methods: [GET]\n"
        }
        let set = HTTPRuleSet(try HTTPPolicyParser.parse([policy("grpc", port: 9000, "h2c"), policy("web", port: 8080, "http"),
                                                          policy("plain", port: 7000, nil), policy("a", port: 6000, "h2c"),
                                                          policy("b", port: 6000, "http")].joined(separator: "---\n"), file: "p.yaml"))
        let labels = ["app": "api"]
        XCTAssertEqual(set.destination(labels: labels, port: 9000)?.appProtocol, .h2c)
        XCTAssertEqual(set.destination(labels: labels, port: 8080)?.appProtocol, .http)
        XCTAssertNil(set.destination(labels: labels, port: 7000)?.appProtocol)
        XCTAssertNotNil(set.destination(labels: labels, port: 6000))
        XCTAssertNil(set.destination(labels: labels, port: 6000)?.appProtocol, "two policies disagree")
        XCTAssertThrowsError(try HTTPPolicyParser.parse(policy("bad", port: 1, "http3"), file: "p.yaml")) {
            XCTAssertTrue("\($0)".contains("p.yaml:7") && "\($0)".contains("appProtocol: expected one of http, h2c, got 'http3'"), "\($0)")
        }
    }

    func testPreciseErrors() {
        func error(_ rules: String) -> String {
            let text = "apiVersion: palisade.dev/v1\nkind: HTTPPolicy\nmetadata: {name: p}\nspec:\n  selector: {labels: {app: x}}\n  rules:\n" + rules
            do { _ = try HTTPPolicyParser.parse(text, file: "p.yaml"); return "no error" } catch { return "\(error)" }
        }
        XCTAssertTrue(error("    - methods: [FETCH]\n").contains("p.yaml:7"), error("    - methods: [FETCH]\n"))
        XCTAssertTrue(error("    - methods: [FETCH]\n").contains("unknown HTTP method 'FETCH'"))
        XCTAssertTrue(error("    - paths: [\"/a/../b\"]\n").contains("expected a path"))
        XCTAssertTrue(error("    - headers: {Authorization: x}\n").contains("Authorization header is not allowed"))
        XCTAssertTrue(error("    - action: maybe\n").contains("expected allow, deny or audit"))
        XCTAssertTrue(error("    - from: [{spiffeIDPrefix: \"spiffe://a/ns\"}]\n").contains("ending with '/'"))
    }
}

/// Istio AuthorizationPolicy import: what maps, and precise refusals.
final class IstioImportTests: XCTestCase {
    func testMapping() throws {
        let text = """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: billing, namespace: shop}
        spec:
          selector: {matchLabels: {app: billing}}
          action: ALLOW
          rules:
          - from: [{source: {principals: ["shop.test/ns/shop/sa/frontend"]}}]
            to: [{operation: {methods: ["POST"], paths: ["/charges", "/charges/*"], ports: ["8080"]}}]
            when: [{key: "request.headers[x-env]", values: ["prod"]}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-admin, namespace: shop}
        spec:
          selector: {matchLabels: {app: billing}}
          action: DENY
          rules:
          - to: [{operation: {paths: ["/admin/*"]}}]
        """
        let set = HTTPRuleSet(try IstioImport.parse(text, file: "istio.yaml"))
        let fe = try SpiffeID("spiffe://shop.test/ns/shop/sa/frontend")
        func ok(_ method: String, _ path: String, _ src: SpiffeID? = nil, env: String = "prod", ns: String = "shop") -> Bool {
            set.decide(HTTPRequestFacts(source: src ?? fe, method: method, path: path, host: "billing", headers: ["x-env": env]),
                       labels: ["app": "billing"], namespace: ns, port: 8080).allowed
        }
        XCTAssertTrue(ok("POST", "/charges"))
        XCTAssertTrue(ok("POST", "/charges/a/b"), "Istio's prefix match spans segments")
        XCTAssertFalse(ok("GET", "/charges"))
        XCTAssertFalse(ok("POST", "/charges", env: "dev"))
        XCTAssertFalse(ok("POST", "/charges", try SpiffeID("spiffe://shop.test/ns/shop/sa/x")))
        XCTAssertFalse(ok("POST", "/admin/x"), "DENY wins")
        XCTAssertTrue(ok("POST", "/charges", ns: "other"), "namespaced: not applied elsewhere")
    }

    func testRefusals() {
        func error(_ spec: String) -> String {
            let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n" + spec
            do { _ = try IstioImport.parse(text, file: "i.yaml"); return "no error" } catch { return "\(error)" }
        }
        XCTAssertTrue(error("  action: CUSTOM\n").contains("CUSTOM"))
        XCTAssertTrue(error("  rules:\n  - from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]\n").contains("remoteIpBlocks"))
        XCTAssertTrue(error("  rules:\n  - from: [{source: {ipBlocks: [10.0.0.300/8]}}]\n").contains("i.yaml:6"))
        XCTAssertTrue(error("  rules:\n  - to: [{operation: {ports: [\"http\"]}}]\n").contains("expected ports 1-65535"))
        XCTAssertTrue(error("  rules:\n  - from: [{source: {notPrincipals: [x]}}]\n").contains("source.notPrincipals is not supported"))
        XCTAssertTrue(error("  rules:\n  - to: [{operation: {paths: [\"*.png\"]}}]\n").contains("suffix path"))
        XCTAssertTrue(error("  rules:\n  - when: [{key: source.ip, values: [x]}]\n").contains("i.yaml:6"))
    }

    /// Istio ipBlocks and ports: the caller's address, several ports with
    /// a rule each; the governed ports are the ones the rules name.
    func testIstioIPBlocksAndPorts() throws {
        let text = """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: api, namespace: shop}
        spec:
          selector: {matchLabels: {app: api}}
          rules:
          - from: [{source: {ipBlocks: ["10.1.0.0/16", "fd00::7"]}}]
            to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
          - to: [{operation: {ports: ["9090", "9091"], paths: ["/metrics"]}}]
        """
        let set = HTTPRuleSet(try IstioImport.parse(text, file: "i.yaml"))
        func ok(_ port: Int, _ path: String = "/x", from addr: String? = "10.1.2.3") -> Bool {
            set.decide(HTTPRequestFacts(source: try! SpiffeID("spiffe://shop.test/ns/shop/sa/fe"), sourceAddress: addr.flatMap(IPAddress.init),
                                        method: "GET", path: path, host: "api"), labels: ["app": "api"], namespace: "shop", port: port).allowed
        }
        XCTAssertTrue(ok(8080))
        XCTAssertTrue(ok(8080, from: "fd00::7"))
        XCTAssertFalse(ok(8080, from: "10.2.0.1"), "outside the block")
        XCTAssertFalse(ok(8080, from: nil), "address unknown: an allow on addresses does not match")
        XCTAssertFalse(ok(9090, "/x"), "9090 is governed: only /metrics")
        XCTAssertTrue(ok(9091, "/metrics"))
        XCTAssertTrue(ok(7000), "a port no rule names is not governed by this policy")
        XCTAssertEqual(set.ports(labels: ["app": "api"], namespace: "shop"), [8080, 9090, 9091])
    }

    func testCIDRSourcesAndRulePortsInPalisadeFormat() throws {
        let text = """
        apiVersion: palisade.dev/v1
        kind: HTTPPolicy
        metadata: {name: p}
        spec:
          selector: {labels: {app: api}}
          ports: [8080, 8081]
          rules:
            - from: [{cidr: 10.0.0.0/8}]
            - action: deny
              from: [{cidr: 10.9.0.0/16}]
              ports: [8081]
        """
        let set = HTTPRuleSet(try HTTPPolicyParser.parse(text, file: "p.yaml"))
        func ok(_ port: Int, _ addr: String?) -> Bool {
            set.decide(HTTPRequestFacts(source: nil, sourceAddress: addr.flatMap(IPAddress.init), method: "GET", path: "/", host: "api"),
                       labels: ["app": "api"], port: port).allowed
        }
        XCTAssertTrue(ok(8080, "10.9.1.1"), "the deny names 8081 only")
        XCTAssertFalse(ok(8081, "10.9.1.1"))
        XCTAssertTrue(ok(8081, "10.1.1.1"))
        XCTAssertFalse(ok(8080, "192.168.1.1"))
        XCTAssertFalse(ok(8081, nil), "address unknown: a deny on addresses applies (fail closed)")
        XCTAssertThrowsError(try HTTPPolicyParser.parse(text.replacingOccurrences(of: "10.0.0.0/8", with: "10.0.0.0/33"), file: "p.yaml")) {
            XCTAssertTrue("\($0)".contains("p.yaml:8:21: spec.rules[0].from[0].cidr") && "\($0)".contains("expected an address block"), "\($0)")
        }
    }
}
