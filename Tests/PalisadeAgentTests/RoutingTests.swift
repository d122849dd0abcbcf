import CPalisadeShared
import Foundation
import PalisadeIdentity
import PalisadeL7
import PalisadePolicy
@testable import PalisadeTunnel
import XCTest
@testable import PalisadeAgent

/// Where the sending side takes a redirected connection, decided without
/// root or packets from the kernel's record and the directory: a remote
/// workload's node, a global service's nearest healthy endpoint, or this
/// node's HTTP proxy; and passive health of endpoints.
final class RoutingTests: XCTestCase {
    let a = try! SpiffeID("spiffe://test.local/ns/default/sa/a")
    let b = try! SpiffeID("spiffe://test.local/ns/default/sa/b")
    let n2 = TunnelPeer(host: "10.200.0.2", port: 15008, trustDomain: "test.local")
    let n3 = TunnelPeer(host: "10.200.0.3", port: 15008, trustDomain: "test.local")
    let client = IPAddress("10.101.1.2")!

    /// a (identity 301) on this node; b (300) at 10.102.1.2 on node 2, also
    /// on this node at 10.101.2.2 with HTTP rules on port 8081; a service
    /// 10.96.0.20:8080 with endpoints here, in the zone (n2) and further (n3).
    func directory() throws -> MeshDirectory {
        var d = MeshDirectory()
        d.trustDomain = "test.local"
        d.identityBySpiffeID = [a: NumericIdentity(301), b: NumericIdentity(300)]
        d.spiffeIDByIdentity = [301: a, 300: b]
        d.credentials = [a: ClientCredentials(spiffeID: a, serial: "1", chainPEM: [], keyPEM: [])]
        d.remoteEndpoints = [IPAddress("10.102.1.2")!: n2, IPAddress("fd00:102:1::2")!: n2]
        d.localEndpoints = [IPAddress("10.101.2.2")!: NumericIdentity(300)]
        d.localWorkloads = [IPAddress("10.101.2.2")!: (labels: ["app": "b"], namespace: "default")]
        d.services = [IPAddress("10.96.0.20")!: ServiceRoute(name: "web", port: 8080, endpoints: [
            .init(peer: n3, address: IPAddress("10.103.1.2")!, distance: 3),
            .init(peer: nil, address: IPAddress("10.101.2.2")!, distance: 0),
            .init(peer: n2, address: IPAddress("10.102.1.2")!, distance: 1),
        ])]
        d.http = try HTTPRuleSet.load([("b.yaml", """
            apiVersion: palisade.dev/v1
            kind: HTTPPolicy
            metadata: {name: b-http}
            spec:
              selector: {labels: {app: b}}
              port: 8081
              appProtocol: h2c
              rules:
                - from: [{spiffeID: "spiffe://test.local/ns/default/sa/a"}]
                  methods: [GET]
                  paths: ["/public/**"]
            """)])
        return d
    }

    func origin(_ address: String, port: UInt16, identity: UInt32 = 301) -> pal_redirect_origin {
        var o = pal_redirect_origin()
        let ip = IPAddress(address)!
        withUnsafeMutableBytes(of: &o.addr) { $0.copyBytes(from: ip.bytes) }
        o.port = port.bigEndian
        o.family = ip.isV4 ? 4 : 6
        o.identity = identity
        return o
    }

    func route(_ address: String, port: UInt16 = 8080, identity: UInt32 = 301, outliers: OutlierDetector = OutlierDetector()) throws -> OutboundRoute? {
        Agent.route(origin: origin(address, port: port, identity: identity), client: client, directory: try directory(), outliers: outliers)
    }

