import Foundation
import XCTest
@testable import PalisadeAgent
import PalisadePolicy

final class ConfigTests: XCTestCase {
    func write(_ text: String) throws -> String {
        let path = NSTemporaryDirectory() + "palisade-config-\(UUID().uuidString).yaml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    func testEmbeddedDefault() throws {
        let c = try AgentConfig.load(path: nil)
        XCTAssertEqual(c.stateDir, "/var/lib/palisade")
        XCTAssertEqual(c.bpffs, "/sys/fs/bpf/palisade")
        XCTAssertEqual(c.resolvedPolicyDir, "/var/lib/palisade/policies")
        XCTAssertEqual(c.trustDomain, "palisade.local")
    }

    func testWorkloadsInConfig() throws {
        let path = try write("""
        trustDomain: example.org
        workloads:
          - name: web
            spiffeID: spiffe://example.org/ns/prod/sa/web
            labels: {app: web}
            interface: veth-web
            addresses: [10.0.0.2, "fd00::2"]
          - name: batch
            spiffeID: spiffe://example.org/batch
            cgroup: palisade/batch
            ports: ["http=8080", {name: dns, port: 53, protocol: UDP}]
        """)
        let c = try AgentConfig.load(path: path)
        XCTAssertEqual(c.workloads.map(\.name), ["web", "batch"])
        XCTAssertEqual(c.workloads[1].ports, [NamedPort(name: "http", port: 8080), NamedPort(name: "dns", port: 53, proto: .udp)])
        // The workload file written back reads the same.
        let again = try Workload.parse(c.workloads[1].yaml(), file: "w.yaml", trustDomain: "example.org")
        XCTAssertEqual(again[0].ports, c.workloads[1].ports)
        XCTAssertEqual(c.workloads[0].addresses.map(\.description), ["10.0.0.2", "fd00::2"])
        XCTAssertEqual(c.workloads[1].attachment, .cgroup(path: "palisade/batch"))
    }

    func assertError(_ yaml: String, contains text: String, line: Int, file: StaticString = #filePath, l: UInt = #line) throws {
        let path = try write(yaml)
        XCTAssertThrowsError(try AgentConfig.load(path: path), file: file, line: l) { e in
            let d = "\(e)"
            XCTAssertTrue(d.contains("\(path):\(line):") && d.contains(text), d, file: file, line: l)
        }
    }

    func testPreciseErrors() throws {
        try assertError("stateDir: relative/path\n", contains: "stateDir: expected an absolute path", line: 1)
        try assertError("trustDomain: Example.org\n", contains: "expected a trust domain", line: 1)
        try assertError("bpfs: /x\n", contains: "unknown field 'bpfs'", line: 1)
        try assertError("eventsPerSecond: -1\n", contains: "expected an integer 0-1000000", line: 1)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://other.org/w\n    cgroup: x\n", contains: "not in this node's trust domain", line: 3)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://palisade.local/w\n    interface: v0\n", contains: "needs 'addresses'", line: 2)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://palisade.local/w\n    addresses: [10.0.0.1]\n", contains: "a workload needs 'interface'", line: 2)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://palisade.local/w\n    cgroup: c\n    mtls: sometimes\n", contains: "expected one of strict, permissive, disabled", line: 5)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://palisade.local/w\n    cgroup: c\n    ports: [http=80000]\n", contains: "expected NAME=PORT", line: 5)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://palisade.local/w\n    cgroup: c\n    ports: [http=80, http=81]\n", contains: "port name 'http' (TCP) is declared twice", line: 5)
        try assertError("workloads:\n  - name: w\n    spiffeID: spiffe://palisade.local/w\n    cgroup: c\n    ports: [{name: Web, port: 80}]\n", contains: "expected a port name", line: 5)
    }

    func testMeshErrorsAndPodCgroups() throws {
        try assertError("nodes:\n  - {name: n2, tunnelAddress: \"off\"}\n", contains: "tunnelAddress cannot be 'off'", line: 2)
        try assertError("nodes:\n  - {name: n2, tunnelAddress: \"10.0.0.2:15008\", spiffeID: \"spiffe://palisade.local/ns/x\"}\n",
                        contains: "expected a node identity", line: 2)
        try assertError("nodes:\n  - {name: n2, tunnelAddress: \"10.0.0.2:15008\"}\nremoteWorkloads:\n  - {name: b, spiffeID: \"spiffe://palisade.local/b\", addresses: [10.1.0.2], node: n3}\n",
                        contains: "node 'n3' is not in 'nodes'", line: 4)
        let ok = try write("""
            nodeName: n1
            outboundPort: 15001
            workloads:
              - {name: a, spiffeID: "spiffe://palisade.local/a", addresses: [10.1.0.2], interface: v0, cgroup: pods/a, mtls: strict}
            nodes:
              - {name: n2, tunnelAddress: "10.0.0.2:15008", trustDomain: other.org}
            remoteWorkloads:
              - {name: b, spiffeID: "spiffe://other.org/b", addresses: [10.2.0.2], node: n2}
            """)
        let c = try AgentConfig.load(path: ok)
        XCTAssertEqual(c.workloads.first?.podCgroup, "pods/a")
        XCTAssertEqual(c.workloads.first?.mtls, .strict)
        XCTAssertEqual(c.nodes.first?.trustDomain, "other.org")
        XCTAssertEqual(c.remoteWorkloads.first?.node, "n2")
        XCTAssertEqual(c.nodeSpiffeID.description, "spiffe://palisade.local/palisade/node/n1")
    }
}

extension ConfigTests {
    func testJWTIssuersAreCheckedAtLoad() throws {
        try assertError("jwtIssuers:\n  - issuer: https://idp\n    jwks: /nonexistent.json\n    audience: a\n", contains: "is not a readable JWKS", line: 3)
        try assertError("jwtIssuers:\n  - issuer: https://idp\n", contains: "needs 'issuer', 'jwks'", line: 2)
    }
}
