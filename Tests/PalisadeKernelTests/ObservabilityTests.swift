import Foundation
import XCTest

extension Data {
    /// certs list JSON has dates; decode everything as strings.
    func replacingDates() -> Data {
        guard let obj = try? JSONSerialization.jsonObject(with: self) as? [[String: Any]] else { return self }
        let strings = obj.map { $0.mapValues { "\($0)" } }
        return (try? JSONSerialization.data(withJSONObject: strings)) ?? self
    }
}

/// A real Prometheus server scrapes the agent; PromQL answers must match
/// the traffic the test sent.
final class ObservabilityTests: XCTestCase {
    func query(_ lab: Lab, _ promQL: String) throws -> Double? {
        let url = "http://127.0.0.1:9090/api/v1/query?query=" + promQL.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        let out = try sh(["nsenter", "--net=\(lab.node)", "curl", "-sf", url], check: false).output
        guard let json = try? JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any],
              let data = json["data"] as? [String: Any], let result = data["result"] as? [[String: Any]],
              let first = result.first, let value = first["value"] as? [Any], let text = value.last as? String else { return nil }
        return Double(text)
    }

    func testPrometheusScrapesKernelCountersAndPairs() throws {
        try requireKernel()
        for tool in ["prometheus", "promtool", "curl"] where (try? sh(["which", tool]))?.status != 0 {
            let msg = "\(tool) is not installed (tools/install-deps installs it)"
            if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail(msg); return }
            throw XCTSkip(msg)
        }
        let (lab, agent) = try setUpPair("po1")
        try agent.start()
        try agent.waitApplied(endpoints: 2)
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("b", "udp", port: 5000)

        // The exposition is valid.
        let exposition = try sh(["nsenter", "--net=\(lab.node)", "curl", "-sf", "http://127.0.0.1:9654/metrics"]).output
        let promtool = Process()
        promtool.executableURL = URL(fileURLWithPath: "/usr/bin/promtool")
        promtool.arguments = ["check", "metrics"]
        let input = Pipe(), output = Pipe()
        promtool.standardInput = input
        promtool.standardOutput = output
        promtool.standardError = output
        try promtool.run()
        input.fileHandleForWriting.write(Data(exposition.utf8))
        input.fileHandleForWriting.closeFile()
        promtool.waitUntilExit()
        let lint = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertEqual(promtool.terminationStatus, 0, "promtool check metrics: \(lint)")

        // Traffic: 3 allowed connections, 7 denied datagrams.
        for _ in 0..<3 { XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080)) }
        for _ in 0..<7 { XCTAssertFalse(try lab.reach(from: lab.netns("a"), "udp", "10.99.2.2", 5000, timeout: 0.2)) }

        let dir = agent.dir + "/prometheus"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
        global: {scrape_interval: 1s}
        scrape_configs:
          - job_name: palisade
            static_configs: [{targets: ["127.0.0.1:9654"]}]
        """.write(toFile: "\(dir)/prometheus.yml", atomically: true, encoding: .utf8)
        try lab.spawn(netns: lab.node, ["prometheus", "--config.file=\(dir)/prometheus.yml", "--storage.tsdb.path=\(dir)/data",
                                        "--web.listen-address=127.0.0.1:9090"], log: "\(dir)/prometheus.log")

        let denied = "sum(palisade_datapath_packets_total{direction=\"ingress\",reason=\"denied-default\"})"
        let allowed = "sum(palisade_datapath_packets_total{direction=\"ingress\",reason=\"allowed-by-policy\"})"
        let pair = "sum(palisade_identity_pair_denied_flows_total{local=\"spiffe://test.local/ns/default/sa/b\",peer=\"spiffe://test.local/ns/default/sa/a\"})"
        let ruleMatches = "sum(palisade_rule_matches_total{local=\"spiffe://test.local/ns/default/sa/b\",peer=\"app=a\",verdict=\"allow\"})"
        var got: [String: Double?] = [:]
        let deadline = Date().addingTimeInterval(30)
        repeat {
            usleep(500_000)
            for q in [denied, allowed, pair, ruleMatches] { got[q] = try query(lab, q) }
        } while Date() < deadline && (got[denied] != 7 || got[allowed] != 3 || got[pair] != 7 || got[ruleMatches] != 3)
        XCTAssertEqual(got[denied], 7, "denied datagrams seen by Prometheus")
        XCTAssertEqual(got[allowed], 3, "allowed new connections seen by Prometheus")
        XCTAssertEqual(got[pair], 7, "denied flows for the (b, a) identity pair")
        XCTAssertEqual(got[ruleMatches], 3, "rule matches for the (b, a) identity pair")
        XCTAssertEqual(try query(lab, "palisade_policy_generation"), Double(agent.generation))
        let expiry = try query(lab, "min(palisade_certificate_expiry_timestamp_seconds)") ?? 0
        XCTAssertGreaterThan(expiry, Date().timeIntervalSince1970 + 1700, "every identity has a current SVID")

        // The SVIDs behind that metric: workloads and the node, keys 0600.
        let list = try agent.palisade(["certs", "list", "--output", "json"]).output
        let svids = try JSONDecoder().decode([[String: String]].self, from: Data(list.utf8).replacingDates())
        let ids = Set(svids.compactMap { $0["spiffeID"] })
        XCTAssertTrue(ids.isSuperset(of: ["spiffe://test.local/ns/default/sa/a", "spiffe://test.local/ns/default/sa/b"]), "\(ids)")
        XCTAssertTrue(ids.contains { $0.hasPrefix("spiffe://test.local/palisade/node/") }, "\(ids)")
        for s in svids {
            let mode = (try FileManager.default.attributesOfItem(atPath: s["keyFile"]!)[.posixPermissions] as! NSNumber).intValue
            XCTAssertEqual(mode & 0o777, 0o600)
        }
        XCTAssertTrue(try agent.palisade(["ca", "bundle"]).output.hasPrefix("-----BEGIN CERTIFICATE-----"))
        let good = try agent.palisade(["certs", "verify", svids[0]["certificateFile"]!])
        XCTAssertTrue(good.output.contains("valid X.509-SVID for spiffe://test.local/"), good.output)
        let bad = try agent.palisade(["certs", "verify", "\(agent.dir)/ca/ca.pem"], check: false)
        XCTAssertEqual(bad.status, 1, bad.output)
        XCTAssertTrue(bad.output.contains("rejected:"), bad.output)
    }

    /// `palisade flows --follow` streams events from the agent's socket with
    /// identities named; history and filters work; allowed flows on request.
    func testFlowsStreamAndHistory() throws {
        try requireKernel()
        let (lab, agent) = try setUpPair("po2", extraConfig: "allowedFlowEvents: true")
        try agent.start()
        try agent.waitApplied(endpoints: 2)
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("b", "tcp", port: 9090)
        let deniedLog = agent.dir + "/follow-denied.log", allowedLog = agent.dir + "/follow-allowed.log"
        try lab.spawn(netns: lab.node, [Paths.palisade, "flows", "--follow", "--verdict", "denied", "--output", "json", "--config", agent.configPath], log: deniedLog)
        try lab.spawn(netns: lab.node, [Paths.palisade, "flows", "--follow", "--verdict", "allowed", "--identity", "sa/b", "--config", agent.configPath], log: allowedLog)
        usleep(500_000)
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080))
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 9090, timeout: 0.5))
        usleep(500_000)

        let denied = (try? String(contentsOfFile: deniedLog, encoding: .utf8)) ?? ""
        let events = denied.split(separator: "\n").compactMap { try? JSONDecoder().decode(AgentHarness.Event.self, from: Data($0.utf8)) }
        XCTAssertTrue(events.contains { $0.destinationPort == 9090 && $0.local == "spiffe://test.local/ns/default/sa/b"
            && $0.peer == "spiffe://test.local/ns/default/sa/a" }, denied)
        XCTAssertTrue(events.allSatisfy { $0.verdict == "denied" }, denied)
        let allowed = (try? String(contentsOfFile: allowedLog, encoding: .utf8)) ?? ""
        XCTAssertTrue(allowed.contains("ALLOWED") && allowed.contains("10.99.2.2:8080") && allowed.contains("local=spiffe://test.local/ns/default/sa/b"), allowed)
        // a -> b:9090 passes a's (unenforced) egress and is dropped at b's ingress: never allowed there.
        XCTAssertFalse(allowed.split(separator: "\n").contains { $0.contains(":9090") && $0.contains(" ingress ") }, allowed)

        let history = try agent.palisade(["flows", "--verdict", "denied", "--identity", "sa/a", "--output", "json"]).output
        XCTAssertTrue(history.contains("\"destinationPort\":9090"), history)
    }
}
