import Foundation
import XCTest

/// Many connections held through the tunnel between two lab nodes.
extension MeshTests {
    /// 10,000 concurrent connections from a (node 1) to b (node 2), held a
    /// minute with a byte echoed on each every 5 s (tools/testing/holdmany.py):
    /// none fails, neither agent comes near its file-descriptor limit, and
    /// each agent's memory per 1,000 connections is reported and bounded.
    func testTenThousandConnectionsHeldForAMinute() throws {
        let connections = 10_000, seconds = 60
        let m = try setUpMesh("pmesh10")
        try m.n2.writePolicy("hold", policyYAML("b-hold", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 7000}]
        """))
        let hold = "\(Paths.repo)/tools/testing/holdmany.py"
        try m.lab.spawn(netns: m.lab.netns("b"), [Paths.python, hold, "serve", "7000"])
        usleep(1_500_000)
        XCTAssertTrue(try reach(m, from: "a", "10.102.1.2", 7000), m.n2.warnings())
        let pids = try agentPIDs(m)
        let idle = pids.map(rss)

        let out = "\(m.n1.dir)/hold.out"
        let command = ["nsenter", "--net=\(m.lab.netns("a"))", Paths.python, hold, "hold", "10.102.1.2", "7000", "\(connections)", "\(seconds)"]
            .map { "'\($0)'" }.joined(separator: " ")
        let client = try m.lab.spawn(netns: m.lab.nodeNetns(1),
                                     ["sh", "-c", "echo $$ > '\(m.lab.podCgroup("a"))/cgroup.procs' && exec \(command) > '\(out)' 2> '\(out).rounds'"])
        // Sampled in the middle of the hold, when every connection is open.
        Thread.sleep(forTimeInterval: Double(seconds) / 2 + 10)
        let held = pids.map(rss)
        let files = pids.map(fileDescriptors)
        client.waitUntilExit()

        let words = ((try? String(contentsOfFile: out, encoding: .utf8)) ?? "").split(separator: " ").map(String.init)
        func figure(_ name: String) -> Int? { words.firstIndex(of: name).flatMap { Int(words[$0 + 1].trimmingCharacters(in: .whitespacesAndNewlines)) } }
        XCTAssertEqual(figure("opened"), connections, words.joined(separator: " "))
        XCTAssertEqual(figure("failed"), 0, ((try? String(contentsOfFile: "\(out).rounds", encoding: .utf8)) ?? "") + m.n1.warnings() + m.n2.warnings())
        XCTAssertEqual(figure("held"), connections)
        print((try? String(contentsOfFile: "\(out).rounds", encoding: .utf8)) ?? "")
        let perThousand = zip(held, idle).map { Double($0 - $1) / Double(1 << 20) / Double(connections) * 1000 }
        print(String(format: "%d connections held %d s: agent RSS idle %@ MiB, held %@ MiB, %.1f / %.1f MiB per 1,000 (n1 / n2, debug build); fds %@",
                     connections, seconds, "\(idle.map { $0 >> 20 })", "\(held.map { $0 >> 20 })", perThousand[0], perThousand[1],
                     "\(files.map { "\($0.open) of \($0.limit)" })"))
        for (node, f) in zip(["n1", "n2"], files) {
            XCTAssertGreaterThan(f.open, connections / 2, "\(node) holds the connections")
            // The agent raised its limit to the hard limit (20,000 on these machines).
            XCTAssertLessThan(f.open + 2_000, f.limit, "\(node) is not near its file-descriptor limit")
        }
        // Per connection the agents hold a socket, a tunnel stream and small
        // buffers: tens of KiB. A leak or unbounded buffer would show here.
        for (node, p) in zip(["n1", "n2"], perThousand) { XCTAssertLessThan(p, 48, "\(node)'s memory per 1,000 connections") }
    }
}
