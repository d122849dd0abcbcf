import Foundation
import XCTest

/// Two clouds with two nodes each, one etcd, each cloud its
/// own trust domain, federated through the store. Written once into etcd: a
/// global service with an endpoint in each cloud and a policy.
final class MultiCloudTests: XCTestCase {
    func testTwoCloudsFourNodesOneStore() throws {
        try requireKernel()
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd") else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail("etcd-server missing") }
            throw XCTSkip("etcd-server missing")
        }
        // Cloud A: n1 (client a), n2 (web endpoint w1). Cloud B: n3 (client x), n4 (web endpoint w2).
        let lab = try Lab(self, prefix: "pcloud1", meshPods: ["1:a", "2:w1", "3:x", "4:w2"])
        let etcdDir = NSTemporaryDirectory() + "palisade-cloud-etcd-\(getpid())"
        addTeardownBlock { try? FileManager.default.removeItem(atPath: etcdDir); try? FileManager.default.removeItem(atPath: etcdDir + ".log") }
        let port = Int.random(in: 30000...39000)
        let etcd = try MeshStoreTests.startEtcd(lab, dir: etcdDir, port: port)
        let url = "http://10.200.0.1:\(port)"
        func put(_ key: String, _ value: String) throws {
            let body = "{\"key\": \"\(Data(key.utf8).base64EncodedString())\", \"value\": \"\(Data(value.utf8).base64EncodedString())\"}"
            try sh(["nsenter", "--net=\(lab.nodeNetns(1))", "curl", "-sf", "-X", "POST", "\(url)/v3/kv/put", "-d", body])
        }
        try put("/palisade/services/web", #"{"name": "web", "vip": "10.96.0.20", "port": 8080, "selector": {"app": "web"}}"#)
        try put("/palisade/policies/web", policyYAML("web-from-a", """
          selector: {labels: {app: web}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
        """))

        let clouds = [1: ("cloud-a.test", "aws", "eu-west-1"), 2: ("cloud-a.test", "aws", "eu-west-1"),
                      3: ("cloud-b.test", "gcp", "europe-west4"), 4: ("cloud-b.test", "gcp", "europe-west4")]
        let pods = [1: ("a", "a"), 2: ("w1", "web"), 3: ("x", "x"), 4: ("w2", "web")]
        var agents: [Int: AgentHarness] = [:]
        for n in 1...4 {
            let (td, cloud, region) = clouds[n]!
            let (pod, app) = pods[n]!
            agents[n] = try AgentHarness(self, lab: lab, extraConfig: """
                trustDomain: \(td)
                nodeName: n\(n)
                locality: {cloud: \(cloud), region: \(region), zone: \(region)-\(n)}
                store: {etcd: ["\(url)"]}
                advertiseAddress: "10.200.0.\(n):15008"
                workloads:
                  - {name: \(pod), spiffeID: "spiffe://\(td)/ns/default/sa/\(app)", labels: {app: \(app)}, addresses: ["10.10\(n).1.2"], \
                interface: \(lab.prefix)\(pod), cgroup: "\(lab.podCgroup(pod))"}
                """, node: n)
            // The config file's trust domain line replaces the harness default.
            let path = agents[n]!.configPath
            let text = try String(contentsOfFile: path, encoding: .utf8).replacingOccurrences(of: "trustDomain: test.local\n", with: "")
            try text.write(toFile: path, atomically: true, encoding: .utf8)
        }
        // One CA per cloud: the second node of each cloud uses the first's.
        for (first, second) in [(1, 2), (3, 4)] {
            try agents[second]!.start(sharingCAOf: agents[first]!, firstEndpoints: 1, endpoints: 1)
        }
        let w1 = try lab.spawn(netns: lab.netns("w1"), [Paths.python, Paths.probe, "whoami", "0.0.0.0", "8080", "w1"])
        try lab.spawn(netns: lab.netns("w2"), [Paths.python, Paths.probe, "whoami", "0.0.0.0", "8080", "w2"])

        func ask(_ pod: String, _ addr: String) throws -> String {
            let command = ["nsenter", "--net=\(lab.netns(pod))", Paths.python, Paths.probe, "ask", addr, "8080", "2"].map { "'\($0)'" }.joined(separator: " ")
            return try sh(["sh", "-c", "echo $$ > '\(lab.podCgroup(pod))/cgroup.procs' && exec \(command)"], check: false).output
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        // Everything (peers, bundles, service, policy) arrives through etcd.
        var first = ""
        for _ in 0..<60 where first != "w1" {
            first = try ask("a", "10.96.0.20")
            if first != "w1" { usleep(250_000) }
        }
        XCTAssertEqual(first, "w1", "a (cloud A) reaches the service in its own cloud: \((1...4).map { agents[$0]!.warnings() })")
        // The policy written once holds in both clouds: x (cloud B) may not reach either endpoint.
        XCTAssertTrue(try ask("x", "10.102.1.2").hasPrefix("failed"), "x -> w1 denied in cloud A")
        XCTAssertTrue(try ask("x", "10.104.1.2").hasPrefix("failed"), "x -> w2 denied in cloud B")

        // Cloud A's endpoint fails: a's connections move to cloud B (the other
        // trust domain, verified with the bundle from the store), none fails.
        kill(w1.processIdentifier, SIGKILL)
        w1.waitUntilExit()
        var answers: [String] = []
        for _ in 0..<8 { answers.append(try ask("a", "10.96.0.20")) }
        XCTAssertEqual(answers, Array(repeating: "w2", count: 8), "failover across clouds: \(agents[1]!.warnings())")
        try lab.spawn(netns: lab.netns("w1"), [Paths.python, Paths.probe, "whoami", "0.0.0.0", "8080", "w1"])
        var back = false
        for _ in 0..<60 where !back {
            let r = try ask("a", "10.96.0.20")
            XCTAssertTrue(r == "w1" || r == "w2", "no failure while w1 recovers: \(r)")
            back = r == "w1"
            if !back { usleep(250_000) }
        }
        XCTAssertTrue(back, "and back to the local cloud once it recovers")

        // etcd gone: enforcement and routing stay as they were.
        kill(etcd.processIdentifier, SIGKILL)
        etcd.waitUntilExit()
        XCTAssertEqual(try ask("a", "10.96.0.20"), "w1")
        XCTAssertTrue(try ask("x", "10.102.1.2").hasPrefix("failed"))
        // An agent restarted while the store is down starts from the last
        // copy it saved (and its pinned maps), not from nothing.
        agents[2]!.stop(signal: SIGKILL)
        try agents[2]!.start()
        usleep(1_500_000)
        XCTAssertEqual(try ask("a", "10.102.1.2"), "w1", "a -> w1 directly after n2's agent restart")
    }
}
