import CPalisadeShared
import Foundation
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy
import XCTest

/// The tc programs run on crafted packets (BPF_PROG_TEST_RUN): every verdict
/// path of one new flow, fast and without namespaces or real traffic. The
/// packet arrives on the loopback device, enrolled as the pod's veth.
final class DatapathProgramTests: XCTestCase {
    static let pass: UInt32 = 0, drop: UInt32 = 2   // TC_ACT_OK, TC_ACT_SHOT

    /// Every kernel verdict reason has its name, in the kernel's order (the
    /// datapath refuses to load otherwise).
    func testReasonNamesCoverTheKernelsReasons() {
        XCTAssertTrue(Reason.coversKernelReasons)
        XCTAssertEqual(Reason.allCases.count, Int(PAL_REASON_MAX.rawValue))
        XCTAssertEqual(Set(Reason.allCases.map(\.description)).count, Reason.allCases.count, "names are distinct")
    }

    /// Ethernet + IPv4 (+ TCP unless `l4` is given).
    static func packet(from src: [UInt8], _ sport: UInt16, to dst: [UInt8], _ dport: UInt16, flags: UInt8 = 0x02,
                       fragmentOffset: UInt16 = 0, ihl: UInt8 = 5, l4: [UInt8]? = nil) -> [UInt8] {
        var tcp = [UInt8](repeating: 0, count: 20)
        tcp[0] = UInt8(sport >> 8); tcp[1] = UInt8(sport & 0xff); tcp[2] = UInt8(dport >> 8); tcp[3] = UInt8(dport & 0xff)
        tcp[12] = 5 << 4; tcp[13] = flags
        let payload = l4 ?? tcp
        var ip = [UInt8](repeating: 0, count: 20)
        ip[0] = 0x40 | ihl
        let total = 20 + payload.count
        ip[2] = UInt8(total >> 8); ip[3] = UInt8(total & 0xff)
        ip[6] = UInt8(fragmentOffset >> 8); ip[7] = UInt8(fragmentOffset & 0xff)
        ip[8] = 64; ip[9] = 6
        ip.replaceSubrange(12..<16, with: src); ip.replaceSubrange(16..<20, with: dst)
        let eth: [UInt8] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]
        return eth + ip + payload
    }

    func testVerdictsOnCraftedPackets() throws {
        try requireKernel()
        let pinRoot = "/sys/fs/bpf/palisade-test-progrun-\(getpid())"
        addTeardownBlock { Datapath.removeAll(pinRoot: pinRoot, podIfindexes: []) }
        let dp = try Datapath(pinRoot: pinRoot)

        // The pod (identity 300, 10.0.0.1) admits app=client on TCP 8080 and
        // may call nothing (egress isolated); 10.0.0.3 is denied outright.
        let pod = NumericIdentity(300), client = NumericIdentity(301), other = NumericIdentity(302)
        let universe = Universe(workloads: [
            pod: WorkloadIdentity(spiffeID: try SpiffeID("spiffe://t/pod"), labels: ["app": "pod"], addresses: [.v4(10, 0, 0, 1)]),
            client: WorkloadIdentity(spiffeID: try SpiffeID("spiffe://t/client"), labels: ["app": "client"], addresses: [.v4(10, 0, 0, 2)],
                                     remoteAddresses: [.v4(10, 0, 0, 2)], isLocal: false),
            other: WorkloadIdentity(spiffeID: try SpiffeID("spiffe://t/other"), labels: ["app": "other"], addresses: [.v4(10, 0, 0, 3)],
                                    remoteAddresses: [.v4(10, 0, 0, 3)], isLocal: false),
        ], hostAddresses: [])
        let set = try PolicySet.load([("p.yaml", """
        apiVersion: palisade.dev/v1
        kind: Policy
        metadata: {name: pod}
        spec:
          selector: {labels: {app: pod}}
          ingress:
            - from: [{labels: {app: client}}]
              ports: [{port: 8080}]
            - action: deny
              from: [{cidr: 10.0.0.3/32}]
          egress: []
        """)])
        let compiled = try PolicyCompiler.compile(set, universe: universe)
        XCTAssertEqual(compiled.entries.count, 2, "one class entry, one CIDR entry: \(compiled.entries)")
        _ = try dp.apply(compiled)
        var ep = pal_endpoint()
        ep.identity = pod.rawValue
        ep.endpoint_id = 1
        ep.flags = UInt32(PAL_EP_VERIFY_SOURCE)
        try dp.maps.endpointsByIfindex.update(1, ep)   // the loopback device carries the test packets

        let podIP: [UInt8] = [10, 0, 0, 1], clientIP: [UInt8] = [10, 0, 0, 2], otherIP: [UInt8] = [10, 0, 0, 3]
        var before = try dp.maps.counterTotals()
        func expect(_ program: String, _ packet: [UInt8], mark: UInt32 = 0, _ verdict: UInt32, _ direction: Direction, _ reason: Reason,
                    _ what: String, line: UInt = #line) throws {
            let prog = program == "to" ? dp.toPod : dp.fromPod
            XCTAssertEqual(try prog.testRun(packet: packet, mark: mark), verdict, what, line: line)
            let after = try dp.maps.counterTotals()
            let d = Int(direction.kernel), r = Int(reason.rawValue)
            XCTAssertEqual(after[d][r].packets, before[d][r].packets + 1, "\(what): counted as \(reason)", line: line)
            before = after
        }
        // to the pod = its ingress; from the pod = its egress.
        try expect("to", Self.packet(from: clientIP, 40000, to: podIP, 8080), Self.pass, .ingress, .allowPolicy, "allowed by the client's class")
        try expect("from", Self.packet(from: podIP, 8080, to: clientIP, 40000, flags: 0x12), Self.pass, .egress, .allowReply,
                   "the reply passes by conntrack although egress is isolated")
        try expect("to", Self.packet(from: clientIP, 40000, to: podIP, 8080, flags: 0x10), Self.pass, .ingress, .allowEstablished, "established")
        try expect("to", Self.packet(from: clientIP, 40001, to: podIP, 9090), Self.drop, .ingress, .denyDefault, "no rule for 9090")
        try expect("to", Self.packet(from: otherIP, 40000, to: podIP, 8080), Self.drop, .ingress, .denyPolicy, "explicit CIDR deny")
        try expect("from", Self.packet(from: podIP, 40002, to: clientIP, 22), Self.drop, .egress, .denyDefault, "egress isolated")
        try expect("from", Self.packet(from: [10, 0, 0, 9], 40003, to: clientIP, 8080), Self.drop, .egress, .denySpoofed,
                   "a source address that is not the pod's")
        try expect("to", Self.packet(from: clientIP, 40004, to: podIP, 8080, fragmentOffset: 100, l4: [UInt8](repeating: 0, count: 8)),
                   Self.drop, .ingress, .denyFragment, "a non-first fragment of an enforced endpoint")
        try expect("to", Self.packet(from: clientIP, 40005, to: podIP, 8080, ihl: 3), Self.drop, .ingress, .denyMalformed, "IHL below 5")
        try expect("to", Array(Self.packet(from: clientIP, 40006, to: podIP, 8080).prefix(14 + 20 + 8)), Self.drop, .ingress, .denyMalformed,
                   "a truncated TCP header")

        // Tunnelled: the agent's mark carries the authenticated identity; the
        // address is nobody's, the class comes from pal_peer_class.
        let world: [UInt8] = [192, 0, 2, 7]
        try expect("to", Self.packet(from: world, 40007, to: podIP, 8080), mark: PAL_MARK_MAGIC | client.rawValue,
                   Self.pass, .ingress, .allowPolicy, "tunnelled from the client's identity")
        try expect("to", Self.packet(from: world, 40008, to: podIP, 8080), mark: PAL_MARK_MAGIC | other.rawValue,
                   Self.drop, .ingress, .denyDefault, "tunnelled from an identity outside the class")
        try expect("to", Self.packet(from: world, 40009, to: podIP, 8080), Self.drop, .ingress, .denyDefault, "the same address unmarked")
    }
}
