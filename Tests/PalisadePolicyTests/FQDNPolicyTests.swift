import XCTest
import CPalisadeShared
@testable import PalisadePolicy
import PalisadeIdentity

final class FQDNPolicyTests: XCTestCase {
    let header = "apiVersion: palisade.dev/v1\nkind: Policy\nmetadata:\n  name: p\nspec:\n"

    func testPatterns() {
        let star = FQDNSelector.pattern("*.example.com")
        XCTAssertTrue(star.matches("a.example.com"))
        XCTAssertTrue(star.matches("a.b.example.com"))
        XCTAssertTrue(star.matches("A.Example.COM."))
        XCTAssertFalse(star.matches("example.com"))
        XCTAssertFalse(star.matches("aexample.com"))
        XCTAssertFalse(star.matches("a.example.com.evil.org"))
        let inLabel = FQDNSelector.pattern("api-*.example.com")
        XCTAssertTrue(inLabel.matches("api-eu.example.com"))
        XCTAssertTrue(inLabel.matches("api-.example.com"))
        XCTAssertFalse(inLabel.matches("api.example.com"))
        XCTAssertFalse(inLabel.matches("x.api-eu.example.com"))
        XCTAssertTrue(FQDNSelector.pattern("*").matches("anything.at.all"))
        XCTAssertTrue(FQDNSelector.name("api.example.com").matches("API.example.com."))
        XCTAssertFalse(FQDNSelector.name("api.example.com").matches("x.api.example.com"))
        XCTAssertTrue(FQDNSelector.pattern("a*c.b*.io").matches("abbc.b.io"))
    }

    func testParsingAndErrors() throws {
        let ps = try PolicyParser.parse(header + """
          selector: {labels: {app: web}}
          egress:
            - toFQDNs: [{matchName: API.Example.com.}, {matchPattern: "*.s3.amazonaws.com"}]
              ports: [{port: 443}]
            - to: [{cidr: 10.0.0.53/32}]
              ports: [{port: 53, protocol: UDP}]
              dns: [{matchPattern: "*"}]
        """, file: "p.yaml")
        XCTAssertEqual(ps[0].egress?[0].peers, [.fqdn(.name("api.example.com")), .fqdn(.pattern("*.s3.amazonaws.com"))])
        XCTAssertEqual(ps[0].egress?[1].dns, [.pattern("*")])
        // Written back, read again: the same policy.
        let again = try PolicyParser.parse(PolicyWriter.yaml(ps), file: "w.yaml")
        XCTAssertEqual(again[0].egress?.map { $0.peers }, ps[0].egress?.map { $0.peers })
        XCTAssertEqual(again[0].egress?.map { $0.dns }, ps[0].egress?.map { $0.dns })

        func expectError(_ rules: String, line: Int, field: String, contains text: String, l: UInt = #line) {
            do {
                _ = try PolicyParser.parse(header + "  selector: {}\n  egress:\n" + rules, file: "p.yaml")
                XCTFail("expected an error", line: l)
            } catch let e as InputError {
                XCTAssertEqual(e.location.line, line, "\(e)", line: l)
                XCTAssertEqual(e.field, field, "\(e)", line: l)
                XCTAssertTrue(e.message.contains(text), "\(e)", line: l)
            } catch { XCTFail("\(error)", line: l) }
        }
        expectError("    - toFQDNs: [{matchName: 'api..example.com'}]\n", line: 8, field: "spec.egress[0].toFQDNs[0].matchName", contains: "an empty label")
        expectError("    - toFQDNs: [{matchName: '*.example.com'}]\n", line: 8, field: "spec.egress[0].toFQDNs[0].matchName", contains: "a wildcard needs matchPattern")
        expectError("    - toFQDNs: [{matchPattern: 'a.*.example.com'}]\n", line: 8, field: "spec.egress[0].toFQDNs[0].matchPattern", contains: "only allowed first")
        expectError("    - toFQDNs: [{matchPattern: 'exa mple.com'}]\n", line: 8, field: "spec.egress[0].toFQDNs[0].matchPattern", contains: "character ' '")
        expectError("    - toFQDNs: [{matchName: a.com, matchPattern: '*.a.com'}]\n", line: 8, field: "spec.egress[0].toFQDNs[0]", contains: "exactly one of")
        expectError("    - toFQDNs: []\n", line: 8, field: "spec.egress[0].toFQDNs", contains: "at least one")
        expectError("    - toFQDNs: [{matchName: '\(String(repeating: "a", count: 64)).com'}]\n", line: 8, field: "spec.egress[0].toFQDNs[0].matchName", contains: "longer than 63")
        do {
            _ = try PolicyParser.parse(header + "  selector: {}\n  ingress:\n    - toFQDNs: [{matchName: a.com}]\n", file: "p.yaml")
            XCTFail("toFQDNs is egress only")
        } catch let e as InputError { XCTAssertTrue(e.message.contains("toFQDNs"), "\(e)") }
    }

