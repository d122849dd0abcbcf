import XCTest
import PalisadeTestSupport
@testable import PalisadePolicy
import PalisadeIdentity

final class ParserTests: XCTestCase {
    func parse(_ yaml: String) throws -> [Policy] { try PolicyParser.parse(yaml, file: "p.yaml") }

    func expectError(_ yaml: String, line: Int, field: String, contains text: String, file: StaticString = #filePath, l: UInt = #line) {
        do {
            _ = try parse(yaml)
            XCTFail("expected an error", file: file, line: l)
        } catch let e as InputError {
            XCTAssertEqual(e.location.file, "p.yaml", file: file, line: l)
            XCTAssertEqual(e.location.line, line, "\(e)", file: file, line: l)
            XCTAssertEqual(e.field, field, "\(e)", file: file, line: l)
            XCTAssertTrue(e.message.contains(text), "\(e)", file: file, line: l)
        } catch {
            XCTFail("unexpected error \(error)", file: file, line: l)
        }
    }

    let header = "apiVersion: palisade.dev/v1\nkind: Policy\nmetadata:\n  name: p\nspec:\n"

    func testNamedPorts() throws {
        let ps = try parse(header + """
          selector: {labels: {app: web}}
          ingress:
            - ports: [{port: http}, {port: dns, protocol: UDP}, {port: 9090}]
        """)
        XCTAssertEqual(ps[0].ingress?[0].ports, [PortRule(proto: .tcp, name: "http"), PortRule(proto: .udp, name: "dns"), PortRule(proto: .tcp, first: 9090)])
        expectError(header + "  selector: {}\n  ingress:\n    - ports: [{port: Http_1}]\n", line: 8, field: "spec.ingress[0].ports[0].port",
                    contains: "expected a port 1-65535, a range 'LOW-HIGH' or a port name")
        expectError(header + "  selector: {}\n  ingress:\n    - ports: [{port: http, endPort: 90}]\n", line: 8, field: "spec.ingress[0].ports[0].endPort",
                    contains: "cannot be combined with a named port")
    }

    func testFullPolicy() throws {
        let ps = try parse(header + """
          mode: audit
          selector:
            spiffeIDPrefix: spiffe://td/ns/prod
            labels: {app: web}
          ingress:
            - from:
                - spiffeID: spiffe://td/ns/prod/sa/api
                - cidr: 10.0.0.0/8
                  except: [10.1.0.0/16]
                - entity: host
              ports:
                - port: 8080
                - port: 9000-9100
                  protocol: UDP
                - port: 100
                  endPort: 200
                - protocol: ICMP
            - action: deny
              from: [{labels: {app: evil}}]
          egress: []
        """)
        XCTAssertEqual(ps.count, 1)
        let p = ps[0]
        XCTAssertEqual(p.mode, .audit)
        XCTAssertEqual(p.selector.spiffeIDPrefix, try SpiffeID("spiffe://td/ns/prod"))
        XCTAssertEqual(p.ingress?.count, 2)
        XCTAssertEqual(p.egress, [])
        XCTAssertEqual(p.ingress?[0].ports, [PortRule(proto: .tcp, first: 8080), PortRule(proto: .udp, first: 9000, last: 9100),
                                             PortRule(proto: .tcp, first: 100, last: 200), PortRule(proto: .icmp)])
        XCTAssertEqual(p.ingress?[0].peers[1], .cidr(CIDR("10.0.0.0/8")!, except: [CIDR("10.1.0.0/16")!]))
        XCTAssertEqual(p.ingress?[1].action, .deny)
        XCTAssertEqual(p.ingress?[1].location.line, 23)
    }

