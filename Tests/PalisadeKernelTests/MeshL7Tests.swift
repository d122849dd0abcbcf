import Foundation
import XCTest

/// L7 rules on the tunnel's receiving side: b has L7 rules, so requests to
/// it are judged one by one by the in-agent HTTP proxy.
extension MeshTests {
    /// The scene the HTTP-rule tests share: files served by a workload,
    /// an ingress policy admitting a on one port, HTTP rules on that port.
    static let publicPrivateCidr = [("public/a.txt", "public a"), ("private/b.txt", "private b"), ("cidr/c.txt", "cidr c")]
    static let getPublic = """
            - from: [{spiffeID: "spiffe://test.local/ns/default/sa/a"}]
              methods: [GET]
              paths: ["/public/**"]

        """
    static let denySecret = """
            - action: deny
              paths: ["/public/secret.txt"]

        """
    static let cidrFromA = """
            - from: [{cidr: "10.101.1.2/32"}]
              paths: ["/cidr/**"]

        """

    /// A web root under the agent's directory holding `files` (path, body).
    func webRoot(_ agent: AgentHarness, _ files: [(String, String)]) throws -> String {
        let www = "\(agent.dir)/www"
        for (p, body) in files {
            try FileManager.default.createDirectory(atPath: (("\(www)/\(p)") as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try body.write(toFile: "\(www)/\(p)", atomically: true, encoding: .utf8)
        }
        return www
    }

    /// `pod` admits a on `port` (L3/L4), and `rules` (HTTPPolicy rules) judge
    /// each request there; returns once the agent had time to apply them.
    func admitAWithHTTPRules(_ agent: AgentHarness, pod: String, port: Int, rules: String) throws {
        try agent.writePolicy("\(pod)\(port)", policyYAML("\(pod)-ingress-\(port)", """
          selector: {labels: {app: \(pod)}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: \(port)}]
        """) + """

        ---
        apiVersion: palisade.dev/v1
        kind: HTTPPolicy
        metadata: {name: \(pod)-http-\(port)}
        spec:
          selector: {labels: {app: \(pod)}}
          port: \(port)
          rules:

        """ + rules)
        usleep(1_500_000)
    }

    /// curl run as workload a (its network namespace and, unless told, its cgroup).
    func curlAsA(_ m: Mesh, _ args: [String], maxTime: Int = 3, inCgroup: Bool = true) throws -> String {
        let command = (["nsenter", "--net=\(m.lab.netns("a"))", "curl", "-s", "--max-time", "\(maxTime)"] + args).map { "'\($0)'" }.joined(separator: " ")
        let enter = inCgroup ? "echo $$ > '\(m.lab.podCgroup("a"))/cgroup.procs' && " : ""
        return try sh(["sh", "-c", "\(enter)exec \(command)"], check: false).output
    }

    func testHTTPRulesJudgeEachRequest() throws {
        let m = try setUpMesh("pmesh6")
        let www = try webRoot(m.n2, Self.publicPrivateCidr + [("public/secret.txt", "nope")])
        try m.lab.spawn(netns: m.lab.netns("b"), [Paths.python, Paths.probe, "http", www, "8081"])
        try admitAWithHTTPRules(m.n2, pod: "b", port: 8081, rules: Self.getPublic + Self.denySecret + Self.cidrFromA)
        func curl(_ args: [String]) throws -> String { try curlAsA(m, args) }
        let url = "http://10.102.1.2:8081"
        XCTAssertEqual(try curl([url + "/public/a.txt"]), "public a", m.n2.warnings())
        // A rule on the caller's address: node 1's agent tells it (forwarded:
        // for=) and node 2 accepts it as it is one of a's addresses.
        XCTAssertEqual(try curl([url + "/cidr/c.txt"]), "cidr c")
        // Three requests on one connection: allowed, denied (403 with the reason), allowed again.
        let out = try curl(["-w", "%{http_code} %{num_connects}\n", "-o", "/dev/null", url + "/public/a.txt",
                            "-o", "/dev/null", url + "/private/b.txt", "-o", "/dev/null", url + "/public/secret.txt",
                            "-o", "/dev/null", url + "/public/a.txt"])
        XCTAssertEqual(out.split(separator: "\n").map(String.init), ["200 1", "403 0", "403 0", "200 0"],
                       "judged one by one; a 403 leaves the connection usable; deny wins")
        XCTAssertTrue(try curl([url + "/private/b.txt"]).contains("denied: no rule allows this request"))
        XCTAssertEqual(try curl(["-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", url + "/public/a.txt"]), "403", "method")
        // A smuggling attempt (Content-Length and Transfer-Encoding together) is refused, never forwarded.
        let smuggle = "POST /public/a.txt HTTP/1.1\\r\\nHost: b\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\nGET /private/b.txt HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n"
        let py = "import socket; s=socket.create_connection(('10.102.1.2', 8081), timeout=3); s.sendall(b'\(smuggle)'); print(s.recv(4096).decode(errors='replace'))"
        let answer = try sh(["sh", "-c", "echo $$ > '\(m.lab.podCgroup("a"))/cgroup.procs' && exec nsenter --net=\(m.lab.netns("a")) \(Paths.python) -c \"\(py)\""], check: false).output
        XCTAssertTrue(answer.contains("400"), "smuggling refused: \(answer)")
        XCTAssertFalse(answer.contains("private b"))
        // The access log: one JSON line per request, with identities and decisions.
        let log = accessLog(in: m.n2.dir) { $0.contains("\"path\":\"/private/b.txt\"") }
        let lines = log.split(separator: "\n")
        XCTAssertGreaterThanOrEqual(lines.count, 6)
        XCTAssertTrue(lines.contains { $0.contains("\"path\":\"/private/b.txt\"") && $0.contains("\"decision\":\"denied\"") && $0.contains("sa/a") }, log)
        XCTAssertFalse(log.lowercased().contains("authorization"))
        XCTAssertTrue(log.contains("\"destination\":\"spiffe://test.local/ns/default/sa/b\""), log)
        // `palisade requests` reads it back, filtered.
        let denied = try m.n2.palisade(["requests", "--decision", "denied"]).output
        XCTAssertTrue(denied.contains("DENIED   403  GET /private/b.txt  spiffe://test.local/ns/default/sa/a -> spiffe://test.local/ns/default/sa/b"), denied)
        XCTAssertFalse(denied.contains("ALLOWED"), denied)
        let allowed = try m.n2.palisade(["requests", "--status", "2xx", "--identity", "sa/a", "--last", "1", "--output", "json"]).output
        XCTAssertEqual(allowed.split(separator: "\n").count, 1, allowed)
        XCTAssertTrue(allowed.contains("\"status\":200"), allowed)
        // Golden signals per identity pair on node 2's /metrics.
        let metrics = try sh(["nsenter", "--net=\(m.lab.nodeNetns(2))", "curl", "-sf", "http://127.0.0.1:9654/metrics"]).output
        let series = metrics.split(separator: "\n").filter { $0.hasPrefix("palisade_http_requests_total{") }
        XCTAssertTrue(series.contains { $0.contains("source=\"spiffe://test.local/ns/default/sa/a\"") && $0.contains("destination=\"spiffe://test.local/ns/default/sa/b\"")
                                        && $0.contains("code=\"4xx\"") && $0.contains("decision=\"denied\"") }, "\(series)")
        // Counted per series, also on the connection whose requests went
        // 200, 403, 403, 200 (its recorder keeps the series it met).
        let allowedCount = series.first { $0.contains("sa/a\"") && $0.contains("code=\"2xx\"") && $0.contains("decision=\"allowed\"") }
            .flatMap { $0.split(separator: " ").last }.flatMap { Double($0) }
        XCTAssertEqual(allowedCount, 4, "four requests were allowed: \(series)")
        XCTAssertTrue(metrics.contains("palisade_http_request_duration_seconds_bucket{"))
    }
}

/// L7 rules over HTTP/2: a caller speaking cleartext HTTP/2 (prior knowledge) to
/// b through the tunnel; every multiplexed stream is judged on its own.
extension MeshTests {
    func testHTTP2StreamsAreJudgedOneByOne() throws {
        let m = try setUpMesh("pmesh7")
        let www = try webRoot(m.n2, [("public/a.txt", "public a"), ("public/secret.txt", "nope"), ("private/b.txt", "private b")])
        // 8 MiB: a response spanning many flow-control windows.
        try Data(repeating: 0x61, count: 8 << 20).write(to: URL(fileURLWithPath: "\(www)/public/big.bin"))
        // nghttpd: an HTTP/2 (h2c) workload.
        try m.lab.spawn(netns: m.lab.netns("b"), ["nghttpd", "--no-tls", "-d", www, "8082"])
        try admitAWithHTTPRules(m.n2, pod: "b", port: 8082, rules: Self.getPublic + Self.denySecret)
        func curl(_ args: [String]) throws -> String { try curlAsA(m, ["--http2-prior-knowledge"] + args, maxTime: 10) }
        let url = "http://10.102.1.2:8082"
        XCTAssertEqual(try curl([url + "/public/a.txt"]), "public a", m.n2.warnings())
        // Six streams multiplexed on one connection, in flight together
        // (nghttp sends them at once): each gets its own verdict; the
        // denials do not disturb the others.
        let paths = ["/public/a.txt?1", "/private/b.txt?1", "/public/big.bin", "/public/secret.txt", "/public/a.txt?2", "/private/b.txt?2"]
        let command = (["nsenter", "--net=\(m.lab.netns("a"))", "nghttp", "-ns", "-t", "10"] + paths.map { url + $0 }).map { "'\($0)'" }.joined(separator: " ")
        let table = try sh(["sh", "-c", "echo $$ > '\(m.lab.podCgroup("a"))/cgroup.procs' && exec \(command)"], check: false).output
        var streams: [String] = [], ids = Set<Int>()
        for line in table.split(separator: "\n") {
            let f = line.split(separator: " ").map(String.init)
            guard f.count == 7, let id = Int(f[0]), f[1].hasPrefix("+") else { continue }
            ids.insert(id)
            streams.append("\(f[6]) \(f[4])")
        }
        XCTAssertEqual(streams.sorted(), ["/private/b.txt?1 403", "/private/b.txt?2 403", "/public/a.txt?1 200", "/public/a.txt?2 200",
                                          "/public/big.bin 200", "/public/secret.txt 403"], "deny wins; one verdict per stream: \(table)")
        XCTAssertEqual(ids.count, 6, "six streams of one connection")
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_version} %{size_download}", url + "/public/big.bin"]), "2 \(8 << 20)")
        XCTAssertTrue(try curl([url + "/private/b.txt"]).contains("denied: no rule allows this request"))
        XCTAssertEqual(try curl(["-X", "POST", "-d", "x", "-o", "/dev/null", "-w", "%{http_code}", url + "/public/a.txt"]), "403", "method")
        // h2 requests are in the access log like HTTP/1.1 ones.
        let log = accessLog(in: m.n2.dir) { $0.contains("\"path\":\"/public/big.bin\"") }
        XCTAssertTrue(log.split(separator: "\n").contains { $0.contains("\"path\":\"/public/big.bin\"") && $0.contains("\"status\":200")
                                                           && $0.contains("\"responseBytes\":\(8 << 20)") }, log)
    }
}

/// Bodies of any size stream through the L7 proxy in bounded
/// memory: 1 GiB up (HTTP/1.1 PUT) and 1 GiB down (HTTP/2), while both
/// agents' resident memory is sampled.
extension MeshTests {
    func testAGibibyteStreamsThroughInBoundedMemory() throws {
        let m = try setUpMesh("pmesh8")
        let gib = 1 << 30
        let www = "\(m.n2.dir)/www"
        try FileManager.default.createDirectory(atPath: www, withIntermediateDirectories: true)
        try sh(["truncate", "-s", "\(gib)", "\(www)/big.bin"])   // sparse: no disk, reads as zeros
        try sh(["truncate", "-s", "10", "\(www)/small.bin"])
        try m.lab.spawn(netns: m.lab.netns("b"), [Paths.python, Paths.probe, "sink", "8083"])
        try m.lab.spawn(netns: m.lab.netns("b"), ["nghttpd", "--no-tls", "-d", www, "8084"])
        var docs = policyYAML("b-ingress-big", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8083}, {port: 8084}]
        """)
        for (port, method, path) in [(8083, "PUT", "/upload"), (8084, "GET", "/*.bin")] {
            docs += """