    /// Learned addresses get the class of the selectors their names match;
    /// a shared address the union; the compiled maps agree with the reference.
    func testLearnedAddressesCompileToClasses() throws {
        let ps = try PolicyParser.parse(header + """
          selector: {labels: {app: web}}
          egress:
            - toFQDNs: [{matchName: api.example.com}]
              ports: [{port: 443}]
            - toFQDNs: [{matchPattern: "*.cdn.net"}]
              ports: [{port: 80}]
        """, file: "p.yaml")
        let web = NumericIdentity(256)
        let a = IPAddress("203.0.113.10")!, b = IPAddress("203.0.113.20")!, shared = IPAddress("203.0.113.30")!, other = IPAddress("203.0.113.40")!
        let universe = Universe(workloads: [web: WorkloadIdentity(spiffeID: try SpiffeID("spiffe://td/web"), labels: ["app": "web"], addresses: [.v4(10, 0, 0, 2)])],
                                hostAddresses: [], learned: [a: ["api.example.com"], b: ["img.cdn.net"], shared: ["api.example.com", "x.cdn.net"], other: ["evil.org"]])
        let compiled = try PolicyCompiler.compile(PolicySet(policies: ps), universe: universe)
        XCTAssertEqual(compiled.fqdnClasses.count, 3)   // two selectors, one shared set
        let lookup = CompiledLookup(compiled)
        let reference = ReferenceEvaluator(set: PolicySet(policies: ps), universe: universe)
        for addr in [a, b, shared, other] {
            for port: UInt16 in [80, 443] {
                let f = Flow(local: web, direction: .egress, peerAddress: addr, proto: 6, port: port)
                XCTAssertEqual(lookup.evaluate(f).verdict, reference.evaluate(f).verdict, "\(f)")
            }
        }
        XCTAssertEqual(lookup.evaluate(Flow(local: web, direction: .egress, peerAddress: shared, proto: 6, port: 80)).verdict, .allow)
        XCTAssertEqual(lookup.evaluate(Flow(local: web, direction: .egress, peerAddress: shared, proto: 6, port: 443)).verdict, .allow)
        XCTAssertEqual(lookup.evaluate(Flow(local: web, direction: .egress, peerAddress: a, proto: 6, port: 80)).verdict, .deny)
        XCTAssertEqual(lookup.evaluate(Flow(local: web, direction: .egress, peerAddress: other, proto: 6, port: 443)).verdict, .deny)
        // A new address of a known set: one ipcache entry; of a new set: a new generation.
        let fresh = IPAddress("198.51.100.1")!
        let entry = try XCTUnwrap(lookup.learnedEntry(fresh, names: ["api.example.com"]) ?? nil)
        XCTAssertEqual(entry.cidr, CIDR(address: fresh, mappedPrefixLength: 128))
        XCTAssertEqual(entry.fqdnClass, compiled.fqdnClasses[[.name("api.example.com")]])
        XCTAssertNil(try XCTUnwrap(lookup.learnedEntry(fresh, names: ["unrelated.org"])))
        let noClassYet: IPCacheEntry?? = lookup.learnedEntry(fresh, names: ["api.example.com", "a.cdn.net"])
        XCTAssertTrue(noClassYet != nil)   // {api, *.cdn.net} has a class already (the shared address)
        let defaults = compiled.defaults.first { $0.local == web && $0.direction == .egress }
        XCTAssertEqual((defaults?.lookups ?? 0) & UInt8(PAL_LOOKUP_FQDN), UInt8(PAL_LOOKUP_FQDN))
    }
}
