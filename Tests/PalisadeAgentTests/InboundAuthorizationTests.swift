import CPalisadeShared
import Foundation
import PalisadeIdentity
import PalisadePolicy
@testable import PalisadeTunnel
import XCTest
@testable import PalisadeAgent

/// The tunnel's receiving side decides without root or packets: the
/// destination must be a workload of this node, and the caller's SVID must
/// come from the node it is registered on.
final class InboundAuthorizationTests: XCTestCase {
    let a = try! SpiffeID("spiffe://test.local/ns/default/sa/a")
    let b = try! SpiffeID("spiffe://test.local/ns/default/sa/b")

    func directory() -> MeshDirectory {
        var d = MeshDirectory()
        d.trustDomain = "test.local"
        d.localEndpoints = [IPAddress("10.102.1.2")!: NumericIdentity(300)]
        d.identityBySpiffeID = [a: NumericIdentity(301), b: NumericIdentity(300)]
        d.registeredNodeAddresses = [a: [IPAddress("10.200.0.1")!]]
        return d
    }

    func decide(_ peer: SpiffeID, to host: String = "10.102.1.2", from source: String?) -> String {
        switch Agent.authorizeInbound(InboundRequest(peer: peer, host: host, port: 8080, sourceAddress: source), directory: directory()) {
        case .deliver(let mark): return "deliver \(mark & PAL_MARK_IDENTITY)"
        case .deliverHTTP: return "deliver-http"
        case .refuse(let status, let reason): return "\(status) \(reason)"
        }
    }

    func testTheSendingNodeMustBeTheOneTheWorkloadIsRegisteredOn() {
        XCTAssertEqual(decide(a, from: "10.200.0.1"), "deliver 301")
        XCTAssertEqual(decide(a, from: "::ffff:10.200.0.1"), "deliver 301", "an IPv4-mapped source is the same node")
        XCTAssertEqual(decide(a, from: "10.200.0.2"),
                       "403 spiffe://test.local/ns/default/sa/a is not registered on the node this tunnel comes from (10.200.0.2)")
        XCTAssertEqual(decide(b, from: "10.200.0.1"), "403 spiffe://test.local/ns/default/sa/b is not registered on any node")
        let federated = try! SpiffeID("spiffe://other.test/ns/x/sa/y")
        XCTAssertEqual(decide(federated, from: "10.9.9.9"), "deliver \(NumericIdentity.unknown.rawValue)",
                       "another trust domain's unlisted workload: delivered as reserved:unknown, for policy to judge")
        XCTAssertEqual(decide(a, to: "10.102.9.9", from: "10.200.0.1"), "404 no such workload on this node")
    }
}