            ---
            apiVersion: palisade.dev/v1
            kind: HTTPPolicy
            metadata: {name: b-\(port)}
            spec:
              selector: {labels: {app: b}}
              port: \(port)
              rules:
                - from: [{spiffeID: "spiffe://test.local/ns/default/sa/a"}]
                  methods: [\(method)]
                  paths: ["\(path)"]
            """
        }
        try m.n2.writePolicy("big", docs)
        usleep(1_500_000)
        let pids = try agentPIDs(m)
        func curl(_ args: [String]) throws -> String { try curlAsA(m, args, maxTime: 300) }
        // Warm both paths (pools, codecs) before the baseline.
        XCTAssertEqual(try curl(["-T", "/etc/hostname", "http://10.102.1.2:8083/upload"]).hasPrefix("received"), true, m.n2.warnings())
        XCTAssertEqual(try curl(["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", "http://10.102.1.2:8084/small.bin"]), "200")
        let baseline = pids.map(rss)
        let peak = Peak(baseline)
        let sampler = Thread {
            while !peak.done { peak.record(pids.map(rss)); usleep(50_000) }
        }
        sampler.start()
        let started = Date()
        XCTAssertEqual(try curl(["-T", "\(www)/big.bin", "http://10.102.1.2:8083/upload"]), "received \(gib)\n", "1 GiB up through the HTTP/1.1 proxy")
        let up = Date().timeIntervalSince(started)
        XCTAssertEqual(try curl(["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{size_download}", "http://10.102.1.2:8084/big.bin"]),
                       "2 \(gib)", "1 GiB down through the HTTP/2 proxy")
        let down = Date().timeIntervalSince(started) - up
        peak.done = true
        let growth = zip(peak.values, baseline).map { ($0 - $1) >> 20 }
        print("1 GiB up \(String(format: "%.1f", up)) s, down \(String(format: "%.1f", down)) s; agent RSS baseline \(baseline.map { $0 >> 20 }) MiB, peak growth \(growth) MiB (n1, n2)")
        // The proxy's buffers are bounded by flow-control windows and
        // watermarks (a few MiB per stream); 1 GiB held anywhere would show.
        for (node, g) in zip(["n1", "n2"], growth) { XCTAssertLessThan(g, 128, "\(node)'s agent grew by \(g) MiB moving 2 GiB") }
    }
}

/// L7 rules on one node: a caller and a destination on the same node; the
/// destination's port has HTTP rules, so the kernel sends the caller to its
/// own agent's proxy, and a connection that skips the proxy is refused.
extension MeshTests {
    func testSameNodeHTTPRulesAndNoBypass() throws {
        let m = try setUpMesh("pmesh9")
        let www = try webRoot(m.n1, Self.publicPrivateCidr)
        try m.lab.spawn(netns: m.lab.netns("c"), [Paths.python, Paths.probe, "http", www, "8085"])
        try admitAWithHTTPRules(m.n1, pod: "c", port: 8085, rules: Self.getPublic + Self.cidrFromA)
        func curl(_ args: [String], inCgroup: Bool = true) throws -> String { try curlAsA(m, args, inCgroup: inCgroup) }
        let url = "http://10.101.2.2:8085"
        XCTAssertEqual(try curl([url + "/public/a.txt"]), "public a", m.n1.warnings())
        let ports = try m.n1.palisade(["maps", "dump", "l7-ports", "--output", "json"]).output
        XCTAssertTrue(ports.contains("\"port\" : \"8085\"") || ports.contains("\"port\":\"8085\""), ports)
        XCTAssertTrue(ports.contains("sa/c") || ports.contains("sa\\/c"), ports)
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_code}", url + "/private/b.txt"]), "403", "judged by node 1's own proxy")
        XCTAssertEqual(try curl([url + "/cidr/c.txt"]), "cidr c", "a rule on the caller's address")
        let log = accessLog(in: m.n1.dir) { $0.contains("\"path\":\"/private/b.txt\"") }
        XCTAssertTrue(log.split(separator: "\n").contains { $0.contains("\"path\":\"/private/b.txt\"") && $0.contains("\"decision\":\"denied\"")
                                                           && $0.contains("sa/a") && $0.contains("sa/c") }, log)
        // The same caller's address without its cgroup (no connect hook):
        // the L3/L4 policy would admit a, but the port has HTTP rules and
        // the connection did not come from the agent.
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_code}", url + "/private/b.txt"], inCgroup: false), "000", "bypass refused")
        let metrics = try sh(["nsenter", "--net=\(m.lab.nodeNetns(1))", "curl", "-sf", "http://127.0.0.1:9654/metrics"]).output
        XCTAssertTrue(metrics.split(separator: "\n").contains { $0.hasPrefix("palisade_datapath_packets_total{") && $0.contains("denied-l7-bypass") },
                      "the refusal is counted under its own reason")
        // HTTP/2 through the same-node proxy: four connections with 16
        // streams each, thousands of requests, none stalls or fails.
        try m.lab.spawn(netns: m.lab.netns("c"), ["nghttpd", "--no-tls", "-d", www, "8087"])
        try m.n1.writePolicy("c8087", policyYAML("c-ingress-8087", """
          selector: {labels: {app: c}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8087}]
        """) + """