    func testPreciseErrors() {
        expectError(header + "  selector: {}\n  ingress:\n    - ports:\n        - port: 70000\n", line: 9, field: "spec.ingress[0].ports[0].port", contains: "1-65535")
        expectError(header + "  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.1/8\n", line: 9, field: "spec.ingress[0].from[0].cidr", contains: "no host bits")
        expectError(header + "  selector: {}\n  ingres: []\n", line: 7, field: "spec.ingres", contains: "unknown field 'ingres'")
        expectError(header + "  selector:\n    spiffeID: http://x/y\n  ingress: []\n", line: 7, field: "spec.selector.spiffeID", contains: "spiffe://")
        expectError(header + "  selector: {}\n", line: 6, field: "spec", contains: "needs 'ingress', 'egress'")
        expectError(header + "  selector: {}\n  ingress:\n    - ports:\n        - port: 80\n          protocol: ICMP\n", line: 9, field: "spec.ingress[0].ports[0].port", contains: "TCP and UDP only")
        expectError(header + "  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.0/8\n          except: [11.0.0.0/16]\n", line: 10, field: "spec.ingress[0].from[0].except", contains: "not strictly inside")
        expectError(header + "  selector: {}\n  ingress:\n    - from:\n        - cidr: 10.0.0.0/8\n          entity: world\n", line: 9, field: "spec.ingress[0].from[0]", contains: "exactly one of")
        expectError(header + "  selector: {}\n  ingress:\n    - action: maybe\n", line: 8, field: "spec.ingress[0].action", contains: "'allow' or 'deny'")
        expectError("apiVersion: v2\nkind: Policy\n", line: 2, field: "kind", contains: "unsupported")
        expectError("a: [1, 2\n", line: 2, field: "", contains: "invalid YAML")
    }

    func testSetRejectsWholeSetAndDuplicates() {
        let good = header + "  selector: {}\n  ingress: []\n"
        XCTAssertThrowsError(try PolicySet.load([("a.yaml", good), ("b.yaml", good)])) { e in
            XCTAssertTrue("\(e)".contains("already defined at a.yaml:1"), "\(e)")
        }
        XCTAssertThrowsError(try PolicySet.load([("a.yaml", good), ("c.yaml", "kind: x")]))
        XCTAssertEqual(try PolicySet.load([("a.yaml", good + "---\n" + good.replacingOccurrences(of: "name: p", with: "name: q"))]).policies.count, 2)
    }

    func testSpiffeID() throws {
        XCTAssertEqual(try SpiffeID("spiffe://example.org/ns/a").path, "/ns/a")
        XCTAssertEqual(try SpiffeID("spiffe://example.org").path, "")
        for bad in ["spiffe://", "spiffe://Example.org/a", "spiffe://td/a//b", "spiffe://td/a/", "spiffe://td/./a", "spiffe://td/a?x", "http://td/a", "spiffe://td/a b"] {
            XCTAssertThrowsError(try SpiffeID(bad), bad)
        }
        let p = try SpiffeID("spiffe://td/ns/a")
        XCTAssertTrue(try SpiffeID("spiffe://td/ns/a/sa/x").isWithin(p))
        XCTAssertFalse(try SpiffeID("spiffe://td/ns/ab").isWithin(p))
        XCTAssertFalse(try SpiffeID("spiffe://other/ns/a").isWithin(p))
    }

    func testAddresses() {
        XCTAssertEqual(IPAddress("10.1.2.3")?.description, "10.1.2.3")
        XCTAssertEqual(IPAddress("fd00:99:1::2")?.description, "fd00:99:1::2")
        XCTAssertEqual(IPAddress("::1")?.description, "::1")
        XCTAssertNil(IPAddress("10.1.2"))
        XCTAssertNil(IPAddress("10.01.2.3"))
        XCTAssertNil(IPAddress("1:2:3:4:5:6:7:8:9"))
        XCTAssertTrue(CIDR("10.0.0.0/8")!.contains(IPAddress("10.255.0.1")!))
        XCTAssertFalse(CIDR("10.0.0.0/8")!.contains(IPAddress("11.0.0.1")!))
        XCTAssertFalse(CIDR("0.0.0.0/0")!.contains(IPAddress("fd00::1")!))
        XCTAssertTrue(CIDR("::/0")!.contains(IPAddress("10.0.0.1")!))
    }

    func testPortRangeBlocksCoverExactly() {
        var rng = SplitMix64(seed: 7)
        for _ in 0..<500 {
            let a = UInt16.random(in: 1...65535, using: &rng)
            let b = UInt16.random(in: a...65535, using: &rng)
            let blocks = PolicyCompiler.rangeToPrefixes(a, b)
            var covered = 0
            var next = UInt32(a)
            for (v, bits) in blocks {
                XCTAssertEqual(UInt32(v), next)
                let size = UInt32(1) << (16 - bits)
                XCTAssertEqual(UInt32(v) % size, 0)
                next += size
                covered += Int(size)
            }
            XCTAssertEqual(covered, Int(b) - Int(a) + 1)
            XCTAssertLessThanOrEqual(blocks.count, 30)
        }
    }
}
