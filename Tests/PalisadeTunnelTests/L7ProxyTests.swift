import Foundation
import PalisadeTestSupport
import XCTest
import JWTKit
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP1
import PalisadeAgent
import PalisadeIdentity
import PalisadeJWT
import PalisadePolicy
@testable import PalisadeL7
@testable import PalisadeTunnel

/// The in-agent HTTP proxy on loopback (no kernel): curl -> outbound proxy
/// -> tunnel -> L7 gate -> a workload. HTTP/1.1 with Python's server and
/// HTTP/2 with nghttpd; the gate allows GET /public/** only.
extension TunnelTests {
    func startL7(_ server: [String], port: Int) throws -> Process {
        let www = "\(dir!)/www"
        for (p, body) in [("public/a.txt", "public a"), ("private/b.txt", "private b")] {
            try FileManager.default.createDirectory(atPath: "\(www)/\((p as NSString).deletingLastPathComponent)", withIntermediateDirectories: true)
            try body.write(toFile: "\(www)/\(p)", atomically: true, encoding: .utf8)
        }
        try Data(repeating: 0x61, count: 4 << 20).write(to: URL(fileURLWithPath: "\(www)/public/big.bin"))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = server.map { $0.replacingOccurrences(of: "WWW", with: www) }
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        for _ in 0..<50 { if (try? sh(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/\(port)"]))?.status == 0 { break }; usleep(100_000) }
        XCTAssertTrue(p.isRunning, "the test's server on port \(port) exited (port taken?)")
        authority = "127.0.0.1:\(port)"
        listener.authorize = { r in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web") { method, uri, _, _, _ in
                let ok = method == "GET" && uri.hasPrefix("/public/")
                return HTTPVerdict(allowed: ok, reason: ok ? "" : "denied: no rule allows this request", rule: ok ? "public" : nil)
            }
        }
        return p
    }

    /// A gate that allows every request.
    static let allowAll: HTTPGate = { _, _, _, _, _ in HTTPVerdict(allowed: true, reason: "", rule: "all") }

    /// A gate that judges by real HTTP rules (the caller has no SPIFFE ID here).
    static func gate(_ rules: HTTPDestinationRules) -> HTTPGate {
        { method, uri, host, headers, jwt in
            let d = rules.decide(HTTPRequestFacts(source: nil, jwtIdentity: jwt, method: method, path: uri, host: host, headers: headers))
            return HTTPVerdict(allowed: d.allowed, reason: d.reason, rule: d.rule)
        }
    }

    func curl(_ args: [String]) throws -> String {
        try sh(["curl", "-s", "--max-time", "10"] + args).output
    }

    /// Runs `body` twice: through the tunnel to node 2's proxy ("tunnel"),
    /// then through this node's own proxy with `route` ("same node").
    func throughBothProxies(_ route: OutboundRoute.HTTP = OutboundRoute.HTTP(destination: "spiffe://example.org/ns/default/sa/web", gate: allowAll),
                            _ body: (_ path: String) throws -> Void) rethrows {
        for path in ["tunnel", "same node"] {
            localHTTP = path == "tunnel" ? nil : route
            try body(path)
        }
    }

    /// Random header multisets: the HTTP/1.1 and the HTTP/2 proxy collect
    /// the same values and reach the same decision, and x-debug: 1 in any
    /// line or list element never passes the deny rule.
    func testBothProtocolsReadRepeatedHeadersAlike() throws {
        let rules = try XCTUnwrap(try HTTPRuleSet.load([(name: "h.yaml", text: """
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
            """)]).destination(labels: ["app": "h"], port: 80))
        var r = SystemRandomNumberGenerator()
        let names = ["x-debug", "X-Debug", "x-env", "x-other"], values = ["1", "0", "prod", "dev", "1, 0", "prod, prod", " 1", "prod,dev"]
        var denied = 0, allowed = 0
        for _ in 0..<3_000 {
            let path = ["/open/a", "/prod/a"].randomElement(using: &r)!
            let lines = (0..<Int.random(in: 0...4, using: &r)).map { _ in (names.randomElement(using: &r)!, values.randomElement(using: &r)!) }
            // HTTP/1.1 from the raw head the framer reads (a field value's
            // surrounding whitespace is not part of it: RFC 9110 5.5).
            let raw = "GET \(path) HTTP/1.1\r\n" + lines.map { "\($0.0): \($0.1)\r\n" }.joined() + "\r\n"
            var h1: [String: [String]] = [:]
            var bytes = ByteBuffer(string: raw)
            try HTTP1RequestFramer().feed(&bytes) { if case .head(let h) = $0 { h1 = h.fieldValues() } }
            let h2 = L7HTTP2.facts(HPACKHeaders(lines.map { ($0.0.lowercased(), $0.1.trimmingCharacters(in: .whitespaces)) })).headers
            XCTAssertEqual(h1, h2, "\(lines)")
            let d1 = rules.decide(HTTPRequestFacts(source: nil, method: "GET", path: path, host: "h", headers: h1))
            let d2 = rules.decide(HTTPRequestFacts(source: nil, method: "GET", path: path, host: "h", headers: h2))
            XCTAssertEqual(d1, d2, "\(lines)")
            let debugOne = lines.contains { $0.0.lowercased() == "x-debug" && $0.1.split(separator: ",").contains { $0.trimmingCharacters(in: .whitespaces) == "1" } }
            if debugOne { XCTAssertFalse(d1.allowed, "x-debug: 1 hidden among \(lines)") }
            if d1.allowed { allowed += 1 } else { denied += 1 }
        }
        XCTAssertGreaterThan(allowed, 300)
        XCTAssertGreaterThan(denied, 300)
    }

    func testHTTP2StreamsJudgedOneByOneThroughTheTunnel() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["sh", "-c", "exec nghttpd -v --no-tls \"$@\" > /tmp/nghttpd.log 2>&1", "x", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        let url = "http://127.0.0.1:\(proxy.localPort)"
        XCTAssertEqual(try curl(["--http2-prior-knowledge", url + "/public/a.txt"]), "public a")
        // nghttp sends all of them at once on one connection (curl 7.88's
        // --parallel does not multiplex with prior knowledge).
        let streams = H2Streams.run(try sh(["nghttp", "-ns", "-t", "10"] + ["/public/a.txt?1", "/private/b.txt?1", "/public/big.bin", "/private/b.txt?2", "/public/a.txt?2"].map { url + $0 }).output)
        XCTAssertEqual(streams.map { "\($0.path) \($0.code)" }.sorted(),
                       ["/private/b.txt?1 403", "/private/b.txt?2 403", "/public/a.txt?1 200", "/public/a.txt?2 200", "/public/big.bin 200"])
        XCTAssertEqual(Set(streams.map(\.stream)).count, 5, "five streams of one connection")
        XCTAssertEqual(try curl(["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}", url + "/public/big.bin"]), "\(4 << 20)")
    }

    /// Hand-made protocol violations through the proxy (a small part of
    /// what h2spec checks; tools/testing/h2-conformance runs the real one):
    /// each is answered the way RFC 9113 asks, by the proxy itself. The
    /// port is declared HTTP/2 (appProtocol: h2c), so even bytes that are no
    /// preface at all get HTTP/2's answer; a port left to detection reads a
    /// damaged preface starting "PRI " as HTTP/2 too.
    func testHTTP2ProtocolViolationsAreAnsweredPerRFC9113() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["nghttpd", "--no-tls", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        listener.authorize = { _ in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", gate: Self.allowAll)
        }
        let detected = try sh([Self.python, Self.netprobe, "h2raw", "bad-preface", "127.0.0.1", "\(proxy.localPort)"]).output
        XCTAssertEqual(detected.trimmingCharacters(in: .whitespacesAndNewlines), "GOAWAY:PROTOCOL_ERROR closed")
        listener.authorize = { _ in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", appProtocol: .http2, gate: Self.allowAll)
        }
        // A connection error is a GOAWAY and then a closed connection (RFC 9113 5.4.1).
        let expected = [
            "valid": "HEADERS:1 DATA:1",
            "bad-preface": "GOAWAY:PROTOCOL_ERROR closed",
            "not-a-preface": "GOAWAY:PROTOCOL_ERROR closed",
            "headers-on-stream-0": "GOAWAY:PROTOCOL_ERROR closed",
            "uppercase-header": "RST_STREAM:1:PROTOCOL_ERROR",
            "connection-header": "RST_STREAM:1:PROTOCOL_ERROR",
            "content-length-mismatch": "RST_STREAM:1:PROTOCOL_ERROR",
            "data-on-idle-stream": "GOAWAY:PROTOCOL_ERROR closed",
            "window-update-zero": "GOAWAY:PROTOCOL_ERROR closed",
            "oversized-frame": "GOAWAY:FRAME_SIZE_ERROR closed",
            "settings-window-too-big": "GOAWAY:FLOW_CONTROL_ERROR closed",
            "rst-on-idle-stream": "GOAWAY:PROTOCOL_ERROR closed",
            "missing-method": "RST_STREAM:1:PROTOCOL_ERROR",
            "ping-wrong-length": "GOAWAY:FRAME_SIZE_ERROR closed",
            // (The proxy's own check: rules read :authority, the workload
            // might read Host. Without it, a Host naming another entity
            // reaches the workload; nghttpd refuses two Hosts itself.)
            "host-not-authority": "RST_STREAM:1:PROTOCOL_ERROR",
            "two-hosts": "RST_STREAM:1:PROTOCOL_ERROR",
            "host-same-authority": "HEADERS:1 DATA:1",
        ]
        for (name, answer) in expected.sorted(by: { $0.key < $1.key }) {
            let got = try sh([Self.python, Self.netprobe, "h2raw", name, "127.0.0.1", "\(proxy.localPort)"]).output
            XCTAssertEqual(got.trimmingCharacters(in: .whitespacesAndNewlines), answer, name)
        }
    }

    /// HTTP/2 floods against the proxy's caller side: each ends with a
    /// GOAWAY and a closed connection well before the flood is through, and
    /// a legitimate caller is served right after each.
    func testHTTP2FloodsCloseTheOffendingConnection() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["nghttpd", "--no-tls", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        listener.authorize = { _ in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", gate: Self.allowAll)
        }
        let url = "http://127.0.0.1:\(proxy.localPort)/public/a.txt"
        let expected = [
            "rapid-reset": "GOAWAY:ENHANCE_YOUR_CALM closed",        // CVE-2023-44487
            "continuation": "GOAWAY:ENHANCE_YOUR_CALM closed",       // the 2024 CONTINUATION family
            "settings": "GOAWAY:ENHANCE_YOUR_CALM closed",
            "ping": "GOAWAY:ENHANCE_YOUR_CALM closed",
            "window-update": "GOAWAY:ENHANCE_YOUR_CALM closed",      // far more than the data sent asks for
            "empty-data": "GOAWAY:ENHANCE_YOUR_CALM closed",
            "hpack-bomb": "GOAWAY:COMPRESSION_ERROR closed",         // past the 64 KiB header list while decoding
        ]
        for (attack, answer) in expected.sorted(by: { $0.key < $1.key }) {
            let start = Date()
            let got = try sh([Self.python, Self.netprobe, "h2flood", attack, "127.0.0.1", "\(proxy.localPort)", "100000"]).output
            print("\(attack): \(got.trimmingCharacters(in: .whitespacesAndNewlines)) in \(String(format: "%.2f", Date().timeIntervalSince(start))) s")
            XCTAssertEqual(got.trimmingCharacters(in: .whitespacesAndNewlines), answer, attack)
            XCTAssertEqual(try curl(["--http2-prior-knowledge", url]), "public a", "a legitimate caller after \(attack)")
        }
    }

    /// tools/testing/h2conform.py (RFC 9113 and RFC 7541, frame by frame:
    /// stream states, frame sizes, flow control, header rules, HPACK) against
    /// the proxy, through the tunnel and on the same node. Every case must
    /// pass: among them padded frames (NIO cannot send padding: they are
    /// relayed unpadded) and STREAM_CLOSED for HEADERS on ended streams.
    func testHTTP2ConformanceThroughTheProxy() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["nghttpd", "--no-tls", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        try throughBothProxies { path in
            let out = try sh([Self.python, Self.h2conform, "127.0.0.1", "\(proxy.localPort)", "--path", "/public/a.txt"]).output
            let summary = out.split(separator: "\n").last { $0.hasSuffix(" failed") }.map(String.init) ?? "no summary"
            let counts = summary.split(separator: " ").compactMap { Int($0) }
            XCTAssertEqual(counts.count, 2, "\(path): \(out)")
            XCTAssertGreaterThanOrEqual(counts.first ?? 0, 89, "\(path): \(summary)")
            XCTAssertEqual(counts.last, 0, "\(path): \(out.split(separator: "\n").filter { $0.contains("FAIL") }.joined(separator: "\n"))")
        }
        XCTAssertTrue(proxy != nil && server.isRunning)
    }

    /// Rules on JWT identities: the bearer token is verified (the agent's
    /// real verifier: a JWKS file, jwt-kit) before the request is judged,
    /// over HTTP/1.1 and HTTP/2; the request's body waits meanwhile and then
    /// goes through whole. No token or a forged one: denied, and a forged
    /// token for a denied subject cannot slip past its deny rule.
    func testRequestsAreJudgedByTheirVerifiedJWTIdentity() async throws {
        let key = ES256PrivateKey(), forger = ES256PrivateKey()
        let jwksPath = "\(dir!)/jwks.json"
        let p = key.publicKey.parameters!
        try #"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"k1","x":"\#(p.x)","y":"\#(p.y)"}]}"#
            .write(toFile: jwksPath, atomically: true, encoding: .utf8)
        func token(_ k: ES256PrivateKey, sub: String) async throws -> String {
            let keys = JWTKeyCollection()
            await keys.add(ecdsa: k, kid: "k1")
            return try await keys.sign(EdgeTestClaims(iss: .init(value: "https://idp.test"), sub: .init(value: sub), aud: .init(value: ["web"]),
                                                      exp: .init(value: Date().addingTimeInterval(300))), kid: "k1")
        }
        let alice = try await token(key, sub: "alice"), mallory = try await token(key, sub: "mallory")
        let forged = try await token(forger, sub: "alice")
        let verify = try XCTUnwrap(try BearerTokens.verifier(issuers: [JWTIssuer(issuer: "https://idp.test", jwksFile: jwksPath, audience: "web")]))
        let rules = try XCTUnwrap(try HTTPRuleSet.load([(name: "jwt.yaml", text: """
            apiVersion: palisade.dev/v1
            kind: HTTPPolicy
            metadata: {name: web}
            spec:
              selector: {labels: {app: web}}
              rules:
                - from: [{jwt: "jwt:https://idp.test/alice"}, {jwt: "jwt:https://idp.test/mallory"}]
                  paths: ["/public/**", "/up"]
                - action: deny
                  from: [{jwt: "jwt:https://idp.test/mallory"}]
            """)]).destination(labels: ["app": "web"], port: 80))
        let gate = Self.gate(rules)
        let body = "\(dir!)/body.bin"
        try Data(repeating: 0x61, count: 300_000).write(to: URL(fileURLWithPath: body))
        // HTTP/1.1 against a sink that counts the body; HTTP/2 against nghttpd.
        for (server, http2) in [([Self.python, Self.netprobe, "sink"], false), (["nghttpd", "--no-tls", "-d", "WWW"], true)] {
            let port = freeLoopbackPort()
            let p = try startL7(server + ["\(port)"], port: port)
            // (Spawned from a concurrency thread, which blocks signals, the
            // server inherits a blocked SIGTERM: SIGKILL ends it.)
            defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
            listener.authorize = { _ in .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", verifyBearer: verify, gate: gate) }
            let url = "http://127.0.0.1:\(proxy.localPort)" + (http2 ? "/public/a.txt" : "/up")
            let proto = http2 ? ["--http2-prior-knowledge"] : []
            try throughBothProxies(OutboundRoute.HTTP(destination: "spiffe://example.org/ns/default/sa/web", verifyBearer: verify, gate: gate)) { path in
                let what = "\(path), \(http2 ? "HTTP/2" : "HTTP/1.1")"
                func status(_ extra: [String]) throws -> String {
                    try curl(proto + ["-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@\(body)"] + extra + [url])
                }
                XCTAssertEqual(try status(["-H", "Authorization: Bearer \(alice)"]), "200", what)
                if !http2 {
                    XCTAssertEqual(try curl(["--data-binary", "@\(body)", "-H", "Authorization: Bearer \(alice)", url]), "received 300000\n", what)
                }
                XCTAssertEqual(try status([]), "403", "\(what): no token")
                XCTAssertEqual(try status(["-H", "Authorization: Bearer \(forged)"]), "403", "\(what): forged")
                XCTAssertEqual(try status(["-H", "Authorization: Bearer \(mallory)"]), "403", "\(what): deny wins")
            }
        }
    }

    /// The header bypasses found by trying: a deny rule on `x-debug: 1` is
    /// met however the header is repeated or listed, over HTTP/1.1 and
    /// HTTP/2, through the tunnel and on the same node.
    func testRepeatedHeadersCannotSkipADenyRule() throws {
        let rules = try XCTUnwrap(try HTTPRuleSet.load([(name: "h.yaml", text: """
            apiVersion: palisade.dev/v1
            kind: HTTPPolicy
            metadata: {name: web}
            spec:
              selector: {labels: {app: web}}
              rules:
                - paths: ["/public/**"]
                - action: deny
                  headers: {x-debug: "1"}
            """)]).destination(labels: ["app": "web"], port: 80))
        let gate = Self.gate(rules)
        for http2 in [false, true] {
            let port = freeLoopbackPort()
            let server = http2 ? ["nghttpd", "--no-tls", "-d", "WWW", "\(port)"] : [Self.python, Self.netprobe, "http", "WWW", "\(port)"]
            let p = try startL7(server, port: port)
            defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
            listener.authorize = { _ in .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", gate: gate) }
            let url = "http://127.0.0.1:\(proxy.localPort)/public/a.txt"
            try throughBothProxies(OutboundRoute.HTTP(destination: "spiffe://example.org/ns/default/sa/web", gate: gate)) { path in
                let what = "\(path), \(http2 ? "HTTP/2" : "HTTP/1.1")"
                func status(_ headers: [String]) throws -> String {
                    try curl((http2 ? ["--http2-prior-knowledge"] : []) + ["-o", "/dev/null", "-w", "%{http_code}"]
                             + headers.flatMap { ["-H", $0] } + [url])
                }
                XCTAssertEqual(try status([]), "200", what)
                XCTAssertEqual(try status(["x-debug: 0"]), "200", what)
                for attempt in [["x-debug: 1"], ["x-debug: 1", "x-debug: 0"], ["x-debug: 0", "x-debug: 1"], ["x-debug: 1", "x-debug: 1"],
                                ["x-debug: 0, 1"], ["X-Debug: 0", "x-debug: 1"]] {
                    XCTAssertEqual(try status(attempt), "403", "\(what): \(attempt)")
                }
            }
        }
    }

    /// A denied gRPC call gets PERMISSION_DENIED (grpc-status 7) in a
    /// trailers-only response, what gRPC clients report as such; an allowed
    /// one reaches the workload.
    func testDeniedGRPCCallsGetPermissionDenied() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["nghttpd", "--no-tls", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        let url = "http://127.0.0.1:\(proxy.localPort)"
        let denied = try sh(["nghttp", "-nv", "-t", "5", "-H", "content-type: application/grpc", "-H", "te: trailers", url + "/private/b.txt"]).output
        XCTAssertTrue(denied.contains(":status: 200") && denied.contains("grpc-status: 7"), denied)
        XCTAssertTrue(denied.contains("grpc-message: denied: no rule allows this request"), denied)
        let allowed = try sh(["nghttp", "-nv", "-t", "5", "-H", "content-type: application/grpc", "-H", "te: trailers", url + "/public/a.txt"]).output
        XCTAssertTrue(allowed.contains(":status: 200") && !allowed.contains("grpc-status"), allowed)
    }

    /// A workload whose HTTP/2 response breaks the header rules: the caller
    /// gets 502 (never the bad block, never a hung stream), through the
    /// tunnel and through the same-node proxy, and the connection goes on.
    func testInvalidHTTP2ResponsesBecome502() throws {
        for bad in ["uppercase", "connection"] {
            let port = freeLoopbackPort()
            let server = try startL7([Self.python, Self.netprobe, "h2badserver", "\(port)", bad], port: port)
            defer { server.terminate() }
            let url = "http://127.0.0.1:\(proxy.localPort)/public/a.txt"
            try throughBothProxies { path in
                XCTAssertEqual(try curl(["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", url]), "502", "\(bad) via \(path)")
                // Three streams on one connection: each answered 502, none hangs.
                let streams = H2Streams.run(try sh(["nghttp", "-ns", "-t", "5", url + "?1", url + "?2", url + "?3"]).output)
                XCTAssertEqual(streams.map(\.code), [502, 502, 502], "\(bad) via \(path)")
            }
        }
    }

    /// The HTTP/1.1 proxy forwards a workload's responses as sent, so one
    /// that two parsers could frame differently (Content-Length with
    /// Transfer-Encoding, two lengths, obs-fold, bare LF) is answered 502
    /// instead; well-framed ones (chunks with extensions and trailers, a
    /// body that runs to the close) arrive whole. Through the tunnel and the
    /// same-node proxy.
    func testAmbiguousHTTP1ResponsesBecome502() throws {
        for (response, want) in [("cl-and-te", "502 0"), ("two-lengths", "502 0"), ("obs-fold", "502 0"), ("bare-lf", "502 0"),
                                 ("chunked-trailers", "200 5"), ("until-close", "200 6")] {
            let port = freeLoopbackPort()
            let server = try startL7([Self.python, Self.netprobe, "h1badserver", "\(port)", response], port: port)
            defer { server.terminate() }
            try throughBothProxies { path in
                let out = try curl(["-o", "/dev/null", "-w", "%{http_code} %{size_download}", "http://127.0.0.1:\(proxy.localPort)/public/a.txt"])
                XCTAssertEqual(out, want, "\(response) via \(path)")
            }
        }
    }

    /// A workload that resets a stream, or whose response breaks its own
    /// content-length (the workload's side of the proxy resets that stream
    /// itself): the caller's stream is reset as well, through the tunnel and
    /// through the same-node proxy, REFUSED_STREAM kept (the request was
    /// not processed: a client may retry it); never left open until a
    /// timeout.
    func testHTTP2ResetsOnTheWorkloadsSideReachTheCaller() throws {
        for (server, code) in [("refused", "REFUSED_STREAM"), ("short", "CANCEL")] {
            let port = freeLoopbackPort()
            let process = try startL7([Self.python, Self.netprobe, "h2badserver", "\(port)", server], port: port)
            defer { process.terminate() }
            let url = "http://127.0.0.1:\(proxy.localPort)/public/a.txt"
            try throughBothProxies { path in
                let out = try sh(["nghttp", "-v", "-t", "5", url]).output
                let resets = out.split(separator: "\n").filter { $0.contains("error_code=") }
                XCTAssertTrue(out.contains("recv RST_STREAM") && resets.contains { $0.contains(code) }, "\(server) via \(path): \(resets)")
            }
        }
    }

    /// Thousands of streams, 16 at a time on each of two connections,
    /// through the tunnel and through the same-node proxy: none stalls.
    func testManyHTTP2StreamsNeverStall() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["nghttpd", "--no-tls", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        let url = "http://127.0.0.1:\(proxy.localPort)/public/a.txt"
        try throughBothProxies { path in
            let out = try sh(["timeout", "60", "h2load", "-n", "3000", "-c", "2", "-m", "16", url]).output
            XCTAssertTrue(out.contains("3000 succeeded, 0 failed"), "\(path): \(out.split(separator: "\n").filter { $0.contains("requests:") || $0.contains("status codes") })")
        }
    }

    /// A same-node caller that connects to an HTTP-ruled port and sends
    /// nothing is closed after the first-bytes timeout.
    func testSilentCallerIsClosed() throws {
        let port = freeLoopbackPort()
        let server = try startL7(["nghttpd", "--no-tls", "-d", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        localHTTP = OutboundRoute.HTTP(destination: "spiffe://example.org/ns/default/sa/web", gate: Self.allowAll)
        proxy.firstBytesTimeout = .milliseconds(500)
        let out = try sh([Self.python, "-c", """
        import socket; s = socket.create_connection(("127.0.0.1", \(proxy.localPort))); s.settimeout(5)
        try: print("eof" if s.recv(1) == b"" else "data")
        except ConnectionResetError: print("eof")
        except socket.timeout: print("timeout")
        """]).output
        XCTAssertEqual(out.trimmingCharacters(in: .whitespacesAndNewlines), "eof", "closed by the proxy, not left open (5 s would time out)")
    }

    func testHTTP1RequestsJudgedOneByOneThroughTheTunnel() throws {
        let port = freeLoopbackPort()
        let server = try startL7([Self.python, Self.netprobe, "http", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        let url = "http://127.0.0.1:\(proxy.localPort)"
        let out = try curl(["-w", "%{http_code} %{size_download}\n", "-o", "/dev/null", url + "/public/a.txt", "-o", "/dev/null", url + "/private/b.txt",
                            "-o", "/dev/null", url + "/public/big.bin"])
        XCTAssertEqual(out.split(separator: "\n").map(String.init), ["200 8", "403 36", "200 \(4 << 20)"])
    }

    /// A client that asks `Expect: 100-continue` (curl does for bodies over
    /// 1 MiB) gets the workload's 100 through the proxy and sends its body
    /// at once, through the tunnel and on the same node.
    func testInformationalResponsesReachTheCaller() throws {
        let port = freeLoopbackPort()
        let server = try startL7([Self.python, Self.netprobe, "sink", "\(port)"], port: port)
        defer { server.terminate() }
        let body = "\(dir!)/upload.bin"
        try Data(repeating: 0x62, count: 3 << 20).write(to: URL(fileURLWithPath: body))
        listener.authorize = { _ in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", gate: Self.allowAll)
        }
        try throughBothProxies { path in
            let out = try sh(["sh", "-c", "curl -sv --max-time 10 --expect100-timeout 8 -T \(body) http://127.0.0.1:\(proxy.localPort)/public/up 2>&1"]).output
            XCTAssertTrue(out.contains("< HTTP/1.1 100 Continue"), "\(path): \(out.suffix(600))")
            XCTAssertTrue(out.contains("received \(3 << 20)"), "\(path): \(out.suffix(600))")
        }
    }

    /// WebSocket through the HTTP proxy: the handshake is judged like any
    /// request; once the workload answers 101 both connections become a
    /// byte relay (frames sent with the 101 included), through the tunnel
    /// and on the same node. A denied handshake gets 403. An h2c upgrade is
    /// taken out of the request (it would carry unjudged requests): the
    /// workload answers in HTTP/1.1 and the connection then ends.
    func testWebSocketUpgradesAreJudgedThenRelayed() throws {
        let port = freeLoopbackPort()
        let server = try startL7([Self.python, Self.netprobe, "wsecho", "\(port)"], port: port)
        defer { server.terminate() }
        let publicOnly = OutboundRoute.HTTP(destination: "spiffe://example.org/ns/default/sa/web") { _, uri, _, _, _ in
            HTTPVerdict(allowed: uri.hasPrefix("/public/"), reason: "denied: no rule allows this request", rule: nil)
        }
        try throughBothProxies(publicOnly) { path in
            let ok = try sh(["sh", "-c", "\(Self.python) \(Self.netprobe) wsclient 127.0.0.1 \(proxy.localPort) /public/chat 12 2>&1"]).output
            XCTAssertEqual(ok.trimmingCharacters(in: .whitespacesAndNewlines), "ok 12", path)
            let denied = try sh([Self.python, Self.netprobe, "wsclient", "127.0.0.1", "\(proxy.localPort)", "/private/chat", "1"]).output
            XCTAssertEqual(denied.trimmingCharacters(in: .whitespacesAndNewlines), "HTTP/1.1 403 Forbidden", path)
        }
        // h2c: an HTTP/1.1 server that would switch (the test's own HTTP
        // server answers 200 and ignores Upgrade; the proxy must not pass
        // the Upgrade on, and must end the connection after the answer).
        let httpPort = freeLoopbackPort()
        let http = try startL7([Self.python, Self.netprobe, "http", "WWW", "\(httpPort)"], port: httpPort)
        defer { http.terminate() }
        let out = try curl(["--http2", "-s", "-w", "%{http_code} %{http_version}\n", "-o", "/dev/null", "http://127.0.0.1:\(proxy.localPort)/public/a.txt",
                            "-o", "/dev/null", "http://127.0.0.1:\(proxy.localPort)/public/a.txt?2"])
        XCTAssertEqual(out.split(separator: "\n").map(String.init), ["200 1.1", "200 1.1"], "h2c upgrade declined, each request answered")
    }

    /// HTTP/1.1 requests built to be read two ways (framing, Host): each is
    /// answered 400 and the connection closed, and the request hidden in
    /// its body never reaches the rules, let alone the workload.
    func testHTTP1AmbiguousRequestsAreRefused() throws {
        let port = freeLoopbackPort()
        let server = try startL7([Self.python, Self.netprobe, "http", "WWW", "\(port)"], port: port)
        defer { server.terminate() }
        let judged = NSLock(), seenURIs = Box<[String]>([])
        listener.authorize = { _ in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web") { method, uri, _, _, _ in
                judged.withLock { seenURIs.value.append(uri) }
                let ok = uri.hasPrefix("/public/")
                return HTTPVerdict(allowed: ok, reason: ok ? "" : "denied: no rule allows this request", rule: nil)
            }
        }
        let expected = ["valid": "200", "cl-and-te": "400", "te-chunked-not-last": "400", "te-unknown": "400", "te-space-before-colon": "400",
                        "te-obs-fold": "400", "cl-twice-differing": "400", "cl-list": "400", "cl-plus-sign": "400", "chunk-size-hex-prefix": "400",
                        "host-twice": "400", "host-missing": "400", "nul-in-header": "400",
                        "header-too-large": "431", "too-many-headers": "431", "te-http10-smuggle": "400",
                        "absolute-form-other-host": "403",   // (its path is not origin-form: denied as ambiguous)
                        "head-then-get": "200 200"]   // (the HEAD's answer framed without a body)
        for (name, answer) in expected.sorted(by: { $0.key < $1.key }) {
            let got = try sh([Self.python, Self.netprobe, "h1raw", name, "127.0.0.1", "\(proxy.localPort)"]).output
            XCTAssertEqual(got.trimmingCharacters(in: .whitespacesAndNewlines), answer, name)
        }
        XCTAssertFalse(judged.withLock { seenURIs.value }.contains("/private/b.txt"), "a smuggled request reached the rules: \(judged.withLock { seenURIs.value })")
    }

    static var python: String { "/usr/bin/python3" }

    /// Nothing of the HTTP/1.1 proxy outlives its connections (a handler
    /// that kept its channel context, which holds the handler, would keep the
    /// gate, both pipelines and the workload's channel alive).
    func testHTTP1ProxyIsFreedWhenItsConnectionsClose() throws {
        weak var gate: L7Gate?, upstreamChannel: EmbeddedChannel?
        do {
            let loop = EmbeddedEventLoop()
            let caller = EmbeddedChannel(loop: loop), upstream = EmbeddedChannel(loop: loop)
            let l7 = L7Context(gate: Self.allowAll,
                               source: "spiffe://t/a", destination: "spiffe://t/b", destinationAddress: "127.0.0.1:80")
            try L7Gate.install(stream: caller, upstream: upstream, l7: l7)
            gate = try caller.pipeline.syncOperations.handler(type: L7Gate.self)
            upstreamChannel = upstream
            try caller.writeInbound(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: b\r\n\r\n"))
            XCTAssertNotNil(try upstream.readOutbound(as: ByteBuffer.self), "the request went to the workload")
            try upstream.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"))
            _ = try? caller.finish()
            _ = try? upstream.finish()
            loop.run()
            try loop.syncShutdownGracefully()
        }
        XCTAssertNil(gate, "the gate outlived its connection")
        XCTAssertNil(upstreamChannel, "the workload's channel outlived the connection")
    }

    /// Allowed requests reach the workload as the caller sent them, byte
    /// for byte (chunked bodies and trailers included), and nothing after
    /// a request that ends the connection is read, judged or forwarded
    /// (RFC 9112 9.6): its response goes back with `connection: close`.
    func testRequestsAreForwardedAsSentAndNothingAfterAClosingOne() throws {
        let loop = EmbeddedEventLoop()
        let caller = EmbeddedChannel(loop: loop), upstream = EmbeddedChannel(loop: loop)
        defer { _ = try? caller.finish(); _ = try? upstream.finish() }
        let judged = Box<[String]>([])
        let l7 = L7Context(gate: { method, uri, _, _, _ in
            judged.value.append("\(method) \(uri)")
            return HTTPVerdict(allowed: true, reason: "", rule: nil)
        }, source: "spiffe://t/a", destination: "spiffe://t/b", destinationAddress: "127.0.0.1:80")
        try L7Gate.install(stream: caller, upstream: upstream, l7: l7)
        let first = "POST /up?x=1 HTTP/1.1\r\nHost: b\r\nX-Odd:  spaced\t\r\nTransfer-Encoding: Chunked\r\n\r\n3;e=\"v\"\r\nabc\r\n0\r\nT: 1\r\n\r\n"
        let second = "GET /a HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
        try caller.writeInbound(ByteBuffer(string: first + second + "GET /hidden HTTP/1.1\r\nHost: b\r\n\r\n"))
        var sent = ""
        while let b = try upstream.readOutbound(as: ByteBuffer.self) { sent += String(buffer: b) }
        XCTAssertEqual(sent, first, "the first request as sent; the second waits for the first's response")
        try upstream.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"))
        sent = ""
        while let b = try upstream.readOutbound(as: ByteBuffer.self) { sent += String(buffer: b) }
        XCTAssertEqual(sent, second)
        try upstream.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"))
        var answered = ""
        while let b = try caller.readOutbound(as: ByteBuffer.self) { answered += String(buffer: b) }
        XCTAssertEqual(answered, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        XCTAssertNil(try upstream.readOutbound(as: ByteBuffer.self), "nothing after the closing request")
        XCTAssertEqual(judged.value, ["POST /up?x=1", "GET /a"])
    }

    /// Slow callers cannot hold a connection: a head still incomplete after
    /// the head timeout, or a body that stalls past the idle timeout, gets
    /// 408 and the end of the connection; a normal caller is served.
    func testSlowHTTP1CallersAreTimedOut() throws {
        let saved = HTTPLimits.current
        defer { HTTPLimits.current = saved }
        var limits = saved
        limits.requestHeadTimeout = .seconds(1)
        limits.bodyIdleTimeout = .seconds(1)
        HTTPLimits.current = limits
        let port = freeLoopbackPort()
        let server = try startL7([Self.python, Self.netprobe, "sink", "\(port)"], port: port)
        defer { server.terminate() }
        listener.authorize = { _ in
            .deliverHTTP(mark: 0, destination: "spiffe://example.org/ns/default/sa/web", gate: Self.allowAll)
        }
        try throughBothProxies { path in
            for mode in ["head", "body"] {
                let got = try sh([Self.python, Self.netprobe, "h1slow", mode, "127.0.0.1", "\(proxy.localPort)", "8"]).output
                let parts = got.split(separator: " ")
                XCTAssertEqual(parts.first.map(String.init), "408", "\(path), slow \(mode): \(got)")
                let seconds = parts.count > 1 ? Double(parts[1].trimmingCharacters(in: .whitespacesAndNewlines)) ?? 99 : 99
                XCTAssertTrue(seconds >= 0.9 && seconds < 3, "\(path), slow \(mode): ended after \(seconds) s")
            }
            XCTAssertEqual(try curl(["--data-binary", "hello", "http://127.0.0.1:\(proxy.localPort)/up"]), "received 5\n", path)
        }
    }

    func testAccessLogLinesAreJSONWhateverThePathHolds() throws {
        let start = Date(timeIntervalSince1970: 1_795_000_000.25)
        let e = AccessLogEntry(time: UTCTime.string(start, milliseconds: true), source: "spiffe://a/x", destination: "spiffe://b/y", destinationAddress: "[fd00::1]:80",
                               method: "GET", path: "/q\"uo\\te/\u{1}\t\n/é/☃", status: 403, requestBytes: 0, responseBytes: 36,
                               durationMs: 1.23456, decision: "denied", rule: nil)
        let line = e.jsonLine()
        XCTAssertTrue(line.hasSuffix("}\n"))
        XCTAssertFalse(line.dropLast().contains("\n"))
        let back = try JSONDecoder().decode(AccessLogEntry.self, from: Data(line.utf8))
        XCTAssertEqual(back.path, e.path)
        XCTAssertEqual(back.time, "2026-11-18T11:06:40.250Z")
        XCTAssertEqual(back.durationMs, 1.235, accuracy: 0.0001)
        XCTAssertNil(back.rule)
        XCTAssertEqual(ISO8601DateFormatter().date(from: back.time.replacingOccurrences(of: ".250", with: "")), Date(timeIntervalSince1970: 1_795_000_000))
    }

    /// The per-stream table `nghttp -ns` prints: stream id, status, path.
    enum H2Streams {
        static func run(_ output: String) -> [(stream: Int, code: Int, path: String)] {
            output.split(separator: "\n").compactMap { line in
                let f = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
                guard f.count == 7, let id = Int(f[0]), f[1].hasPrefix("+"), let code = Int(f[4]) else { return nil }
                return (id, code, f[6])
            }
        }
    }

    func sh(_ args: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}

final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

struct EdgeTestClaims: JWTPayload {
    var iss: IssuerClaim
    var sub: SubjectClaim
    var aud: AudienceClaim
    var exp: ExpirationClaim
    func verify(using algorithm: some JWTAlgorithm) async throws {}
}