        ---
        apiVersion: palisade.dev/v1
        kind: HTTPPolicy
        metadata: {name: c-h2}
        spec:
          selector: {labels: {app: c}}
          port: 8087
          rules:
            - from: [{spiffeID: "spiffe://test.local/ns/default/sa/a"}]
              paths: ["/public/**"]
        """)
        usleep(1_500_000)
        let load = try sh(["sh", "-c", "echo $$ > '\(m.lab.podCgroup("a"))/cgroup.procs' && exec nsenter --net=\(m.lab.netns("a")) timeout 60 h2load -n 2000 -c 4 -m 16 http://10.101.2.2:8087/public/a.txt"], check: false).output
        XCTAssertTrue(load.contains("2000 succeeded, 0 failed"), load.split(separator: "\n").filter { $0.contains("requests:") || $0.contains("status codes") }.joined(separator: "; "))
        XCTAssertTrue(load.contains("status codes: 2000 2xx"))
        // Finished callers leave nothing open on the node: no socket waiting
        // for the agent to close, no connection to the workloads kept.
        usleep(500_000)
        let sockets = try sh(["nsenter", "--net=\(m.lab.nodeNetns(1))", "ss", "-Htn"]).output
        let leftover = sockets.split(separator: "\n").filter { $0.contains("CLOSE-WAIT") || $0.contains("10.101.2.2:808") }
        XCTAssertEqual(leftover, [], "connections of finished callers")
        // A port of c without HTTP rules is still direct (no proxy).
        try m.lab.serve("c", "tcp", port: 8086, address: "::")
        try m.n1.writePolicy("c8086", policyYAML("c-ingress-8086", """
          selector: {labels: {app: c}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8086}]
        """))
        usleep(1_500_000)
        XCTAssertTrue(try reach(m, from: "a", "10.101.2.2", 8086, inCgroup: false))
    }
}