    func testARemoteWorkloadGoesToItsNodeWithTheCallersSVID() throws {
        let r = try XCTUnwrap(route("10.102.1.2"))
        XCTAssertEqual(r.candidates.map(\.key), ["10.200.0.2:15008/10.102.1.2:8080"])
        XCTAssertEqual(r.credentials.spiffeID, a)
        XCTAssertEqual(r.mark & PAL_MARK_IDENTITY, 0, "no mark: the peer's node marks what it delivers")
        XCTAssertEqual(r.caller, "10.101.1.2", "the caller's address travels (forwarded: for=)")
        XCTAssertNil(r.http)
        XCTAssertEqual(try XCTUnwrap(route("fd00:102:1::2")).candidates.first?.authority, "[fd00:102:1::2]:8080")
    }

    func testNothingRoutesWithoutTheCallersIdentityAndSVID() throws {
        XCTAssertNil(try route("10.102.1.2", identity: 999), "an identity the directory does not know")
        XCTAssertNil(try route("10.102.1.2", identity: 300), "b has no SVID on this node")
        XCTAssertNil(try route("10.109.9.9"), "an address no node serves")
    }

    func testAServiceGoesNearestFirstAndEjectedEndpointsLast() throws {
        let outliers = OutlierDetector()
        let r = try XCTUnwrap(route("10.96.0.20", outliers: outliers))
        XCTAssertEqual(r.candidates.map(\.key), ["local/10.101.2.2:8080", "10.200.0.2:15008/10.102.1.2:8080", "10.200.0.3:15008/10.103.1.2:8080"])
        XCTAssertEqual(r.mark & PAL_MARK_IDENTITY, 301, "a local endpoint is reached marked with the caller's identity")
        outliers.failed("local/10.101.2.2:8080")
        let ejected = try XCTUnwrap(route("10.96.0.20", outliers: outliers))
        XCTAssertEqual(ejected.candidates.map(\.key).last, "local/10.101.2.2:8080", "still tried, after the healthy ones")
        XCTAssertNil(try route("10.96.0.20", port: 9090), "another port of the service's address")
    }

    func testALocalPortWithHTTPRulesGoesThroughTheProxyHere() throws {
        let r = try XCTUnwrap(route("10.101.2.2", port: 8081))
        let http = try XCTUnwrap(r.http)
        XCTAssertEqual(r.candidates.map(\.key), ["local/10.101.2.2:8081"])
        XCTAssertEqual(http.destination, b.description)
        XCTAssertEqual(http.appProtocol, .http2, "appProtocol: h2c")
        XCTAssertNil(http.verifyBearer, "no JWT rule: no token is checked")
        XCTAssertTrue(http.gate("GET", "/public/a.txt", "b", [:], nil).allowed)
        let denied = http.gate("POST", "/public/a.txt", "b", [:], nil)
        XCTAssertFalse(denied.allowed)
        XCTAssertTrue(denied.reason.contains("no rule allows"), denied.reason)
        XCTAssertNil(try route("10.101.2.2", port: 8080), "a local port without HTTP rules is not redirected here")
    }

    func testAnEndpointThatFailsIsEjectedLongerEachTimeAndBackOnSuccess() {
        let o = OutlierDetector(baseEjection: 2)
        let t0 = Date(timeIntervalSince1970: 1_000_000)
        o.failed("e", now: t0)
        XCTAssertTrue(o.isEjected("e", now: t0.addingTimeInterval(1.9)))
        XCTAssertFalse(o.isEjected("e", now: t0.addingTimeInterval(2.1)))
        o.failed("e", now: t0)
        XCTAssertTrue(o.isEjected("e", now: t0.addingTimeInterval(3.9)), "second failure: 4 s")
        for _ in 0..<10 { o.failed("e", now: t0) }
        XCTAssertTrue(o.isEjected("e", now: t0.addingTimeInterval(29.9)))
        XCTAssertFalse(o.isEjected("e", now: t0.addingTimeInterval(30.1)), "never longer than 30 s")
        o.succeeded("e")
        XCTAssertFalse(o.isEjected("e", now: t0))
        XCTAssertFalse(o.isEjected("other", now: t0))
    }
}
