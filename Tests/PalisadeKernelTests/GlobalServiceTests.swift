import Foundation
import XCTest

/// A global service (virtual IP) with endpoints on both nodes.
/// The caller's agent prefers the endpoint on its own node, fails over to
/// the other node when that one stops answering (no failed connection),
/// and comes back once it recovers.
final class GlobalServiceTests: XCTestCase {
    func testNearestEndpointFailoverAndBack() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pgsvc1", meshPods: ["1:a", "2:b", "1:c"])
        let web = "spiffe://test.local/ns/default/sa/web"
        func pod(_ name: String, node: Int, index: Int, id: String, app: String) -> String {
            """
              - {name: \(name), spiffeID: "\(id)", labels: {app: \(app)}, addresses: ["10.10\(node).\(index).2"], \
            interface: \(lab.prefix)\(name), cgroup: "\(lab.podCgroup(name))"}
            """
        }
        let service = "services:\n  - {name: web, vip: 10.96.0.10, port: 8080, selector: {app: web}}"
        let n1 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n1
            locality: {cloud: aws, region: eu-west-1, zone: eu-west-1a}
            \(service)
            workloads:
            \(pod("a", node: 1, index: 1, id: "spiffe://test.local/ns/default/sa/a", app: "a"))
            \(pod("c", node: 1, index: 2, id: web, app: "web"))
            nodes:
              - {name: n2, tunnelAddress: "10.200.0.2:15008", locality: {cloud: gcp, region: europe-west1, zone: europe-west1-b}}
            remoteWorkloads:
              - {name: b, spiffeID: "\(web)", labels: {app: web}, addresses: ["10.102.1.2"], node: n2}
            """, node: 1)
        let n2 = try AgentHarness(self, lab: lab, extraConfig: """
            nodeName: n2
            workloads:
            \(pod("b", node: 2, index: 1, id: web, app: "web"))
            nodes:
              - {name: n1, tunnelAddress: "10.200.0.1:15008"}
            remoteWorkloads:
              - {name: a, spiffeID: "spiffe://test.local/ns/default/sa/a", labels: {app: a}, addresses: ["10.101.1.2"], node: n1}
            """, node: 2)
        try n2.start(sharingCAOf: n1, firstEndpoints: 2, endpoints: 1)
        let cServer = try lab.spawn(netns: lab.netns("c"), [Paths.python, Paths.probe, "whoami", "0.0.0.0", "8080", "c"])
        try lab.spawn(netns: lab.netns("b"), [Paths.python, Paths.probe, "whoami", "0.0.0.0", "8080", "b"])
        usleep(500_000)

        func ask() throws -> String {
            let command = ["nsenter", "--net=\(lab.netns("a"))", Paths.python, Paths.probe, "ask", "10.96.0.10", "8080", "2"].map { "'\($0)'" }.joined(separator: " ")
            return try sh(["sh", "-c", "echo $$ > '\(lab.podCgroup("a"))/cgroup.procs' && exec \(command)"], check: false).output
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        XCTAssertEqual(try ask(), "c", "the endpoint on the caller's own node first: \(n1.warnings())")
        XCTAssertEqual(try ask(), "c")

        // The local endpoint goes away: the next connections land in the other cloud, none fails.
        kill(cServer.processIdentifier, SIGKILL)
        cServer.waitUntilExit()
        var answers: [String] = []
        for _ in 0..<10 { answers.append(try ask()) }
        XCTAssertEqual(answers, Array(repeating: "b", count: 10), "failover to node 2 with no failed connection")

        // It comes back: after its ejection expires, traffic returns to it.
        try lab.spawn(netns: lab.netns("c"), [Paths.python, Paths.probe, "whoami", "0.0.0.0", "8080", "c"])
        var back = false
        for _ in 0..<60 where !back {
            let a = try ask()
            XCTAssertTrue(a == "b" || a == "c", "no failure while c recovers: \(a)")
            back = a == "c"
            if !back { usleep(250_000) }
        }
        XCTAssertTrue(back, "traffic returned to the recovered local endpoint")
    }
}
