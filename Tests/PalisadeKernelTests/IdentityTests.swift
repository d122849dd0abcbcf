import Foundation
import XCTest

/// The running agent's mTLS listener, reached with a stock TLS client
/// (openssl s_client): an enrolled workload's SVID is accepted and named;
/// a certificate that is not an SVID is refused in the handshake.
final class IdentityTests: XCTestCase {
    func handshake(_ agent: AgentHarness, cert: String, key: String) throws -> String {
        try sh(["sh", "-c", "sleep 1 | timeout 5 nsenter --net=\(agent.lab.node) openssl s_client -connect 127.0.0.1:15008 -tls1_3 -quiet " +
                "-cert '\(cert)' -key '\(key)' -CAfile '\(agent.dir)/ca/ca.pem' 2>&1"], check: false).output
    }

    func testAgentListenerAcceptsSVIDsAndRefusesOthers() throws {
        try requireKernel()
        let lab = try Lab(self, prefix: "pi1", pods: ["a"])
        let agent = try AgentHarness(self, lab: lab)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.start()
        try agent.waitApplied(endpoints: 1)
        let deadline = Date().addingTimeInterval(10)
        var listed: [[String: String]] = []
        repeat {
            usleep(200_000)
            let out = try agent.palisade(["certs", "list", "--output", "json"]).output
            listed = (try? JSONDecoder().decode([[String: String]].self, from: Data(out.utf8).replacingDates())) ?? []
        } while listed.count < 2 && Date() < deadline
        guard let svid = listed.first(where: { $0["spiffeID"] == "spiffe://test.local/ns/default/sa/a" }) else {
            return XCTFail("no SVID for workload a: \(listed)")
        }
        usleep(300_000)
        let ok = try handshake(agent, cert: svid["certificateFile"]!, key: svid["keyFile"]!)
        XCTAssertTrue(ok.contains("spiffe://test.local/ns/default/sa/a"), ok)
        // The CA certificate is not an SVID (CA:TRUE, no path), whatever key goes with it.
        let refused = try handshake(agent, cert: "\(agent.dir)/ca/ca.pem", key: "\(agent.dir)/ca/ca.key")
        XCTAssertFalse(refused.contains("spiffe://test.local/ns"), refused)
        let metrics = try sh(["nsenter", "--net=\(lab.node)", "curl", "-sf", "http://127.0.0.1:9654/metrics"]).output
        XCTAssertTrue(metrics.contains("palisade_tls_handshakes_total{result=\"refused\"} 1"), "s_client said: \(refused)")
        XCTAssertTrue(metrics.contains("palisade_tls_handshakes_total{result=\"accepted\"} 1"), metrics)
    }
}
